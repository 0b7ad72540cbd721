"""Wan2.2 TI2V training trains both of its modes: per video sample, image-to-video (first latent frame clean,
t = 0 on its tokens, out of the loss) with probability `train.i2v_ratio`, else text-to-video (noised whole,
every frame in the loss); an image (one latent frame) always as text-to-image, so image steps train. The draw
is the sample's own (seed, step, index in the global batch): any data-parallel split, micro-batching or
resume draws the same. (A step mixing both modes under TP2 x PP2 x CP2 equals the one-rank step:
tests/test_parallel_training_step.py, with the other image-conditioned models.)"""


import pytest
import torch

from megawan.config import ConfigError, dit_preset, load_config
from megawan.diffusion import FlowMatching, trains_image_to_video
from megawan.models.dit import WanDiT
from megawan.parallel.launch import spawn_local

LATENT = (3, 4, 6)  # [T', H', W']: 18 tokens at patch (1, 2, 2)
FIRST = 4 * 6 // 4  # tokens of the first latent frame


def _draws(ratio: float, frames: int, n: int = 64) -> list:
    return [trains_image_to_video(torch.Generator().manual_seed(i), ratio, frames) for i in range(n)]


def test_i2v_ratio_chooses_the_mode_of_videos_only():
    mixed = _draws(0.5, frames=3)
    assert 16 < sum(mixed) < 48  # both modes, about half each
    assert _draws(0.5, frames=3) == mixed  # the sample's generator alone decides
    assert not any(_draws(0.0, frames=3)) and all(_draws(1.0, frames=3))
    assert not any(_draws(1.0, frames=1))  # an image is always text-to-image
    # one number drawn whatever the outcome: what the generator yields next does not depend on the ratio
    after = []
    for ratio in (0.0, 0.5, 1.0):
        g = torch.Generator().manual_seed(7)
        trains_image_to_video(g, ratio, 3)
        after.append(torch.rand(1, generator=g))
    assert after[0] == after[1] == after[2]


