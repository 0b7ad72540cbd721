"""`megawan generate --image`: image-to-video sampling equals diffusers' WanImageToVideoPipeline given our exported
pipeline, the same image, noise, prompt, sampler and guidance — Wan2.2 I2V-A14B (mask + first-frame latents, two
experts), TI2V-5B (a clean first latent frame, per-token timesteps), Wan2.1 I2V and FLF2V (CLIP tokens of the
first / first and last frame); TP2 and CP2 sample what one rank does. Sizes from the image, crops, bad input."""

import os

import numpy as np
import pytest
import torch

from megawan.export import convert_pipeline
from megawan.generation import GenerationRequest, prepare, run_generate
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


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """A tiny Wan2.2 TI2V-5B (the Wan2.2 VAE: 16x spatial stride) in megawan and diffusers layouts."""
    root = tmp_path_factory.mktemp("ti2v")
    make_official_pipeline(root / "official", preset="tiny-ti2v", vae="tiny-2.2", dtype=torch.float32,
                           overrides=dict(in_dim=6, out_dim=6, text_dim=32, text_len=24))
    for fmt in ("megawan", "diffusers"):
        convert_pipeline(str(root / "official"), "official", str(root / fmt), fmt)
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


def _generate_logged(rank, req, log_dir):
    """run_generate with this rank's stdout in log_dir/rank<N>.log: ranks forked from spawn_local's fork server
    write to the fd 1 the server started with, which pytest's capfd of a later test does not see."""
    import sys

    with open(os.path.join(log_dir, f"rank{rank}.log"), "w") as log:
        sys.stdout = log
        try:
            run_generate(rank, req)
        finally:
            sys.stdout = sys.__stdout__


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _noise(path, shape, seed=7):
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))
    torch.save(noise, path)
    return noise


