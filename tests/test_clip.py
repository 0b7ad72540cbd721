"""The CLIP image encoder: ours against transformers' CLIPVisionModel `hidden_states[-2]` (weights through our
converter; gelu and quick_gelu), the official open-clip layout (written here from the transformers tensors by an
independent inverse mapping, saved and read back weights-only), TP=2 against TP=1, Wan's preprocessing and the
errors of bad input."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megawan.convert import convert_state_dict
from megawan.models.clip import CLIPVisionEncoder, clip_config_from, clip_preset
from megawan.parallel.launch import spawn_local
from wan_reference import relative_error

TOL = 1e-5


def transformers_clip(cfg, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, patch_size=cfg.patch_size, image_size=cfg.image_size,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.projection_dim,
        attn_implementation="eager",
    ))
    assert model.config._attn_implementation == "eager"
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random, not the init's ones / zeros: every norm and bias matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _pixels(cfg, batch=2):
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))


def _expected(ref, pixels):
    with torch.no_grad():
        return ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def _official_from_transformers(sd: dict) -> dict:
    """The open-clip layout of Wan's models_clip_*.pth, written independently of megawan.convert."""
    out = {"log_scale": torch.tensor(2.6), "textual.token_embedding.weight": torch.randn(10, 4),
           "visual.head": torch.randn(sd["pre_layrnorm.weight"].shape[0], 16)}
    out["visual.patch_embedding.weight"] = sd["embeddings.patch_embedding.weight"]
    out["visual.cls_embedding"] = sd["embeddings.class_embedding"].view(1, 1, -1)
    out["visual.pos_embedding"] = sd["embeddings.position_embedding.weight"].unsqueeze(0)
    for ours, theirs in (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"visual.{ours}.{p}"] = sd[f"{theirs}.{p}"]
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    for i in layers:
        t, o = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for p in ("weight", "bias"):
            out[o + f"attn.to_qkv.{p}"] = torch.cat([sd[t + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                         ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
                out[o + f"{a}.{p}"] = sd[t + f"{b}.{p}"]
    return out


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_encoder_matches_transformers_penultimate_states(act):
    cfg = clip_preset("tiny", hidden_act=act)
    ref = transformers_clip(cfg)
    assert clip_config_from(ref.config.to_dict()) == dataclasses.replace(cfg, name="transformers")
    ours = CLIPVisionEncoder(clip_config_from(ref.config.to_dict())).eval()
    sd = convert_state_dict(ref.state_dict(), src="transformers", dst="megawan", config=ours.clip_config)
    ours.load_state_dict(sd)
    pixels = _pixels(cfg)
    with torch.no_grad():
        states = ours(pixels)
    assert states.shape == (2, 1 + (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)
    assert relative_error(states, _expected(ref, pixels)) <= TOL


def test_official_layout_loads_to_the_same_numbers_and_round_trips(tmp_path):
    cfg = clip_preset("tiny")
    ref = transformers_clip(cfg)
    torch.save(_official_from_transformers(ref.state_dict()), tmp_path / "models_clip_tiny.pth")
    official = torch.load(tmp_path / "models_clip_tiny.pth", weights_only=True)
    ours = CLIPVisionEncoder(cfg).eval()
    sd = convert_state_dict(official, src="official", dst="megawan", config=cfg)
    ours.load_state_dict(sd)
    pixels = _pixels(cfg)
    with torch.no_grad():
        assert relative_error(ours(pixels), _expected(ref, pixels)) <= TOL
    # back out: every visual tower tensor bit-exact (text tower, log_scale and head are not Wan's to run)
    back = convert_state_dict(sd, src="megawan", dst="official", config=cfg)
    kept = {k: v for k, v in official.items() if k.startswith("visual.") and k != "visual.head"}
    assert set(back) == set(kept) and all(torch.equal(back[k], kept[k]) for k in kept)
    hf = convert_state_dict(sd, src="megawan", dst="transformers", config=cfg)
    assert all(torch.equal(hf[k], v) for k, v in ref.state_dict().items())
    # the Hub's files nest the tower under vision_model. (CLIPVisionModelWithProjection: plus the unused head)
    prefixed = {f"vision_model.{k}": v for k, v in ref.state_dict().items()}
    prefixed["visual_projection.weight"] = torch.zeros(cfg.projection_dim, cfg.hidden_size)
    assert all(torch.equal(convert_state_dict(prefixed, "transformers", "megawan", cfg)[k], v) for k, v in sd.items())


def test_wrong_weights_name_the_key():
    cfg = clip_preset("tiny")
    sd = transformers_clip(cfg).state_dict()
    with pytest.raises(ValueError, match="pos"):
        convert_state_dict(sd, "transformers", "megawan", clip_preset("tiny", image_size=40))
    with pytest.raises(KeyError, match="missing"):
        convert_state_dict({k: v for k, v in sd.items() if "layers.2." not in k}, "transformers", "megawan", cfg)


def _tp_worker(rank, cfg_dict, sd_path, out_dir):
    from megatron.core import parallel_state

    from megawan.config import CLIPConfig

    cfg = CLIPConfig(**cfg_dict)
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    enc = CLIPVisionEncoder(cfg).eval()
    enc.load_state_dict(convert_state_dict(torch.load(sd_path), "megawan", "megawan", cfg, tp_size=tp)[tp_rank])
    with torch.no_grad():
        torch.save(enc(_pixels(cfg)), f"{out_dir}/rank{rank}.pt")


def test_tensor_parallel_encoder_equals_one_rank(tmp_path):
    cfg = clip_preset("tiny", hidden_act="quick_gelu")
    ref = transformers_clip(cfg)
    sd = convert_state_dict(ref.state_dict(), "transformers", "megawan", cfg)
    torch.save(sd, tmp_path / "sd.pt")
    spawn_local(_tp_worker, world_size=2, tensor_parallel=2, args=(dataclasses.asdict(cfg), str(tmp_path / "sd.pt"),
                                                                   str(tmp_path)))
    single = CLIPVisionEncoder(cfg).eval()
    single.load_state_dict(sd)
    with torch.no_grad():
        expected = single(_pixels(cfg))
    assert relative_error(expected, _expected(ref, _pixels(cfg))) <= TOL
    for r in range(2):
        assert relative_error(torch.load(tmp_path / f"rank{r}.pt"), expected) <= TOL


def test_preprocess_is_wans_resize_and_normalisation():
    cfg = clip_preset("tiny")
    enc = CLIPVisionEncoder(cfg)
    image = torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1  # H 40, W 24, in [-1, 1]
    pixels = enc.preprocess(image)
    assert pixels.shape == (1, 3, cfg.image_size, cfg.image_size)
    resized = F.interpolate(image, size=(32, 32), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.allclose(pixels, ((resized + 1) / 2 - mean) / std, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(1, 4, 32, 32), r"\[B, 3, H, W\]"),           # RGBA
    (torch.zeros(3, 32, 32), r"\[B, 3, H, W\]"),              # no batch axis
    (torch.full((1, 3, 8, 8), 255.0), r"\[-1, 1\]"),          # 0..255 pixels
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floats"),
])
def test_bad_images_are_clear_errors(bad, message):
    enc = CLIPVisionEncoder(clip_preset("tiny"))
    with pytest.raises(ValueError, match=message):
        enc.preprocess(bad)


def test_unprocessed_pixels_are_refused():
    enc = CLIPVisionEncoder(clip_preset("tiny"))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\].*preprocess"):
        enc(torch.zeros(1, 3, 40, 24))
    with pytest.raises(ValueError, match="hidden_act"):
        clip_preset("tiny", hidden_act="relu")


def test_vit_h_size():
    from megawan.convert.clip_keys import clip_param_shapes

    cfg = clip_preset("open-clip-xlm-roberta-large-vit-huge-14")
    assert cfg.num_tokens == 257
    with torch.device("meta"):  # transformers' tower of the same config, never materialised
        from transformers import CLIPVisionConfig, CLIPVisionModel

        ref = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in dataclasses.asdict(cfg).items()
                                                  if k not in ("name", "params_dtype")}))
    shapes = clip_param_shapes(cfg)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == sum(p.numel() for p in ref.parameters())
    # the ViT-H/14 tower (its last block, held but not run, included; the official 1280 x 1024 head not)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 630_766_080


