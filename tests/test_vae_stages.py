"""The VAE configs of examples/configs/vae/ (the report's three stages, the fine-tunes, the demo's two stages):
each one loads, `megawan train-vae --print-config` prints it in a form that loads back to the same config, and
each passes the preflight `megawan train-vae` runs before any rank starts (architecture, buckets against the
VAE's strides, the global batch over the ranks it is launched on, the discriminator's crop, files, init.from's
tensors and the stage-1 -> stage-2 inflation) at the tiny size of the same architecture: the paths they name
are pointed at small stand-ins written here, nothing is trained."""

from __future__ import annotations

import contextlib
import glob
import io
import os

import pytest
import torch
import yaml

from megawan.cli import main
from megawan.config import vae_preset
from megawan.config.vae_run import load_vae_config, vae_run_config_dict
from megawan.convert import convert_state_dict
from megawan.models.vae import WanVAE
from megawan.models.vae.inflate import image_vae_config
from megawan.training.vae_preflight import preflight_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "vae", "*.yaml")))
REPORT_STAGES = ("stage1_image.yaml", "stage2_clips.yaml", "stage3_gan.yaml")


def test_the_stage_configs_are_there():
    names = {os.path.basename(p) for p in CONFIGS}
    assert set(REPORT_STAGES) | {"decoder_finetune.yaml", "wan2.2_finetune.yaml", "tiny_demo_stage1.yaml",
                                 "tiny_demo_stage2.yaml"} <= names
    stage1, stage2, stage3 = (load_vae_config(os.path.join(ROOT, "examples", "configs", "vae", n))
                              for n in REPORT_STAGES)
    assert stage1.vae.image_only and not stage2.vae.image_only and stage2.init.inflate
    assert "5x128x128" in stage2.data.buckets  # the report's stage 2: 128 x 128, 5 frames
    assert stage3.gan and len(stage3.data.buckets) > 2
    for cfg in (stage1, stage2, stage3):  # the report's weights
        assert (cfg.loss.l1, cfg.loss.kl, cfg.loss.lpips) == (3.0, 3.0e-6, 3.0)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_print_config_loads_back_to_the_same_config(path, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train-vae", "--config", path, "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(out.getvalue())
    assert yaml.safe_load(out.getvalue())["vae"]
    assert vae_run_config_dict(load_vae_config(str(printed))) == vae_run_config_dict(load_vae_config(path))


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Small files in place of the data, the LPIPS weights and the weights the configs start from."""
    root = tmp_path_factory.mktemp("stand-ins")
    files = {}
    for name in ("manifest.jsonl", "vgg.pth", "lin.pth"):
        files[name] = str(root / name)
        open(files[name], "w").close()  # preflight checks that they exist; the run reads them
    torch.manual_seed(0)
    for preset in ("tiny-2.1", "tiny-2.2"):
        cfg = vae_preset(preset)
        path = str(root / f"{preset}_official.pth")
        torch.save(convert_state_dict(WanVAE(cfg).state_dict(), "megawan", "official", cfg), path)
        files[preset] = path
    flat = image_vae_config(vae_preset("tiny-2.1"))
    files["image"] = str(root / "image_vae.pth")
    torch.save(WanVAE(flat).state_dict(), files["image"])  # what stage 1 trains (megawan names)
    return files


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_passes_preflight_at_tiny_size(path, stand_ins):
    cfg = load_vae_config(path)
    tiny = "tiny-2.2" if cfg.vae.is_residual else "tiny-2.1"
    overrides = [f"vae.preset={tiny}", f"data.manifest={stand_ins['manifest.jsonl']}",
                 f"validation.manifest={stand_ins['manifest.jsonl']}"]
    if cfg.loss.lpips > 0:
        overrides += [f"loss.lpips_vgg={stand_ins['vgg.pth']}", f"loss.lpips_lin={stand_ins['lin.pth']}"]
    if cfg.init.from_:
        overrides.append(f"init.from={stand_ins['image' if cfg.init.inflate else tiny]}")
    world = 1 if "tiny_demo" in path else 8  # the demo runs on one rank; the others are launched on 8 GPUs
    tiny_cfg = load_vae_config(path, tuple(overrides))
    facts = preflight_vae(tiny_cfg, world)
    assert facts["buckets"] == list(cfg.data.buckets)
    if cfg.init.from_:
        expected = WanVAE(tiny_cfg.vae).state_dict()
        assert facts["init_state"].keys() == expected.keys()
        assert all(facts["init_state"][k].shape == v.shape for k, v in expected.items())
