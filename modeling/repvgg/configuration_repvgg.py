"""Configuration of RepVGG (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021, arXiv 2101.03697)
as a Hugging Face custom-code image classifier.

The official variants are those of `repvgg.py` in DingXiaoH/RepVGG (`create_RepVGG_*`): four stages after a one-block
stem ("stage0"), stage widths 64a, 128a, 256a (a = width_multiplier[:3]) and 512b (b = width_multiplier[3]), stem width
min(64, 64a), every stage (and the stem) starting with a stride-2 block; the g2 / g4 variants use groupwise 3x3 / 1x1
convolutions in the even-numbered blocks 2, 4, ..., 26 (blocks counted from 1 after the stem)."""
from transformers import PretrainedConfig

_GROUPWISE_BLOCKS = tuple(range(2, 27, 2))  # official `optional_groupwise_layers`
_A_BLOCKS, _B_BLOCKS = (2, 4, 14, 1), (4, 6, 16, 1)

# name -> (num_blocks, width_multiplier, groups of the groupwise blocks or 1)
REPVGG_VARIANTS = {
    "A0": (_A_BLOCKS, (0.75, 0.75, 0.75, 2.5), 1),
    "A1": (_A_BLOCKS, (1.0, 1.0, 1.0, 2.5), 1),
    "A2": (_A_BLOCKS, (1.5, 1.5, 1.5, 2.75), 1),
    "B0": (_B_BLOCKS, (1.0, 1.0, 1.0, 2.5), 1),
    "B1": (_B_BLOCKS, (2.0, 2.0, 2.0, 4.0), 1),
    "B1g2": (_B_BLOCKS, (2.0, 2.0, 2.0, 4.0), 2),
    "B1g4": (_B_BLOCKS, (2.0, 2.0, 2.0, 4.0), 4),
    "B2": (_B_BLOCKS, (2.5, 2.5, 2.5, 5.0), 1),
    "B2g2": (_B_BLOCKS, (2.5, 2.5, 2.5, 5.0), 2),
    "B2g4": (_B_BLOCKS, (2.5, 2.5, 2.5, 5.0), 4),
    "B3": (_B_BLOCKS, (3.0, 3.0, 3.0, 5.0), 1),
    "B3g2": (_B_BLOCKS, (3.0, 3.0, 3.0, 5.0), 2),
    "B3g4": (_B_BLOCKS, (3.0, 3.0, 3.0, 5.0), 4),
}
OFFICIAL_BASE_CHANNELS = (64, 128, 256, 512)


def variant_kwargs(name):
    """The architecture fields of an official variant ("A0", "RepVGG-B1g2", ...)."""
    key = name[len("RepVGG-"):] if isinstance(name, str) and name.startswith("RepVGG-") else name
    if key not in REPVGG_VARIANTS:
        raise ValueError(f"unknown RepVGG variant {name!r}; official ones: {', '.join(REPVGG_VARIANTS)} "
                         "(RepVGGplus / D2se with SE blocks are not supported).")
    blocks, widths, groups = REPVGG_VARIANTS[key]
    return dict(num_blocks=list(blocks), width_multiplier=list(widths), base_channels=list(OFFICIAL_BASE_CHANNELS),
                override_groups_map={b: groups for b in _GROUPWISE_BLOCKS} if groups > 1 else {})


