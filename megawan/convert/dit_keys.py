"""Wan DiT state-dict names in the three layouts, as one table.

    megawan   our modules' names (megatron-core style: linear_q, linear_proj, mlp.linear_fc1, …)
    official  Wan-Video's WanModel (blocks.0.self_attn.q, ffn.0, head.head, …)
    diffusers WanTransformer3DModel (blocks.0.attn1.to_q, ffn.net.0.proj, proj_out, …)

Each row names a module (its .weight / .bias follow) or, with params=("",), a bare parameter. Note the
swap: official `norm3` (affine, before cross-attention) is diffusers' `norm2`.
"""

from __future__ import annotations

from math import prod

from megawan.config import DiTConfig

LAYOUTS = ("megawan", "official", "diffusers")
_WB = ("weight", "bias")
_W = ("weight",)
_P = ("",)

# (megawan, official, diffusers, params)
TOP_LEVEL = [
    ("patch_embedding", "patch_embedding", "patch_embedding", _WB),
    ("text_embedding.linear_1", "text_embedding.0", "condition_embedder.text_embedder.linear_1", _WB),
    ("text_embedding.linear_2", "text_embedding.2", "condition_embedder.text_embedder.linear_2", _WB),
    ("time_embedding.linear_1", "time_embedding.0", "condition_embedder.time_embedder.linear_1", _WB),
    ("time_embedding.linear_2", "time_embedding.2", "condition_embedder.time_embedder.linear_2", _WB),
    ("time_embedding.projection", "time_projection.1", "condition_embedder.time_proj", _WB),
    ("head.modulation", "head.modulation", "scale_shift_table", _P),
    ("head.linear", "head.head", "proj_out", _WB),
]
IMAGE_EMBEDDING = [
    ("image_embedding.norm_in", "img_emb.proj.0", "condition_embedder.image_embedder.norm1", _WB),
    ("image_embedding.linear_1", "img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj", _WB),
    ("image_embedding.linear_2", "img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2", _WB),
    ("image_embedding.norm_out", "img_emb.proj.4", "condition_embedder.image_embedder.norm2", _WB),
]
IMAGE_POSITIONS = [("image_embedding.pos_embed", "img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed", _P)]

BLOCK = [  # relative to blocks.{i}.
    ("modulation", "modulation", "scale_shift_table", _P),
    ("self_attention.linear_q", "self_attn.q", "attn1.to_q", _WB),
    ("self_attention.linear_k", "self_attn.k", "attn1.to_k", _WB),
    ("self_attention.linear_v", "self_attn.v", "attn1.to_v", _WB),
    ("self_attention.linear_proj", "self_attn.o", "attn1.to_out.0", _WB),
    ("cross_attention.linear_q", "cross_attn.q", "attn2.to_q", _WB),
    ("cross_attention.linear_k", "cross_attn.k", "attn2.to_k", _WB),
    ("cross_attention.linear_v", "cross_attn.v", "attn2.to_v", _WB),
    ("cross_attention.linear_proj", "cross_attn.o", "attn2.to_out.0", _WB),
    ("mlp.linear_fc1", "ffn.0", "ffn.net.0.proj", _WB),
    ("mlp.linear_fc2", "ffn.2", "ffn.net.2", _WB),
]
BLOCK_QK_NORM = [
    ("self_attention.q_norm", "self_attn.norm_q", "attn1.norm_q", _W),
    ("self_attention.k_norm", "self_attn.norm_k", "attn1.norm_k", _W),
    ("cross_attention.q_norm", "cross_attn.norm_q", "attn2.norm_q", _W),
    ("cross_attention.k_norm", "cross_attn.norm_k", "attn2.norm_k", _W),
]
BLOCK_CROSS_ATTN_NORM = [("cross_attention_norm", "norm3", "norm2", _WB)]
BLOCK_IMAGE = [
    ("cross_attention.linear_k_img", "cross_attn.k_img", "attn2.add_k_proj", _WB),
    ("cross_attention.linear_v_img", "cross_attn.v_img", "attn2.add_v_proj", _WB),
]
BLOCK_IMAGE_NORM = [("cross_attention.k_img_norm", "cross_attn.norm_k_img", "attn2.norm_added_k", _W)]

