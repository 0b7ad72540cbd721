"""The config of a VAE training run (`megawan train-vae`): the architecture trained, where its weights start,
the pixel data, the losses and the GAN stage, and the sections it shares with `megawan train` (optimizer,
checkpoint, logging, parallel).

    cfg = load_vae_config("examples/configs/vae/stage2_clips.yaml", ["train.steps=100", "loss.gan=0.1"])

Every field has a default; an unknown key is an error naming it (and the nearest known one); impossible values
are refused by `validate()` naming the field. What needs files or the data (init.from's tensors, the buckets
the VAE's strides take, LPIPS weights) is checked by megawan.training.vae_preflight.preflight_vae before any
rank starts.

    vae:        {preset: tiny-2.1, <any VAEConfig field>}       the architecture (image_only: the 2D stage-1 VAE)
    init:       {from: null, inflate: false, freeze_encoder: false, per_frame: false, logvar: null,
                 freeze_time_taps: false}
    data:       {manifest, buckets, global_batch_size, micro_batch_size, num_workers, fps, decode, random_crop}
    loss:       {l1, kl, lpips, lpips_vgg, lpips_lin, gan, gan_start, disc_lr, disc_betas, adaptive_gan_weight,
                 latent_moments, mse, foreground_weight, foreground_threshold, foreground_color, disc_base,
                 disc_layers}
    optimizer:  run.OptimizerConfig      checkpoint: run.CheckpointConfig     logging: run.LoggingConfig
    parallel:   run.ParallelConfig (data parallel only: the overlap / bucket fields)
    train:      {steps, precision, seed, log_every, ema_decay, recompute, max_bad_steps}
    validation: {every, manifest, buckets, samples}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megawan.config.fields import ConfigError, build, checker, config_to_dict, did_you_mean
from megawan.config.run import CheckpointConfig, LoggingConfig, OptimizerConfig, ParallelConfig, read_raw_config
from megawan.config.vae import _VAE_PRESETS, VAEConfig

DECODES = ("auto", "pyav", "dali")


@dataclass
class InitConfig:
    """Where the weights start. `from` in YAML (a Python keyword: `from_` here)."""

    # an official Wan2.x_VAE.pth, a diffusers vae folder / .safetensors, or a train-vae checkpoint (folder or run
    # root); null: a fresh initialisation
    from_: Optional[str] = None
    inflate: bool = False  # `from` is an image_only VAE (stage 1): its 2D weights are inflated into vae.* (3D)
    freeze_encoder: bool = False  # decoder-only fine-tuning: encoder + quant_conv frozen (latent stores stay valid)
    # a fresh initialisation (no `from`) as a per-frame image autoencoder: the causal convs' earlier time taps zero,
    # the temporal resampling convs identities (megawan.models.vae.inflate.per_frame_init)
    per_frame: bool = False
    logvar: Optional[float] = None  # a fresh initialisation's posterior log-variance (quant_conv bias), e.g. -6
    # the causal convs' earlier time taps stay as they start (zero after inflate / per_frame): only the temporal
    # resampling convs mix frames (megawan.models.vae.inflate.freeze_earlier_time_taps)
    freeze_time_taps: bool = False


@dataclass
class VAEDataConfig:
    """The pixel data: clips decoded from a manifest on the fly (megawan.data.pixel_loader.PixelLoader)."""

    manifest: str = ""  # the manifest (megawan/data/manifest.py format: JSONL of {id, path, caption, start, end})
    buckets: tuple = ("17x32x32",)  # FRAMESxHEIGHTxWIDTH; frames 1 (images) or 1 + 4k
    global_batch_size: int = 8  # samples per step over all data-parallel ranks
    micro_batch_size: int = 1  # samples per forward / backward on a rank
    num_workers: int = 2  # decoding workers per rank
    fps: float = 16.0  # clips are sampled at this frame rate
    decode: str = "auto"  # auto (DALI on the rank's GPU when available, else PyAV) | pyav | dali
    random_crop: bool = True  # random crop position (seeded: resume is exact); false: centre crop
    # share of steps that draw a clip bucket (the rest an image bucket); None: buckets drawn by their sample counts
    # (a manifest of many stills and few clips then trains on clips rarely)
    video_ratio: Optional[float] = None

    def validate(self, prefix: str = "data") -> "VAEDataConfig":
        need = checker(prefix)
        need(bool(self.manifest), "manifest", "no manifest given (a JSONL of clips and images)")
        need(len(self.buckets) > 0, "buckets", "give at least one bucket, e.g. 17x32x32")
        for name in ("global_batch_size", "micro_batch_size"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(self.num_workers >= 0, "num_workers", "must be at least 0")
        need(self.fps > 0, "fps", "must be positive")
        need(self.decode in DECODES, "decode", f"{self.decode!r} is not one of {DECODES}")
        need(self.video_ratio is None or 0.0 <= self.video_ratio <= 1.0, "video_ratio",
             f"must be within [0, 1] (or unset), got {self.video_ratio}")
        return self


@dataclass
class VAELossConfig:
    """Loss weights (defaults: the Wan report's L1 3, KL 3e-6, LPIPS 3) and the GAN stage."""

    l1: float = 3.0  # mean |x - x_hat| over pixels in [-1, 1]
    kl: float = 3.0e-6  # KL(N(mu, sigma^2) || N(0, 1)), mean over latent elements (megawan.training.vae_losses)
    lpips: float = 3.0  # LPIPS (VGG16 "lin") per frame, frames of a clip averaged; needs lpips_vgg and lpips_lin
    lpips_vgg: Optional[str] = None  # torchvision's vgg16-397923af.pth (.pth or .safetensors)
    lpips_lin: Optional[str] = None  # the LPIPS repo's weights/v0.1/vgg.pth (the five linear heads)
    gan: float = 0.0  # generator's hinge GAN loss weight; 0 = no discriminator
    gan_start: int = 0  # the step the discriminator and the generator's GAN loss start at
    disc_lr: float = 1.0e-4  # the discriminator's own AdamW
    disc_betas: tuple = (0.5, 0.9)
    adaptive_gan_weight: bool = True  # VQGAN's ||grad L_rec|| / ||grad L_gan|| on the decoder's last conv
    latent_moments: float = 0.0  # pull the per-channel mean / std of the normalised posterior means to 0 / 1
    mse: float = 0.0  # mean squared error over pixels in [-1, 1] (the l1 term's L2 sibling)
    foreground_weight: float = 0.0  # l1 / mse weight 1 + this on pixels unlike their frame's median colour
    foreground_threshold: float = 0.1  # "unlike": a channel differs from the median by more than this ([-1, 1])
    foreground_color: float = 0.0  # squared error of each sample's mean foreground colour (vae_losses)
    latent_color: float = 0.0  # 1 - R^2 of a linear map from objects' colours to their latents (vae_losses)
    disc_base: int = 64  # channels of the discriminator's first conv (megawan.models.vae.discriminator)
    disc_layers: int = 3  # its stride-2 conv layers

    def validate(self, prefix: str = "loss") -> "VAELossConfig":
        need = checker(prefix)
        for name in ("l1", "kl", "lpips", "gan", "latent_moments", "mse", "foreground_weight",
                     "foreground_threshold", "foreground_color", "latent_color"):
            need(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        need(self.l1 + self.mse + self.lpips > 0, "l1", "a reconstruction loss is needed: l1, mse or lpips > 0")
        need(self.gan_start >= 0, "gan_start", "must be >= 0")
        need(self.disc_lr > 0, "disc_lr", "must be positive")
        need(len(self.disc_betas) == 2 and all(0 <= b < 1 for b in self.disc_betas), "disc_betas",
             f"two values in [0, 1), got {list(self.disc_betas)}")
        need(self.disc_base >= 1 and self.disc_layers >= 1, "disc_base", "disc_base and disc_layers must be >= 1")
        if self.lpips > 0:
            for name in ("lpips_vgg", "lpips_lin"):
                need(bool(getattr(self, name)), name, f"loss.lpips={self.lpips:g} needs the LPIPS weight files "
                     "loss.lpips_vgg (torchvision vgg16-397923af.pth) and loss.lpips_lin (LPIPS weights/v0.1/"
                     "vgg.pth); set loss.lpips: 0 to train without")
        return self


@dataclass
class VAETrainConfig:
    steps: int = 1000
    precision: str = "fp32"  # fp32 | bf16 (bf16 weights and activations, fp32 main weights in the optimizer)
    seed: int = 0  # initialisation, posterior noise (per step and sample), the data order
    log_every: int = 1
    ema_decay: float = 0.0  # 0 = no EMA of the VAE's weights
    recompute: bool = False  # activation recompute: the encoder and the decoder each recomputed in the backward
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops

    def validate(self, prefix: str = "train") -> "VAETrainConfig":
        need = checker(prefix)
        need(self.steps >= 1, "steps", "must be at least 1")
        need(self.precision in ("bf16", "fp32"), "precision", f"{self.precision!r} is not bf16 or fp32")
        need(self.log_every >= 1, "log_every", "must be at least 1")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        need(self.max_bad_steps >= 1, "max_bad_steps", "must be at least 1")
        return self


@dataclass
class VAEValidationConfig:
    """Every `every` steps: PSNR / SSIM (and LPIPS when its weights are set) on held-out clips, and
    reconstructions (original | reconstruction strips) to the trackers."""

    every: int = 0  # 0 = never
    manifest: Optional[str] = None  # held-out clips (the same manifest format as data.manifest)
    buckets: Optional[tuple] = None  # default: data.buckets
    samples: int = 8  # held-out samples per bucket

    def validate(self, prefix: str = "validation") -> "VAEValidationConfig":
        need = checker(prefix)
        need(self.every >= 0, "every", "must be 0 (off) or a number of steps")
        need(self.every == 0 or bool(self.manifest), "manifest", "validation.every is set but no manifest is given")
        need(self.samples >= 1, "samples", "must be at least 1")
        return self


@dataclass
class VAERunConfig:
    """A whole `megawan train-vae` run: one YAML file maps onto this."""

    vae: VAEConfig = field(default_factory=lambda: _preset("tiny-2.1", {}))
    init: InitConfig = field(default_factory=InitConfig)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    validation: VAEValidationConfig = field(default_factory=VAEValidationConfig)

    @property
    def gan(self) -> bool:
        """Whether the run has a discriminator (loss.gan > 0)."""
        return self.loss.gan > 0

    def validate(self, world_size: Optional[int] = None) -> "VAERunConfig":
        p = self.parallel.validate(world_size)
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(p, name) != 1:
                raise ConfigError(f"parallel.{name}: train-vae is data-parallel only (a Wan-VAE is small; its "
                                  "memory is activations: train.recompute)")
        if p.recompute != "none" or p.offload_blocks:
            raise ConfigError("parallel.recompute: train-vae recomputes with train.recompute: true")
        self.vae.validate()
        self.data.validate()
        self.loss.validate()
        self.optimizer.validate()
        self.train.validate()
        self.logging.validate()
        self.validation.validate()
        if self.loss.gan > 0 and self.loss.gan_start >= self.train.steps:
            raise ConfigError(f"loss.gan_start: {self.loss.gan_start} is not before train.steps={self.train.steps}: "
                              "the GAN would never start")
        if self.init.inflate and not self.init.from_:
            raise ConfigError("init.inflate: inflates the image VAE named by init.from, which is not set")
        if self.init.inflate and getattr(self.vae, "image_only", False):
            raise ConfigError("init.inflate: inflation makes a 3D VAE; vae.image_only is true")
        if self.init.freeze_encoder and not self.init.from_:
            raise ConfigError("init.freeze_encoder: a frozen encoder keeps trained weights; set init.from to them")
        if self.init.from_ and (self.init.per_frame or self.init.logvar is not None):
            raise ConfigError("init.per_frame / init.logvar: shape a fresh initialisation; init.from is set")
        if self.checkpoint.init_from:
            raise ConfigError("checkpoint.init_from: train-vae starts from init.from")
        if self.checkpoint.every < 1 or self.checkpoint.keep < 1:
            raise ConfigError("checkpoint.every / checkpoint.keep: must be at least 1")
        if self.checkpoint.on_corrupt not in ("fallback", "fail"):
            raise ConfigError(f"checkpoint.on_corrupt: {self.checkpoint.on_corrupt!r} is not fallback | fail")
        return self


def _preset(name: str, overrides: dict) -> VAEConfig:
    if name not in _VAE_PRESETS:
        raise ConfigError(f"vae.preset: unknown preset {name!r}{did_you_mean(name, _VAE_PRESETS)}; known: "
                          f"{', '.join(sorted(_VAE_PRESETS))}")
    return build(VAEConfig, {"name": name, **_VAE_PRESETS[name], **overrides}, "vae").validate()


def vae_run_config_dict(cfg: VAERunConfig) -> dict:
    """The run config as a plain dict (YAML-safe): what --print-config prints and checkpoints keep in config.yaml.
    `vae:` starts with `preset:` when the VAE's name is a preset (helper readers take `preset` + the fields),
    `init:` says `from:`; load_vae_config reads it back to the same config."""
    out = config_to_dict(cfg)
    vae = out["vae"]
    if vae["name"] in _VAE_PRESETS:
        vae = {"preset": vae.pop("name"), **vae}
    out["vae"] = vae
    init = out["init"]
    out["init"] = {"from": init.pop("from_"), **init}
    return out


def load_vae_config(path: Optional[str] = None, overrides: tuple = ()) -> VAERunConfig:
    """Read a train-vae config from YAML (or start from defaults) and apply `section.key=value` overrides.

    `vae: {preset: NAME, ...}` starts the architecture from a VAE preset (default tiny-2.1); other vae keys
    override it."""
    raw = read_raw_config(path, overrides)
    vae_raw = dict(raw.pop("vae", None) or {})
    preset = vae_raw.pop("preset", None)
    if preset is None and "name" not in vae_raw:
        preset = "tiny-2.1"
    init_raw = dict(raw.pop("init", None) or {})
    if "from_" in init_raw:
        raise ConfigError("unknown key 'init.from_' (did you mean 'init.from'?)")
    if "from" in init_raw:
        init_raw["from_"] = init_raw.pop("from")
    vae = _preset(preset, vae_raw) if preset is not None else build(VAEConfig, vae_raw, "vae").validate()
    cfg = build(VAERunConfig, {**raw, "init": init_raw}, "")
    return dataclasses.replace(cfg, vae=vae).validate()
