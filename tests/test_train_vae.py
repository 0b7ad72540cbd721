"""`megawan train-vae` on a tiny Wan2.1 VAE and real files (synthetic clips as mp4, stills as png, a manifest):
DP2 trains the weights one rank trains on the same global batches; a run SIGKILLed mid-way and started again
continues the same loss curve, and in the GAN stage its discriminator and both optimizers come back exactly;
configs that cannot work are refused before training, naming the field."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from training_runs import kill_when

from megawan.checkpoint import latest_checkpoint
from megawan.config import ConfigError
from megawan.config.vae_run import load_vae_config
from megawan.parallel.launch import spawn_local
from megawan.training.metrics import read_metrics

CONFIG = """\
vae: {preset: tiny-2.1}
data: {manifest: MANIFEST, buckets: ["5x32x32", "1x32x32"], global_batch_size: 2, micro_batch_size: 2,
       num_workers: 0, random_crop: true}
loss: {lpips: 0, latent_moments: 0.1, latent_color: 0.1}
optimizer: {lr: 2.0e-3}
train: {steps: 4, seed: 3}
checkpoint: {dir: CKPT, every: 2}
logging: {tensorboard: false, progress: false}
"""
GAN = ("loss.gan=0.5", "loss.gan_start=1", "loss.disc_base=4", "loss.disc_layers=1")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Six 17-frame clips (32 x 48) and four 32 x 32 stills, as files and one manifest."""
    import json

    from megawan.demo.shapes import write_synthetic_dataset
    from megawan.demo.tiny_dataset import write_images

    root = tmp_path_factory.mktemp("vae-data")
    clips = write_synthetic_dataset(str(root / "clips"), count=6, frames=17, height=32, width=48, seed=5)
    rows = [json.loads(line) for line in open(clips, encoding="utf-8")]
    for row in rows:
        row["path"] = str(root / "clips" / row["path"])
    rows += write_images(str(root / "images"), 4, seed=6)
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _config(tmp_path, manifest, name="run") -> tuple:
    ckpt = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.replace("MANIFEST", manifest).replace("CKPT", ckpt), encoding="utf-8")
    return str(path), ckpt


def _tensors(folder: str, prefix: str = "") -> dict:
    """Every tensor of a checkpoint folder whose key starts with `prefix` (model, EMA, optimizer states)."""
    meta = FileSystemReader(folder).read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
           if k.startswith(prefix) and hasattr(m, "size")}
    dcp.load(out, checkpoint_id=folder, no_dist=True)
    return out


def _train_rank(rank, config_path, overrides):
    from megawan.config.vae_run import load_vae_config
    from megawan.training.vae_trainer import VAETrainer

    VAETrainer(load_vae_config(config_path, overrides)).run()


def _relative(got: dict, ref: dict) -> dict:
    """Per tensor ||got - ref|| / ||ref|| (see tests/test_parallel_training_step.py: elementwise, Adam's step
    lr * g / (|g| + eps) follows the fp32 summation noise of a near-zero gradient element)."""
    assert got.keys() == ref.keys() and ref
    return {k: float((got[k].double() - ref[k].double()).norm() / ref[k].double().norm().clamp_min(1e-30))
            for k in ref}


