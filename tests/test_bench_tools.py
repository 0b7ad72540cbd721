"""The benchmark tools run end to end on a tiny shape (their real numbers come from bigger runs)."""

import json
import sys

sys.path.insert(0, "tools")


def test_bench_vae_smoke(tmp_path, capsys):
    from bench_vae import main

    out = tmp_path / "vae.json"
    assert main(["--preset", "tiny-2.1", "--height", "32", "--width", "32", "--frames", "1", "5",
                 "--repeats", "1", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["op"], r["frames"]) for r in rows} == {("encode", 1), ("encode", 5), ("decode", 1), ("decode", 5)}
    assert all(r["ours"]["seconds"] > 0 and r["diffusers"]["seconds"] > 0 for r in rows)
    assert "ratio" in capsys.readouterr().out