class RepVGGConfig(PretrainedConfig):
    """RepVGG hyper-parameters. Defaults: RepVGG-A0 for 1000 ImageNet classes at 224 x 224.

    variant: an official variant ("A0", "A1", "A2", "B0", "B1", "B1g2", "B1g4", "B2", "B2g2", "B2g4", "B3", "B3g2",
    "B3g4"; a "RepVGG-" prefix is accepted) that fixes num_blocks / width_multiplier / base_channels /
    override_groups_map (passing a different value for one of them is an error); None = give them freely
    (`RepVGGConfig.from_variant(name, **kw)` is the same as `RepVGGConfig(variant=name, **kw)`).
    num_blocks: blocks per stage after the stem (official: 4 stages). width_multiplier: one per stage; stage i has
    int(base_channels[i] * width_multiplier[i]) channels; the stem has min(base_channels[0],
    int(base_channels[0] * width_multiplier[0])) (official: min(64, 64a)). base_channels: (64, 128, 256, 512)
    officially; shrink them (with fewer stages) for tiny models.
    stage_strides: stride of the first block of the stem (index 0) and of each stage (indices 1..), the other blocks
    have stride 1; official: all 2 (output stride 32). Use 1s for small inputs (e.g. 32 x 32).
    override_groups_map: {block index: groups} for groupwise convolutions; blocks are counted from 1 over all stages
    after the stem (the stem, index 0, is never grouped); the groups must divide the block's input and output widths.
    in_channels: image channels. image_size: the training / evaluation resolution (224 officially); the network
    itself takes any size. deploy: the fused (inference-time) form, one 3x3 convolution with bias per block
    (`RepVGGForImageClassification.reparameterize()` switches a model to it and sets this flag).
    num_labels / id2label: the classifier's classes (1000 by default).
    """

    model_type = "hfq_repvgg"

    def __init__(
        self,
        variant=None,
        num_blocks=None,
        width_multiplier=None,
        base_channels=None,
        stage_strides=None,
        override_groups_map=None,
        in_channels=3,
        image_size=224,
        deploy=False,
        **kwargs,
    ):
        _load_quantizer(kwargs.get("quantization_config"))
        if kwargs.get("id2label") is None and kwargs.get("num_labels") is None:
            kwargs["num_labels"] = 1000
        super().__init__(**kwargs)
        given = dict(num_blocks=num_blocks, width_multiplier=width_multiplier, base_channels=base_channels,
                     override_groups_map=override_groups_map)
        if variant is not None:
            official = variant_kwargs(variant)
            variant = variant[len("RepVGG-"):] if variant.startswith("RepVGG-") else variant
            for name, value in given.items():
                if value is not None and _normalise(name, value) != _normalise(name, official[name]):
                    raise ValueError(f"variant={variant!r} fixes {name}={official[name]}, got {value}; pass "
                                     f"variant=None to build a custom RepVGG.")
            given = official
        else:  # free architecture; missing fields default to RepVGG-A0
            default = variant_kwargs("A0")
            given = {k: default[k] if v is None else v for k, v in given.items()}
        num_blocks = [int(n) for n in given["num_blocks"]]
        width_multiplier = [float(w) for w in given["width_multiplier"]]
        base_channels = [int(c) for c in given["base_channels"]]
        groups_map = _normalise("override_groups_map", given["override_groups_map"])
        if stage_strides is None:
            stage_strides = [2] * (len(num_blocks) + 1)
        stage_strides = [int(s) for s in stage_strides]

        if not num_blocks or min(num_blocks) < 1:
            raise ValueError(f"num_blocks={num_blocks}: need at least one stage, each with at least one block.")
        if len(width_multiplier) != len(num_blocks) or len(base_channels) != len(num_blocks):
            raise ValueError(f"num_blocks ({len(num_blocks)} stages), width_multiplier ({len(width_multiplier)}) and "
                             f"base_channels ({len(base_channels)}) need one entry per stage.")
        if len(stage_strides) != len(num_blocks) + 1:
            raise ValueError(f"stage_strides={stage_strides}: need {len(num_blocks) + 1} entries, the stem's stride "
                             f"then one per stage.")
        if min(stage_strides) < 1:
            raise ValueError(f"stage_strides={stage_strides}: strides must be >= 1.")
        widths = [int(c * w) for c, w in zip(base_channels, width_multiplier)]
        if min(widths) < 1 or min(base_channels) < 1:
            raise ValueError(f"base_channels={base_channels} x width_multiplier={width_multiplier} gives stage widths "
                             f"{widths}; every stage needs at least one channel.")
        if in_channels < 1 or image_size < 1:
            raise ValueError(f"in_channels={in_channels} and image_size={image_size} must be >= 1.")
        if not isinstance(deploy, bool):
            raise TypeError(f"deploy must be True (fused form) or False (training-time branches), got {deploy!r}.")
        total = sum(num_blocks)
        stem = min(base_channels[0], widths[0])
        outs = [w for n, w in zip(num_blocks, widths) for _ in range(n)]  # blocks 1..total after the stem
        ins = [stem] + outs[:-1]
        for index, groups in groups_map.items():
            if not 1 <= index <= total:
                raise ValueError(f"override_groups_map key {index}: blocks are numbered 1..{total} after the stem "
                                 "(the stem, 0, is never grouped).")
            cin, cout = ins[index - 1], outs[index - 1]
            if groups < 1 or cin % groups or cout % groups:
                raise ValueError(f"override_groups_map[{index}] = {groups} must divide the block's {cin} input and "
                                 f"{cout} output channels.")

        self.variant = variant
        self.num_blocks = num_blocks
        self.width_multiplier = width_multiplier
        self.base_channels = base_channels
        self.stage_strides = stage_strides
        self.override_groups_map = groups_map
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.deploy = deploy

    @classmethod
    def from_variant(cls, name, **kwargs):
        """An official variant ("A0", "B1g2", "RepVGG-B0", ...) with other fields (num_labels, image_size,
        stage_strides, deploy, ...) from kwargs."""
        return cls(variant=name, **kwargs)

    # ------------------------------------------------------------------ derived sizes
    @property
    def stem_channels(self):
        """Width of the stem block ("stage0"): min(base, int(base * width_multiplier[0]))."""
        return min(self.base_channels[0], self.hidden_sizes[0])

    @property
    def hidden_sizes(self):
        """Width of each stage after the stem."""
        return [int(c * w) for c, w in zip(self.base_channels, self.width_multiplier)]

    @property
    def num_features(self):
        """Width of the pooled features that feed the classifier."""
        return self.hidden_sizes[-1]

    def block_layout(self):
        """(stage, index in stage, in channels, out channels, stride, groups) of every block, stem first."""
        layout = [(0, 0, self.in_channels, self.stem_channels, self.stage_strides[0], 1)]
        cin, index = self.stem_channels, 1
        for s, (n, width) in enumerate(zip(self.num_blocks, self.hidden_sizes), start=1):
            for j in range(n):
                layout.append((s, j, cin, width, self.stage_strides[s] if j == 0 else 1,
                               self.override_groups_map.get(index, 1)))
                cin, index = width, index + 1
        return layout


def _normalise(name, value):
    """Comparable form of an architecture field (JSON turns the groups map's keys into strings)."""
    if name == "override_groups_map":
        return {int(k): int(v) for k, v in dict(value or {}).items()}
    return [float(v) for v in value]


def _load_quantizer(quantization_config):
    """An hfq-quantized checkpoint needs hfq's quantizer registered with transformers before its weights load: import
    hfq here (the config is read first), or refuse with the fix. Float checkpoints never import hfq."""
    qc = quantization_config
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if isinstance(method, str) and method.startswith("hfq_"):
        try:
            import hfq  # noqa: F401
        except ImportError as e:
            raise ImportError(f"this checkpoint is quantized with hfq ({method}): install hfq (pip install hfq) to "
                              f"load it; without it its packed integer weights cannot be read") from e
