"""What a latent store says about itself, typed: the VAE and text encoder that made it, how it was made.

    meta = LatentStore.open("latents.zarr").metadata          # StoreMetadata
    meta.vae.z_dim, meta.vae.stride, meta.text_encoder.dim    # named fields, no string keys
    mean, std = meta.vae.normalization()                      # [1, z, 1, 1, 1]: train on (z - mean) / std
    meta.conditioning                                         # None, or kind i2v | flf2v + CLIP width / tokens
    LatentStore.create(path, **meta.to_attrs())               # how precompute writes it

On disk these are the root group's Zarr attributes, as before this class existed (`vae`, `text_encoder` and
provenance keys beside `format_version`), so every existing store still opens. The fields a reader needs
(the VAE's name, z_dim and stride, the text encoder's name, dim and max_length) must be there: a store
without one (written by an older megawan, or damaged) raises StoreMetadataError naming it. The rest is
optional (None when absent); `conditioning` (an image-conditioned store, ConditioningMetadata) is None on every
store written without --conditioning, older ones included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megawan.utils.user_errors import UserError


class StoreMetadataError(UserError, ValueError):
    """A store's attributes lack a field readers need, or hold one of the wrong kind."""


def _get(section: dict, key: str, kind, where: str, prefix: str, required: bool = True):
    name = f"{prefix}.{key}" if prefix else key
    if key not in section or section[key] is None:
        if required:
            raise StoreMetadataError(f"{where}: the store's metadata has no '{name}' (a store written by an older "
                                     "megawan, or damaged): precompute it again")
        return None
    try:
        return kind(section[key])
    except (TypeError, ValueError):
        raise StoreMetadataError(f"{where}: the store's metadata field '{name}' is {section[key]!r}, not "
                                 f"{getattr(kind, '__name__', kind)}") from None


def _floats(value) -> tuple:
    return tuple(float(v) for v in value)


def _ints(value) -> tuple:
    return tuple(int(v) for v in value)


def _section(attrs: dict, key: str, where: str) -> dict:
    section = attrs.get(key)
    if not isinstance(section, dict):
        raise StoreMetadataError(f"{where}: the store's metadata has no '{key}' section (a store written by an "
                                 "older megawan, or damaged): precompute it again")
    return section


def _without_none(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True)
class VAEMetadata:
    name: str  # the VAE preset's name
    z_dim: int
    stride: tuple  # (temporal, height, width)
    latents_mean: Optional[tuple] = None  # per channel: the statistics latents are normalised with
    latents_std: Optional[tuple] = None
    weights: Optional[str] = None  # fingerprint of the weights (precompute.fingerprint)
    normalized: bool = False  # False: the stored latents are the VAE's raw means
    preset: Optional[str] = None  # the preset, where it differs from `name`

    def normalization(self) -> tuple:
        """(mean, std), float32 [1, z, 1, 1, 1]: the trainer learns (latents - mean) / std. A store without
        statistics gives 0 and 1 (its latents are trained as stored)."""
        z = self.z_dim
        mean = torch.tensor(list(self.latents_mean) if self.latents_mean else [0.0] * z).view(1, z, 1, 1, 1)
        std = torch.tensor(list(self.latents_std) if self.latents_std else [1.0] * z).view(1, z, 1, 1, 1)
        return mean, std

    @classmethod
    def from_attrs(cls, vae: dict, where: str) -> "VAEMetadata":
        return cls(name=_get(vae, "name", str, where, "vae"), z_dim=_get(vae, "z_dim", int, where, "vae"),
                   stride=_get(vae, "stride", _ints, where, "vae"),
                   latents_mean=_get(vae, "latents_mean", _floats, where, "vae", required=False),
                   latents_std=_get(vae, "latents_std", _floats, where, "vae", required=False),
                   weights=_get(vae, "weights", str, where, "vae", required=False),
                   normalized=bool(vae.get("normalized", False)),
                   preset=_get(vae, "preset", str, where, "vae", required=False))

    def to_attrs(self) -> dict:
        """The JSON attributes, lists where tuples are (a resumed store compares them with what it holds)."""
        return _without_none({"name": self.name, "z_dim": self.z_dim, "stride": list(self.stride),
                              "latents_mean": None if self.latents_mean is None else list(self.latents_mean),
                              "latents_std": None if self.latents_std is None else list(self.latents_std),
                              "weights": self.weights, "normalized": self.normalized, "preset": self.preset})


