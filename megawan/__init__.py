"""megawan: train Wan-style video diffusion models at scale on megatron-core."""

import warnings as _warnings

__version__ = "0.1.0"

# megatron-core announces its torch fallbacks at import on every rank; megawan chooses its backends itself
# (megawan.capabilities) and says so where it matters, so these lines are noise in every tool's output.
_warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
_warnings.filterwarnings("ignore", message="full scope is deprecated")
