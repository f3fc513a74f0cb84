"""FlashOcc and Panoptic-FlashOcc as Hugging Face custom-code models (pure PyTorch), their test-time
pre-processing and a converter for the official single-frame checkpoints (Yzichen/FlashOCC)."""
from .configuration_flashocc import (
    NUSCENES_DET_CLASSES, OCC3D_CLASSES, OFFICIAL_CENTER_HEADS, OFFICIAL_CENTER_TO_OCC, THING_OCC_CLASSES,
    FlashOccConfig, flashocc_m0_kwargs, panoptic_tiny_kwargs,
)
from .convert_flashocc import convert_official_checkpoint
from .image_processing_flashocc import FlashOccImageProcessor
from .modeling_flashocc import FlashOccForOccupancy, FlashOccModel, FlashOccPreTrainedModel

FlashOccConfig.register_for_auto_class("AutoConfig")
# The occupancy model is what users load: `AutoModel.from_pretrained(dir, trust_remote_code=True)` returns it.
FlashOccForOccupancy.register_for_auto_class("AutoModel")

__all__ = ["FlashOccConfig", "FlashOccModel", "FlashOccForOccupancy", "FlashOccPreTrainedModel",
           "FlashOccImageProcessor", "convert_official_checkpoint", "flashocc_m0_kwargs", "panoptic_tiny_kwargs",
           "OCC3D_CLASSES", "NUSCENES_DET_CLASSES", "OFFICIAL_CENTER_HEADS", "OFFICIAL_CENTER_TO_OCC",
           "THING_OCC_CLASSES"]
