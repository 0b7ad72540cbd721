"""tools/export_vae.py: a train-vae checkpoint (keys vae.<WanVAE key>, run config `vae:` section; written here the
way the trainer writes it) -> the official .pth + vae_config.json and diffusers' AutoencoderKLWan folder. The
exported VAE loads in diffusers and in megawan's own loader with identical encode / decode (1e-6), tiny-2.1 and
tiny-2.2; the latent statistics recomputed on a manifest sample reach both configs and a latent store; --ema picks
the EMA weights; bad input is one line."""

import dataclasses
import importlib.util
import json
import os

import pytest
import torch

from megawan.artifacts import load_vae
from megawan.checkpoint import CheckpointTensors, resolve_checkpoint
from megawan.config import ConfigError, config_to_dict, vae_preset
from megawan.config.vae_files import vae_config_named
from megawan.data.eval_clips import eval_clips
from megawan.demo.shapes import write_synthetic_dataset
from megawan.parallel.launch import spawn_local
from megawan.vae_export import export_vae, read_trained_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKETS = ["9x32x32", "1x32x32"]



def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


export_tool = _tool("export_vae")


def _write_checkpoints(rank, root):
    """tiny-2.1: a training checkpoint with an EMA (one optimizer step of the real DDP + distributed optimizer,
    as train-vae saves: the unwrapped module, `vae.` keys); tiny-2.2: a weights-only checkpoint."""
    from megawan.checkpoint import save_checkpoint, save_model_checkpoint
    from megawan.models.vae import WanVAE
    from megawan.parallel.cpu_compat import megatron_cpu_mode
    from megawan.training.ema import EMA
    from megawan.training.optimizer import build_optimizer, wrap_data_parallel
    from megawan.training.vae_module import TrainableVAE

    torch.manual_seed(0)
    with megatron_cpu_mode():
        module = TrainableVAE(WanVAE(vae_preset("tiny-2.1")))
        ddp = wrap_data_parallel([module])
        optimizer = build_optimizer(ddp, lr=1e-2)
        ema = EMA([module], decay=0.5, optimizer=optimizer)
        video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
        mean, _ = module.vae.encode(video)
        optimizer.zero_grad()
        (module.vae.decode(mean) - video).abs().mean().backward()
        ddp[0].finish_grad_sync()
        optimizer.step()
        ema.update()  # halfway between the initial and the stepped weights: differs from both
        config = {"vae": {"preset": "tiny-2.1"}, "data": {"buckets": BUCKETS}}
        save_checkpoint(os.path.join(root, "run21"), 1, [module], optimizer, {"step": 1}, config, ema=ema)
        # a VAE that is no preset: its name and every field, as train-vae writes it
        custom = config_to_dict(dataclasses.replace(vae_preset("tiny-2.2"), name="mine"))
        save_model_checkpoint(os.path.join(root, "ckpt22"), [TrainableVAE(WanVAE(vae_preset("tiny-2.2")))],
                              {"vae": custom}, {"step": 0})
        image = vae_preset("tiny-2.1", image_only=True)
        save_model_checkpoint(os.path.join(root, "image"), [TrainableVAE(WanVAE(image))],
                              {"vae": {"preset": "tiny-2.1", "image_only": True}}, {"step": 0})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-export")
    spawn_local(_write_checkpoints, world_size=1, args=(str(root),))
    manifest = write_synthetic_dataset(str(root / "clips"), count=4, frames=9, height=32, width=48)
    return root, {"tiny-2.1": str(root / "run21"), "tiny-2.2": str(root / "ckpt22"), "image": str(root / "image")}, \
        manifest


