import os
import warnings

# Tests run many tiny ranks on a 2-core machine: one thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Triton decides at import whether its functions are interpreted; diffusers / torch may import it before any
# kernel test runs, so the CPU interpreter is chosen here, before anything else (a GPU runs the real kernels).
if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def slurm_dataset(tmp_path_factory):
    """The tiny store both Slurm test modules train on (tests/test_slurm.py, tests/test_slurm_multihost.py):
    built once per session, since it takes ~10 s on 2 cores. The jobs only read it."""
    from megawan.demo.tiny_dataset import make_tiny_dataset

    return make_tiny_dataset(str(tmp_path_factory.mktemp("slurm-data") / "work"), videos=8, images=8)
