"""The CLIP image encoder's config: `CLIPConfig` (the vision tower Wan2.1 I2V / FLF2V condition on), its presets,
the reader of transformers' CLIPVisionConfig and the writer back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megawan.config.fields import DTYPES, build, checker, from_preset

CLIP_ACTIVATIONS = ("gelu", "quick_gelu")
# OpenAI CLIP's pixel statistics, which Wan normalises with (wan/modules/clip.py)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    """ViT hyper-parameters (transformers' CLIPVisionConfig names). The tower holds `num_hidden_layers` blocks;
    Wan reads the states after the penultimate one."""

    name: str = "custom"
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    hidden_act: str = "gelu"  # open-clip XLM-RoBERTa ViT-H/14 (Wan): exact GELU; OpenAI CLIP: quick_gelu
    layer_norm_eps: float = 1e-5
    projection_dim: int = 1024  # the official head's width: not part of the tower we run, kept for config.json
    params_dtype: str = "float32"

    def validate(self, tensor_parallel: int = 1, prefix: str = "clip") -> "CLIPConfig":
        need = checker(prefix)
        need(self.params_dtype in DTYPES, "params_dtype", f"{self.params_dtype!r} is not one of {DTYPES}")
        need(self.hidden_act in CLIP_ACTIVATIONS, "hidden_act", f"{self.hidden_act!r} is not one of {CLIP_ACTIVATIONS}")
        need(self.num_hidden_layers >= 2, "num_hidden_layers",
             f"{self.num_hidden_layers} < 2: Wan reads the states before the last block")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        need(self.image_size % self.patch_size == 0, "patch_size",
             f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        need(self.num_attention_heads % tensor_parallel == 0, "num_attention_heads",
             f"num_attention_heads={self.num_attention_heads} is not divisible by tensor_parallel={tensor_parallel}")
        need(self.intermediate_size % tensor_parallel == 0, "intermediate_size",
             f"intermediate_size={self.intermediate_size} is not divisible by tensor_parallel={tensor_parallel}")
        return self

    @property
    def num_tokens(self) -> int:
        """The class token plus one per patch."""
        return 1 + (self.image_size // self.patch_size) ** 2


_CLIP_PRESETS = {
    # the vision tower of models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (Wan2.1 I2V / FLF2V)
    "open-clip-xlm-roberta-large-vit-huge-14": dict(),
    # width 20 = the tiny-i2v DiT's image_dim
    "tiny": dict(hidden_size=20, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, patch_size=8,
                 image_size=32, projection_dim=16),
}


def clip_preset(name: str, **overrides) -> CLIPConfig:
    """`clip_preset("open-clip-xlm-roberta-large-vit-huge-14" | "tiny")`."""
    return from_preset(CLIPConfig, _CLIP_PRESETS, name, "CLIP", "clip", overrides)


def clip_config_from(config_json: dict, **overrides) -> CLIPConfig:
    """CLIPConfig from a transformers CLIPVisionConfig dict (config.json, or `.to_dict()`). A full CLIPConfig dict
    (text + vision) is read through its `vision_config`."""
    if "vision_config" in config_json and "hidden_size" not in config_json:
        config_json = config_json["vision_config"]
    channels = config_json.get("num_channels", 3)
    if channels != 3:
        raise ValueError(f"clip.num_channels: {channels}; Wan's CLIP encoder reads RGB images (3 channels)")
    known = {f.name for f in dataclasses.fields(CLIPConfig)}
    values = {k: v for k, v in config_json.items() if k in known and k not in ("name", "params_dtype")}
    values["name"] = "transformers"
    values.update(overrides)
    return build(CLIPConfig, values, "clip").validate()


def transformers_clip_config_json(c: CLIPConfig) -> dict:
    """transformers' CLIPVisionConfig config.json of `c` (what clip_config_from reads back; diffusers'
    WanImageToVideoPipeline loads its image_encoder/ with it)."""
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "patch_size": c.patch_size, "image_size": c.image_size,
            "hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps, "projection_dim": c.projection_dim,
            "num_channels": 3, "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
            "torch_dtype": "float32"}


def clip_image_processor_json(c: CLIPConfig) -> dict:
    """transformers' CLIPImageProcessor preprocessor_config.json with Wan's size, mean and std (bicubic)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": c.image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": c.image_size, "width": c.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "do_convert_rgb": True}