@dataclass(frozen=True)
class TextEncoderMetadata:
    name: str  # the text-encoder preset's name
    max_length: int  # tokens per caption (the stored states' length)
    dim: int  # the states' width
    weights: Optional[str] = None  # fingerprint of the encoder's weights
    tokenizer: Optional[str] = None  # fingerprint of the tokenizer's vocabulary

    @classmethod
    def from_attrs(cls, text: dict, where: str) -> "TextEncoderMetadata":
        return cls(name=_get(text, "name", str, where, "text_encoder"),
                   max_length=_get(text, "max_length", int, where, "text_encoder"),
                   dim=_get(text, "dim", int, where, "text_encoder"),
                   weights=_get(text, "weights", str, where, "text_encoder", required=False),
                   tokenizer=_get(text, "tokenizer", str, where, "text_encoder", required=False))

    def to_attrs(self) -> dict:
        return _without_none({"name": self.name, "max_length": self.max_length, "dim": self.dim,
                              "weights": self.weights, "tokenizer": self.tokenizer})


@dataclass(frozen=True)
class ConditioningMetadata:
    """What an image-conditioned store holds beside the latents (megawan.data.conditioning): per sample the raw
    VAE latents of the conditioning video (`cond_latents`, the latents' shape), its frame mask (`cond_mask`,
    uint8 [mask_channels, T']) and, when a CLIP image encoder was given, the CLIP tokens of the given frames
    (`clip_tokens`, [clip_tokens, clip_width]; FLF2V: both frames' tokens, first then last)."""
    kind: str  # "i2v" (first frame) | "flf2v" (first and last frame)
    mask_channels: int  # the VAE's temporal stride: 4
    clip: Optional[str] = None  # the CLIP image encoder's preset name; None: no CLIP tokens stored
    clip_weights: Optional[str] = None  # fingerprint of its weights
    clip_width: Optional[int] = None  # the tokens' width (1280 for Wan2.1's ViT-H/14)
    clip_tokens: Optional[int] = None  # tokens per sample (257 per frame for ViT-H/14 at 224 px; FLF2V twice)

    @classmethod
    def from_attrs(cls, section: dict, where: str) -> "ConditioningMetadata":
        p = "conditioning"
        return cls(kind=_get(section, "kind", str, where, p),
                   mask_channels=_get(section, "mask_channels", int, where, p),
                   clip=_get(section, "clip", str, where, p, required=False),
                   clip_weights=_get(section, "clip_weights", str, where, p, required=False),
                   clip_width=_get(section, "clip_width", int, where, p, required=False),
                   clip_tokens=_get(section, "clip_tokens", int, where, p, required=False))

    def to_attrs(self) -> dict:
        return _without_none({"kind": self.kind, "mask_channels": self.mask_channels, "clip": self.clip,
                              "clip_weights": self.clip_weights, "clip_width": self.clip_width,
                              "clip_tokens": self.clip_tokens})


@dataclass(frozen=True)
class StoreMetadata:
    vae: VAEMetadata
    text_encoder: TextEncoderMetadata
    # provenance, as precompute records it
    buckets: Optional[tuple] = None  # the bucket names the job was given
    fps: Optional[float] = None  # the default sampling rate of videos
    dtype: Optional[str] = None  # how latents and text states are stored
    logvar: Optional[bool] = None  # whether the VAE's log-variance is stored beside the mean
    manifest: Optional[str] = None  # the manifest's absolute path
    conditioning: Optional[ConditioningMetadata] = None  # image conditioning; None: a text-to-video store

    @classmethod
    def from_attrs(cls, attrs: dict, where: str = "latent store") -> "StoreMetadata":
        """Parse a store's root attributes; `where` (its path) goes into the error for a missing field."""
        return cls(vae=VAEMetadata.from_attrs(_section(attrs, "vae", where), where),
                   text_encoder=TextEncoderMetadata.from_attrs(_section(attrs, "text_encoder", where), where),
                   buckets=_get(attrs, "buckets", tuple, where, "", required=False),
                   fps=_get(attrs, "fps", float, where, "", required=False),
                   dtype=_get(attrs, "dtype", str, where, "", required=False),
                   logvar=_get(attrs, "logvar", bool, where, "", required=False),
                   manifest=_get(attrs, "manifest", str, where, "", required=False),
                   conditioning=(ConditioningMetadata.from_attrs(attrs["conditioning"], where)
                                 if isinstance(attrs.get("conditioning"), dict) else None))

    def to_attrs(self) -> dict:
        """Keyword arguments of LatentStore.create: vae, text_encoder and the provenance keys that are set."""
        return {"vae": self.vae.to_attrs(), "text_encoder": self.text_encoder.to_attrs(),
                **_without_none({"buckets": None if self.buckets is None else list(self.buckets), "fps": self.fps,
                                 "dtype": self.dtype, "logvar": self.logvar, "manifest": self.manifest,
                                 "conditioning": None if self.conditioning is None else self.conditioning.to_attrs()})}
