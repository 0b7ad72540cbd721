"""The DiT's config: `DiTConfig`, the official presets (Wan-Video's config.json files) and tiny ones for tests,
and the reader of official / diffusers config.json files.

    dit = dit_preset("wan2.1-t2v-1.3b")                      # the official hyper-parameters
    dit = dit_preset("tiny", num_layers=3)
    dit = dit_config_from(json.load(open("config.json")))   # an official Wan or a diffusers config.json
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megawan.config.fields import DTYPES, ConfigError, build, checker, from_preset

MODEL_TYPES = ("t2v", "i2v", "ti2v")
BACKENDS = ("auto", "local", "te")


@dataclass
class DiTConfig:
    """Hyper-parameters of one Wan DiT (one expert, for the two-expert A14B models).

    Names follow the official Wan `WanModel` arguments (dim, ffn_dim, num_heads, …).
    """

    name: str = "custom"
    model_type: str = "t2v"  # t2v | i2v (first-frame latents concatenated: in_dim 36) | ti2v (Wan2.2 5B)
    in_dim: int = 16
    out_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256  # sinusoidal timestep-embedding width
    text_dim: int = 4096  # umT5-XXL hidden size
    text_len: int = 512  # text tokens are zero-padded to this length, as Wan does
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True  # RMSNorm over the full hidden size on q and k
    cross_attn_norm: bool = True  # affine LayerNorm before the cross-attention
    image_dim: Optional[int] = None  # CLIP image-token width (1280) of Wan2.1 I2V; None: no image branch
    image_pos_len: Optional[int] = None  # learned position table of FLF2V image tokens (2 x 257)
    rope_theta: float = 10000.0
    rope_max_len: int = 1024  # largest latent frame / height / width index in patches
    expert_boundary: Optional[float] = None  # A14B: t / 1000 >= boundary -> high-noise expert
    backend: str = "auto"  # local (pure torch) | te (Transformer Engine) | auto (te when usable)
    params_dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple:
        """(t, h, w) parts of the head dim that 3D RoPE rotates: (d - 4*(d//6), 2*(d//6), 2*(d//6))."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    def validate(self, tensor_parallel: int = 1, prefix: str = "model") -> "DiTConfig":
        need = checker(prefix)

        need(self.model_type in MODEL_TYPES, "model_type", f"{self.model_type!r} is not one of {MODEL_TYPES}")
        need(self.backend in BACKENDS, "backend", f"{self.backend!r} is not one of {BACKENDS}")
        need(self.params_dtype in DTYPES, "params_dtype", f"{self.params_dtype!r} is not one of {DTYPES}")
        for name in ("in_dim", "out_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "text_len", "num_heads", "num_layers"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(len(self.patch_size) == 3 and all(p > 0 for p in self.patch_size), "patch_size",
             f"must be three positive ints (t, h, w), got {self.patch_size}")
        need(self.dim % self.num_heads == 0, "num_heads", f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        need(self.head_dim % 2 == 0 and self.head_dim >= 6, "num_heads",
             f"head dim {self.head_dim} (dim / num_heads) must be even and >= 6 for 3D RoPE")
        need(self.freq_dim % 2 == 0, "freq_dim", f"must be even, got {self.freq_dim}")
        need(self.model_type != "i2v" or self.in_dim > self.out_dim, "in_dim",
             f"an i2v model takes the noisy latents plus mask and image latents: in_dim ({self.in_dim}) must exceed out_dim ({self.out_dim})")
        need(self.image_pos_len is None or self.image_dim is not None, "image_pos_len", "needs image_dim")
        need(self.expert_boundary is None or 0.0 < self.expert_boundary < 1.0, "expert_boundary",
             f"must lie in (0, 1), got {self.expert_boundary}")
        need(tensor_parallel >= 1, "tensor_parallel", "must be >= 1")
        if tensor_parallel > 1:
            need(self.num_heads % tensor_parallel == 0, "num_heads",
                 f"num_heads={self.num_heads} is not divisible by tensor_parallel={tensor_parallel}")
            need(self.ffn_dim % tensor_parallel == 0, "ffn_dim",
                 f"ffn_dim={self.ffn_dim} is not divisible by tensor_parallel={tensor_parallel}")
        return self



_WAN_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

DIT_PRESETS: dict = {
    "wan2.1-t2v-1.3b": dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": dict(model_type="t2v", **_WAN_14B),
    "wan2.1-i2v-14b": dict(model_type="i2v", in_dim=36, image_dim=1280, **_WAN_14B),
    "wan2.1-flf2v-14b": dict(model_type="i2v", in_dim=36, image_dim=1280, image_pos_len=514, **_WAN_14B),
    "wan2.2-ti2v-5b": dict(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30),
    # A14B: two experts of the 14B architecture; Wan2.2 I2V conditions through the latents only (no CLIP).
    "wan2.2-t2v-a14b": dict(model_type="t2v", expert_boundary=0.875, **_WAN_14B),
    "wan2.2-i2v-a14b": dict(model_type="i2v", in_dim=36, expert_boundary=0.900, **_WAN_14B),
}
_TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=24, text_len=16, rope_max_len=64)
DIT_PRESETS.update({
    "tiny": dict(model_type="t2v", **_TINY),
    "tiny-i2v": dict(model_type="i2v", in_dim=36, image_dim=20, **_TINY),
    "tiny-ti2v": dict(model_type="ti2v", in_dim=48, out_dim=48, **_TINY),
    "tiny-a14b": dict(model_type="t2v", expert_boundary=0.875, **_TINY),
})


def preset_names() -> list:
    return sorted(DIT_PRESETS)


def dit_preset(name: str, **overrides: Any) -> DiTConfig:
    """The DiT config of a named model: `dit_preset("wan2.1-t2v-14b")`, `dit_preset("tiny", num_layers=3)`."""
    return from_preset(DiTConfig, DIT_PRESETS, name, "DiT", "model", overrides)


def dit_config_from(config_json: dict, state_dict_keys=None, **overrides: Any) -> DiTConfig:
    """DiTConfig from the config.json dict of an official Wan checkpoint or of a diffusers one.

    `state_dict_keys` (official checkpoints): decides whether an i2v model has the CLIP image branch
    (Wan2.1 I2V / FLF2V) or not (Wan2.2 I2V-A14B); without it an official i2v config means Wan2.1.
    """
    if "num_attention_heads" in config_json:  # diffusers WanTransformer3DModel
        c = config_json
        in_dim = c.get("in_channels", 16)
        if c.get("image_dim") is not None or in_dim == 36:
            model_type = "i2v"
        elif in_dim == 48:
            model_type = "ti2v"
        else:
            model_type = "t2v"
        values = dict(
            name="diffusers", model_type=model_type, in_dim=in_dim, out_dim=c.get("out_channels") or in_dim,
            dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c.get("ffn_dim", 13824),
            freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096), num_heads=c["num_attention_heads"],
            num_layers=c.get("num_layers", 40), patch_size=tuple(c.get("patch_size", (1, 2, 2))),
            eps=c.get("eps", 1e-6), qk_norm=c.get("qk_norm") is not None, cross_attn_norm=c.get("cross_attn_norm", True),
            image_dim=c.get("image_dim"), image_pos_len=c.get("pos_embed_seq_len"),
            rope_max_len=c.get("rope_max_seq_len", 1024),
        )
    elif "num_heads" in config_json and "dim" in config_json:  # official Wan WanModel
        c = config_json
        model_type = c.get("model_type", "t2v")
        flf2v = model_type == "flf2v"
        if flf2v:
            model_type = "i2v"
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json model_type {model_type!r} is not supported (one of {MODEL_TYPES})")
        # Wan2.1 I2V / FLF2V carry CLIP image tokens, Wan2.2 I2V-A14B conditions through latents only, and
        # their config.json files look alike: the state dict's keys tell them apart when given.
        if state_dict_keys is not None:
            keys = set(state_dict_keys)
            image_dim = 1280 if "img_emb.proj.1.weight" in keys else None
            flf2v = "img_emb.emb_pos" in keys
        else:
            image_dim = 1280 if model_type == "i2v" else None
        values = dict(
            name="official", model_type=model_type, in_dim=c.get("in_dim", 16), out_dim=c.get("out_dim", 16),
            dim=c["dim"], ffn_dim=c["ffn_dim"], freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096),
            text_len=c.get("text_len", 512), num_heads=c["num_heads"], num_layers=c["num_layers"],
            patch_size=tuple(c.get("patch_size", (1, 2, 2))), eps=c.get("eps", 1e-6), qk_norm=c.get("qk_norm", True),
            cross_attn_norm=c.get("cross_attn_norm", True), image_dim=image_dim,
            image_pos_len=514 if flf2v and image_dim else None,
        )
    else:
        raise ConfigError("config.json is neither an official Wan config (dim, num_heads, …) "
                          "nor a diffusers WanTransformer3DModel config (num_attention_heads, …)")
    values.update(overrides)
    return build(DiTConfig, values, "model").validate()


# Writers: the config.json of each foreign layout (export writes them; dit_config_from reads them).


def official_config_json(cfg: DiTConfig) -> dict:
    """The official Wan config.json of `cfg` (what dit_config_from reads back)."""
    model_type = "flf2v" if cfg.image_pos_len else cfg.model_type
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": model_type,
            "patch_size": list(cfg.patch_size), "text_len": cfg.text_len, "in_dim": cfg.in_dim, "dim": cfg.dim,
            "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim, "out_dim": cfg.out_dim,
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "window_size": [-1, -1],
            "qk_norm": cfg.qk_norm, "cross_attn_norm": cfg.cross_attn_norm, "eps": cfg.eps}


def diffusers_config_json(cfg: DiTConfig) -> dict:
    """diffusers' WanTransformer3DModel config.json of `cfg` (what dit_config_from reads back)."""
    return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0",
            "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim, "out_channels": cfg.out_dim,
            "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
            "cross_attn_norm": cfg.cross_attn_norm, "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
            "eps": cfg.eps, "image_dim": cfg.image_dim, "added_kv_proj_dim": cfg.dim if cfg.image_dim else None,
            "rope_max_seq_len": cfg.rope_max_len, "pos_embed_seq_len": cfg.image_pos_len}
