"""RepVGG (arXiv 2101.03697) as a Hugging Face custom-code image classifier, in plain PyTorch.

Training-time block: ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN_id(x)), the identity branch only when the block keeps
its width and has stride 1. `reparameterize()` fuses every block into one 3x3 convolution with bias (structural
re-parameterisation); the model then holds only nn.Conv2d (3x3, bias), nn.ReLU and the nn.Linear head. Module and
parameter names follow the official code (rbr_dense.conv / .bn, rbr_1x1, rbr_identity, rbr_reparam), so hfq's
BatchNorm folding pairs each branch's BN with its convolution (nn.Sequential neighbours)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutput

from .configuration_repvgg import RepVGGConfig


def _conv_bn(cin, cout, kernel_size, stride, groups):
    branch = nn.Sequential()
    branch.add_module("conv", nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2,
                                        groups=groups, bias=False))
    branch.add_module("bn", nn.BatchNorm2d(cout))
    return branch


def identity_kernel(channels, groups=1, dtype=torch.float32, device=None):
    """The 3x3 kernel of the identity map for a (grouped) convolution with `channels` inputs and outputs: output
    channel i reads input channel i, which is channel i % (channels / groups) of its group, at the centre tap."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, 3, 3, dtype=dtype, device=device)
    index = torch.arange(channels, device=device)
    kernel[index, index % per_group, 1, 1] = 1
    return kernel


def fuse_bn(kernel, bn):
    """Kernel and bias of conv(x, kernel) followed by the eval-mode BatchNorm `bn`, computed in float64:
    kernel * gamma / std and beta - mean * gamma / std, std = sqrt(running_var + eps)."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    t = gamma / std
    return kernel.double() * t.reshape(-1, 1, 1, 1), beta - bn.running_mean.double() * t


class RepVGGBlock(nn.Module):
    """One RepVGG block: three branches summed then ReLU (training time), or one 3x3 conv with bias then ReLU
    (deploy). The branches are `rbr_dense` (3x3 conv + BN), `rbr_1x1` (1x1 conv + BN) and `rbr_identity` (a BN, or
    None when the width changes or the stride is not 1); the fused convolution is `rbr_reparam`."""

    def __init__(self, in_channels, out_channels, stride=1, groups=1, deploy=False):
        super().__init__()
        self.in_channels, self.out_channels, self.stride, self.groups = in_channels, out_channels, stride, groups
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups,
                                         bias=True)
        else:
            self.rbr_identity = (nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1
                                 else None)
            self.rbr_dense = _conv_bn(in_channels, out_channels, 3, stride, groups)
            self.rbr_1x1 = _conv_bn(in_channels, out_channels, 1, stride, groups)
        self.nonlinearity = nn.ReLU()

    @property
    def deployed(self):
        return hasattr(self, "rbr_reparam")

    def forward(self, x):
        if self.deployed:
            return self.nonlinearity(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)

    def fused_kernel_bias(self):
        """(3x3 kernel, bias) of the single convolution equal to the three branches in eval mode, differentiable
        (e.g. for penalties or quantization of the equivalent kernel); float64, cast back by `reparameterize`."""
        if self.deployed:
            return self.rbr_reparam.weight.double(), self.rbr_reparam.bias.double()
        kernel, bias = fuse_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        k1, b1 = fuse_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel, bias = kernel + F.pad(k1, [1, 1, 1, 1]), bias + b1  # the 1x1 kernel is the 3x3 centre tap
        if self.rbr_identity is not None:
            kid = identity_kernel(self.in_channels, self.groups, device=kernel.device)
            kid, bid = fuse_bn(kid, self.rbr_identity)
            kernel, bias = kernel + kid, bias + bid
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self):
        """Replace the branches by `rbr_reparam` (in place; uses the BatchNorm running statistics)."""
        if self.deployed:
            return
        weight = self.rbr_dense.conv.weight
        kernel, bias = self.fused_kernel_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, stride=self.stride, padding=1, groups=self.groups,
                         bias=True, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(kernel.to(weight.dtype))
        conv.bias.copy_(bias.to(weight.dtype))
        conv.weight.requires_grad_(weight.requires_grad)
        conv.bias.requires_grad_(weight.requires_grad)
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            delattr(self, name)
        self.rbr_reparam = conv
        # keep the official module order (rbr_reparam before nonlinearity) so state dicts list the same way
        self._modules = {"rbr_reparam": self._modules.pop("rbr_reparam"), **self._modules}


class RepVGGPreTrainedModel(PreTrainedModel):
    config_class = RepVGGConfig
    base_model_prefix = "repvgg"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["RepVGGBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.01)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if getattr(module, "num_batches_tracked", None) is not None:
                init.zeros_(module.num_batches_tracked)

    def reparameterize(self):
        """Fuse every block into one 3x3 convolution with bias, in place, and set `config.deploy = True` so that
        save_pretrained / from_pretrained rebuild the fused layout. Uses the BatchNorm running statistics: the fused
        model equals the training-time one in eval mode. Returns the model."""
        for module in self.modules():
            if isinstance(module, RepVGGBlock):
                module.reparameterize()
        self.config.deploy = True
        return self

    def blocks(self):
        """Every RepVGGBlock, stem first."""
        return [m for m in self.modules() if isinstance(m, RepVGGBlock)]


class RepVGGModel(RepVGGPreTrainedModel):
    """The RepVGG body: stem block ("stage0") and the stages, then global average pooling."""

    def __init__(self, config):
        super().__init__(config)
        stages = [[] for _ in range(len(config.num_blocks) + 1)]
        for stage, _, cin, cout, stride, groups in config.block_layout():
            stages[stage].append(RepVGGBlock(cin, cout, stride, groups, deploy=config.deploy))
        # stages[0] is the stem (official "stage0"), stages[i] the official "stage{i}"
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        self.pooler = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def forward(self, pixel_values, output_hidden_states=None, return_dict=None, **kwargs):
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(f"pixel_values must be (batch, {self.config.in_channels}, height, width), got "
                             f"{tuple(pixel_values.shape)}")
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden, states = pixel_values, []
        for stage in self.stages:
            hidden = stage(hidden)
            states.append(hidden)
        pooled = self.pooler(hidden).flatten(1)
        states = tuple(states) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (hidden, pooled, states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=hidden, pooler_output=pooled,
                                                        hidden_states=states)


class RepVGGForImageClassification(RepVGGPreTrainedModel):
    """RepVGG body + linear classifier (official "linear") on the pooled features."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.repvgg = RepVGGModel(config)
        self.classifier = nn.Linear(config.num_features, config.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        """pixel_values (batch, in_channels, H, W), normalised images; labels (batch,) class ids (or float targets
        for problem_type "regression" / "multi_label_classification") -> ImageClassifierOutput with the loss."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.repvgg(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(out.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        if not return_dict:
            rest = (logits,) + ((out.hidden_states,) if out.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """save_pretrained, with `AutoModel` -> RepVGGModel (the body) in the saved auto_map beside
        `AutoModelForImageClassification` -> this class, as transformers' own classifiers load."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", f"{type(self).__module__.split('.')[-1]}.RepVGGModel")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)