# Tensor-parallel split axis of megawan parameters (by name suffix); absent = replicated on every TP rank.
TP_AXIS = {
    "linear_q.weight": 0, "linear_q.bias": 0,
    "linear_k.weight": 0, "linear_k.bias": 0,
    "linear_v.weight": 0, "linear_v.bias": 0,
    "linear_k_img.weight": 0, "linear_k_img.bias": 0,
    "linear_v_img.weight": 0, "linear_v_img.bias": 0,
    "q_norm.weight": 0, "k_norm.weight": 0, "k_img_norm.weight": 0,
    "mlp.linear_fc1.weight": 0, "mlp.linear_fc1.bias": 0,
    "linear_proj.weight": 1, "mlp.linear_fc2.weight": 1,
}


def dit_key_table(config: DiTConfig) -> list:
    """[(megawan_key, official_key, diffusers_key)] for every parameter of a model with this config."""
    rows = list(TOP_LEVEL)
    if config.image_dim:
        rows += IMAGE_EMBEDDING + (IMAGE_POSITIONS if config.image_pos_len else [])
    block = list(BLOCK)
    if config.qk_norm:
        block += BLOCK_QK_NORM
    if config.cross_attn_norm:
        block += BLOCK_CROSS_ATTN_NORM
    if config.image_dim:
        block += BLOCK_IMAGE + (BLOCK_IMAGE_NORM if config.qk_norm else [])
    rows += [tuple(f"blocks.{i}.{name}" for name in row[:3]) + (row[3],) for i in range(config.num_layers) for row in block]

    def key(prefix: str, param: str) -> str:
        return f"{prefix}.{param}" if param else prefix

    return [tuple(key(p, param) for p in row[:3]) for row in rows for param in row[3]]


def dit_param_shapes(config: DiTConfig) -> dict:
    """Full (unsplit) shape of every megawan parameter."""
    d, f, c = config.dim, config.ffn_dim, config.out_dim * config.patch_volume
    shapes = {
        "patch_embedding.weight": (d, config.in_dim, *config.patch_size), "patch_embedding.bias": (d,),
        "text_embedding.linear_1.weight": (d, config.text_dim), "text_embedding.linear_1.bias": (d,),
        "text_embedding.linear_2.weight": (d, d), "text_embedding.linear_2.bias": (d,),
        "time_embedding.linear_1.weight": (d, config.freq_dim), "time_embedding.linear_1.bias": (d,),
        "time_embedding.linear_2.weight": (d, d), "time_embedding.linear_2.bias": (d,),
        "time_embedding.projection.weight": (6 * d, d), "time_embedding.projection.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.linear.weight": (c, d), "head.linear.bias": (c,),
    }
    if config.image_dim:
        i = config.image_dim
        shapes.update({
            "image_embedding.norm_in.weight": (i,), "image_embedding.norm_in.bias": (i,),
            "image_embedding.linear_1.weight": (i, i), "image_embedding.linear_1.bias": (i,),
            "image_embedding.linear_2.weight": (d, i), "image_embedding.linear_2.bias": (d,),
            "image_embedding.norm_out.weight": (d,), "image_embedding.norm_out.bias": (d,),
        })
        if config.image_pos_len:
            shapes["image_embedding.pos_embed"] = (1, config.image_pos_len, i)
    for key, _, _ in dit_key_table(config):
        if key in shapes or not key.startswith("blocks."):
            continue
        name = key.split(".", 2)[2]
        if name == "modulation":
            shapes[key] = (1, 6, d)
        elif name == "mlp.linear_fc1.weight":
            shapes[key] = (f, d)
        elif name == "mlp.linear_fc1.bias":
            shapes[key] = (f,)
        elif name == "mlp.linear_fc2.weight":
            shapes[key] = (d, f)
        elif name.endswith(".weight") and not name.endswith("norm.weight") and "norm" not in name.split(".")[-2]:
            shapes[key] = (d, d)
        else:  # biases, norm weights
            shapes[key] = (d,)
    return shapes


def dit_param_count(config: DiTConfig) -> int:
    """Parameters of the whole DiT (one expert of A14B), from the shapes: no model is built."""
    return sum(prod(shape) for shape in dit_param_shapes(config).values())
