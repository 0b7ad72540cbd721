"""tools/inspect_store.py: the per-bucket table, one sample's metadata, a decoded contact sheet; and contact_sheet."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megawan.config import vae_preset
from megawan.convert import convert_state_dict
from megawan.data.store import LatentStore, Sample
from megawan.models.vae import WanVAE
from megawan.utils.images import contact_sheet, even_indices, video_to_uint8

sys.path.insert(0, "tools")

from inspect_store import dir_bytes, human_bytes, main, summarize  # noqa: E402

TEXT = {"name": "tiny", "max_length": 8, "dim": 6}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A store with two buckets whose 5x32x32 samples hold real tiny-VAE latents, and the VAE's weights."""
    root = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)
    cfg = vae_preset("tiny-2.1")
    vae = WanVAE(cfg).eval()
    with torch.no_grad():
        mean, _ = vae.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1)  # [1, 4, 2, 4, 4]
    from safetensors.torch import save_file

    weights = root / "vae.safetensors"
    save_file(vae.state_dict(), str(weights))
    official = root / "vae_official.safetensors"
    save_file(convert_state_dict(vae.state_dict(), "megawan", "official", cfg), str(official))

    path = str(root / "s.zarr")
    store = LatentStore.create(path, vae={"name": "tiny-2.1", "preset": "tiny-2.1", "z_dim": 4, "stride": [4, 8, 8]},
                               text_encoder=TEXT, created_by="test")
    g = torch.Generator().manual_seed(1)
    for rank, i in ((0, 0), (0, 1), (1, 2)):  # bucket 5x32x32 in two parts
        latents = (mean[0] + 0.01 * i).to(torch.bfloat16)
        store.writer(rank).write(Sample(id=f"clip{i}", bucket="5x32x32", latents=latents,
                                        text=torch.randn(8, 6, generator=g).to(torch.bfloat16), text_length=3 + i,
                                        source=f"/v/{i}.mp4", caption=f"caption {i}", fps=16.0,
                                        frame_indices=np.arange(5) * 2 + i))
    store.writer(0).write(Sample(id="still", bucket="1x32x32", latents=mean[0, :, :1].to(torch.bfloat16),
                                 text=torch.randn(8, 6, generator=g).to(torch.bfloat16), text_length=2,
                                 frame_indices=np.zeros(1, dtype=np.int32)))
    return {"path": path, "weights": str(weights), "official": str(official), "vae": vae, "mean": mean}


def test_summary_counts_samples_parts_and_bytes(tiny):
    s = summarize(LatentStore.open(tiny["path"]))
    rows = {r["bucket"]: r for r in s["buckets"]}
    assert list(rows) == ["1x32x32", "5x32x32"]
    b = rows["5x32x32"]
    assert (b["samples"], b["parts"], b["latent_shape"], b["latent_dtype"]) == (3, 2, (4, 2, 4, 4), "bfloat16")
    assert b["bytes"] == dir_bytes(os.path.join(tiny["path"], "buckets", "5x32x32")) > 0
    assert b["bytes_per_sample"] == pytest.approx(b["bytes"] / 3)
    assert b["pixels_fp32_bytes"] == 5 * 32 * 32 * 3 * 4 and b["latents_fp32_bytes"] == 4 * 2 * 4 * 4 * 4
    assert b["ratio_pixels"] == pytest.approx(5 * 32 * 32 * 12 / (b["bytes"] / 3))
    assert 0 < b["latent_bytes_per_sample"] < b["bytes_per_sample"]
    assert (rows["1x32x32"]["samples"], rows["1x32x32"]["parts"]) == (1, 1)
    assert s["total"]["samples"] == 4 and s["total"]["parts"] == 3
    assert s["total"]["bytes"] == b["bytes"] + rows["1x32x32"]["bytes"] <= s["store_bytes"]
    assert s["attrs"]["created_by"] == "test"


