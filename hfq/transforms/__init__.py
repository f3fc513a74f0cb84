"""Equivalent transforms (rotations, smoothing scales, online Hadamards) and their exact fusion into models.

Building blocks for OSTQuant and QuaRot-style methods: see `fuse.py` for where each transform goes."""
from .fuse import (LayerTransform, fuse_transforms_, global_params, layer_params, restore_online_rotations,
                   set_kv_quant, smoothing_scale, transform_layout, transform_shapes, weight_klt_rotation)
from .hadamard import (apply_hadamard, hadamard_factors, hadamard_matrix, klt_rotation, random_hadamard,
                       random_orthogonal, random_signs)
from .online import OnlineHadamard, attach_input_rotation, kv_quant_args, online_spec, use_rotated_attention
from .stiefel import Rotation, riemannian_adam

__all__ = [
    "LayerTransform", "OnlineHadamard", "Rotation", "apply_hadamard", "attach_input_rotation", "fuse_transforms_",
    "global_params", "hadamard_factors", "hadamard_matrix", "klt_rotation", "kv_quant_args", "layer_params",
    "online_spec", "random_hadamard", "random_orthogonal", "random_signs", "restore_online_rotations",
    "riemannian_adam", "set_kv_quant", "smoothing_scale", "transform_layout", "transform_shapes",
    "use_rotated_attention", "weight_klt_rotation",
]