def test_find_encoders_finds_the_optional_clip_and_loads_it(tmp_path):
    from megawan.artifacts import detect_clip_preset, find_encoders, load_clip_encoder
    from megawan.demo.tiny_assets import write_tiny_encoders
    from pipelines import write_tiny_clip

    write_tiny_encoders(str(tmp_path))
    assert find_encoders(str(tmp_path))["clip"] is None and find_encoders(str(tmp_path))["clip_config"] is None
    path = write_tiny_clip(tmp_path)
    found = find_encoders(str(tmp_path))
    assert found["clip"] == path and found["clip_config"] == "tiny"
    cfg = clip_preset(found["clip_config"])
    official = torch.load(path, weights_only=True)
    encoder = load_clip_encoder(found["clip"], cfg)
    expected = convert_state_dict(official, "official", "megawan", cfg)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in expected.items())
    assert not any(p.requires_grad for p in encoder.parameters())
    # transformers' names load too (safetensors, as diffusers' image_encoder/ holds them), and in another dtype
    from safetensors.torch import save_file

    save_file(convert_state_dict(expected, "megawan", "transformers", cfg), str(tmp_path / "hf_clip.safetensors"))
    assert detect_clip_preset(torch.load(path, weights_only=True)) == "tiny"
    half = load_clip_encoder(str(tmp_path / "hf_clip.safetensors"), cfg, dtype=torch.bfloat16)
    assert half.pos_embedding.dtype == torch.bfloat16
    assert torch.equal(half.pos_embedding, expected["pos_embedding"].bfloat16())
    with pytest.raises(ValueError, match="not a CLIP image encoder"):
        load_clip_encoder(found["vae"], cfg)


