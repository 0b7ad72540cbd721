import os
import warnings

# Tests run many tiny ranks on a 2-core machine: one thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Triton decides at import whether its functions are interpreted; diffusers / torch may import it before any
# kernel test runs, so the CPU interpreter is chosen here, before anything else (a GPU runs the real kernels).
if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
