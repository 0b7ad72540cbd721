"""megawan: train Wan-style video diffusion models at scale on megatron-core."""

__version__ = "0.1.0"
