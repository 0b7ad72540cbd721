"""Run and model configuration: one dataclass per section, every field with a default, validation that names the
field, and the presets and foreign config.json readers of each model beside its config.

    fields.py   ConfigError, the field check, building a dataclass from a mapping, config_to_dict
    dit.py      DiTConfig, the official / tiny DiT presets, dit_config_from (official or diffusers config.json) and
                the writers of both (official_config_json, diffusers_config_json)
    vae.py      VAEConfig, the Wan2.1 / Wan2.2 / tiny presets and latent statistics, vae_config_from /
                diffusers_vae_config_json (diffusers' AutoencoderKLWan)
    text.py     TextConfig, the umT5 presets, text_config_from / transformers_config_json (transformers' UMT5Config)
    clip.py     CLIPConfig, the CLIP vision tower presets, clip_config_from / transformers_clip_config_json
                (transformers' CLIPVisionConfig), clip_image_processor_json (CLIPImageProcessor)
    lora.py     LoRAConfig, the run's `lora:` section
    run.py      the run sections (parallel, data, optimizer, train, checkpoint, logging, validation), RunConfig,
                load_config (YAML + `section.key=value` overrides)
"""

from megawan.config.clip import (CLIP_MEAN, CLIP_STD, CLIPConfig, clip_config_from, clip_image_processor_json,
                                 clip_preset, transformers_clip_config_json)
from megawan.config.dit import (BACKENDS, MODEL_TYPES, DiTConfig, diffusers_config_json, dit_config_from, dit_preset,
                                official_config_json, preset_names)
from megawan.config.fields import DTYPES, ConfigError, config_to_dict
from megawan.config.lora import LoRAConfig
from megawan.config.run import (CheckpointConfig, DataConfig, LoggingConfig, OptimizerConfig, ParallelConfig,
                                RunConfig, TrainConfig, ValidationConfig, load_config)
from megawan.config.text import TextConfig, text_config_from, text_preset, transformers_config_json
from megawan.config.vae import (WAN21_LATENT_MEAN, WAN21_LATENT_STD, VAEConfig, diffusers_vae_config_json,
                                vae_config_from, vae_preset)

__all__ = [
    "BACKENDS", "DTYPES", "MODEL_TYPES", "WAN21_LATENT_MEAN", "WAN21_LATENT_STD",
    "ConfigError", "DiTConfig", "VAEConfig", "TextConfig", "CLIPConfig", "CLIP_MEAN", "CLIP_STD",
    "ParallelConfig", "DataConfig", "OptimizerConfig", "TrainConfig", "CheckpointConfig", "LoggingConfig",
    "ValidationConfig", "LoRAConfig", "RunConfig",
    "dit_preset", "preset_names", "dit_config_from", "vae_preset", "vae_config_from", "text_preset",
    "text_config_from", "clip_preset", "clip_config_from", "load_config", "config_to_dict",
    "official_config_json", "diffusers_config_json", "diffusers_vae_config_json", "transformers_config_json",
    "transformers_clip_config_json", "clip_image_processor_json",
]
