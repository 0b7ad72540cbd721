import os
import warnings

# Tests run many tiny ranks on a 2-core machine: one thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
