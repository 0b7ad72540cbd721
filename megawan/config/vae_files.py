"""A VAE config named by a preset or by a file: what `--vae-config` accepts wherever a VAE is loaded.

    vae_config_named("wan2.1")                       # a preset (megawan.config.vae)
    vae_config_named("exported/vae/config.json")     # diffusers' AutoencoderKLWan config.json (a trained VAE's
    vae_config_named("exported/vae")                 #   export: its recomputed latents_mean / latents_std), or the
    vae_config_named("exported/vae_config.json")     #   vae_config.json written beside an exported official .pth

A file's config is named by its path (`VAEConfig.name`), so that what a latent store records (its VAE's name,
latents_mean / latents_std) leads back to it.
"""

from __future__ import annotations

import json
import os

from megawan.config.fields import ConfigError
from megawan.config.vae import VAEConfig, vae_config_from, vae_preset

CONFIG_NAMES = ("config.json", "vae_config.json")  # what a folder is searched for, in this order


def _config_file(path: str, field: str) -> str:
    if not os.path.isdir(path):
        return path
    for name in CONFIG_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ConfigError(f"{field}: {path}: a VAE config folder holds {' or '.join(CONFIG_NAMES)}; found neither")


def vae_config_named(name_or_path: str, field: str = "--vae-config") -> VAEConfig:
    """The preset `name_or_path`, or the AutoencoderKLWan config.json at that path (a file or a folder holding
    config.json / vae_config.json). Errors are one line naming `field` and the file."""
    looks_like_path = os.sep in name_or_path or name_or_path.endswith(".json") or os.path.exists(name_or_path)
    if not looks_like_path:
        try:
            return vae_preset(name_or_path)
        except ConfigError as e:
            raise ConfigError(f"{field}: {e} (or give an AutoencoderKLWan config.json path)") from None
    path = _config_file(name_or_path, field)
    if not os.path.isfile(path):
        raise ConfigError(f"{field}: {path}: no such VAE config file")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{field}: {path} is not a readable JSON file ({e})") from None
    if not isinstance(values, dict) or values.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ConfigError(f"{field}: {path} is not an AutoencoderKLWan config.json (_class_name "
                          f"{values.get('_class_name') if isinstance(values, dict) else None!r})")
    try:
        return vae_config_from(values, name=os.path.abspath(path))
    except ConfigError as e:
        raise ConfigError(f"{field}: {path}: {e}") from None
