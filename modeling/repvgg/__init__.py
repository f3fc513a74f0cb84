"""RepVGG (official A0-B3 and g2 / g4 variants) as a Hugging Face custom-code image classifier with in-place
structural re-parameterisation (`reparameterize()`), and a converter for the official DingXiaoH/RepVGG checkpoints."""
from .configuration_repvgg import REPVGG_VARIANTS, RepVGGConfig, variant_kwargs
from .convert_repvgg import config_from_official_checkpoint, convert_official_checkpoint
from .modeling_repvgg import (
    RepVGGBlock, RepVGGForImageClassification, RepVGGModel, RepVGGPreTrainedModel, fuse_bn, identity_kernel,
)

RepVGGConfig.register_for_auto_class("AutoConfig")
RepVGGModel.register_for_auto_class("AutoModel")
# The classifier is what users load: `AutoModelForImageClassification.from_pretrained(dir, trust_remote_code=True)`
RepVGGForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["RepVGGConfig", "RepVGGModel", "RepVGGForImageClassification", "RepVGGPreTrainedModel", "RepVGGBlock",
           "REPVGG_VARIANTS", "variant_kwargs", "convert_official_checkpoint", "config_from_official_checkpoint",
           "fuse_bn", "identity_kernel"]
