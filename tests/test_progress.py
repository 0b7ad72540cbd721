"""Progress lines (megawan.utils.progress, on tqdm): off a terminal (a Slurm log) plain newline-separated lines;
after a resume the rate and ETA count the steps this process ran, not the resumed ones as if they took no
time. The trainer's start-of-run banner (megawan.training.banner)."""

import io

from megawan.utils.progress import Progress


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_resumed_run_counts_its_rate_from_the_resume_step():
    clock, out = _Clock(), io.StringIO()
    bar = Progress(100, desc="train", unit="steps", stream=out, every=0, initial=40, clock=clock)
    for _ in range(10):  # 10 steps of 2 s each after resuming at step 40
        clock.now += 2.0
        bar.update(1, loss="0.1234")
    assert bar.count == 50 and bar.rate == 0.5  # not 50 steps / 20 s
    last = bar.line()
    # 50 more steps at 2 s each: 1:40 left (tqdm writes a rate under 1/s as seconds per step)
    assert last.startswith("train 50/100 steps [00:20<01:40, 2.00s/steps]") and last.endswith(" | loss 0.1234")
    bar.close()


def test_off_a_terminal_each_update_is_its_own_line():
    clock, out = _Clock(), io.StringIO()
    bar = Progress(4, desc="precompute [rank 0]", unit="clips", stream=out, every=1.0, clock=clock)
    for k in range(4):
        clock.now += 0.6
        bar.update(1, skipped=k)
    bar.close()
    lines = out.getvalue().split("\n")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue() and lines[-1] == ""
    # every second at most, and the last count always: 2 of 4 updates (1.2 s, the end) printed, none again at close
    assert [line.split(" clips")[0] for line in lines[:-1]] == ["precompute [rank 0] 2/4", "precompute [rank 0] 4/4"]
    assert lines[-2].endswith(" | skipped 3")


def test_a_disabled_bar_prints_nothing():
    out = io.StringIO()
    bar = Progress(3, stream=out, enabled=False, every=0)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""


def test_the_start_banner_names_the_layout_batches_and_folders():
    from megawan.config import load_config
    from megawan.training.banner import parameter_counts, run_banner

    cfg = load_config(None, ["model.preset=tiny", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                             "data.global_batch_size=4", "lora.rank=4", "checkpoint.init_from=base",
                             "checkpoint.dir=runs/x"])
    total, trainable = parameter_counts(cfg)
    assert 0 < trainable < total  # LoRA: the adapters only
    text = run_banner(cfg, 8, {"17x32x48": 24}, (4, 8, 8), step=10, log_dir="runs/x/logs")
    assert "world 8 = TP2 x PP1 x CP1 x DP4; SP on" in text and "LoRA rank 4" in text
    assert "17x32x48: 24 samples, 30 tokens/sample, 120 tokens/step" in text  # 5 x 4 x 6 latents, patch 1 x 2 x 2
    assert "resuming at step 10 of 1000" in text and "into runs/x" in text and "logs: runs/x/logs" in text
