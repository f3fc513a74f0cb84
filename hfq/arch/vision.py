"""Custom-code vision models (`hfq.modeling`). Their own operations (e.g. PETR's position-embedding adds) are found
through `marked_op`, nn.MultiheadAttention / Conv2d / Linear by type."""
from .base import ArchAdapter

# PETR family: the training-only 2-D auxiliary head is never on the inference path
ADAPTERS = {
    "hfq_petr": ArchAdapter(blocks="model.decoder.layers", keep_float=("aux_head",)),
    # FlashOcc / Panoptic-FlashOcc: the blocks are the BEV encoder's stages
    "hfq_flashocc": ArchAdapter(blocks="model.bev_backbone.layers"),
    # RepVGG: the blocks are the stages (stages[0] is the stem, the official "stage0")
    "hfq_repvgg": ArchAdapter(blocks="repvgg.stages"),
}
