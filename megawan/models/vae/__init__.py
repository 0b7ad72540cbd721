"""The Wan-VAE (2.1 and 2.2): causal, chunked encode / decode in bounded memory."""

from megawan.models.vae.model import WanVAE, patchify, unpatchify

__all__ = ["WanVAE", "patchify", "unpatchify"]
