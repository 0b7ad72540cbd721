"""LPIPS-VGG (megawan.models.vae.lpips) against an independent numpy computation of the paper's formula on random
weights, read from files in the two standard layouts (torchvision's vgg16 .pth, the LPIPS repo's lin heads).

The official `lpips` package cannot be the reference here: it builds its VGG through torchvision, which is not
installable beside this torch. The numpy code below re-derives the network from the paper and torchvision's VGG16
definition (3x3 convs with padding 1, ReLU, 2x2 max pools; features at relu1_2 ... relu5_3)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from megawan.config.fields import ConfigError
from megawan.models.vae.lpips import CHANNELS, LPIPS, VGG16_CONVS, lpips_video

SHIFT = np.array([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
SCALE = np.array([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random weights as the two standard files: vgg16 (.pth, with a classifier key to ignore), heads (.safetensors)."""
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, cin, cout in VGG16_CONVS:
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.1
    vgg["classifier.6.bias"] = torch.zeros(1000)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(CHANNELS)}
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(vgg, folder / "vgg16-397923af.pth")
    save_file(lin, str(folder / "vgg.safetensors"))
    return str(folder / "vgg16-397923af.pth"), str(folder / "vgg.safetensors"), vgg, lin


def _numpy_lpips(x, y, vgg, lin):
    """The paper's formula, in float64 numpy."""
    def conv3x3(h, w, b):
        n, c, hh, ww = h.shape
        p = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
        win = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(2, 3))  # [n, c, hh, ww, 3, 3]
        return np.einsum("nchwij,ocij->nohw", win, w, optimize=True) + b.reshape(1, -1, 1, 1)

    def pool(h):
        n, c, hh, ww = h.shape
        h = h[:, :, :hh // 2 * 2, :ww // 2 * 2]
        return h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))

    def features(img):
        h, taps = (img - SHIFT) / SCALE, []
        for i, _, _ in VGG16_CONVS:
            if i in (5, 10, 17, 24):
                h = pool(h)
            h = np.maximum(conv3x3(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"]), 0)
            if i in (2, 7, 14, 21, 28):
                taps.append(h)
        return taps

    total = 0.0
    for k, (fx, fy) in enumerate(zip(features(x), features(y))):
        fx = fx / (np.sqrt((fx**2).sum(axis=1, keepdims=True)) + 1e-10)
        fy = fy / (np.sqrt((fy**2).sum(axis=1, keepdims=True)) + 1e-10)
        w = lin[f"lin{k}.model.1.weight"].reshape(-1)
        total = total + np.einsum("nchw,c->n", (fx - fy) ** 2, w) / (fx.shape[2] * fx.shape[3])
    return total


def test_matches_the_papers_formula(weight_files):
    vgg_path, lin_path, vgg, lin = weight_files
    net = LPIPS.from_files(vgg_path, lin_path)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 24, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    ref = _numpy_lpips(x.numpy(), y.numpy(), {k: v.double().numpy() for k, v in vgg.items()},
                       {k: v.double().numpy() for k, v in lin.items()})
    assert np.allclose(net.double()(x, y).numpy(), ref, rtol=1e-10, atol=0)
    net.float()
    got = net(x.float(), y.float())
    assert got.shape == (2,) and np.allclose(got.double().numpy(), ref, rtol=1e-5, atol=0)
    assert torch.equal(net(x.float(), x.float()), torch.zeros(2))

    # a loss: gradients reach the inputs, never the (frozen) weights
    xr = x.float().requires_grad_(True)
    net(xr, y.float()).sum().backward()
    assert xr.grad.abs().sum() > 0 and all(p.grad is None and not p.requires_grad for p in net.parameters())

    # clips: per frame, mean over frames
    clip_x, clip_y = torch.stack([x.float(), y.float()], dim=2), torch.stack([y.float(), y.float()], dim=2)
    assert torch.allclose(lpips_video(net, clip_x, clip_y), got / 2, rtol=1e-6, atol=0)


def test_bad_weight_files_are_refused_in_one_line(weight_files, tmp_path):
    vgg_path, lin_path, vgg, lin = weight_files
    fields = ("loss.lpips_vgg", "loss.lpips_lin")
    wrong = dict(lin, **{"lin2.model.1.weight": torch.zeros(1, 128, 1, 1)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ConfigError) as e:
        LPIPS.from_files(vgg_path, str(tmp_path / "wrong.safetensors"), fields=fields)
    assert str(e.value).startswith(f"loss.lpips_lin: {tmp_path / 'wrong.safetensors'}: lin2.model.1.weight has shape "
                                   "[1, 128, 1, 1], expected [1, 256, 1, 1]")
    torch.save({k: vgg[k] for k in ("features.0.weight", "features.0.bias")}, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r"^loss.lpips_vgg: .*partial.pth: no tensor 'features.2.weight'"):
        LPIPS.from_files(str(tmp_path / "partial.pth"), lin_path, fields=fields)
    with pytest.raises(ConfigError, match=r"^loss.lpips_vgg: no LPIPS weight file at .*missing.pth"):
        LPIPS.from_files(str(tmp_path / "missing.pth"), lin_path, fields=fields)
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"^loss.lpips_lin: .*garbage.pth (is not a readable|holds code)"):
        LPIPS.from_files(vgg_path, str(tmp_path / "garbage.pth"), fields=fields)
    with pytest.raises(ConfigError) as e:  # the same file for both: it has no heads
        LPIPS.from_files(vgg_path, vgg_path)
    assert "\n" not in str(e.value) and "lin0.model.1.weight" in str(e.value)
