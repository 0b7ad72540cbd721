"""Configs: presets carry the official hyper-parameters; YAML + overrides; clear errors naming the field."""

import dataclasses

import pytest
import yaml

from megawan.config import ConfigError, config_to_dict, dit_config_from, dit_preset, load_config, preset_names


def test_presets_have_the_official_hyper_parameters():
    # (dim, ffn_dim, num_heads, num_layers, in_dim, out_dim, model_type) from the Wan-Video config.json files
    official = {
        "wan2.1-t2v-1.3b": (1536, 8960, 12, 30, 16, 16, "t2v"),
        "wan2.1-t2v-14b": (5120, 13824, 40, 40, 16, 16, "t2v"),
        "wan2.1-i2v-14b": (5120, 13824, 40, 40, 36, 16, "i2v"),
        "wan2.2-ti2v-5b": (3072, 14336, 24, 30, 48, 48, "ti2v"),
        "wan2.2-t2v-a14b": (5120, 13824, 40, 40, 16, 16, "t2v"),
        "wan2.2-i2v-a14b": (5120, 13824, 40, 40, 36, 16, "i2v"),
    }
    for name, values in official.items():
        c = dit_preset(name)
        assert (c.dim, c.ffn_dim, c.num_heads, c.num_layers, c.in_dim, c.out_dim, c.model_type) == values, name
        assert (c.freq_dim, c.text_dim, c.text_len, c.eps, c.patch_size, c.head_dim) == (256, 4096, 512, 1e-6, (1, 2, 2), 128)
        assert c.rope_split == (44, 42, 42)
    assert dit_preset("wan2.1-i2v-14b").image_dim == 1280
    assert dit_preset("wan2.2-i2v-a14b").image_dim is None  # Wan2.2 dropped CLIP
    assert dit_preset("wan2.2-t2v-a14b").expert_boundary == 0.875
    assert dit_preset("wan2.2-i2v-a14b").expert_boundary == 0.900
    assert {"tiny", "tiny-i2v", "tiny-ti2v", "tiny-a14b"} <= set(preset_names())


def test_yaml_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "wan2.1-t2v-1.3b", "num_layers": 4}, "parallel": {"tensor_parallel": 2}}))
    cfg = load_config(str(path), ["model.num_layers=6", "seed=3", "model.patch_size=[1,2,2]"])
    assert cfg.model.name == "wan2.1-t2v-1.3b" and cfg.model.dim == 1536
    assert cfg.model.num_layers == 6 and cfg.seed == 3 and cfg.parallel.tensor_parallel == 2
    # the resolved config is plain data that loads back to the same thing
    again = tmp_path / "resolved.yaml"
    again.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(str(again)) == cfg


def test_example_config_loads():
    cfg = load_config("examples/configs/tiny_tp2.yaml")
    assert cfg.parallel.tensor_parallel == 2 and cfg.model.name == "tiny"


@pytest.mark.parametrize("overrides,message", [
    (["model.num_layer=3"], r"unknown key 'model.num_layer' \(did you mean 'num_layers'\?\)"),
    (["parallel.tensor_parallel=3"], r"model.num_heads: num_heads=2 is not divisible by tensor_parallel=3"),
    (["model.num_heads=5"], r"model.num_heads: dim=32 is not divisible by num_heads=5"),
    (["model.num_layers=two"], r"model.num_layers: expected an integer"),
    (["model.backend=cuda"], r"model.backend: 'cuda' is not one of"),
    (["model.preset=tiny2"], r"unknown preset 'tiny2' \(did you mean 'tiny'\?\)"),
    (["model.expert_boundary=1.5"], r"model.expert_boundary: must lie in \(0, 1\)"),
    (["train.compile=model"], r"train.compile: 'model' is not none or blocks"),
    (["seed"], r"not of the form section.key=value"),
])
def test_impossible_configs_fail_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.preset=tiny", *overrides])


def test_config_from_official_config_json():
    # the config.json of Wan2.1-T2V-1.3B as Wan-Video ships it
    official = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960,
                "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16,
                "text_len": 512}
    cfg = dit_config_from(official)
    assert dataclasses.replace(cfg, name="x") == dataclasses.replace(dit_preset("wan2.1-t2v-1.3b"), name="x")
    i2v = dict(official, model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
    assert dit_config_from(i2v).image_dim == 1280  # Wan2.1 I2V by default
    assert dit_config_from(i2v, state_dict_keys=["blocks.0.self_attn.q.weight"]).image_dim is None  # Wan2.2 I2V
    flf2v = dict(i2v, model_type="flf2v")
    assert dit_config_from(flf2v).image_pos_len == 514


def test_config_from_diffusers_config_json():
    from wan_reference import diffusers_dit

    for preset in ("tiny", "tiny-i2v", "tiny-ti2v"):
        cfg = dit_preset(preset)
        back = dit_config_from(dict(diffusers_dit(cfg).config), text_len=cfg.text_len)
        assert dataclasses.replace(back, name=preset) == cfg
    with pytest.raises(ConfigError, match="neither"):
        dit_config_from({"hidden": 3})


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads `lr: 1e-4` as a string; the config takes it as the number a user meant."""
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  lr: 1e-4\n")
    from megawan.config import load_config

    assert load_config(str(path)).optimizer.lr == 1e-4