@pytest.mark.parametrize("preset", ["tiny-2.1", "tiny-2.2"])
def test_export_loads_in_diffusers_and_megawan_alike(checkpoints, preset):
    from diffusers import AutoencoderKLWan

    root, ckpts, manifest = checkpoints
    out = str(root / f"out-{preset}")
    assert export_tool.main([ckpts[preset], "--to", "both", "--out", out, "--stats", manifest,
                             "--stats-samples", "3", "--stats-buckets", *BUCKETS]) == 0
    state, cfg = read_trained_vae(ckpts[preset])
    pth = os.path.join(out, "Wan2.2_VAE.pth" if preset == "tiny-2.2" else "Wan2.1_VAE.pth")
    ours = load_vae(pth, vae_config_named(os.path.join(out, "vae_config.json")))
    ref = AutoencoderKLWan.from_pretrained(os.path.join(out, "vae")).eval()
    for key, value in state.items():  # the checkpoint's weights, renamed, never changed
        assert torch.equal(ours.state_dict()[key], value), key
        assert torch.equal(ref.state_dict()[key], value), key

    # in float64: in fp32 the two implementations' operation orders alone differ by up to 1.4e-6 (tiny-2.2 decode)
    ours, ref = ours.double(), ref.double()
    s = cfg.spatial_stride
    video = torch.rand(1, 3, 5, 2 * s, s, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(video)
        posterior = ref.encode(video).latent_dist
        assert (mean - posterior.mean).abs().max() <= 1e-6
        assert (logvar - posterior.logvar).abs().max() <= 1e-6
        assert (ours.decode(mean) - ref.decode(mean).sample).abs().max() <= 1e-6
    ours, ref = ours.float(), ref.float()

    # the statistics: per channel over every latent position of the sampled clips, in both configs
    clips, _ = eval_clips(manifest, BUCKETS, limit=3)
    with torch.no_grad():
        latents = torch.cat([ours.encode(c["video"][None])[0].flatten(2) for c in clips], dim=2)[0].double()
    for config in (os.path.join(out, "vae_config.json"), os.path.join(out, "vae", "config.json")):
        with open(config) as f:
            values = json.load(f)
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        torch.testing.assert_close(as_tensor(values["latents_mean"]), latents.mean(1))
        torch.testing.assert_close(as_tensor(values["latents_std"]), latents.std(1, correction=0))
    assert list(ref.config.latents_mean) == values["latents_mean"]

    # an encoder folder holding the export: generation / validation normalise with the recomputed statistics
    from megawan.artifacts import find_encoders
    from megawan.demo.tiny_assets import write_tiny_encoders

    folder = str(root / f"encoders-{preset}")
    write_tiny_encoders(folder, vae_config=preset)
    os.replace(pth, os.path.join(folder, os.path.basename(pth)))
    os.replace(os.path.join(out, "vae_config.json"), os.path.join(folder, "vae_config.json"))
    found = find_encoders(folder)
    assert found["vae_config"] == os.path.join(folder, "vae_config.json")
    assert list(vae_config_named(found["vae_config"]).latents_mean) == values["latents_mean"]


def test_ema_choice_and_refusals(checkpoints, tmp_path, capsys):
    root, ckpts, _ = checkpoints
    path = resolve_checkpoint(ckpts["tiny-2.1"])
    key = "encoder.conv_in.weight"
    ema_state, _ = read_trained_vae(ckpts["tiny-2.1"])  # default: the EMA where there is one
    trained, _ = read_trained_vae(ckpts["tiny-2.1"], ema=False)
    assert torch.equal(ema_state[key], CheckpointTensors(path, ema=True).get("vae." + key))
    assert torch.equal(trained[key], CheckpointTensors(path).get("vae." + key))
    assert not torch.equal(ema_state[key], trained[key])

    written = export_vae(ckpts["tiny-2.1"], str(tmp_path / "official"), to="official", ema=False)
    assert written["diffusers"] is None
    assert sorted(os.listdir(tmp_path / "official")) == ["Wan2.1_VAE.pth", "vae_config.json"]
    assert written["config"].latents_mean == vae_preset("tiny-2.1").latents_mean  # no --stats: the run's values

    def refused(args):
        assert export_tool.main(args) == 2
        return capsys.readouterr().err.strip()

    assert "holds no EMA weights" in refused([ckpts["tiny-2.2"], "--out", str(tmp_path / "a"), "--ema"])
    assert "exists already" in refused([ckpts["tiny-2.1"], "--out", str(tmp_path / "official"), "--to", "official"])
    assert "data.buckets" in refused([ckpts["tiny-2.2"], "--out", str(tmp_path / "b"), "--stats", "x.jsonl"])
    assert "image_only" in refused([ckpts["image"], "--out", str(tmp_path / "d")])
    assert read_trained_vae(ckpts["tiny-2.2"])[1].name == "mine"
    err = refused([str(tmp_path), "--out", str(tmp_path / "c")])
    assert "neither a checkpoint" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="--vae-config: unknown VAE preset 'tiny-2.3'"):
        vae_config_named("tiny-2.3")
    with pytest.raises(ConfigError, match="no such VAE config file"):
        vae_config_named(str(tmp_path / "missing.json"))
    from megawan.data.precompute import PrecomputeJob

    job = PrecomputeJob(manifest="m.jsonl", out="o.zarr", vae="v.pth", text_encoder="t.pth", tokenizer="tok",
                        vae_config=str(tmp_path), decode_backend="pyav")
    with pytest.raises(ConfigError, match=r"^PrecomputeJob.vae_config \(--vae-config\): .* holds config.json or "):
        job.check()  # before any file is read or model built


def test_precompute_records_the_exported_statistics(checkpoints, tmp_path):
    """`--vae-config exported/vae_config.json`: the store's VAE metadata carries the recomputed statistics, and its
    latents are the exported VAE's."""
    from megawan.data.precompute import PrecomputeJob, run_precompute
    from megawan.data.store import LatentStore
    from megawan.demo.tiny_assets import write_tiny_encoders

    root, ckpts, manifest = checkpoints
    out = str(tmp_path / "exported")
    written = export_vae(ckpts["tiny-2.1"], out, to="official", stats=manifest, stats_samples=2)  # run's buckets
    assert written["config"].latents_mean != vae_preset("tiny-2.1").latents_mean
    encoders = write_tiny_encoders(str(tmp_path / "encoders"))
    job = PrecomputeJob(manifest=manifest, out=str(tmp_path / "store.zarr"), vae=written["official"],
                        vae_config=os.path.join(out, "vae_config.json"), text_encoder=encoders["text_encoder"],
                        text_config=encoders["text_config"], tokenizer=encoders["tokenizer"], buckets=["9x32x48"],
                        decode_workers=1, dtype="float32")
    run_precompute(job, progress=False)
    store = LatentStore.open(job.out)
    vae_meta = store.metadata.vae
    assert vae_meta.latents_mean == written["config"].latents_mean
    assert vae_meta.latents_std == written["config"].latents_std
    assert vae_meta.name == os.path.abspath(os.path.join(out, "vae_config.json"))
    sample = store.read("9x32x48", 0)
    clips, _ = eval_clips(manifest, ["9x32x48"])
    clip = next(c for c in clips if c["id"] == sample["id"])
    state, cfg = read_trained_vae(ckpts["tiny-2.1"])
    from megawan.vae_export import build_vae

    with torch.no_grad():
        expected = build_vae(state, cfg).encode(clip["video"][None])[0][0]
    torch.testing.assert_close(torch.as_tensor(sample["latents"]), expected)
