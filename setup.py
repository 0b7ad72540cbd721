"""megawan: training Wan-style video diffusion models at scale on megatron-core."""

import re

from setuptools import find_packages, setup

# Every pin is satisfied by the CPU torch 2.13.0 used in CI and by the newest releases on
# Python 3.12 GPU clusters (megatron-core 0.17+ there).
INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core>=0.16.1",
    "numpy>=1.24",
    "pyyaml>=6.0",
    "safetensors>=0.4",
    "packaging",
    "psutil",  # megatron-core dist_checkpointing needs it
    "einops",  # megatron-core's hierarchical context-parallel groups (parallel.context_parallel_mode=2d)
    "sentencepiece>=0.2",  # the umT5 tokenizer
    "av>=12",  # PyAV: video decoding on CPU, synthetic videos
    "zarr>=3,<4",  # the latent store (v3 format, sharding)
    "pillow",
    "tqdm>=4.60",  # progress lines of train, precompute, generate, conversion (log-friendly off a terminal)
]

# What a run logs to and draws with: TensorBoard event files (on by default: logging.tensorboard=auto writes them
# when this is installed, as the quickstart does) and matplotlib for tools/plot_metrics.py and the demo's loss plot.
LOGGING = ["tensorboard>=2.14", "matplotlib>=3.7"]
# The generation web page (`megawan serve`)
SERVE = ["gradio>=4.44"]
# tools/curate.py: shot cuts (PySceneDetect), optical flow and blur (OpenCV), perceptual hashes (imagehash)
CURATE = ["scenedetect>=0.6.4", "opencv-python-headless>=4.8", "imagehash>=4.3"]

EXTRAS = {
    # Test-only references: diffusers' Wan classes and transformers' UMT5 are what we check against.
    "test": [
        "pytest>=8",
        "pytest-timeout",
        "diffusers>=0.35",
        "transformers>=4.50",
        "protobuf",  # transformers reads sentencepiece models through it
        "scikit-image",  # the reference for megawan.utils.video_metrics' PSNR / SSIM
        "triton>=3.0",  # the kernels/ tests run it on CPU through its interpreter (TRITON_INTERPRET=1)
        "peft",  # diffusers' load_lora_weights needs it (the reference our exported LoRA files are loaded with)
        "accelerate",  # diffusers needs it to load WanPipeline.from_pretrained (fp32-kept modules)
        # DALI's CPU decoders (VP8 / VP9 / MJPEG) run without a GPU, so its tests run in CI; pinned to the release
        # the decoding tolerances in tests/test_data_dali.py were measured with. One py3-none wheel (~420 MB) for
        # every Python 3, no torch dependency; Linux only (x86_64, aarch64)
        "nvidia-dali-cuda120==2.4.0; sys_platform == 'linux'",
        *LOGGING,  # the tests read TensorBoard's event files back and draw plots
        "wandb",  # offline mode: a requeued run keeps its W&B id
        *SERVE,
        *CURATE,
        "selenium>=4.20",  # drives headless Chromium (apt: chromium, chromium-driver) against `megawan serve`
    ],
    "logging": LOGGING,
    "wandb": ["wandb"],
    "serve": SERVE,
    "curate": [*CURATE, "matplotlib>=3.7"],  # + report.html's histograms
    "gpu": [
        "transformer-engine[pytorch]>=2.9",  # te.autocast; megatron-core 0.16.1 declares 2.9 - 2.11
        # fn.decoders.video with frames=, as megawan.data.dali uses it. The CUDA 12 build also runs under CUDA 13
        # drivers; a cluster may install nvidia-dali-cuda130 instead (not both: they share the nvidia.dali package)
        "nvidia-dali-cuda120>=2.4,<3; sys_platform == 'linux'",
        "triton>=3.0",
    ],
}

# One version, in megawan/__init__.py (`megawan --version`, generate's OUT.json and `megawan env` print it)
VERSION = re.search(r'^__version__ = "([^"]+)"', open("megawan/__init__.py", encoding="utf-8").read(), re.M).group(1)

setup(
    name="megawan",
    version=VERSION,
    description="Train Wan-style video diffusion models at scale on megatron-core",
    license="Apache-2.0",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # zarr 3
    packages=find_packages(include=["megawan", "megawan.*", "kernels", "kernels.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megawan = megawan.cli:main"]},
)