def test_i2v_pipeline_official_to_diffusers_to_megawan_and_back_keeps_clip(tmp_path):
    """The CLIP encoder travels with whole-pipeline conversion, every tensor kept: official -> diffusers ->
    megawan -> diffusers and -> official (one megawan write: it spawns ranks). diffusers' WanImageToVideoPipeline
    loads the diffusers folder, and its image encoder gives our encoder's numbers."""
    import json

    from diffusers import WanImageToVideoPipeline
    from safetensors.torch import load_file

    from megawan.artifacts import load_clip_encoder
    from megawan.convert import load_safetensors_folder
    from megawan.export import convert_pipeline
    from pipelines import make_official_i2v_pipeline

    src, diff, mw, diff2, back = (tmp_path / n for n in ("official", "diffusers", "megawan", "diffusers2", "back"))
    make_official_i2v_pipeline(src)
    official = torch.load(src / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", weights_only=True)
    cfg = clip_preset("tiny")
    convert_pipeline(str(src), "official", str(diff), "diffusers")
    index = json.loads((diff / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert (index["image_encoder"], index["image_processor"]) == (["transformers", "CLIPVisionModel"],
                                                                  ["transformers", "CLIPImageProcessor"])
    convert_pipeline(str(diff), "diffusers", str(mw), "megawan")
    meta = json.loads((mw / "megawan_pipeline.json").read_text())
    assert (meta["clip"], meta["clip_config"]) == ("image_encoder.safetensors", "tiny")
    clip = load_file(str(mw / "image_encoder.safetensors"))
    expected = convert_state_dict(official, "official", "megawan", cfg)
    assert sorted(clip) == sorted(expected) and all(torch.equal(clip[k], expected[k]) for k in expected)

    convert_pipeline(str(mw), "megawan", str(diff2), "diffusers")
    for sub in ("transformer", "vae", "text_encoder", "image_encoder"):
        a, b = load_safetensors_folder(str(diff / sub)), load_safetensors_folder(str(diff2 / sub))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), sub
    dit_keys = load_safetensors_folder(str(diff2 / "transformer"))
    assert any(k.startswith("condition_embedder.image_embedder.") for k in dit_keys)
    processor = "image_processor/preprocessor_config.json"
    assert (diff / processor).read_text() == (diff2 / processor).read_text()
    convert_pipeline(str(mw), "megawan", str(back), "official")
    visual = torch.load(back / "models_clip_tiny.pth", weights_only=True)
    assert sorted(visual) == sorted(k for k in official if k.startswith("visual.") and k != "visual.head")
    assert all(torch.equal(v, official[k]) for k, v in visual.items())
    dit, dit_back = load_safetensors_folder(str(src)), load_safetensors_folder(str(back))
    assert sorted(dit) == sorted(dit_back) and all(torch.equal(dit[k], dit_back[k]) for k in dit)

    pipe = WanImageToVideoPipeline.from_pretrained(str(diff2))
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModel"
    assert list(pipe.image_processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert pipe.image_processor.crop_size["height"] == cfg.image_size
    ours = load_clip_encoder(str(mw / "image_encoder.safetensors"), cfg)
    pixels = _pixels(cfg)
    with torch.no_grad():
        assert relative_error(ours(pixels), _expected(pipe.image_encoder.eval(), pixels)) <= TOL
