"""Image conditioning in the latent store (precompute --conditioning i2v | flf2v) and the trainer's preflight on
it: the stored conditioning latents are the VAE's encoding of [first frame, zeros..., (last frame)], the mask is
Wan's `msk`, the CLIP tokens are the encoder's of the given frame(s), the metadata records the kind and the CLIP
encoder, the loader hands it out, and an image-conditioned model refuses a store that does not fit it in one line
naming the field."""

import os
import re

import pytest
import torch

from megawan.config import ConfigError, load_config
from megawan.data import precompute
from megawan.data.loader import BucketedLoader
from megawan.data.manifest import read_manifest
from megawan.data.precompute import Encoders, PrecomputeJob, prepare, run_precompute
from megawan.data.store import LatentStore
from megawan.demo.shapes import write_synthetic_dataset
from megawan.demo.tiny_assets import write_tiny_encoders
from megawan.training.trainer import preflight
from megawan.training.validation import read_samples
from pipelines import write_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_train.yaml")
BUCKET = "17x32x48"  # tiny VAE (z_dim 4, stride 4x8x8): latents 4x5x4x6


def _job(root, enc, manifest, name, conditioning, clip=None):
    return PrecomputeJob(manifest=manifest, out=str(root / f"{name}.zarr"), vae=enc["vae"], vae_config="tiny-2.1",
                         text_encoder=enc["text_encoder"], text_config="tiny", tokenizer=enc["tokenizer"],
                         buckets=[BUCKET], conditioning=conditioning, clip=clip, decode_workers=1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two clips precomputed four ways (a few seconds each): text-to-video, i2v without CLIP (Wan2.2 I2V-A14B),
    i2v and flf2v with the tiny CLIP encoder's tokens (Wan2.1 I2V / FLF2V)."""
    root = tmp_path_factory.mktemp("i2v-store")
    enc = write_tiny_encoders(str(root / "encoders"))
    clip = write_tiny_clip(root / "encoders")
    manifest = write_synthetic_dataset(str(root / "videos"), count=2, frames=17, height=32, width=48)
    kinds = {"t2v": (None, None), "i2v": ("i2v", None), "i2v-clip": ("i2v", clip), "flf2v": ("flf2v", clip)}
    jobs = {name: _job(root, enc, manifest, name, kind, path) for name, (kind, path) in kinds.items()}
    for job in jobs.values():
        run_precompute(job, progress=False)
    return jobs


def _official_mask(frames: int, last: bool) -> torch.Tensor:
    """Wan's `msk` (wan/image2video.py, first_last_frame2video.py), one latent position: [4, T']."""
    msk = torch.ones(1, frames, 1, 1)
    msk[:, 1:-1 if last else None] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, 1, 1).transpose(1, 2)[0]
    return msk[..., 0, 0]


@pytest.mark.parametrize("name", ["i2v", "i2v-clip", "flf2v"])
def test_stored_conditioning_is_the_vae_encoding_of_the_given_frames(stores, name):
    job = stores[name]
    kind, clip = job.conditioning, job.clip
    store = LatentStore.open(job.out)
    cond = store.metadata.conditioning
    assert (cond.kind, cond.mask_channels) == (kind, 4)
    assert LatentStore.open(stores["t2v"].out).metadata.conditioning is None  # a text-to-video store: none
    encoders = Encoders(job, torch.device("cpu"))
    if clip:  # the tiny CLIP: 1 + (32 / 8)^2 = 17 tokens of width 20 per frame
        assert (cond.clip, cond.clip_width, cond.clip_tokens) == ("tiny", 20, 17 * (2 if kind == "flf2v" else 1))
        assert cond.clip_weights == precompute.fingerprint(encoders.clip.state_dict())
    else:
        assert (cond.clip, cond.clip_width, cond.clip_tokens) == (None, None, None)
    rows = {e.id: e for e in read_manifest(job.manifest)}
    for i in range(store.count(BUCKET)):
        stored = store.read(BUCKET, i)
        video = prepare(rows[stored["id"]], job.resolved_buckets(), job.fps).video  # [3, 17, 32, 48]
        given = torch.zeros_like(video)
        given[:, 0] = video[:, 0]
        if kind == "flf2v":
            given[:, -1] = video[:, -1]
        mean, _ = encoders.encode_video(given)
        assert stored["cond_latents"].dtype == torch.bfloat16 and torch.equal(stored["cond_latents"], mean)
        assert not torch.equal(stored["cond_latents"], stored["latents"])
        assert stored["cond_mask"].dtype == torch.uint8
        assert torch.equal(stored["cond_mask"].float(), _official_mask(17, last=kind == "flf2v"))
        assert ("clip_tokens" in stored) == bool(clip)
        if clip:  # the first frame's tokens, then (FLF2V) the last frame's, along the token axis
            frames = [video[:, 0], video[:, -1]] if kind == "flf2v" else [video[:, 0]]
            with torch.no_grad():
                tokens = [encoders.clip(encoders.clip.preprocess(f[None]))[0] for f in frames]
            assert torch.equal(stored["clip_tokens"], torch.cat(tokens).to(torch.bfloat16))


