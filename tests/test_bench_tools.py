"""The benchmark tools run end to end on a tiny shape (their real numbers come from bigger runs)."""

import json
import sys

sys.path.insert(0, "tools")


def test_bench_vae_smoke(tmp_path, capsys):
    from bench_vae import main

    out = tmp_path / "vae.json"
    # one clip length: each measurement is a fresh process (its own peak memory), ~5 s of imports apiece
    assert main(["--preset", "tiny-2.1", "--height", "32", "--width", "32", "--frames", "5",
                 "--repeats", "1", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["op"], r["frames"]) for r in rows} == {("encode", 5), ("decode", 5)}
    assert all(r["ours"]["seconds"] > 0 and r["diffusers"]["seconds"] > 0 for r in rows)
    assert "ratio" in capsys.readouterr().out


def test_bench_loader_smoke(tmp_path, capsys):
    from bench_loader import main

    out = tmp_path / "loader.json"
    assert main(["--make", "6", "--bucket", "5x32x32", "--text-len", "8", "--text-dim", "16", "--steps", "4",
                 "--workers", "1", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["workers"] for r in result["rows"]] == [1, 2]
    assert all(r["samples_per_s"] > 0 and r["ratio_vs_h100"] > 0 for r in result["rows"])
    assert result["h100_samples_per_s"] > 0 and "x H100 need" in capsys.readouterr().out

