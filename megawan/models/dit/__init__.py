"""The Wan DiT on megatron-core.

    from megawan.models.dit import WanDiT
    model = WanDiT(dit_preset("tiny"))
    v = model(latents, timestep, text)
"""

from megawan.models.dit.experts import WanDiTExperts
from megawan.models.dit.flops import flops
from megawan.models.dit.model import WanDiT, megatron_config
from megawan.models.dit.specs import get_wan_block_local_spec, get_wan_block_spec, get_wan_block_te_spec

__all__ = [
    "WanDiT",
    "WanDiTExperts",
    "flops",
    "megatron_config",
    "get_wan_block_local_spec",
    "get_wan_block_te_spec",
    "get_wan_block_spec",
]
