"""The stage-1 image VAE (VAEConfig.image_only) and its inflation into the 3D causal Wan-VAE
(megawan.models.vae.inflate): the inflated VAE reproduces the image VAE on images exactly, and on clips what the
module's docstring says."""

import pytest
import torch

from megawan.config import vae_preset
from megawan.config.fields import ConfigError
from megawan.config.vae import diffusers_vae_config_json
from megawan.models.vae import WanVAE
from megawan.models.vae.inflate import freeze_earlier_time_taps, image_vae_config, inflate_image_vae, per_frame_init

ATOL = 1e-5


def _pair(preset: str):
    """A randomly initialised image VAE (PyTorch's default init: every tensor non-zero) and its inflation."""
    cfg = vae_preset(preset)
    torch.manual_seed(0)
    vae2d = WanVAE(image_vae_config(cfg)).eval()
    vae3d = WanVAE(cfg).eval()
    vae3d.load_state_dict(inflate_image_vae(vae2d.state_dict(), cfg), strict=True)
    return vae2d, vae3d


def _close(a, b):
    return torch.allclose(a, b, rtol=0, atol=ATOL)


@pytest.mark.parametrize("preset", ["tiny-2.1", "tiny-2.2"])
@torch.no_grad()
def test_inflated_vae_reproduces_the_image_vae(preset):
    vae2d, vae3d = _pair(preset)
    assert vae2d.vae_config.temporal_stride == 1 and not any("time_conv" in k for k in vae2d.state_dict())
    assert all(w.shape[2] == 1 for k, w in vae2d.state_dict().items() if w.dim() == 5)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 1, 32, 32, generator=g) * 2 - 1
    mean2d, logvar2d = vae2d.encode(images)
    mean3d, logvar3d = vae3d.encode(images)
    assert _close(mean3d, mean2d) and _close(logvar3d, logvar2d)
    assert _close(vae3d.decode(mean2d), vae2d.decode(mean2d))

    # a clip of 5 identical frames
    clip = images[:1].repeat(1, 1, 5, 1, 1)
    mean, _ = vae3d.encode(clip)
    recon = vae3d.decode(mean)
    assert mean.shape[2] == 2 and recon.shape == clip.shape
    assert _close(mean[:, :, :1], mean2d[:1]) and _close(recon[:, :, :1], vae2d.decode(mean2d[:1]))  # causal
    if preset == "tiny-2.1":  # every latent frame is the image's, every decoded frame the image VAE's recon
        assert _close(mean[:, :, 1:], mean2d[:1]) and _close(recon, vae2d.decode(mean2d[:1]).expand_as(recon))
    else:  # Wan2.2's parameter-free time shortcuts average frame pairs after the first: no longer per frame
        assert not _close(mean[:, :, 1:], mean2d[:1])


@torch.no_grad()
def test_wan21_clip_latents_are_the_newest_frame_of_each_chunk():
    vae2d, vae3d = _pair("tiny-2.1")
    clip = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    per_image, _ = vae2d.encode(clip)  # the image VAE encodes each frame on its own
    assert per_image.shape[2] == 9
    assert _close(per_image[:, :, 3:4], vae2d.encode(clip[:, :, 3:4])[0])
    mean, _ = vae3d.encode(clip)
    assert _close(mean, per_image[:, :, [0, 4, 8]])
    recon = vae3d.decode(mean)  # each latent frame's image over its 4 frames
    assert _close(recon, vae2d.decode(mean)[:, :, [0, 1, 1, 1, 1, 2, 2, 2, 2]])


@torch.no_grad()
def test_per_frame_init_is_an_image_autoencoder_per_frame():
    cfg = vae_preset("tiny-2.1")
    vae = WanVAE(cfg)
    per_frame_init(vae, torch.Generator().manual_seed(0))
    clip = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean, _ = vae.encode(clip)
    assert mean[:, :, 1].abs().sum() > 0 and _close(mean[:, :, 1:], vae.encode(clip[:, :, 4:5])[0])


def test_frozen_time_taps_get_no_gradient_and_the_resampling_convs_do():
    from megawan.models.vae.blocks import Resample

    vae = WanVAE(vae_preset("tiny-2.1"))
    per_frame_init(vae, torch.Generator().manual_seed(0))
    handles = freeze_earlier_time_taps(vae)
    mean, _ = vae.encode(torch.rand(1, 3, 5, 16, 16) * 2 - 1, chunked=False)
    mean.square().sum().backward()
    resampling = [m.time_conv.weight for m in vae.modules() if isinstance(m, Resample) and hasattr(m, "time_conv")]
    causal = [m.weight for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv3d) and m.weight.shape[2] > 1
              and all(m.weight is not w for w in resampling)]
    assert len(handles) > 0 and causal and resampling
    assert all(w.grad[:, :, :-1].abs().max() == 0 for w in causal)
    assert any(w.grad[:, :, -1].abs().max() > 0 for w in causal)
    assert any(w.grad.abs().max() > 0 for w in resampling if w.grad is not None)


def test_refusals_name_the_field_and_key():
    cfg = vae_preset("tiny-2.1")
    state3d = WanVAE(cfg).state_dict()
    state3d.pop("quant_conv.bias")
    with pytest.raises(ConfigError, match=r"^init.from: the image VAE has no tensor quant_conv.bias"):
        inflate_image_vae(state3d, cfg)
    state2d = WanVAE(image_vae_config(vae_preset("tiny-2.1", base_dim=16))).state_dict()
    with pytest.raises(ConfigError, match=r"^init.from: encoder.conv_in.weight has shape \[16, 3, 1, 3, 3\]; "
                                          r"the 3D VAE wants \[8, 3, 3, 3, 3\]"):
        inflate_image_vae(state2d, cfg)
    state2d = WanVAE(image_vae_config(vae_preset("tiny-2.2"))).state_dict()  # Wan2.2 weights for a Wan2.1 VAE
    with pytest.raises(ConfigError, match=r"^init.from: the image VAE's tensor decoder.* has no place in the 3D VAE"):
        inflate_image_vae(state2d, cfg)
    with pytest.raises(ConfigError, match="^vae.image_only"):
        inflate_image_vae(state2d, image_vae_config(cfg))
    with pytest.raises(ConfigError, match="^vae.image_only: an image-only VAE has no diffusers"):
        diffusers_vae_config_json(image_vae_config(cfg))
