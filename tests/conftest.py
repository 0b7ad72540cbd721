import os
import warnings

# Tests run many tiny ranks on a 2-core machine: one thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Triton decides at import whether its functions are interpreted; diffusers / torch may import it before any
# kernel test runs, so the CPU interpreter is chosen here, before anything else (a GPU runs the real kernels).
if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


import pytest  # noqa: E402  (after the environment above is settled)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """The tiny latent store the `megawan train` tests train on (tests/training_runs.py), made once per session:
    it takes ~10 s to make, and several test files only read it."""
    from training_runs import make_tiny_store

    return make_tiny_store(str(tmp_path_factory.mktemp("tiny-store")))


@pytest.fixture(scope="session")
def uninterrupted(tiny_store, tmp_path_factory):
    """(checkpoint dir, per-step losses) of the tiny config trained on 2 ranks without interruption: what every
    killed-and-resumed run must reproduce bit for bit (tests/test_trainer.py, tests/test_async_checkpoint.py)."""
    from training_runs import losses, run

    ckpt = str(tmp_path_factory.mktemp("ref") / "ckpt")
    code, log = run(2, ckpt, tiny_store)
    assert code == 0, log
    return ckpt, losses(ckpt)


@pytest.fixture(scope="session")
def slurm_dataset(tmp_path_factory):
    """The tiny store both Slurm test modules train on (tests/test_slurm.py, tests/test_slurm_multihost.py),
    and tests/test_curriculum.py's stages: built once per session, since it takes ~10 s on 2 cores. The runs
    only read it."""
    from megawan.demo.tiny_dataset import make_tiny_dataset

    return make_tiny_dataset(str(tmp_path_factory.mktemp("slurm-data") / "work"), videos=8, images=8)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """A tiny text-to-video pipeline (random weights, fp32) in `root`/official, `root`/megawan (what `--ckpt`
    takes) and `root`/diffusers (tests/pipelines.py): made once per session for the tests that only read it
    (tests/test_generate.py, tests/test_serve.py)."""
    from pipelines import make_pipelines_in_three_layouts

    root = tmp_path_factory.mktemp("tiny-pipelines")
    make_pipelines_in_three_layouts(root)
    return root


@pytest.fixture(scope="session")
def trained_encoders(tmp_path_factory):
    """The tiny encoders with the VAE trained for TINY_VAE_STEPS (seed 0), exactly what `megawan demo` writes
    (megawan.demo.tiny_dataset.make_tiny_dataset(train_vae_steps=TINY_VAE_STEPS)): made once per session, since
    the training takes ~2.5 min on 2 cores. tests/test_demo.py runs the demo on them (and counts their training
    time in its 15-minute limit); tests/test_tiny_vae_colors.py checks the VAE's colours on held-out clips.
    On the session's one thread (above): two threads were no faster on 2 cores, and far slower on a busy machine."""
    from megawan.demo.tiny_assets import TINY_VAE_STEPS, write_tiny_encoders

    return write_tiny_encoders(str(tmp_path_factory.mktemp("trained-encoders") / "encoders"),
                               train_vae_steps=TINY_VAE_STEPS)


@pytest.fixture(scope="session")
def demo_run(trained_encoders, tmp_path_factory):
    """(output folder, summary) of `megawan demo` run once per session on the session's trained encoders:
    tests/test_demo.py checks the run itself; tests/test_lora_task.py fine-tunes its checkpoint (a model of the
    six COLORS) with a LoRA, so the suite pre-trains the demo's model once (~8 min on 2 cores), not twice."""
    from megawan.demo.runner import run_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(str(out), encoders=trained_encoders)  # what `megawan demo` runs: 1200 steps