def test_cli_prints_table_and_sample(tiny, capsys):
    assert main(["--store", tiny["path"], "--id", "clip2"]) == 0
    out = capsys.readouterr().out
    s = summarize(LatentStore.open(tiny["path"]))
    row = next(line for line in out.splitlines() if line.startswith("5x32x32"))
    assert row.split()[1:3] == ["3", "2"] and human_bytes(s["buckets"][1]["bytes"]) in row
    assert next(line for line in out.splitlines() if line.startswith("total")).split()[1:3] == ["4", "3"]
    assert "text encoder:" in out and 'created_by="test"' in out and 'preset="tiny-2.1"' in out
    # clip2 was written by rank 1: the third sample of the bucket, after rank 0's two
    assert "sample 5x32x32:2" in out and "caption 2" in out and "[2, 4, 6, 8, 10]" in out
    assert "4x2x4x4 bfloat16" in out and "text length:   5" in out

    assert main(["--store", tiny["path"], "--sample", "1x32x32:0"]) == 0
    assert "id:            still" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["--store", tiny["path"], "--sample", "5x32x32:3"]) == 2  # a user error: one line, status 2
    assert capsys.readouterr().err == "inspect_store.py: bucket 5x32x32 has 3 samples; no index 3\n"


@pytest.mark.parametrize("layout", ["weights", "official"])
def test_cli_writes_a_contact_sheet_of_decoded_frames(tiny, tmp_path, capsys, layout):
    png = tmp_path / "sheet.png"
    assert main(["--store", tiny["path"], "--sample", "5x32x32:0", "--png", str(png), "--vae", tiny[layout],
                 "--columns", "3", "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    sheet = Image.open(png)
    assert sheet.size == (3 * 32, 2 * 32)  # 5 decoded frames, 3 per row
    with torch.no_grad():
        frames = video_to_uint8(tiny["vae"].decode(tiny["mean"].to(torch.bfloat16).float())[0])
    assert np.array_equal(np.asarray(sheet)[32:, 32:64], frames[4])  # the last frame, second row, second column


def test_cli_png_defaults_to_the_store_preset_and_first_sample(tiny, tmp_path):
    png = tmp_path / "first.png"
    assert main(["--store", tiny["path"], "--png", str(png), "--vae", tiny["weights"], "--frames", "8"]) == 0
    assert Image.open(png).size == (32, 32)  # bucket 1x32x32 comes first: one frame


def test_contact_sheet_grid_and_frame_choice():
    video = np.zeros((9, 4, 6, 3), dtype=np.uint8)
    for t in range(9):
        video[t] = t * 10
    sheet = contact_sheet(video, columns=4, max_frames=5)
    assert sheet.size == (4 * 6, 2 * 4) and sheet.mode == "RGB"
    a = np.asarray(sheet)
    assert [a[0, c * 6, 0] for c in range(4)] + [a[4, 0, 0]] == [0, 20, 40, 60, 80]  # frames 0, 2, 4, 6, 8
    assert a[4, 6:, :].max() == 0  # the empty cells stay background
    assert contact_sheet(video).size == (9 * 6, 4)  # default: every frame, one row
    gapped = contact_sheet(torch.from_numpy(video), columns=3, gap=2, background=(255, 0, 0))
    assert gapped.size == (3 * 6 + 2 * 2, 3 * 4 + 2 * 2) and tuple(np.asarray(gapped)[0, 6]) == (255, 0, 0)
    assert contact_sheet(video[:, :, :, 0], columns=9).size == (9 * 6, 4)  # grey frames
    assert even_indices(81, 8) == [0, 11, 23, 34, 46, 57, 69, 80] and even_indices(3, 8) == [0, 1, 2]
    with pytest.raises(ValueError, match="uint8"):
        contact_sheet(video.astype(np.float32))


def test_video_to_uint8_maps_minus_one_to_one():
    v = torch.stack([torch.full((2, 2, 2), -1.0), torch.zeros(2, 2, 2), torch.ones(2, 2, 2)])  # [3, T, H, W]
    out = video_to_uint8(v)
    assert out.shape == (2, 2, 2, 3) and out.dtype == np.uint8 and tuple(out[0, 0, 0]) == (0, 128, 255)
