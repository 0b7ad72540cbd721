"""Wan-VAE 2.1 and 2.2 against diffusers' AutoencoderKLWan (tiny random configs, weights loaded through
our converter): encode mean / log-variance and decode output, fp32, max|d|/max|ref| <= 1e-5, for T = 1, 5,
9, 13 frames, non-square sizes, batch 2; chunked == one pass; tiled decode close to untiled."""

import pytest
import torch

from megawan.config import vae_config_from, vae_preset
from megawan.convert import convert_state_dict
from megawan.models.vae import WanVAE
from wan_reference import relative_error

TOL = 1e-5


def diffusers_vae(cfg, seed=0):
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(
        base_dim=cfg.base_dim, decoder_base_dim=cfg.decoder_base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks, attn_scales=list(cfg.attn_scales),
        temperal_downsample=list(cfg.temperal_downsample), is_residual=cfg.is_residual, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, patch_size=cfg.patch_size, scale_factor_spatial=cfg.spatial_stride,
        scale_factor_temporal=cfg.temporal_stride, latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", params=["tiny-2.1", "tiny-2.2"])
def pair(request):
    cfg = vae_preset(request.param)
    ref = diffusers_vae(cfg)
    ours = WanVAE(cfg).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), src="diffusers", dst="megawan", config=cfg))
    return cfg, ours, ref


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_encode_decode_match_diffusers(pair, frames):
    cfg, ours, ref = pair
    s = cfg.spatial_stride
    video = torch.rand(2, 3, frames, 2 * s, 3 * s, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(video)
        posterior = ref.encode(video).latent_dist
        assert mean.shape == (2, cfg.z_dim, 1 + (frames - 1) // 4, 2, 3)
        assert relative_error(mean, posterior.mean) <= TOL
        assert relative_error(logvar, posterior.logvar) <= TOL
        decoded = ours.decode(mean)
        assert decoded.shape == video.shape
        assert relative_error(decoded, ref.decode(mean).sample) <= TOL
        # one pass over the whole video equals the causal chunks (up to fp32 rounding of other conv shapes)
        assert relative_error(ours.encode(video, chunked=False)[0], mean) <= TOL
        assert relative_error(ours.decode(mean, chunked=False), decoded) <= TOL


def test_normalize_uses_the_official_tables():
    vae = WanVAE(vae_preset("tiny-2.1"))
    z = torch.randn(1, 4, 2, 3, 3)
    mean = torch.tensor(vae.vae_config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.vae_config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(vae.normalize(z), (z - mean) / std)
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z)
    assert vae_preset("wan2.1").latents_mean[0] == -0.7571 and vae_preset("wan2.1").latents_std[-1] == 1.9160


def test_tiled_decode_equals_diffusers_tiling_and_stays_near_untiled(pair):
    """Tiling (off by default): tiles of 8 x 8 latents overlapping by 2, cross-faded like diffusers' tiling.

    It equals diffusers' tiled decode (<= 1e-5). Against the untiled decode the stated tolerance is a mean
    absolute difference below 0.3 (outputs in [-1, 1]): tiles cannot see each other through the mid block's
    frame-wide attention, and random tiny weights make that attention far from smooth (measured 0.08-0.23).
    """
    cfg, ours, ref = pair
    s = cfg.spatial_stride
    z = torch.randn(1, cfg.z_dim, 2, 16, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = ours.decode(z)
        ours.enable_tiling(tile=8 * s, stride=6 * s)
        ref.enable_tiling(8 * s, 8 * s, 6 * s, 6 * s)
        try:
            tiled = ours.decode(z)
            theirs = ref.decode(z).sample
        finally:
            ours.disable_tiling()
            ref.disable_tiling()
    assert tiled.shape == whole.shape
    assert relative_error(tiled, theirs) <= TOL
    assert (tiled - whole).abs().mean() < 0.3


def test_tiled_encode_equals_diffusers_tiling():
    cfg = vae_preset("tiny-2.1")
    ref = diffusers_vae(cfg)
    ours = WanVAE(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    video = torch.rand(1, 3, 5, 128, 192, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours.enable_tiling(tile=64, stride=48)
    ref.enable_tiling(64, 64, 48, 48)
    with torch.no_grad():
        assert relative_error(ours.encode(video)[0], ref.encode(video).latent_dist.mean) <= TOL


def test_bad_video_sizes_are_rejected():
    vae = WanVAE(vae_preset("tiny-2.1"))
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 1, 12, 16))


def test_config_from_diffusers():
    cfg = vae_preset("tiny-2.2")
    back = vae_config_from(dict(diffusers_vae(cfg).config))
    assert back.z_dim == cfg.z_dim and back.patch_size == 2 and back.is_residual and back.decoder_base_dim == 12


@pytest.mark.parametrize("preset", ["tiny-2.1", "tiny-2.2"])
def test_official_and_diffusers_names_round_trip_bit_exact(preset):
    cfg = vae_preset(preset)
    diffusers_sd = {k: v.to(torch.bfloat16) for k, v in diffusers_vae(cfg).state_dict().items()}
    official = convert_state_dict(diffusers_sd, src="diffusers", dst="official", config=cfg)
    ours = convert_state_dict(official, src="official", dst="megawan", config=cfg)
    back = convert_state_dict(convert_state_dict(ours, src="megawan", dst="diffusers", config=cfg),
                              src="diffusers", dst="official", config=cfg)
    assert set(back) == set(official)
    for key, tensor in official.items():
        assert back[key].dtype == torch.bfloat16 and torch.equal(back[key], tensor), key


def test_official_21_names_agree_with_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    cfg = vae_preset("tiny-2.1")
    diffusers_sd = diffusers_vae(cfg).state_dict()
    official = convert_state_dict(diffusers_sd, src="diffusers", dst="official", config=cfg)
    assert "decoder.upsamples.4.shortcut.weight" in official and "encoder.downsamples.5.time_conv.weight" in official
    theirs = convert_wan_vae_to_diffusers(dict(official))
    assert set(theirs) == set(diffusers_sd)
    assert all(torch.equal(theirs[k], diffusers_sd[k]) for k in diffusers_sd)


def test_full_size_tables_match_the_official_checkpoints():
    """Wan2.1_VAE.pth: 194 tensors, 126,892,531 parameters; Wan2.2_VAE.pth: 196 tensors, 704,688,668."""
    from math import prod

    from megawan.convert.vae_keys import vae_key_table, vae_param_shapes

    for preset, tensors, params, probe in (
        ("wan2.1", 194, 126_892_531, "decoder.upsamples.11.resample.1.weight"),
        ("wan2.2", 196, 704_688_668, "decoder.upsamples.1.upsamples.3.time_conv.weight"),
    ):
        cfg = vae_preset(preset)
        table = vae_key_table(cfg)
        assert len(table) == tensors and sum(prod(s) for s in vae_param_shapes(cfg).values()) == params
        assert probe in {row[1] for row in table}


@pytest.mark.parametrize("preset", ["wan2.1", "wan2.2", "tiny-2.1", "tiny-2.2"])
def test_conversion_shapes_are_the_models_parameters(preset):
    """megawan.convert works the VAE's parameters out from the config (it imports no model code): the same
    names, shapes and order as WanVAE's, for every preset and for variants of the knobs the layout depends on."""
    from megawan.convert.vae_keys import vae_param_shapes

    for overrides in ({}, {"attn_scales": (1.0, 0.5)}, {"num_res_blocks": 1}, {"temperal_downsample": (True, False, True)}):
        cfg = vae_preset(preset, **overrides)
        with torch.device("meta"):
            model = WanVAE(cfg)
        assert list(vae_param_shapes(cfg).items()) == [(k, tuple(p.shape)) for k, p in model.named_parameters()]


def test_wrong_shapes_and_keys_are_named():
    cfg = vae_preset("tiny-2.1")
    official = convert_state_dict(diffusers_vae(cfg).state_dict(), src="diffusers", dst="official", config=cfg)
    bad = dict(official, **{"encoder.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="encoder.conv1.weight"):
        convert_state_dict(bad, src="official", dst="megawan", config=cfg)
    with pytest.raises(KeyError, match="not_a_key"):
        convert_state_dict(dict(official, not_a_key=torch.zeros(1)), src="official", dst="megawan", config=cfg)


def test_checkpoint_files_load_without_unpickling_objects(tmp_path):
    """Official .pth files load with weights_only=True, safetensors too; a pickled object is refused."""
    from safetensors.torch import save_file

    from megawan.convert import load_state_dict_file
    from megawan.convert.files import WeightFileError

    cfg = vae_preset("tiny-2.1")
    official = convert_state_dict(WanVAE(cfg).state_dict(), src="megawan", dst="official", config=cfg)
    torch.save(official, tmp_path / "Wan2.1_VAE.pth")
    save_file(official, str(tmp_path / "vae.safetensors"))
    for name in ("Wan2.1_VAE.pth", "vae.safetensors"):
        loaded = load_state_dict_file(str(tmp_path / name))
        vae = WanVAE(cfg)
        vae.load_state_dict(convert_state_dict(loaded, src="official", dst="megawan", config=cfg))
    import argparse

    torch.save({"weights": official, "extra": argparse.Namespace(x=1)}, tmp_path / "evil.pth")  # an arbitrary object
    # refused by torch (weights_only) or, where a library allow-listed the class, by our flat-tensor check
    with pytest.raises(WeightFileError, match="not loaded for safety|flat state dict of tensors"):
        load_state_dict_file(str(tmp_path / "evil.pth"))


def test_bfloat16_runs_close_to_float32():
    cfg = vae_preset("tiny-2.2")
    vae32 = WanVAE(cfg).eval()
    vae16 = WanVAE(vae_preset("tiny-2.2", params_dtype="bfloat16")).eval()
    vae16.load_state_dict({k: v.to(torch.bfloat16) for k, v in vae32.state_dict().items()})
    video = torch.rand(2, 3, 5, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        m32, _ = vae32.encode(video)
        m16, _ = vae16.encode(video)
        d16 = vae16.decode(m16)
    assert m16.dtype == torch.bfloat16 and d16.dtype == torch.bfloat16 and d16.shape == video.shape
    assert relative_error(m16.float(), m32) < 5e-2