def test_two_data_parallel_ranks_train_the_weights_of_one(manifest, tmp_path):
    """3 steps (lr warm-up from 0: step 1 moves only Adam's moments), the GAN from step 1: one rank and DP2 on the
    same global batches give the same losses and gradient norms (1e-5 relative, each step) and weights (VAE and
    discriminator: 1e-5 relative in norm over the whole model), fp32."""
    config, _ = _config(tmp_path, manifest)
    folders, rows = {}, {}
    for world in (1, 2):
        ckpt = str(tmp_path / f"dp{world}")
        spawn_local(_train_rank, world_size=world, args=(config, (f"checkpoint.dir={ckpt}", "train.steps=3",
                                                                  "optimizer.warmup_steps=2", *GAN)))
        folders[world] = latest_checkpoint(ckpt)
        rows[world] = read_metrics(os.path.join(ckpt, "logs", "metrics.jsonl"))
    for key in ("loss", "grad_norm", "l1", "kl", "gan_d"):
        got = [r.get(key) or 0.0 for r in rows[2]]
        assert got == pytest.approx([r.get(key) or 0.0 for r in rows[1]], rel=1e-5), key
    for prefix in ("vae.", "discriminator."):
        got, ref = _tensors(folders[2], prefix), _tensors(folders[1], prefix)
        whole = _relative({"all": torch.cat([got[k].flatten() for k in ref])},
                          {"all": torch.cat([ref[k].flatten() for k in ref])})["all"]
        assert whole < 1e-5, (prefix, whole)  # about 1e-6 here
        # per tensor: a small bias whose elements have near-zero gradients moves by ~1e-5 of lr more or less
        worst = max(_relative(got, ref).items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-4, worst


def _launch(config, *overrides):
    cmd = [sys.executable, "-m", "megawan.cli", "train-vae", "--config", config, *overrides]
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _losses(ckpt):
    rows = [r for r in read_metrics(os.path.join(ckpt, "logs", "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    no_gan = -1.0  # the steps before the discriminator starts (a flat list: pytest.approx compares no tuples)
    return [value for r in rows for value in (r["loss"], no_gan if r.get("gan_d") is None else r["gan_d"])]


def test_kill_and_resume_in_the_gan_stage_continues_the_same_run(manifest, tmp_path):
    """SIGKILL after the checkpoint of step 2, then the same command: the loss curve (generator and discriminator
    losses) is the uninterrupted one, and so are the final weights, the discriminator's and both optimizers'
    states (Adam moments under the checkpoint's chained_<i>. prefixes)."""
    config, _ = _config(tmp_path, manifest)
    steps = ("train.steps=5", *GAN)
    straight = str(tmp_path / "straight")
    proc = _launch(config, f"checkpoint.dir={straight}", *steps)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log

    killed = str(tmp_path / "killed")
    proc = _launch(config, f"checkpoint.dir={killed}", *steps)
    metrics = os.path.join(killed, "logs", "metrics.jsonl")
    ready = lambda: os.path.exists(metrics) and len(read_metrics(metrics)) >= 3  # noqa: E731
    assert kill_when(proc, ready), proc.communicate()[0]
    assert latest_checkpoint(killed).endswith("iter_0000002")
    proc = _launch(config, f"checkpoint.dir={killed}", *steps)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "resumed from" in log, log

    assert _losses(killed) == pytest.approx(_losses(straight), rel=1e-6, abs=1e-7)
    a, b = _tensors(latest_checkpoint(straight)), _tensors(latest_checkpoint(killed))
    assert a.keys() == b.keys()
    assert any(k.startswith("discriminator.") for k in a)
    assert any("chained_" in k and "exp_avg_sq" in k for k in a), sorted(a)[:5]  # both optimizers' moments
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("overrides, field", [
    (("vae.patch_size=2",), "vae.patch_size"),  # Wan2.2's patchify on Wan2.1 blocks
    (("vae.z_dim=8",), "vae.latents_mean"),  # z_dim without its latent statistics
    (("data.buckets=[6x32x32]",), "data.buckets"),  # not 1 + 4k frames
    (("data.buckets=[5x20x32]",), "data.buckets"),  # not a multiple of the spatial stride
    (("data.global_batch_size=3",), "data.global_batch_size"),  # does not split over DP2
    (("loss.lpips=3.0",), "loss.lpips_vgg"),  # LPIPS without its weights
    (("loss.gan=0.1", "loss.gan_start=10"), "loss.gan_start"),  # after the last step
    (("vae.preset=tiny-2.2", "init.from=CKPT_21"), "init.from"),  # Wan2.1 tensors for a Wan2.2 VAE
    (("init.from=/nonexistent/vae.pth",), "init.from"),
    (("data.manifest=/nonexistent.jsonl",), "data.manifest"),
    (("parallel.tensor_parallel=2",), "parallel.tensor_parallel"),
    (("loss.gans=1",), "loss.gans"),  # unknown key
    (("loss.l1=0", "loss.lpips=0"), "loss.l1"),  # no reconstruction loss at all
    (("data.video_ratio=0.5", "data.buckets=[1x32x32]"), "data.video_ratio"),  # clip batches without a clip bucket
    (("data.video_ratio=1.5",), "data.video_ratio"),
])
def test_configs_that_cannot_work_are_refused_naming_the_field(manifest, tmp_path, overrides, field):
    from megawan.training.vae_preflight import preflight_vae

    config, _ = _config(tmp_path, manifest)
    if any("CKPT_21" in o for o in overrides):
        from megawan.config import vae_preset
        from megawan.models.vae import WanVAE

        path = str(tmp_path / "wan21.pth")
        torch.save(WanVAE(vae_preset("tiny-2.1")).state_dict(), path)
        overrides = tuple(o.replace("CKPT_21", path) for o in overrides)
    with pytest.raises(ConfigError) as err:
        preflight_vae(load_vae_config(config, overrides), world_size=2)
    message = str(err.value)
    assert field in message and "\n" not in message, message


def test_image_vae_then_inflated_clips_with_frozen_encoder_recompute_ema_and_validation(manifest, tmp_path):
    """Stage 1: the 2D image VAE (vae.image_only) on stills, fresh per-frame init. Stage 2: its weights inflated into
    the 3D VAE (init.inflate), the encoder frozen, activation recompute, an EMA and held-out validation. The
    frozen encoder is stage 1's, inflated; validation logs PSNR / SSIM and writes its strips."""
    from megawan.config import vae_preset
    from megawan.models.vae.inflate import image_vae_config, inflate_image_vae

    config, _ = _config(tmp_path, manifest)
    stage1, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    spawn_local(_train_rank, world_size=1, args=(config, (
        f"checkpoint.dir={stage1}", "vae.image_only=true", "data.buckets=[1x32x32]", "train.steps=1",
        "init.per_frame=true", "init.logvar=-6")))
    spawn_local(_train_rank, world_size=1, args=(config, (
        f"checkpoint.dir={stage2}", f"init.from={stage1}", "init.inflate=true", "init.freeze_encoder=true",
        "train.steps=2", "train.recompute=true", "train.ema_decay=0.9", "validation.every=2",
        f"validation.manifest={manifest}", "validation.samples=2")))
    flat = {k[len("vae."):]: v for k, v in _tensors(latest_checkpoint(stage1), "vae.").items()}
    inflated = inflate_image_vae(flat, vae_preset("tiny-2.1"))
    assert image_vae_config(vae_preset("tiny-2.1")).image_only
    trained = _tensors(latest_checkpoint(stage2))
    for key, value in inflated.items():
        if key.startswith(("encoder.", "quant_conv.")):
            torch.testing.assert_close(trained["vae." + key], value, rtol=0, atol=0, msg=key)
    assert any(k.startswith("ema.vae.decoder.") for k in trained)
    assert not any(k.startswith("ema.vae.encoder.") for k in trained)  # frozen: not averaged
    from megawan.vae_export import read_trained_vae

    exported, _ = read_trained_vae(stage2)  # the EMA's decoder, the model's frozen encoder: a whole VAE
    assert torch.equal(exported["encoder.conv_in.weight"], trained["vae.encoder.conv_in.weight"])
    assert torch.equal(exported["decoder.conv_in.weight"], trained["ema.vae.decoder.conv_in.weight"].float())
    rows = read_metrics(os.path.join(stage2, "logs", "metrics.jsonl"))
    val = [r for r in rows if "val/psnr" in r]
    assert len(val) == 1 and val[0]["val/psnr"] > 0 and "val/1x32x32/ssim" in val[0], val
    assert sorted(os.listdir(os.path.join(stage2, "logs", "validation"))) == [
        "step0000002_1x32x32.png", "step0000002_5x32x32.png"]



def test_foreground_weights_single_out_pixels_unlike_their_frames_median_colour():
    from megawan.training.vae_losses import foreground_weights, l1_loss

    x = torch.full((1, 3, 2, 8, 8), -0.8)  # a flat background ...
    x[:, 0, :, 2:4, 2:4] = 0.9  # ... and a red square in both frames (4 of 64 pixels)
    w = foreground_weights(x, 20.0, 0.1)
    assert w.shape == (1, 1, 2, 8, 8) and w.sum() == 2 * (60 + 4 * 21)
    x_hat = x.clone()
    x_hat[:, 0, :, 2:4, 2:4] = -0.8  # the square lost: weighted, its share of the error is 21 / (60 + 84)
    expected = (2 * 4 * 21 * 1.7 / 3) / (2 * (60 + 84))
    torch.testing.assert_close(l1_loss(x, x_hat, w), torch.tensor([expected]))


def test_foreground_color_loss_is_the_squared_error_of_the_objects_mean_colour():
    from megawan.training.vae_losses import foreground_color_loss, foreground_mask

    x = torch.full((2, 3, 1, 8, 8), -0.8)
    x[0, 0, :, 2:4, 2:4] = 0.9  # sample 0: a red square; sample 1: background only
    mask = foreground_mask(x, 0.1)
    x_hat = x.clone()
    x_hat[0, 0, :, 2:3, 2:4] = 0.5  # half the square 0.4 too dark: its mean red is 0.2 off
    x_hat[0, 1, :, 0:8, 0] = 0.3  # errors on the background do not count
    torch.testing.assert_close(foreground_color_loss(x, x_hat, mask), torch.tensor([0.2 ** 2 / 3, 0.0]))


def test_latent_color_loss_is_zero_when_latents_are_linear_in_colour():
    """The latent colour term: 1 - R^2 of the best linear map from the objects' colours to their latents. An
    "encoder" whose latent cells are a linear function of their mean colour scores 0 wherever the objects sit
    (cells half covered count half); one that cubes the colours does not, and its latents get a gradient."""
    import torch.nn.functional as F

    from megawan.training.vae_losses import foreground_mask, latent_color_loss

    generator = torch.Generator().manual_seed(0)
    x = torch.full((8, 3, 1, 32, 32), -0.8)  # 8 stills: a square of a random colour at a random place each
    for b in range(8):
        i, j = torch.randint(0, 24, (2,), generator=generator).tolist()
        x[b, :, 0, i:i + 8, j:j + 8] = torch.rand(3, 1, 1, generator=generator) * 2 - 1
    mask = foreground_mask(x, 0.1)
    cells = F.avg_pool3d(x + 0.8, (1, 8, 8))  # [8, 3, 1, 4, 4]: each 8 x 8 cell's colour offset
    linear_map = torch.randn(3, 4, generator=generator)
    linear = torch.einsum("bcthw,cd->bdthw", cells, linear_map) + 0.3
    assert float(latent_color_loss(linear, x, mask, 4, 8)) < 1e-5
    cubed = torch.einsum("bcthw,cd->bdthw", cells.pow(3), linear_map).requires_grad_(True)
    loss = latent_color_loss(cubed, x, mask, 4, 8)
    assert float(loss) > 0.05
    loss.backward()
    assert cubed.grad.abs().sum() > 0
    blank = torch.full_like(x, -0.8)  # no objects at all: nothing to fit, the term is 0
    assert float(latent_color_loss(cubed, blank, foreground_mask(blank, 0.1), 4, 8)) == 0.0
    # a clip: frame 0 alone, then 4 frames per latent frame (the causal VAE's chunking)
    clip = x.repeat(1, 1, 17, 1, 1)
    latents = torch.einsum("bcthw,cd->bdthw", F.avg_pool3d(clip[:, :, ::4] + 0.8, (1, 8, 8)), linear_map)
    assert latents.shape[2] == 5 and float(latent_color_loss(latents, clip, foreground_mask(clip, 0.1), 4, 8)) < 1e-5
