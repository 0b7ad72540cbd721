"""The colour metric and the trained tiny VAE: dominant_color reads every rendered clip's and still's colour;
a tiny Wan-VAE trained for TINY_VAE_STEPS (the session's `trained_encoders`, tests/conftest.py: the one the demo
trains; written and loaded back in the official layout) reconstructs held-out clips (17x32x48) and stills
(1x32x32) so that their decoded colour is still the true one."""

import itertools
import math
import os
import random

import numpy as np
import pytest
import torch

from megawan.demo.shapes import (BACKGROUND, COLORS, DIRECTIONS, SHAPES, ShapeClip, caption_color, dominant_color,
                                 render)
from megawan.demo.tiny_assets import TINY_VAE_STEPS, write_tiny_encoders


def _pixels(frames):
    return torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]


def _uint8(video):
    return ((video[0].permute(1, 2, 3, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def test_dominant_color_reads_every_rendered_color():
    checked = 0
    for color, shape, direction in itertools.product(COLORS, SHAPES, DIRECTIONS):
        clip = ShapeClip(color, shape, direction)
        for seed in range(2):
            assert dominant_color(render(clip, 17, 32, 48, seed=seed)) == color
            assert dominant_color(render(clip, 2, 32, 32, seed=seed)[0]) == color  # [H, W, 3]
            assert dominant_color(render(clip, 17, 64, 64, seed=seed)[5:6]) == color
            checked += 3
    assert checked == 3 * 2 * len(COLORS) * len(SHAPES) * len(DIRECTIONS)
    # blended with the background (a blurry decode's edges) it still reads as its hue, not a darker neighbour
    for color, rgb in COLORS.items():
        frame = np.empty((16, 16, 3), dtype=np.uint8)
        frame[:] = BACKGROUND
        frame[4:12, 4:12] = np.round(0.55 * np.array(rgb) + 0.45 * np.array(BACKGROUND))
        assert dominant_color(frame) == color
    blank = np.empty((2, 16, 16, 3), dtype=np.uint8)
    blank[:] = BACKGROUND
    assert dominant_color(blank) is None
    blank[0, 0, :3] = COLORS["red"]  # 3 stray pixels: too few to be a shape
    assert dominant_color(blank) is None
    with pytest.raises(ValueError):
        dominant_color(np.zeros((4, 4), dtype=np.uint8))


def test_caption_color():
    assert caption_color("a red circle moves left") == "red"
    assert caption_color("A Cyan square") == "cyan"
    assert caption_color("a purple triangle moves up") == "purple"
    assert caption_color("a video") is None
    assert caption_color("moving shapes on a dark background") is None
    assert caption_color("reddish") is None  # whole words only


def test_write_tiny_encoders_trains_the_vae_with_the_job_deterministically(tmp_path):
    """`megawan train-vae` runs both stages of examples/configs/vae/tiny_demo_stage*.yaml (2 steps here) on the shapes
    written as files; the VAE comes from the job's last checkpoint. Twice the same weights (the clips encode to the
    same bytes in every process: megawan.utils.media.write_video), the text encoder the untrained call's."""
    plain = write_tiny_encoders(str(tmp_path / "plain"))
    runs = [write_tiny_encoders(str(tmp_path / f"trained{i}"), train_vae_steps=2, seed=0) for i in range(2)]
    stats = runs[0]["vae_training"]
    assert stats["steps"] == 2 and [s["steps"] for s in stats["stages"]] == [1, 1]
    assert stats["stages"][0]["config"].endswith("tiny_demo_stage1.yaml") and math.isfinite(stats["psnr"])
    assert "vae_training" not in plain
    assert os.path.exists(tmp_path / "trained0" / "vae_training" / "stage2_clips" / "latest")
    data = [tmp_path / f"trained{i}" / "vae_training" / "data" for i in range(2)]
    clips = sorted(p.name for p in data[0].glob("*.mp4"))
    assert clips and all((data[0] / n).read_bytes() == (data[1] / n).read_bytes() for n in clips)
    a, b = (torch.load(r["vae"]) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = torch.load(plain["text_encoder"]), torch.load(runs[0]["text_encoder"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = torch.load(plain["vae"]), torch.load(runs[0]["vae"])
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


def test_trained_tiny_vae_keeps_the_colors_of_held_out_clips_and_stills(trained_encoders):
    from megawan.config import vae_preset
    from megawan.artifacts import load_vae

    encoders = trained_encoders  # tests/conftest.py: the VAE `megawan demo` trains (TINY_VAE_STEPS)
    stats = encoders["vae_training"]
    assert stats["steps"] == TINY_VAE_STEPS
    vae = load_vae(encoders["vae"], vae_preset(encoders["vae_config"]))  # the saved official-layout file

    rng = random.Random(2024)  # held out: other draws and render seeds than the training's
    hits, squared_errors, latents = [], [], []
    with torch.no_grad():
        for i in range(36):
            clip = ShapeClip(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS)))
            if i % 2:
                frames = render(clip, 2, 32, 32, seed=500_000 + i)[:1]  # a still, as write_images makes them
            else:
                frames = render(clip, 17, 32, 48, seed=500_000 + i)
            x = _pixels(frames)
            mean, _ = vae.encode(x)
            y = vae.decode(mean)
            latents.append(vae.normalize(mean).transpose(0, 1).reshape(mean.shape[1], -1))
            squared_errors.append(float(((y - x) ** 2).mean()))
            hits.append(dominant_color(_uint8(y)) == clip.color)
    accuracy = sum(hits) / len(hits)
    psnr = 10 * math.log10(4.0 / float(np.mean(squared_errors)))
    z = torch.cat(latents, dim=1)
    print(f"\ntiny VAE: {TINY_VAE_STEPS} steps in {stats['seconds']:.1f}s, the job's held-out PSNR {stats['psnr']:.2f} "
          f"dB; here held-out colour accuracy {accuracy:.1%} ({sum(hits)}/{len(hits)}), "
          f"PSNR {psnr:.2f} dB; normalised latent mean {z.mean(1).numpy().round(3)} std {z.std(1).numpy().round(3)}")
    assert accuracy >= 0.95
    assert psnr > 17.0
    # the trainer's normalisation (z - latents_mean) / latents_std gives roughly zero-mean unit-std latents
    assert z.mean(1).abs().max() < 0.3
    assert ((z.std(1) > 0.6) & (z.std(1) < 1.4)).all()
