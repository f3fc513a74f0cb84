"""OSTQuant (Hu et al., ICLR 2025): config, quantizer (lifecycle) and training (the method's own idea)."""
from .config import OSTQuantConfig
from .quantizer import OSTQuantHfQuantizer
from .train import ROTATION_INITS, SCALES, OSTQuantTrainer, OSTTransforms, init_transforms, orthogonalize

__all__ = ["OSTQuantConfig", "OSTQuantHfQuantizer", "OSTQuantTrainer", "OSTTransforms", "ROTATION_INITS", "SCALES",
           "init_transforms", "orthogonalize"]
