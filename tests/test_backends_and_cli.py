"""Backend selection, the TE spec's classes, parameter counts of the official models, and the CLI."""

import ast
import importlib.util

import pytest

from megawan.capabilities import resolve_backend, transformer_engine_available
from megawan.cli import main
from megawan.config import dit_preset
from megawan.convert.dit_keys import dit_param_count, dit_param_shapes
from megawan.models.dit import WanDiT, get_wan_block_te_spec


def test_auto_backend_is_local_without_transformer_engine():
    if transformer_engine_available():
        assert resolve_backend("auto") == "te"
    else:
        assert resolve_backend("auto") == "local"
        with pytest.raises(RuntimeError, match="model.backend=te needs Transformer Engine"):
            WanDiT(dit_preset("tiny", backend="te"))


def test_te_spec_names_classes_that_megatron_core_defines():
    """The TE spec is imported lazily; make sure megatron-core (this version) still defines what it names."""
    source = open(importlib.util.find_spec("megatron.core.extensions.transformer_engine").origin).read()
    defined = {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef)}
    spec = get_wan_block_te_spec()
    attn = spec.submodules.self_attention.submodules
    for sub in (attn.linear_q, attn.linear_proj, attn.core_attention):
        module_path, class_name = sub.module
        assert module_path == "megatron.core.extensions.transformer_engine"
        assert class_name in defined


def test_parameter_counts_equal_the_official_checkpoints():
    # counted from the official WanModel definitions (Wan-Video Wan2.1 / Wan2.2) built on the meta device
    official = {
        "wan2.1-t2v-1.3b": 1_418_996_800,
        "wan2.1-t2v-14b": 14_288_491_584,
        "wan2.1-i2v-14b": 16_394_878_784,
        "wan2.1-flf2v-14b": 16_395_536_704,
        "wan2.2-ti2v-5b": 4_999_787_712,
        "wan2.2-t2v-a14b": 14_288_491_584,  # per expert
        "wan2.2-i2v-a14b": 14_288_901_184,  # per expert
    }
    for name, count in official.items():
        assert dit_param_count(dit_preset(name)) == count, name


def test_model_parameters_match_the_shape_table():
    for preset in ("tiny", "tiny-i2v", "tiny-ti2v"):
        cfg = dit_preset(preset)
        model = WanDiT(cfg)
        shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
        assert shapes == dit_param_shapes(cfg)


def test_cli_presets_and_flops(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "wan2.1-t2v-14b" in out and "14.288B" in out
    assert main(["flops", "wan2.1-t2v-1.3b", "--frames", "81", "--height", "480", "--width", "832"]) == 0  # video
    assert "32,760 tokens" in capsys.readouterr().out
