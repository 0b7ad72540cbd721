"""`megawan generate --image`: image-to-video sampling equals diffusers' WanImageToVideoPipeline given our exported
pipeline, the same image, noise, prompt, sampler and guidance — Wan2.2 I2V-A14B (mask + first-frame latents, two
experts) and TI2V-5B (a clean first latent frame, per-token timesteps); TP2 and CP2 sample what one rank does."""

import numpy as np
import pytest
import torch

from megawan.export import convert_pipeline
from megawan.generation import GenerationRequest, run_generate
from megawan.parallel.launch import spawn_local
from pipelines import make_official_pipeline

pytest.importorskip("diffusers")
PROMPT = "a red circle moves left"
NEGATIVE = "a blurry still frame"
FRAMES, HEIGHT, WIDTH = 17, 32, 48


def _image(path, height=HEIGHT, width=WIDTH, seed=0):
    """A PNG of exactly the video size (resizing is the identity on both sides): a smooth colour field and a
    square, so the first frame carries structure the VAE keeps."""
    from PIL import Image

    gen = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 90)], -1).astype(np.uint8)
    top, left = gen.integers(0, height // 2), gen.integers(0, width // 2)
    rgb[top:top + height // 3, left:left + width // 3] = (230, 40, 40)
    Image.fromarray(rgb).save(path)
    return str(path)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """A tiny Wan2.2 I2V-A14B (two experts, 4 mask + 4 image-latent input channels beside the noise) converted
    from the official layout to megawan and to diffusers."""
    root = tmp_path_factory.mktemp("i2v-a14b")
    make_official_pipeline(root / "official", preset="tiny-a14b", dtype=torch.float32,
                           overrides=dict(model_type="i2v", in_dim=12, out_dim=4, text_dim=32, text_len=24))
    for fmt in ("megawan", "diffusers"):
        convert_pipeline(str(root / "official"), "official", str(root / fmt), fmt, boundary=0.9)
    return root


def _request(ckpt, out_dir, name, **kw):
    base = dict(ckpt=str(ckpt), prompts=[PROMPT], out=str(out_dir / name), frames=FRAMES, height=HEIGHT,
                width=WIDTH, steps=8, shift=5.0, guidance=(3.0, 4.0), negative_prompt=NEGATIVE, seed=3,
                progress=False, save_latents=str(out_dir / f"{name}.pt"))
    base.update(kw)
    return GenerationRequest(**base)


def _generate(req, world=1, **layout):
    spawn_local(run_generate, world_size=world, args=(req, None), **layout)
    return torch.load(req.save_latents, weights_only=True)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _noise(path, shape, seed=7):
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))
    torch.save(noise, path)
    return noise


def _diffusers_i2v(folder, shift, expand_timesteps=False):
    """diffusers' WanImageToVideoPipeline on our diffusers export (no CLIP image encoder: Wan2.2), its UniPC on
    Wan's sampling grid (diffusers' default flow grid differs from the official one)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    class WanGridUniPC(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=np.linspace(0.999, 0, num_inference_steps + 1)[:-1], device=device)

    t2v = WanPipeline.from_pretrained(str(folder))
    parts = {k: getattr(t2v, k) for k in ("tokenizer", "text_encoder", "vae", "transformer", "transformer_2")}
    pipe = WanImageToVideoPipeline(**parts, scheduler=WanGridUniPC.from_config(t2v.scheduler.config, flow_shift=shift),
                                   boundary_ratio=t2v.config.boundary_ratio, expand_timesteps=expand_timesteps)
    # the text states from WanPipeline's encode_prompt (the same code): diffusers 0.42's image-to-video copy
    # calls ftfy unguarded, which is not installed here
    cond, uncond = t2v.encode_prompt(PROMPT, NEGATIVE, True, max_sequence_length=24)
    return pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond)


def _same_preprocessed_image(pipe, path, height, width):
    """Both sides condition on the same pixels: diffusers' video processor and ours give the same [-1, 1] image."""
    from PIL import Image

    from megawan.generation import _load_image

    theirs = pipe.video_processor.preprocess(Image.open(path), height=height, width=width)[0]
    ours = _load_image(path, height, width)
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() < 1e-6


def test_i2v_a14b_equals_diffusers_and_tp2_cp2_equal_one_rank(a14b, tmp_path):
    from PIL import Image

    image = _image(tmp_path / "first.png")
    noise = _noise(tmp_path / "noise.pt", (4, 5, 4, 6))
    pipe, text = _diffusers_i2v(a14b / "diffusers", shift=5.0)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.9
    _same_preprocessed_image(pipe, image, HEIGHT, WIDTH)
    # diffusers: guidance_scale drives `transformer` (the high-noise expert), guidance_scale_2 the low-noise one
    theirs = pipe(image=Image.open(image), **text, height=HEIGHT, width=WIDTH,
                  num_frames=FRAMES, num_inference_steps=8, guidance_scale=4.0, guidance_scale_2=3.0,
                  latents=noise.clone(), output_type="latent").frames.float()
    kw = dict(image=image, noise=str(tmp_path / "noise.pt"))
    one = _generate(_request(a14b / "megawan", tmp_path, "one", **kw))
    assert _rel(one, theirs) < 1e-4
    assert _rel(noise, theirs) > 0.1  # it did sample
    for name, layout in {"tp2": dict(tensor_parallel=2), "cp2": dict(context_parallel=2)}.items():
        got = _generate(_request(a14b / "megawan", tmp_path, name, **kw), world=2, **layout)
        assert _rel(got, one) < 1e-5, name


def test_ti2v_equals_diffusers_expand_timesteps(tmp_path):
    """TI2V-5B's image-to-video in diffusers is WanImageToVideoPipeline with expand_timesteps=True: the first latent
    frame is the image's, with timestep 0 on its tokens, at every step and in the result."""
    from PIL import Image

    make_official_pipeline(tmp_path / "official", preset="tiny-ti2v", vae="tiny-2.2", dtype=torch.float32,
                           overrides=dict(in_dim=6, out_dim=6, text_dim=32, text_len=24))
    for fmt in ("megawan", "diffusers"):
        convert_pipeline(str(tmp_path / "official"), "official", str(tmp_path / fmt), fmt)
    height, width = 32, 64
    image = _image(tmp_path / "first.png", height, width)
    noise = _noise(tmp_path / "noise.pt", (6, 5, 2, 4))
    pipe, text = _diffusers_i2v(tmp_path / "diffusers", shift=5.0, expand_timesteps=True)
    _same_preprocessed_image(pipe, image, height, width)
    theirs = pipe(image=Image.open(image), **text, height=height, width=width,
                  num_frames=FRAMES, num_inference_steps=8, guidance_scale=4.0, latents=noise.clone(),
                  output_type="latent").frames.float()
    ours = _generate(_request(tmp_path / "megawan", tmp_path, "ours", height=height, width=width, guidance=4.0,
                              image=image, noise=str(tmp_path / "noise.pt")))
    assert _rel(ours, theirs) < 1e-4
    assert _rel(noise[:, :, 1:], theirs[:, :, 1:]) > 0.1
