# megawan on NVIDIA's PyTorch container (NGC). The base brings what a GPU run needs, built and tested together
# by NVIDIA: CUDA, cuDNN, NCCL, PyTorch, Transformer Engine, Triton, Python 3.12. This file adds NVIDIA DALI
# (video decoding on the GPU) and megawan with its few pure-Python dependencies, and keeps the base's torch.
#
#   docker build -t megawan .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:26.05-py3 -t megawan .   # another NGC tag
#   docker run --gpus all --ipc=host --rm -it -v /data:/data megawan megawan env
#   enroot import dockerd://megawan          # -> megawan.sqsh, for Slurm with pyxis (docs/slurm.md)
#
# A CUDA 13 base needs an NVIDIA driver of the 580 series or newer on the host (data-centre GPUs may use an
# older one through CUDA's forward compatibility, which the NGC images carry); on an older driver pick a tag
# whose CUDA is 12.x (NGC's release notes list each tag's CUDA). Python must be 3.11+ (zarr 3): NGC 25.01 on.

# The NGC tag: year.month of the release.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.05-py3
FROM ${BASE_IMAGE}

# The megatron-core the test suite runs (setup.py asks for >= 0.16.1); --build-arg MCORE_VERSION=... for another.
ARG MCORE_VERSION=0.16.1

# No pip cache in the layers, no pip self-update notice; Python's output unbuffered (logs show lines at once).
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# Pin every package the base ships that pip could otherwise replace (torch above all: a PyPI torch would drop
# NVIDIA's build, and Transformer Engine with it). NGC images from 25.03 on pin every package they ship in
# /etc/pip/constraint.txt, which pip reads by itself; this file says it for any base, and every pip call passes it.
RUN pip list --format=freeze | grep -iE '^(torch|triton|pytorch-triton|numpy|transformer[-_]engine[-_a-z0-9]*)==' \
    > /etc/megawan-keep-base.txt && cat /etc/megawan-keep-base.txt

# DALI built for the base's CUDA major version (nvidia-dali-cuda120 or -cuda130; one of them only: they share
# the nvidia.dali package). Before megawan's source is copied, so that a code change does not download it again.
RUN CUDA_MAJOR=$(python -c "import torch; print(torch.version.cuda.split('.')[0])") && \
    pip install -c /etc/megawan-keep-base.txt "nvidia-dali-cuda${CUDA_MAJOR}0>=2.4,<3"

# The source (.dockerignore leaves out runs, stores, caches and .git).
WORKDIR /opt/megawan
COPY . /opt/megawan

# megawan, editable (a checkout mounted over /opt/megawan is what then runs, without a rebuild), with the logging
# extra (TensorBoard, matplotlib); the constraints keep the base's torch, which satisfies setup.py's torch>=2.4.
RUN pip install -c /etc/megawan-keep-base.txt "megatron-core==${MCORE_VERSION}" -e ".[logging]" && \
    python -c "import megawan, megatron.core, nvidia.dali, torch; print('megawan', megawan.__version__, 'torch', torch.__version__)"

# `megawan ...` runs the CLI (train, generate, demo, env ...); without arguments a shell.
CMD ["bash"]
