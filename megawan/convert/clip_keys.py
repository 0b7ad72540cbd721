"""CLIP vision tower state-dict names: megawan, transformers' CLIPVisionModel (what diffusers'
WanImageToVideoPipeline keeps in image_encoder/) and the official open-clip layout (the `visual.*` keys of Wan's
models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth), as one table; plus the tensor-parallel split axes.

Two official tensors are not plain renames: the fused `attn.to_qkv` (q, k, v rows concatenated, as Wan's
SelfAttention views it [.., 3, heads, head_dim]) and the class / position embeddings, stored with leading
singleton axes ([1, 1, D], [1, 1 + P, D]; transformers and megawan: [D], [1 + P, D]). `official_to_table` and
`table_to_official` turn the official file into the table's names (`to_q` / `to_k` / `to_v`) and back.
The official file also holds the text tower (`textual.*`), `log_scale` and the image head (`visual.head`);
Wan runs none of them, so they are left out.
"""

from __future__ import annotations

import torch

from megawan.config import CLIPConfig

CLIP_LAYOUTS = ("megawan", "transformers", "official")
TRANSFORMERS_PREFIX = "vision_model."  # transformers 4 (and the Hub's files) nest the tower under it
_WB = ("weight", "bias")

_TOP = [  # (megawan, transformers, official, params)
    ("patch_embedding", "embeddings.patch_embedding", "visual.patch_embedding", ("weight",)),
    ("cls_embedding", "embeddings.class_embedding", "visual.cls_embedding", ("",)),
    ("pos_embedding", "embeddings.position_embedding", "visual.pos_embedding", ("",)),
    ("pre_norm", "pre_layrnorm", "visual.pre_norm", _WB),
    ("post_norm", "post_layernorm", "visual.post_norm", _WB),
]
_BLOCK = [  # blocks.{i}. / encoder.layers.{i}. / visual.transformer.{i}.
    ("norm1", "layer_norm1", "norm1"),
    ("attn.q", "self_attn.q_proj", "attn.to_q"),
    ("attn.k", "self_attn.k_proj", "attn.to_k"),
    ("attn.v", "self_attn.v_proj", "attn.to_v"),
    ("attn.proj", "self_attn.out_proj", "attn.proj"),
    ("norm2", "layer_norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1", "mlp.0"),
    ("mlp.fc2", "mlp.fc2", "mlp.2"),
]

CLIP_TP_AXIS = {
    "attn.q.weight": 0, "attn.q.bias": 0, "attn.k.weight": 0, "attn.k.bias": 0, "attn.v.weight": 0, "attn.v.bias": 0,
    "attn.proj.weight": 1, "mlp.fc1.weight": 0, "mlp.fc1.bias": 0, "mlp.fc2.weight": 1,
}


def _key(module: str, param: str) -> str:
    return f"{module}.{param}" if param else module


def clip_key_table(config: CLIPConfig) -> list:
    rows = []
    for m, t, o, params in _TOP:
        # transformers' position embedding is an nn.Embedding (.weight); the other two keep a bare tensor
        rows += [(_key(m, p), _key(t, p or ("weight" if m == "pos_embedding" else "")), _key(o, p)) for p in params]
    for i in range(config.num_hidden_layers):
        rows += [(f"blocks.{i}.{m}.{p}", f"encoder.layers.{i}.{t}.{p}", f"visual.transformer.{i}.{o}.{p}")
                 for m, t, o in _BLOCK for p in _WB]
    return rows


def clip_param_shapes(config: CLIPConfig) -> dict:
    d, f, p = config.hidden_size, config.intermediate_size, config.patch_size
    shapes = {"patch_embedding.weight": (d, 3, p, p), "cls_embedding": (d,), "pos_embedding": (config.num_tokens, d),
              "pre_norm.weight": (d,), "pre_norm.bias": (d,), "post_norm.weight": (d,), "post_norm.bias": (d,)}
    per_block = {"mlp.fc1.weight": (f, d), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (d, f), "mlp.fc2.bias": (d,)}
    for name in ("norm1", "norm2", "attn.q", "attn.k", "attn.v", "attn.proj"):
        per_block[f"{name}.bias"] = (d,)
        per_block[f"{name}.weight"] = (d,) if name.startswith("norm") else (d, d)
    for i in range(config.num_hidden_layers):
        shapes.update({f"blocks.{i}.{k}": v for k, v in per_block.items()})
    return shapes


def is_unused_official_key(key: str) -> bool:
    """The official file's tensors Wan does not run: the text tower, the logit scale, the image head."""
    return not key.startswith("visual.") or key == "visual.head" or key.startswith("visual.head.")


def official_to_table(state_dict: dict) -> dict:
    """The official `visual.*` tensors under the table's names: to_qkv split into to_q / to_k / to_v, the
    embeddings without their singleton axes. Unused keys dropped; a tensor of an unexpected shape is passed on
    unchanged for the table's shape check to name."""
    out = {}
    for key, tensor in state_dict.items():
        if is_unused_official_key(key):
            continue
        if key.endswith(".attn.to_qkv.weight") or key.endswith(".attn.to_qkv.bias"):
            head, _, param = key.rpartition(".")
            if tensor.shape[0] % 3:
                raise ValueError(f"official key {key!r} has shape {tuple(tensor.shape)}: not q, k and v stacked")
            for name, part in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                out[f"{head[:-len('to_qkv')]}{name}.{param}"] = part.clone()  # its own storage: safetensors
        elif key in ("visual.cls_embedding", "visual.pos_embedding") and tensor.dim() == 3 and tensor.shape[0] == 1:
            out[key] = tensor[0, 0] if key == "visual.cls_embedding" and tensor.shape[1] == 1 else tensor[0]
        else:
            out[key] = tensor
    return out


def table_to_official(state_dict: dict) -> dict:
    """The inverse of `official_to_table`: to_q / to_k / to_v concatenated into to_qkv, embeddings reshaped."""
    out = {}
    for key, tensor in state_dict.items():
        if ".attn.to_q." in key:
            parts = [state_dict[key.replace(".to_q.", f".{n}.")] for n in ("to_q", "to_k", "to_v")]
            out[key.replace(".to_q.", ".to_qkv.")] = torch.cat(parts, dim=0)
        elif ".attn.to_k." in key or ".attn.to_v." in key:
            continue
        elif key == "visual.cls_embedding":
            out[key] = tensor.reshape(1, 1, -1)
        elif key == "visual.pos_embedding":
            out[key] = tensor.unsqueeze(0)
        else:
            out[key] = tensor
    return out


# what a CLIPVisionModelWithProjection or a whole CLIPModel holds beside the tower (the image head = the official
# visual.head transposed; the text tower): not run by Wan, left out like the official file's
_TRANSFORMERS_UNUSED = ("visual_projection.weight", "text_projection.weight", "logit_scale", "text_model.")


def transformers_to_table(state_dict: dict) -> dict:
    """transformers' CLIPVisionModel tensors with or without the `vision_model.` prefix (transformers 5 writes
    none, the Hub's files have it); the non-persistent position_ids buffer older files carry is dropped."""
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith(_TRANSFORMERS_UNUSED):
            continue
        key = key[len(TRANSFORMERS_PREFIX):] if key.startswith(TRANSFORMERS_PREFIX) else key
        if key != "embeddings.position_ids":
            out[key] = tensor
    return out
