"""`megawan env` on this (CPU) machine: every item is named, a missing library reads "not installed", and nothing
raises: the report is most wanted where something is missing."""

from megawan.cli import main
from megawan.env_report import LIBRARIES, MISSING, TRACKERS, collect, module_version

ITEMS = ("megawan", "Python", "torch", "CUDA", "NCCL", "cuDNN", "GPUs", "PyAV H.264 encoder", "backend: auto")


def test_env_names_every_item_on_cpu(capsys, monkeypatch):
    monkeypatch.delenv("MEGAWAN_KERNELS", raising=False)
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split("  ")[0].strip() for line in lines]
    expected = [*ITEMS, "MEGAWAN_KERNELS=auto", *(label for label, _, _ in LIBRARIES),
                *(f"tracker {label}" for label, _ in TRACKERS)]
    assert sorted(labels) == sorted(expected)
    values = dict(collect())
    assert values["backend: auto"].startswith("local") and values["GPUs"] == "none"  # this machine: CPU only
    assert values["MEGAWAN_KERNELS=auto"] == "torch on cpu" and values["Transformer Engine"] == MISSING


def test_a_missing_or_misnamed_library_is_not_installed():
    assert module_version("no_such_module_megawan") == MISSING
    assert module_version("no_such_package.core", ("no-such-dist",)) == MISSING
