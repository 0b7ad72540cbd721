"""Checks of a `megawan train-vae` config before any rank starts, and the weights it starts from.

    facts = preflight_vae(cfg, world_size)   # ConfigError naming the field, or {"buckets", "stride", "init_state"}
    state = init_state(cfg)                  # init.from as a state dict of cfg.vae (inflated when init.inflate)

Refused: Wan2.1 / Wan2.2 shapes mixed (a patch size without residual blocks, channels that do not match the
patch size), buckets the VAE's strides (or the discriminator) cannot take, an image_only VAE with a multi-frame
bucket, a global batch that does not split over the data-parallel ranks, missing files (manifest, LPIPS weights,
init.from), and init.from tensors that do not fit vae.* (the first key and both shapes are named).
"""

from __future__ import annotations

import os

import torch

from megawan.artifacts import VAE_LAYOUTS, to_megawan
from megawan.checkpoint import CheckpointTensors, is_checkpoint, resolve_checkpoint
from megawan.checkpoint_integrity import CheckpointError
from megawan.config import ConfigError, VAEConfig
from megawan.config.vae_run import VAERunConfig
from megawan.convert import load_state_dict_file
from megawan.data.buckets import Bucket
from megawan.models.vae import WanVAE
from megawan.models.vae.discriminator import Discriminator3D
from megawan.training.vae_module import VAE_PREFIX


def vae_stride(cfg: VAEConfig) -> tuple:
    """(temporal, height, width) stride of `cfg` (an image_only VAE has no temporal stride)."""
    t = 1 if getattr(cfg, "image_only", False) else cfg.temporal_stride
    return t, cfg.spatial_stride, cfg.spatial_stride


def _check_architecture(v: VAEConfig) -> None:
    if v.patch_size and v.patch_size > 1 and not v.is_residual:
        raise ConfigError(f"vae.patch_size: {v.patch_size} is Wan2.2's patchify, which goes with its residual "
                          "blocks (vae.is_residual: true); Wan2.1 has no patch size (null)")
    p = v.patch_size or 1
    for name in ("in_channels", "out_channels"):
        if getattr(v, name) != 3 * p * p:
            raise ConfigError(f"vae.{name}: {getattr(v, name)}, but RGB pixels patchified by vae.patch_size={p} "
                              f"have {3 * p * p} channels")


def check_buckets(names, cfg: VAEConfig, field: str) -> list:
    """Bucket objects of `names`, each one the VAE's strides take (`field` names the config field)."""
    st, s, _ = vae_stride(cfg)
    out = []
    for name in names:
        try:
            b = Bucket.from_name(str(name))
        except ValueError as e:
            raise ConfigError(f"{field}: {e}") from None
        if b.frames < 1 or (b.frames - 1) % st:
            raise ConfigError(f"{field}: {name} has {b.frames} frames; this VAE takes 1 + {st}k frames")
        if getattr(cfg, "image_only", False) and b.frames != 1:
            raise ConfigError(f"{field}: {name} is a clip, but vae.image_only trains the 2D image VAE on 1-frame "
                              "buckets only")
        if b.height % s or b.width % s or b.height < 1 or b.width < 1:
            raise ConfigError(f"{field}: {name}: height and width must be multiples of the VAE's spatial stride {s}")
        out.append(b)
    return out


def _exists(path, field: str) -> None:
    if path and not os.path.exists(path):
        raise ConfigError(f"{field}: {path} does not exist")