def test_the_loader_hands_out_the_conditioning(stores):
    store = LatentStore.open(stores["flf2v"].out)
    batch = next(iter(BucketedLoader(store, global_batch_size=2, num_workers=1)))
    assert batch["cond_latents"].shape == batch["latents"].shape == (2, 4, 5, 4, 6)
    assert batch["cond_mask"].shape == (2, 4, 5) and batch["clip_tokens"].shape == (2, 34, 20)
    first = store.read(BUCKET, batch["indices"][0])
    for key in ("cond_latents", "cond_mask", "clip_tokens"):
        assert torch.equal(batch[key][0], first[key])
    assert "clip_tokens" not in next(iter(BucketedLoader(stores["i2v"].out, global_batch_size=2, num_workers=1)))
    plain = next(iter(BucketedLoader(stores["t2v"].out, global_batch_size=2, num_workers=1)))
    assert "cond_latents" not in plain and "cond_mask" not in plain


def test_image_buckets_and_other_conditioning_are_refused(stores, tmp_path):
    job = stores["i2v"]
    image_job = PrecomputeJob(**{**job.__dict__, "buckets": [BUCKET, "1x32x32"], "out": str(tmp_path / "x.zarr")})
    with pytest.raises(ConfigError) as e:
        run_precompute(image_job, progress=False)
    assert str(e.value).count("\n") == 0 and "--stage-buckets" in str(e.value) and "1x32x32" in str(e.value)
    assert not os.path.exists(image_job.out)
    with pytest.raises(ConfigError, match=r"--conditioning.*unknown 'ti2v'"):
        PrecomputeJob(**{**job.__dict__, "conditioning": "ti2v"}).check()
    with pytest.raises(ConfigError, match=r"^PrecomputeJob.clip \(--clip\): .* give --conditioning i2v \| flf2v"):
        PrecomputeJob(**{**stores["flf2v"].__dict__, "conditioning": None}).check()
    # the i2v store resumed as flf2v (or as text-to-video): another store, refused
    with pytest.raises(ValueError, match="different conditioning"):
        run_precompute(PrecomputeJob(**{**job.__dict__, "conditioning": "flf2v"}), progress=False)


def _cfg(store, *overrides):
    return load_config(CONFIG, [f"data.store={store}", "parallel.tensor_parallel=1", "data.video_ratio=1.0",
                                "model.preset=tiny-i2v", "model.in_dim=12", "model.image_dim=null", *overrides])


def _refused(cfg, pattern):
    with pytest.raises(ConfigError) as e:
        preflight(cfg, 1)
    message = str(e.value)
    assert "\n" not in message and re.search(pattern, message), message


def test_preflight_takes_a_fitting_store_and_refuses_the_others(stores):
    t2v, i2v, i2v_clip, flf2v = (stores[k].out for k in ("t2v", "i2v", "i2v-clip", "flf2v"))
    # Wan2.2 I2V-A14B-like (no CLIP): 4 + 4 mask + 4 channels on the tiny VAE's latents, one expert per run
    assert preflight(_cfg(i2v), 1)["metadata"].conditioning.kind == "i2v"
    assert preflight(_cfg(i2v, "model.preset=tiny-a14b", "model.model_type=i2v", "train.expert=high"), 1)
    # Wan2.1 I2V and FLF2V: CLIP tokens of width 20 (the tiny CLIP), FLF2V 2 x 17 of them
    assert preflight(_cfg(i2v_clip, "model.image_dim=20"), 1)
    assert preflight(_cfg(flf2v, "model.image_dim=20", "model.image_pos_len=34"), 1)
    _refused(_cfg(t2v), r"^data\.store: .* holds no image conditioning .*--conditioning i2v makes one$")
    _refused(_cfg(t2v, "model.image_dim=20", "model.image_pos_len=34"), r"--conditioning flf2v makes one$")
    _refused(_cfg(i2v, "model.in_dim=36"), r"^model\.in_dim: 36 input channels, .* = 12$")
    _refused(_cfg(i2v_clip, "model.image_dim=20", "model.image_pos_len=34"),
             r"^data\.store: the store's conditioning is 'i2v' and the model is FLF2V .*--conditioning flf2v")
    _refused(_cfg(flf2v), r"^data\.store: the store's conditioning is 'flf2v' and the model is I2V")
    _refused(_cfg(i2v, "model.image_dim=20"), r"^model\.image_dim: 20: the model takes CLIP image tokens and the "
                                              r"store holds none; precompute it with a CLIP image encoder \(--clip\)")
    _refused(_cfg(i2v_clip, "model.image_dim=24"), r"^model\.image_dim: 24, but the store's CLIP tokens have width "
                                                   r"20 \(tiny\)$")
    _refused(_cfg(flf2v, "model.image_dim=20", "model.image_pos_len=14"),
             r"^model\.image_pos_len: 14 image tokens, but the store holds 34 per sample$")
    _refused(_cfg(i2v, "validation.every=2", f"validation.store={t2v}"),
             r"^validation\.store: .* holds no image conditioning .*--conditioning i2v makes one$")
    # a text-to-video model trains on an image-conditioned store as on any other (the conditioning unused)
    assert preflight(load_config(CONFIG, [f"data.store={i2v}", "parallel.tensor_parallel=1",
                                          "data.video_ratio=1.0"]), 1)


