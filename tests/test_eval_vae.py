"""tools/eval_vae.py: several VAEs (an official .pth, the same weights as a diffusers folder, another VAE) scored on
held-out clips per bucket, side by side, with LPIPS from weight files; results.json, the table, mp4 / png media
and the PNG strips written; the numbers equal a direct computation; evaluate_vae takes batches as a training
loop's validation hands them; bad input is one line."""

import importlib.util
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from megawan.config import diffusers_vae_config_json, vae_preset
from megawan.convert import convert_state_dict
from megawan.data.eval_clips import eval_clips
from megawan.demo.shapes import write_synthetic_dataset
from megawan.models.vae import WanVAE
from megawan.models.vae.lpips import CHANNELS, LPIPS, VGG16_CONVS, lpips_video
from megawan.models.vae.scores import evaluate_vae
from megawan.vae_eval import load_any_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKETS = ["5x16x16", "1x16x16"]


def _tool():
    spec = importlib.util.spec_from_file_location("eval_vae", os.path.join(ROOT, "tools", "eval_vae.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _vae(seed):
    torch.manual_seed(seed)
    return WanVAE(vae_preset("tiny-2.1")).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-vae")
    manifest = write_synthetic_dataset(str(root / "clips"), count=2, frames=9, height=32, width=48, broken=1)
    cfg = vae_preset("tiny-2.1")
    torch.save(convert_state_dict(_vae(0).state_dict(), "megawan", "official", cfg), root / "Wan2.1_VAE.pth")
    os.makedirs(root / "same" / "vae")
    save_file(_vae(0).state_dict(), str(root / "same" / "vae" / "diffusion_pytorch_model.safetensors"))
    with open(root / "same" / "vae" / "config.json", "w") as f:
        json.dump(diffusers_vae_config_json(cfg), f)
    os.makedirs(root / "other")
    torch.save(convert_state_dict(_vae(1).state_dict(), "megawan", "official", cfg), root / "other" / "w.pth")
    g = torch.Generator().manual_seed(0)  # random LPIPS weights in the two standard files
    vgg = {}
    for i, cin, cout in VGG16_CONVS:
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.zeros(cout)
    torch.save(vgg, root / "vgg16.pth")
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(CHANNELS)},
               root / "lin.pth")
    return root, manifest


def test_side_by_side_per_bucket(files, capsys):
    root, manifest = files
    out = str(root / "eval")
    argv = ["--vae", f"official={root / 'Wan2.1_VAE.pth'}", "--vae", f"diffusers={root / 'same'}",
            "--vae", str(root / "other" / "w.pth"), "--manifest", manifest, "--buckets", *BUCKETS, "--out", out,
            "--media", "3", "--lpips-vgg", str(root / "vgg16.pth"), "--lpips-lin", str(root / "lin.pth")]
    assert _tool().main(argv) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert list(results["vaes"]) == ["official", "diffusers", "w.pth"]
    assert results["clips"] == 2 and results["samples"] == 4  # each clip at both buckets
    assert [s["id"] for s in results["skipped"]] == ["broken_000"]
    official, same, other = (results["vaes"][k] for k in ("official", "diffusers", "w.pth"))
    assert official["buckets"] == same["buckets"] and official["overall"] == same["overall"]  # one VAE, two layouts
    assert official["overall"]["psnr"] != other["overall"]["psnr"]
    assert sorted(official["buckets"]) == sorted(BUCKETS) and official["buckets"]["5x16x16"]["samples"] == 2

    # the numbers, recomputed directly: PSNR per frame from the MSE, LPIPS through the network itself
    clips, _ = eval_clips(manifest, BUCKETS)
    net = LPIPS.from_files(str(root / "vgg16.pth"), str(root / "lin.pth"))
    vae = _vae(0)
    for clip, row in zip(clips, official["samples"]):
        assert (row["id"], row["bucket"]) == (clip["id"], clip["bucket"])
        x = clip["video"][None]
        with torch.no_grad():
            recon = vae.decode(vae.encode(x)[0])
            mse = (recon - x).pow(2).mean(dim=(1, 3, 4))[0]
            assert row["psnr"] == pytest.approx(sum(10 * math.log10(4 / float(m)) for m in mse) / len(mse), rel=1e-5)
            assert row["lpips"] == pytest.approx(float(lpips_video(net, recon, x)[0]), rel=1e-5)
    by_bucket = [r["psnr"] for r in official["samples"] if r["bucket"] == "1x16x16"]
    assert official["buckets"]["1x16x16"]["psnr"] == pytest.approx(sum(by_bucket) / len(by_bucket))

    table = open(os.path.join(out, "table.txt")).read()
    assert table.strip() in printed and table.count("overall") == 3
    strips = sorted(os.listdir(os.path.join(out, "strips")))
    assert len(strips) == 3 and all(s.endswith(".png") for s in strips)
    video_sample = next(f"{c['id']}@{c['bucket']}" for c in clips if c["bucket"] == "5x16x16")
    image_sample = next(f"{c['id']}@{c['bucket']}" for c in clips if c["bucket"] == "1x16x16")
    assert {"original.mp4", "official.mp4", "diffusers.mp4", "w.pth.mp4"} <= set(
        os.listdir(os.path.join(out, "media", video_sample)))
    assert "w.pth.png" in os.listdir(os.path.join(out, "media", image_sample))


def test_batches_as_validation_hands_them(files):
    root, manifest = files
    clips, _ = eval_clips(manifest, ["5x16x16"])
    _, vae = load_any_vae(str(root / "Wan2.1_VAE.pth"))
    one_by_one = evaluate_vae(vae, clips)
    batched = evaluate_vae(vae, [{"video": torch.stack([c["video"] for c in clips]), "bucket": "5x16x16",
                                  "ids": [c["id"] for c in clips]}], keep=1)
    assert [r["id"] for r in batched["samples"]] == [c["id"] for c in clips]
    for a, b in zip(one_by_one["samples"], batched["samples"]):
        assert a["psnr"] == pytest.approx(b["psnr"], rel=1e-5) and a["ssim"] == pytest.approx(b["ssim"], rel=1e-5)
    assert batched["reconstructions"][0].shape == clips[0]["video"].shape


def test_bad_input_is_one_line(files, capsys):
    root, manifest = files
    tool = _tool()
    base = ["--manifest", manifest, "--buckets", *BUCKETS, "--out", str(root / "bad")]
    for argv, words in [
        (["--vae", str(root / "missing.pth"), *base], "no such file or folder"),
        (["--vae", str(root / "Wan2.1_VAE.pth"), "--lpips-vgg", str(root / "vgg16.pth"), *base], "go together"),
        (["--vae", str(root / "Wan2.1_VAE.pth"), "--lpips-vgg", str(root / "lin.pth"), "--lpips-lin",
          str(root / "lin.pth"), *base], "--lpips-vgg"),
        (["--vae", str(root), *base], "neither a train-vae checkpoint"),
    ]:
        assert tool.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
