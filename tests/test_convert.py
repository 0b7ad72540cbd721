"""State-dict conversion: official <-> megawan <-> diffusers, bit-exact, checked against diffusers' own
official-to-diffusers converter; TP split / merge; clear errors for keys and shapes that do not fit."""

import pytest
import torch

from megawan.config import dit_preset
from megawan.convert import convert_state_dict
from wan_reference import diffusers_dit

CONFIGS = {
    "t2v": dict(preset="tiny"),
    "i2v": dict(preset="tiny-i2v"),
    "flf2v": dict(preset="tiny-i2v", image_pos_len=14),
    "ti2v": dict(preset="tiny-ti2v"),
}


def _config(name):
    args = dict(CONFIGS[name])
    return dit_preset(args.pop("preset"), **args)


def _assert_bit_exact(a: dict, b: dict):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_official_to_diffusers_agrees_with_diffusers_converter(name):
    """Our official names are right: diffusers' single-file loader maps them to the same diffusers keys."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    cfg = _config(name)
    diffusers_sd = diffusers_dit(cfg).state_dict()
    official = convert_state_dict(diffusers_sd, src="diffusers", dst="official", config=cfg)
    theirs = convert_wan_transformer_to_diffusers(dict(official))
    if "img_emb.emb_pos" in theirs:
        # diffusers' single-file loader leaves FLF2V's image positions unmapped; its conversion script
        # (scripts/convert_wan_to_diffusers.py) maps img_emb.emb_pos -> condition_embedder.image_embedder.pos_embed
        theirs["condition_embedder.image_embedder.pos_embed"] = theirs.pop("img_emb.emb_pos")
    _assert_bit_exact(theirs, diffusers_sd)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_official_megawan_diffusers_megawan_is_bit_exact(name, dtype):
    cfg = _config(name)
    official = {k: v.to(dtype) for k, v in convert_state_dict(
        diffusers_dit(cfg).state_dict(), src="diffusers", dst="official", config=cfg).items()}
    ours = convert_state_dict(official, src="official", dst="megawan", config=cfg)
    diffusers = convert_state_dict(ours, src="megawan", dst="diffusers", config=cfg)
    again = convert_state_dict(diffusers, src="diffusers", dst="megawan", config=cfg)
    _assert_bit_exact(again, ours)
    _assert_bit_exact(convert_state_dict(again, src="megawan", dst="official", config=cfg), official)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_split_and_merge_round_trip(tp):
    cfg = dit_preset("tiny-i2v", num_heads=4)
    official = convert_state_dict(diffusers_dit(cfg).state_dict(), src="diffusers", dst="official", config=cfg)
    shards = convert_state_dict(official, src="official", dst="megawan", config=cfg, tp_size=tp)
    assert len(shards) == tp
    q = "blocks.0.self_attention.linear_q.weight"
    proj = "blocks.0.self_attention.linear_proj.weight"
    assert shards[0][q].shape == (cfg.dim // tp, cfg.dim)
    assert shards[0][proj].shape == (cfg.dim, cfg.dim // tp)
    assert shards[0]["blocks.0.self_attention.q_norm.weight"].shape == (cfg.dim // tp,)
    assert shards[0]["blocks.0.modulation"].shape == (1, 6, cfg.dim)  # replicated
    merged = convert_state_dict(shards, src="megawan", dst="official", config=cfg)
    _assert_bit_exact(merged, official)


def test_model_state_dict_round_trips_through_official():
    """The model's own state dict (with megatron's _extra_state entries) converts and loads back."""
    from megawan.models.dit import WanDiT

    cfg = dit_preset("tiny")
    model = WanDiT(cfg)
    official = convert_state_dict(model.state_dict(), src="megawan", dst="official", config=cfg)
    assert "blocks.0.self_attn.q.weight" in official and "head.head.weight" in official
    fresh = WanDiT(cfg)
    fresh.load_state_dict(convert_state_dict(official, src="official", dst="megawan", config=cfg))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k


def test_errors_name_the_key():
    cfg = dit_preset("tiny")
    official = convert_state_dict(diffusers_dit(cfg).state_dict(), src="diffusers", dst="official", config=cfg)

    extra = dict(official, **{"blocks.0.cross_attn.k_img.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="k_img"):
        convert_state_dict(extra, src="official", dst="megawan", config=cfg)

    missing = dict(official)
    del missing["blocks.1.ffn.2.bias"]
    with pytest.raises(KeyError, match=r"blocks\.1\.ffn\.2\.bias"):
        convert_state_dict(missing, src="official", dst="megawan", config=cfg)

    wrong = dict(official, **{"head.head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"head\.head\.weight.*shape"):
        convert_state_dict(wrong, src="official", dst="megawan", config=cfg)

    with pytest.raises(ValueError, match="src"):
        convert_state_dict(official, src="comfy", dst="megawan", config=cfg)

    with pytest.raises(ValueError, match="does not split"):
        convert_state_dict(official, src="official", dst="megawan", config=cfg, tp_size=3)