def _diffusers_i2v(folder, shift, expand_timesteps=False, text_len=24):
    """diffusers' WanImageToVideoPipeline on our diffusers export (with the CLIP image encoder for Wan2.1), its UniPC
    on Wan's sampling grid (diffusers' default flow grid differs from the official one); and the text states."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    class WanGridUniPC(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=np.linspace(0.999, 0, num_inference_steps + 1)[:-1], device=device)

    pipe = WanImageToVideoPipeline.from_pretrained(str(folder), expand_timesteps=expand_timesteps)
    pipe.scheduler = WanGridUniPC.from_config(pipe.scheduler.config, flow_shift=shift)
    # the text states from WanPipeline's encode_prompt (the same code): diffusers 0.42's image-to-video copy
    # calls ftfy unguarded, which is not installed here
    t2v = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                      transformer=pipe.transformer, scheduler=pipe.scheduler)
    cond, uncond = t2v.encode_prompt(PROMPT, NEGATIVE, True, max_sequence_length=text_len)
    return pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond)


def _same_preprocessed_image(pipe, req):
    """Both sides condition on the same pixels: diffusers' video processor and ours give the same [-1, 1] image
    (an image of the video's size: no resampling on either side)."""
    from PIL import Image

    plan = prepare(req)
    theirs = pipe.video_processor.preprocess(Image.open(req.image), height=req.height, width=req.width)[0]
    ours = plan["images"]["first"]
    assert plan["note"] is None and theirs.shape == ours.shape and (theirs - ours).abs().max() < 1e-6


def test_i2v_a14b_equals_diffusers(a14b, tmp_path):
    """Mask + first-frame latents beside the noise, the high-noise expert above the boundary and the low-noise one
    below, each with its guidance scale. (The conditioning under TP2 / CP2: the FLF2V test below, the same path
    plus the CLIP tokens; expert switching under TP2: tests/test_generate.py.)"""
    from PIL import Image

    image = _image(tmp_path / "first.png")
    noise = _noise(tmp_path / "noise.pt", (4, 5, 4, 6))
    pipe, text = _diffusers_i2v(a14b / "diffusers", shift=5.0)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.9
    kw = dict(image=image, noise=str(tmp_path / "noise.pt"))
    _same_preprocessed_image(pipe, _request(a14b / "megawan", tmp_path, "one", **kw))
    # diffusers: guidance_scale drives `transformer` (the high-noise expert), guidance_scale_2 the low-noise one
    theirs = pipe(image=Image.open(image), **text, height=HEIGHT, width=WIDTH,
                  num_frames=FRAMES, num_inference_steps=8, guidance_scale=4.0, guidance_scale_2=3.0,
                  latents=noise.clone(), output_type="latent").frames.float()
    one = _generate(_request(a14b / "megawan", tmp_path, "one", **kw))
    assert _rel(one, theirs) < 1e-4
    assert _rel(noise, theirs) > 0.1  # it did sample


def test_ti2v_equals_diffusers_expand_timesteps(ti2v, tmp_path):
    """TI2V-5B's image-to-video in diffusers is WanImageToVideoPipeline with expand_timesteps=True: the first latent
    frame is the image's, with timestep 0 on its tokens, at every step and in the result."""
    from PIL import Image

    height, width = 32, 64
    image = _image(tmp_path / "first.png", height, width)
    noise = _noise(tmp_path / "noise.pt", (6, 5, 2, 4))
    pipe, text = _diffusers_i2v(ti2v / "diffusers", shift=5.0, expand_timesteps=True)
    req = _request(ti2v / "megawan", tmp_path, "ours", height=height, width=width, guidance=4.0, image=image,
                   noise=str(tmp_path / "noise.pt"))
    _same_preprocessed_image(pipe, req)
    theirs = pipe(image=Image.open(image), **text, height=height, width=width,
                  num_frames=FRAMES, num_inference_steps=8, guidance_scale=4.0, latents=noise.clone(),
                  output_type="latent").frames.float()
    ours = _generate(req)
    assert _rel(ours, theirs) < 1e-4
    assert _rel(noise[:, :, 1:], theirs[:, :, 1:]) > 0.1


# ----------------------------------------------------------------------------------------------
# The video's size from the image; images that do not fit; bad input


def test_sizes_follow_the_image_as_the_official_repos_choose():
    """The values the official code gives (Wan2.1 / Wan2.2 image2video's rounding of lat_h / lat_w within max_area;
    Wan2.2 TI2V's best_output_size with 32-pixel steps), for landscape, portrait and square images."""
    from megawan.utils.conditioning_images import i2v_size, ti2v_size

    assert i2v_size(768, 1024, 720 * 1280, stride=8, patch=2) == (816, 1104)
    assert i2v_size(1080, 1920, 720 * 1280, stride=8, patch=2) == (720, 1280)
    assert i2v_size(1080, 1920, 480 * 832, stride=8, patch=2) == (464, 832)
    assert i2v_size(512, 512, 720 * 1280, stride=8, patch=2) == (960, 960)
    assert ti2v_size(768, 1024, 704 * 1280, multiple=32) == (800, 1088)
    assert ti2v_size(1024, 768, 704 * 1280, multiple=32) == (1088, 800)
    assert ti2v_size(1080, 1920, 704 * 1280, multiple=32) == (704, 1248)
    assert ti2v_size(512, 512, 704 * 1280, multiple=32) == (928, 960)  # a tie goes to the height-first size
    with pytest.raises(ValueError, match="^--image of 4000x8 pixels: its aspect ratio leaves no"):
        i2v_size(8, 4000, 1536, stride=8, patch=2)


def _pixels(path, box=None):
    from PIL import Image

    img = Image.open(path).convert("RGB")
    img = img.crop(box) if box else img
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1


def test_the_image_sets_the_size_and_another_aspect_ratio_is_cropped_and_said(a14b, ti2v, tmp_path):
    """No --height / --width: the video takes the image's aspect ratio within the official area (--max-area),
    and the whole image is bicubic-resized to it (I2V). A size of another aspect ratio: the image is centre-
    cropped to it first (I2V), or covered and centre-cropped (TI2V). Each change is said in one line."""
    import torch.nn.functional as F

    wide = _image(tmp_path / "wide.png", height=40, width=64)
    base = dict(ckpt=str(a14b / "megawan"), prompts=[PROMPT], out=str(tmp_path / "x"), image=wide)
    plan = prepare(GenerationRequest(**base))  # the tiny presets' official area: 32 x 48 pixels
    assert (plan["height"], plan["width"]) == (16, 48)
    assert plan["note"].startswith("48x16 video: the aspect ratio of --image (64x40) within 1536 pixels")
    expect = F.interpolate(_pixels(wide)[None], size=(16, 48), mode="bicubic")[0]
    assert (plan["images"]["first"] - expect).abs().max() < 1e-6 and plan["images"]["last"] is None
    plan = prepare(GenerationRequest(**base, max_area=64 * 96))
    assert (plan["height"], plan["width"]) == (48, 96)
    square = _image(tmp_path / "square.png", height=64, width=64)
    plan = prepare(GenerationRequest(**dict(base, image=square), height=32, width=48))
    assert plan["note"] == ("--image 64x64 has another aspect ratio than the 48x32 video: centre-cropped to "
                            "64x43, then resized")
    expect = F.interpolate(_pixels(square, (0, 10, 64, 53))[None], size=(32, 48), mode="bicubic")[0]
    assert (plan["images"]["first"] - expect).abs().max() < 1e-6
    # TI2V: Wan2.2's best_output_size, then Lanczos to cover and a centre crop
    odd = _image(tmp_path / "odd.png", height=60, width=100)
    plan = prepare(GenerationRequest(**dict(base, ckpt=str(ti2v / "megawan"), image=odd), max_area=64 * 128))
    assert (plan["height"], plan["width"]) == (64, 96) and plan["note"].startswith("96x64 video")
    plan = prepare(GenerationRequest(**dict(base, ckpt=str(ti2v / "megawan"), image=odd), height=32, width=64))
    assert plan["note"] == "--image 100x60 resized to cover the 64x32 video and centre-cropped"
    assert plan["images"]["first"].shape == (3, 32, 64)


def test_ti2v_sized_from_the_image_says_so_once_and_cp2_equals_one_rank(ti2v, tmp_path):
    """An image of 64 x 32 within 2048 pixels gives a 64 x 32 video (Wan2.2's rule); the size line is printed once
    by the whole world, and two context-parallel ranks sample what one rank does (per-token timesteps split)."""
    image = _image(tmp_path / "first.png", height=32, width=64)
    kw = dict(image=image, guidance=4.0, steps=4, height=None, width=None, max_area=2048)
    one = _generate(_request(ti2v / "megawan", tmp_path, "one", **kw))
    assert one.shape == (1, 6, 5, 2, 4)
    req = _request(ti2v / "megawan", tmp_path, "cp2", **kw)
    spawn_local(_generate_logged, world_size=2, args=(req, str(tmp_path)), context_parallel=2)
    assert _rel(torch.load(req.save_latents, weights_only=True), one) < 1e-5
    out = "".join(open(tmp_path / f"rank{r}.log").read() for r in range(2))
    assert out.count("[generate] 64x32 video: the aspect ratio of --image (64x32) within 2048 pixels") == 1, out


def _relabelled(a14b, folder, preset, **overrides):
    """A megawan pipeline marker for another tiny model on the A14B pipeline's encoders: what the checks before
    any weight loads see (the DiT itself is never read)."""
    from megawan.artifacts import write_pipeline_file
    from megawan.config import dit_preset

    folder.mkdir()
    src = a14b / "megawan"
    for name in ("vae.safetensors", "text_encoder.safetensors", "tokenizer"):
        (folder / name).symlink_to(src / name)
    cfg = dit_preset(preset, text_dim=32, text_len=24, out_dim=4, **overrides)
    write_pipeline_file(str(folder), cfg, {"transformer": str(src / "high_noise_model")}, vae="vae.safetensors",
                        vae_config="tiny-2.1", text_encoder="text_encoder.safetensors", text_config="tiny",
                        tokenizer="tokenizer")
    return str(folder)


def test_bad_image_input_is_one_line(a14b, tmp_path, capsys):
    """Each refused before any process group starts: exit status 2 and one line naming the option (a pipeline
    converted from the official layout is named "official": its config.json names no preset)."""
    from megawan.cli import main

    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "folder.png").mkdir()
    good = _image(tmp_path / "first.png")
    i2v = str(a14b / "megawan")
    t2v = _relabelled(a14b, tmp_path / "t2v", "tiny", in_dim=4)
    flf2v = _relabelled(a14b, tmp_path / "flf2v", "tiny-i2v", in_dim=12, image_pos_len=14)
    cases = {
        (i2v, "--image", str(tmp_path / "notes.png")): f"--image {tmp_path / 'notes.png'} is not a readable image",
        (i2v, "--image", str(tmp_path / "folder.png")): f"--image {tmp_path / 'folder.png'} is a directory",
        (i2v, "--image", str(tmp_path / "none.png")): f"--image {tmp_path / 'none.png'}: no such file",
        (i2v, "--image", good, "--last-image", str(tmp_path / "notes.png")): "--last-image: official is not a "
                                                                              "first-last-frame model",
        (i2v,): "official is an image-to-video model: pass --image FIRST_FRAME",
        (i2v, "--image", good, "--height", "32"): "--height and --width go together with --image",
        (i2v, "--image", good, "--height", "32", "--width", "48", "--max-area", "2048"): "--max-area sizes a video",
        (t2v, "--image", good): "tiny is a text-to-video model: it takes no --image",
        (flf2v, "--image", good): "tiny-i2v is a first-last-frame model: pass --last-image LAST_FRAME too",
        (flf2v, "--image", good, "--last-image", str(tmp_path / "notes.png")): "--last-image ",
        (flf2v, "--image", good, "--last-image", good): "tiny-i2v conditions on CLIP image tokens (Wan2.1 I2V / "
                                                        "FLF2V), but",
    }
    for (ckpt, *args), message in cases.items():
        assert main(["generate", "--ckpt", ckpt, "--prompt", PROMPT, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"megawan generate: {message}") and err.count("\n") == 1, (args, err)


# ----------------------------------------------------------------------------------------------
# Wan2.1 I2V and FLF2V: the CLIP tokens of the first (and last) frame beside the latents


def _wan21(root, **overrides):
    """A tiny Wan2.1 I2V (FLF2V with image_pos_len) with the tiny CLIP, official -> megawan and diffusers. Text
    length 512: diffusers splits the cross-attention context as [image tokens | 512 text tokens]."""
    from pipelines import TINY_I2V, write_tiny_clip

    make_official_pipeline(root / "official", "tiny-i2v", dict(TINY_I2V, text_len=512, **overrides),
                           dtype=torch.float32)
    write_tiny_clip(root / "official")
    for fmt in ("megawan", "diffusers"):
        convert_pipeline(str(root / "official"), "official", str(root / fmt), fmt)
    return root


def _our_clip(pipeline):
    from megawan.artifacts import find_encoders, load_clip_encoder
    from megawan.config import clip_preset

    enc = find_encoders(str(pipeline))
    return load_clip_encoder(enc["clip"], clip_preset(enc["clip_config"]))


def test_wan21_i2v_equals_diffusers_with_its_own_clip(tmp_path):
    """A square first frame of CLIP's size (32 px for the tiny CLIP) and a 32 x 32 video: diffusers'
    CLIPImageProcessor and Wan's bicubic resize then see the same pixels, so diffusers encodes the image itself;
    our encoder on the processor's output equals its encode_image, and the sampled latents are the same."""
    from PIL import Image

    from megawan.utils.conditioning_images import to_tensor

    root = _wan21(tmp_path)
    image = _image(tmp_path / "first.png", height=32, width=32)
    noise = _noise(tmp_path / "noise.pt", (4, 5, 4, 4))
    pipe, text = _diffusers_i2v(root / "diffusers", shift=5.0, text_len=512)
    assert pipe.image_encoder is not None and pipe.transformer.config.image_dim == 20
    encoder = _our_clip(root / "megawan")
    processed = pipe.image_processor(images=Image.open(image), return_tensors="pt").pixel_values
    with torch.no_grad():
        assert (encoder.preprocess(to_tensor(Image.open(image))[None]) - processed).abs().max() < 1e-5
        assert (encoder(processed) - pipe.encode_image(Image.open(image), torch.device("cpu"))).abs().max() < 1e-5
    theirs = pipe(image=Image.open(image), **text, height=32, width=32, num_frames=FRAMES, num_inference_steps=8,
                  guidance_scale=4.0, latents=noise.clone(), output_type="latent").frames.float()
    ours = _generate(_request(root / "megawan", tmp_path, "ours", height=32, width=32, guidance=4.0, image=image,
                              noise=str(tmp_path / "noise.pt")))
    assert _rel(ours, theirs) < 1e-4
    assert _rel(noise, theirs) > 0.1


def test_flf2v_equals_diffusers_and_tp2_cp2_equal_one_rank(tmp_path):
    """FLF2V: first frame, zeros, last frame through the VAE, the mask on the first and the last frame, the CLIP
    tokens of both frames side by side. The last frame (64 x 32) is centre-cropped to the first's aspect ratio
    (48 x 32), and said. diffusers' processor centre-crops a non-square image where Wan squashes it, so diffusers
    gets Wan's CLIP tokens (our encoder, Wan's preprocessing) in place of its own encode_image."""
    from PIL import Image

    from megawan.utils.conditioning_images import to_tensor

    root = _wan21(tmp_path, image_pos_len=34)  # 2 images x (1 + (32 / 8)^2) tokens
    first = _image(tmp_path / "first.png")
    last = _image(tmp_path / "last.png", height=32, width=64, seed=1)
    cropped = Image.open(last).convert("RGB").crop((8, 0, 56, 32))
    noise = _noise(tmp_path / "noise.pt", (4, 5, 4, 6))
    pipe, text = _diffusers_i2v(root / "diffusers", shift=5.0, text_len=512)
    encoder = _our_clip(root / "megawan")
    with torch.no_grad():
        tokens = encoder(torch.cat([encoder.preprocess(to_tensor(img)[None])
                                    for img in (Image.open(first).convert("RGB"), cropped)]))
    pipe.encode_image = lambda images, device=None: tokens
    theirs = pipe(image=Image.open(first), last_image=cropped, **text, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                  num_inference_steps=8, guidance_scale=4.0, latents=noise.clone(), output_type="latent").frames.float()
    kw = dict(image=first, last_image=last, guidance=4.0, noise=str(tmp_path / "noise.pt"))
    plan = prepare(_request(root / "megawan", tmp_path, "plan", **kw))
    assert plan["note"] == "--last-image 64x32 centre-cropped to 48x32, the aspect ratio of --image"
    one = _generate(_request(root / "megawan", tmp_path, "one", **kw))
    assert _rel(one, theirs) < 1e-4
    for name, layout in {"tp2": dict(tensor_parallel=2), "cp2": dict(context_parallel=2)}.items():
        got = _generate(_request(root / "megawan", tmp_path, name, **kw), world=2, **layout)
        assert _rel(got, one) < 1e-5, name
