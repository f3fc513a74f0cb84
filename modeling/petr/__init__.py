"""PETR family (PETR, PETRv2 multi-frame, a StreamPETR-style memory queue) as Hugging Face custom-code models.
Official PETR / PETRv2 checkpoints (ResNet, R50-DCN, VoVNet-99 backbones) convert; official StreamPETR ones do not."""
from .configuration_petr import NUSCENES_CLASSES, PetrConfig
from .convert_petr import convert_official_checkpoint
from .image_processing_petr import PetrImageProcessor
from .modeling_petr import PetrForObjectDetection3D, PetrModel, PetrPreTrainedModel

PetrConfig.register_for_auto_class("AutoConfig")
# The detector is what users load: `AutoModel.from_pretrained(dir, trust_remote_code=True)` returns it.
PetrForObjectDetection3D.register_for_auto_class("AutoModel")

__all__ = ["PetrConfig", "PetrModel", "PetrForObjectDetection3D", "PetrPreTrainedModel", "PetrImageProcessor",
           "convert_official_checkpoint", "NUSCENES_CLASSES"]