def test_first_frame_is_in_the_loss_of_text_to_video_samples_only():
    """A micro-batch mixing the modes: per-token timesteps, x_t, the mask and the loss's gradient on the
    first-frame prediction, per sample."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 48, *LATENT, generator=g), torch.randn(4, 48, *LATENT, generator=g)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    clean = torch.tensor([True, False, True, False])
    x_t, target, token_t, mask = FlowMatching.clean_first_frame(x0, noise, t, (1, 2, 2), clean)
    assert token_t.shape == (4, 18)
    for i in range(4):
        rest = torch.full((18 - FIRST,), float(t[i] * 1000))
        torch.testing.assert_close(token_t[i, FIRST:], rest)
        if clean[i]:  # image-to-video: the given frame, t = 0, out of the loss
            assert torch.equal(x_t[i, :, 0], x0[i, :, 0]) and (token_t[i, :FIRST] == 0).all()
            assert (mask[i, :, 0] == 0).all() and (mask[i, :, 1:] == 1).all()
        else:  # text-to-video: every frame noised at t, every frame in the loss
            assert not torch.equal(x_t[i, :, 0], x0[i, :, 0])
            torch.testing.assert_close(token_t[i, :FIRST], rest[:FIRST])
            assert (mask[i] == 1).all()
    prediction = torch.zeros_like(target, requires_grad=True)
    FlowMatching.per_sample_loss(prediction, target, mask).sum().backward()
    first = prediction.grad[:, :, 0].flatten(1).abs().sum(1)
    assert (first[~clean] > 0).all() and (first[clean] == 0).all()
    assert (prediction.grad[:, :, 1:].flatten(1).abs().sum(1) > 0).all()
    # the default (no selection) keeps every sample's first frame clean, as validation of videos uses it
    assert (FlowMatching.clean_first_frame(x0, noise, t)[3][:, :, 0] == 0).all()


def test_tiny_ti2v_dit_trains_on_images_and_both_video_modes():
    """The tiny TI2V DiT: an image batch and a mixed video batch give a non-zero loss and gradient, and the
    gradient of a text-to-video sample reaches the loss through its first frame."""
    torch.manual_seed(0)
    cfg = dit_preset("tiny-ti2v")
    model = WanDiT(cfg)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 8, cfg.text_dim, generator=g)
    t = torch.tensor([0.3, 0.7])
    for frames in (1, 3):
        x0 = torch.randn(2, cfg.in_dim, frames, 4, 6, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        # the first sample text-to-video (ratio 0), the second image-to-video (ratio 1) unless it is an image
        clean = torch.tensor([trains_image_to_video(torch.Generator(), ratio, frames) for ratio in (0.0, 1.0)])
        assert clean.tolist() == [False, frames > 1]
        x_t, target, timestep, mask = FlowMatching.clean_first_frame(x0, noise, t, cfg.patch_size, clean)
        model.zero_grad()
        loss = FlowMatching.per_sample_loss(model(x_t, timestep, text), target, mask)
        assert (loss > 0).all()
        loss.sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert grad.abs().sum() > 0


def test_i2v_ratio_is_checked_and_only_a_ti2v_model_takes_it():
    assert load_config(None, ["model.preset=tiny-ti2v"]).train.i2v_ratio == 0.5  # the default, recorded
    assert load_config(None, ["model.preset=tiny-ti2v", "train.i2v_ratio=1"]).train.i2v_ratio == 1.0
    assert load_config(None, ["model.preset=tiny"]).train.i2v_ratio is None  # t2v configs are unchanged
    with pytest.raises(ConfigError, match=r"train\.i2v_ratio: must be in \[0, 1\]"):
        load_config(None, ["model.preset=tiny-ti2v", "train.i2v_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"train\.i2v_ratio: only a Wan2\.2 TI2V model"):
        load_config(None, ["model.preset=tiny", "train.i2v_ratio=0.5"])


# ----------------------------------------------------------------------------------------------
# The trainer's own micro-batches and steps, on a tiny store of clips and stills (one rank)


def _store(path: str) -> str:
    from megawan.data.store import LatentStore, Sample

    store = LatentStore.create(path, vae={"name": "t", "z_dim": 4, "stride": [4, 8, 8]},
                               text_encoder={"name": "t", "max_length": 24, "dim": 32})
    writer = store.writer(0)
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        for bucket, frames in (("9x32x48", 3), ("1x32x48", 1)):
            writer.write(Sample(id=f"{bucket}-{i}", bucket=bucket, latents=torch.randn(4, frames, 4, 6, generator=g),
                                text=torch.randn(24, 32, generator=g), text_length=24))
    return path


def _slice(batch: dict, start: int, stop: int) -> dict:
    part = {k: v[start:stop] if torch.is_tensor(v) else v for k, v in batch.items()}
    return {**part, "offset": batch["offset"] + start}


def _trainer_worker(rank, store, out):
    from megawan.parallel.cpu_compat import megatron_cpu_mode
    from megawan.training.trainer import Trainer

    cfg = load_config(None, ["model.preset=tiny-ti2v", "model.in_dim=4", "model.out_dim=4", "model.text_dim=32",
                             "model.text_len=24", f"data.store={store}", "data.global_batch_size=4",
                             "data.image_global_batch_size=4", "data.micro_batch_size=2", "data.video_ratio=0.5",
                             "train.precision=fp32",
                             "train.text_dropout=0.25", "seed=3"])
    trainer = Trainer(cfg)
    result = {"clean": {}, "layouts_agree": True, "image_steps": []}
    with megatron_cpu_mode():
        trainer._setup()
        batches, stream = {}, iter(trainer.loader)
        while len(batches) < 2:  # the first clip batch and the first still batch (video_ratio 0.5: both soon)
            batch = next(stream)
            batches.setdefault(batch["bucket"], batch)
            assert batch["step"] < 32, f"no batch of both streams in 32 steps: {sorted(batches)}"
        video, image = batches["9x32x48"], batches["1x32x48"]

        def modes(batch, ratio=0.5, step=0):
            trainer.cfg.train.i2v_ratio, trainer.step = ratio, step
            micro = trainer._microbatches(batch)
            return torch.cat([(m["mask"][:, 0, 0] == 0).flatten(1).all(1) for m in micro]).tolist(), micro

        for step in range(6):
            whole, micro = modes(video, step=step)
            result["clean"][step] = whole
            for m in micro:  # per-token timesteps; a clean first frame has t = 0 there
                assert m["timestep"].shape == (2, 18)
            # a DP2 split (each replica its half, at its offset in the global batch): the same modes and inputs
            halves = [modes(_slice(video, s, s + 2), step=step) for s in (0, 2)]
            split = [c for h in halves for c in h[0]]
            same = all(torch.equal(a[k], b[k]) for a, b in zip(micro, [h[1][0] for h in halves])
                       for k in ("x_t", "timestep", "target", "mask", "text"))
            result["layouts_agree"] &= split == whole and same
        result["never"] = modes(video, ratio=0.0)[0]
        result["always"] = modes(video, ratio=1.0)[0]
        result["image_clean"] = [c for s in range(6) for c in modes(image, ratio=1.0, step=s)[0]]
        trainer.cfg.train.i2v_ratio, trainer.step = 0.5, 0
        for _ in range(2):
            out_step = trainer._train_step(image)
            result["image_steps"].append((out_step["loss"], float(out_step["grad_norm"])))
    torch.save(result, out)


def test_trainer_draws_each_sample_mode_once_for_every_layout_and_trains_image_steps(tmp_path):
    store = _store(str(tmp_path / "store.zarr"))
    out = str(tmp_path / "result.pt")
    spawn_local(_trainer_worker, world_size=1, args=(store, out))
    result = torch.load(out, weights_only=False)
    clean = [c for step in result["clean"].values() for c in step]
    assert 0 < sum(clean) < len(clean)  # at train.i2v_ratio 0.5, both modes over a few steps' videos
    assert result["clean"][0] != result["clean"][1] or result["clean"][1] != result["clean"][2]  # per step
    assert result["layouts_agree"]  # DP split / micro-batching changes no sample's mode, noise or timestep
    assert result["never"] == [False] * 4 and result["always"] == [True] * 4
    assert not any(result["image_clean"])  # even at ratio 1, images train as text-to-image
    for loss, grad_norm in result["image_steps"]:
        assert loss > 0 and grad_norm > 0