def preflight_vae(cfg: VAERunConfig, world_size: int) -> dict:
    """Refuse a run that cannot work, naming the field. Returns facts the trainer reuses: "buckets" (names),
    "stride" and "init_state" (init.from's tensors as a state dict of vae.*, or None)."""
    cfg.validate(world_size)
    _check_architecture(cfg.vae)
    buckets = check_buckets(cfg.data.buckets, cfg.vae, "data.buckets")
    dp = cfg.parallel.data_parallel(world_size)
    if cfg.data.global_batch_size % dp:
        raise ConfigError(f"data.global_batch_size: {cfg.data.global_batch_size} samples do not split over "
                          f"{dp} data-parallel ranks")
    if cfg.gan:
        d = Discriminator3D(base=1, layers=cfg.loss.disc_layers)
        small = [b.name for b in buckets if min(b.height, b.width) < d.min_size()]
        if small:
            raise ConfigError(f"data.buckets: {small} are smaller than the discriminator's {d.min_size()} pixels "
                              f"(loss.disc_layers={cfg.loss.disc_layers}: fewer layers take smaller crops)")
    ratio = cfg.data.video_ratio
    for kind, wanted, present in (("clip", ratio is not None and ratio > 0, any(b.frames > 1 for b in buckets)),
                                  ("image", ratio is not None and ratio < 1, any(b.frames == 1 for b in buckets))):
        if wanted and not present:
            raise ConfigError(f"data.video_ratio: {ratio} asks for {kind} batches but data.buckets "
                              f"{[b.name for b in buckets]} has no {kind} bucket")
    _exists(cfg.data.manifest, "data.manifest")
    if cfg.loss.lpips > 0:
        _exists(cfg.loss.lpips_vgg, "loss.lpips_vgg")
        _exists(cfg.loss.lpips_lin, "loss.lpips_lin")
    if cfg.validation.every:
        _exists(cfg.validation.manifest, "validation.manifest")
        check_buckets(cfg.validation.buckets or cfg.data.buckets, cfg.vae, "validation.buckets")
    state = init_state(cfg) if cfg.init.from_ else None
    return {"buckets": [b.name for b in buckets], "stride": vae_stride(cfg.vae), "init_state": state}


# ----------------------------------------------------------------------------------------------
# init.from


def _read(path: str, config: VAEConfig) -> dict:
    """A VAE state dict in megawan (= diffusers) names from a train-vae checkpoint, a diffusers folder or file,
    or an official .pth."""
    if os.path.isdir(path) and (os.path.isfile(os.path.join(path, "latest")) or is_checkpoint(path)):
        try:
            folder = resolve_checkpoint(path)
            tensors = CheckpointTensors(folder)
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            raise ConfigError(f"init.from: {e}") from None
        keys = [k for k in tensors.keys() if k.startswith(VAE_PREFIX)]
        if not keys:
            raise ConfigError(f"init.from: {folder} holds no VAE tensors ({VAE_PREFIX}*): not a train-vae checkpoint")
        return {k[len(VAE_PREFIX):]: tensors.get(k) for k in keys}
    if os.path.isdir(path):
        files = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".pth", ".pt", ".bin")))
        if not files:
            raise ConfigError(f"init.from: {path} holds no weight file (.safetensors / .pth)")
        path = os.path.join(path, files[0])
    try:
        state = load_state_dict_file(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init.from: {e}") from None
    expected = WanVAE(config).state_dict()
    if set(state) == set(expected):
        return state  # megawan / diffusers names
    try:
        return to_megawan(state, config, VAE_LAYOUTS, "Wan-VAE", path)[0]
    except ValueError as e:
        raise ConfigError(f"init.from: {str(e).splitlines()[0]}") from None


def check_fits(state: dict, config: VAEConfig, field: str = "init.from") -> None:
    """ConfigError naming the first tensor of `state` missing from, or shaped unlike, a WanVAE of `config`."""
    expected = {k: tuple(v.shape) for k, v in WanVAE(config).state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise ConfigError(f"{field}: has no tensor {key} that vae.* ({config.name}) needs")
        if tuple(state[key].shape) != shape:
            raise ConfigError(f"{field}: {key} is {list(state[key].shape)} there, but vae.* ({config.name}) makes it "
                              f"{list(shape)} (a Wan2.1 / Wan2.2 or size mix-up?)")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ConfigError(f"{field}: its tensor {extra[0]} has no place in vae.* ({config.name})")


def init_state(cfg: VAERunConfig) -> dict:
    """init.from read and checked against vae.*; with init.inflate, read as the 2D image VAE of vae.* and inflated
    (megawan.models.vae.inflate)."""
    path = cfg.init.from_
    if not os.path.exists(path):
        raise ConfigError(f"init.from: {path} does not exist")
    if cfg.init.inflate:
        from megawan.models.vae.inflate import image_vae_config, inflate_image_vae

        flat = image_vae_config(cfg.vae)
        state = _read(path, flat)
        check_fits(state, flat)
        state = inflate_image_vae(state, cfg.vae)
    else:
        state = _read(path, cfg.vae)
    check_fits(state, cfg.vae)
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}