def test_the_tool_refuses_image_buckets_under_conditioning_in_one_line(stores, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("precompute_latents", os.path.join(ROOT, "tools",
                                                                                   "precompute_latents.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    job = stores["i2v"]
    args = ["--manifest", job.manifest, "--out", str(tmp_path / "t.zarr"), "--vae", job.vae, "--vae-config",
            "tiny-2.1", "--text-encoder", job.text_encoder, "--text-config", "tiny", "--tokenizer", job.tokenizer,
            "--conditioning", "i2v"]
    assert tool.parse_args(args).conditioning == "i2v"
    assert tool.main([*args, "--stage-buckets", "video-192", "image-256"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an image-conditioned store (--conditioning i2v) holds videos only" in err, err


def test_megawan_train_runs_and_validates_flf2v_on_its_store_under_pp2(stores, tmp_path):
    """`megawan train` end to end on the FLF2V store, two pipeline stages: the trainer's own input assembly, CLIP
    tokens through the image branch, finite losses; validation measures the held-out loss and samples each
    held-out clip from its stored first and last frames (decoded to mp4). (Layout equality of the step:
    tests/test_parallel_training_step.py.)"""
    from training_runs import losses, run
    from megawan.training.metrics import read_metrics
    from megawan.training.validation import frames_of

    ckpt, job = str(tmp_path / "ckpt"), stores["flf2v"]
    code, log = run(2, ckpt, job.out, "parallel.tensor_parallel=1", "parallel.pipeline_parallel=2",
                    "data.video_ratio=1.0", "model.preset=tiny-i2v", "model.in_dim=12", "model.image_dim=20",
                    "model.image_pos_len=34", "train.steps=2", "data.global_batch_size=2", "checkpoint.every=2",
                    "validation.every=2", f"validation.store={job.out}", f"validation.vae={job.vae}",
                    "validation.steps=3", "validation.num_samples=2", "validation.batch_size=2")
    assert code == 0, log
    got = losses(ckpt)
    assert len(got) == 2 and all(0 < loss < 100 for loss in got), got
    val = [r for r in read_metrics(os.path.join(ckpt, "logs", "metrics.jsonl")) if "val/loss" in r]
    assert len(val) == 1 and 0 < val[0]["val/loss"] < 100, val
    samples = read_samples(os.path.join(ckpt, "logs", "validation", "step-0000002"))
    assert len(samples) == 2 and all(frames_of(r).shape == (17, 32, 48, 3) for r in samples)


def test_ti2v_validation_samples_from_the_held_out_first_frame(stores, tmp_path):
    """A TI2V model validates image-to-video: each sampled clip's first latent frame is the held-out clip's own
    (normalised), kept clean through sampling; the rest is sampled."""
    from training_runs import run

    ckpt, job = str(tmp_path / "ckpt"), stores["t2v"]
    code, log = run(1, ckpt, job.out, "parallel.tensor_parallel=1", "data.video_ratio=1.0", "model.preset=tiny-ti2v",
                    "model.in_dim=4", "model.out_dim=4", "train.steps=1", "data.global_batch_size=2",
                    "validation.every=1", f"validation.store={job.out}", "validation.steps=3",
                    "validation.num_samples=2", "validation.batch_size=2")
    assert code == 0, log
    store = LatentStore.open(job.out)
    mean, std = (v[0] for v in store.metadata.vae.normalization())
    for row in read_samples(os.path.join(ckpt, "logs", "validation", "step-0000001")):
        sampled = torch.load(row["latents"])
        held_out = store.read(BUCKET, store.ids(BUCKET).index(row["id"]))["latents"].float()
        assert torch.allclose(sampled[:, :1], ((held_out - mean) / std)[:, :1], atol=1e-6)
        assert not torch.allclose(sampled[:, 1:], ((held_out - mean) / std)[:, 1:], atol=1e-2)


def test_inspect_store_shows_the_conditioning(stores):
    import importlib.util

    spec = importlib.util.spec_from_file_location("inspect_store", os.path.join(ROOT, "tools", "inspect_store.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    store = LatentStore.open(stores["flf2v"].out)
    summary = tool.format_summary(tool.summarize(store))
    assert re.search(r'^conditioning: +kind="flf2v", mask_channels=4, clip="tiny", clip_weights="\w+", '
                     r'clip_width=20, clip_tokens=34$', summary, re.M), summary
    sample = tool.format_sample(store.read(BUCKET, 0), BUCKET, 0)
    assert "cond mask:     4x5, given latent frames (channels) 0:1111, 4:0001" in sample, sample
    assert "clip tokens:   34x20 bfloat16" in sample
    plain = tool.format_summary(tool.summarize(LatentStore.open(stores["t2v"].out)))
    assert "conditioning:   - (text-to-video)" in plain
