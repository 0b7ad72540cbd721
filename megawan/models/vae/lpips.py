"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), the
"lin" version over VGG16: the perceptual loss of the Wan-VAE's training (weight 3 in the Wan report).

    net = LPIPS.from_files("vgg16-397923af.pth", "vgg.pth", fields=("loss.lpips_vgg", "loss.lpips_lin"))
    d = net(x, y)              # images [N, 3, H, W] in [-1, 1] -> [N]
    d = lpips_video(net, x, y) # clips [B, 3, T, H, W] -> [B], mean over frames

The network is ours; the weights are the two standard files the user provides: torchvision's ImageNet VGG16
(`vgg16-397923af.pth`: `features.{0,2,5,...,28}.weight / .bias`; the classifier is ignored) and the LPIPS
repository's linear heads (`lpips/weights/v0.1/vgg.pth`: `lin{0..4}.model.1.weight`, [1, C, 1, 1]), as .pth or
.safetensors. The distance: inputs shifted and scaled as the LPIPS repo's ScalingLayer does (ImageNet statistics
in [-1, 1] units), VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, each unit-normalised over
channels (x / (||x|| + 1e-10)), squared difference, a 1x1 conv head (no bias), spatial mean, sum over the 5 layers.
The network is frozen (no parameter wants a gradient; it has no dropout or batch norm, so train / eval do not
differ); gradients flow to the inputs, which is what a loss needs.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from megawan.config.fields import ConfigError
from megawan.convert.files import load_state_dict_file
from megawan.utils.user_errors import UserError

# torchvision's vgg16().features up to relu5_3: (conv index, in channels, out channels); a max pool sits at 4, 9, 16, 23
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512))
VGG16_POOLS = (4, 9, 16, 23)
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the ReLU after convs 2, 7, 14, 21, 28
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # the LPIPS repo's ScalingLayer (ImageNet mean / std mapped to [-1, 1])
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def _lin_key(k: int) -> str:
    return f"lin{k}.model.1.weight"  # NetLinLayer = Sequential(Dropout, Conv2d): the conv is model.1


class LPIPS(nn.Module):
    """LPIPS-VGG distance, [N] per image pair. Build with random weights (tests) or `LPIPS.from_files`."""

    def __init__(self):
        super().__init__()
        layers: list = []
        convs = {i: (cin, cout) for i, cin, cout in VGG16_CONVS}
        for i in range(TAPS[-1] + 1):  # torchvision's indices, so the state dict is vgg16's `features.*`
            if i in convs:
                layers.append(nn.Conv2d(*convs[i], 3, padding=1))
            elif i in VGG16_POOLS:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y [N, 3, H, W] in [-1, 1] -> [N] (in the network's dtype)."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS wants two [N, 3, H, W] images, got {tuple(x.shape)} and {tuple(y.shape)}")
        n, w = x.shape[0], self.lins[0].weight
        shift, scale = (torch.tensor(v, dtype=w.dtype, device=w.device).view(1, 3, 1, 1) for v in (SHIFT, SCALE))
        h = (torch.cat([x, y]).to(w.dtype) - shift) / scale  # one pass over both images
        total = 0.0
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
                total = total + self.lins[k]((f[:n] - f[n:]).pow(2)).mean(dim=(1, 2, 3))
                k += 1
        return total

    @classmethod
    def from_files(cls, vgg_path: str, lin_path: str, fields: tuple | None = None) -> "LPIPS":
        """The network with torchvision's VGG16 weights (`vgg_path`) and the LPIPS repo's heads (`lin_path`).

        A missing, unreadable or misshapen file or key is a ConfigError of one line naming the config field (when
        `fields` = (vgg field, lin field) is given), the file and the key."""
        net = cls()
        vgg_field, lin_field = fields if fields is not None else (None, None)
        vgg = _read(vgg_path, vgg_field)
        lin = _read(lin_path, lin_field)
        wanted = {}
        for i, _, _ in VGG16_CONVS:
            conv = net.features[i]
            wanted[f"features.{i}.weight"] = (conv.weight, True)
            wanted[f"features.{i}.bias"] = (conv.bias, True)
        for k, head in enumerate(net.lins):
            wanted[_lin_key(k)] = (head.weight, False)
        with torch.no_grad():
            for key, (param, is_vgg) in wanted.items():
                state, path, field = (vgg, vgg_path, vgg_field) if is_vgg else (lin, lin_path, lin_field)
                where = f"{field}: {path}" if field else str(path)
                if key not in state:
                    raise ConfigError(f"{where}: no tensor {key!r} (expected {_expected(is_vgg)})")
                if tuple(state[key].shape) != tuple(param.shape):
                    raise ConfigError(f"{where}: {key} has shape {list(state[key].shape)}, expected "
                                      f"{list(param.shape)} ({_expected(is_vgg)})")
                param.copy_(state[key])
        return net


def _expected(vgg: bool) -> str:
    return ("torchvision's ImageNet VGG16, vgg16-397923af.pth" if vgg
            else "the LPIPS repo's linear heads, lpips/weights/v0.1/vgg.pth")


def _read(path: str, field: str | None) -> dict:
    where = f"{field}: " if field else ""
    if not path or not os.path.isfile(str(path)):
        raise ConfigError(f"{where}no LPIPS weight file at {path}")
    try:
        return load_state_dict_file(str(path))
    except UserError as e:
        raise ConfigError(f"{where}{e}") from None


def lpips_video(net: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Clips [B, 3, T, H, W] (or images [B, 3, H, W]) in [-1, 1] -> [B]: LPIPS per frame, mean over frames."""
    if x.dim() == 4:
        return net(x, y)
    if x.shape != y.shape or x.dim() != 5:
        raise ValueError(f"lpips_video wants two [B, 3, T, H, W] clips, got {tuple(x.shape)} and {tuple(y.shape)}")
    b, c, t, h, w = x.shape

    def frames(v):
        return v.transpose(1, 2).reshape(b * t, c, h, w)

    return net(frames(x), frames(y)).view(b, t).mean(dim=1)
