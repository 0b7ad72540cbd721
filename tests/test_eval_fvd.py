"""FVD's parts (megawan.evaluation.fvd, megawan.evaluation.i3d): the Fréchet distance equals the plain
scipy.linalg.sqrtm computation; the I3D network loads a weight file in the pytorch-i3d layout (rgb_imagenet.pt's
keys, random weights written by the test) and turns clips into 400-d features; a file of the wrong shape or with a
key missing is refused naming the file and the key, also by `megawan eval` (one line, exit status 2)."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from megawan.demo.shapes import ShapeClip, render
from megawan.evaluation.fvd import feature_stats, frechet_distance, fvd, i3d_features, preprocess
from megawan.evaluation.i3d import I3DWeightsError, InceptionI3d, load_i3d


def _scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("n, d", [(64, 8), (300, 64), (12, 40)])  # the last: singular covariances (n < d)
def test_frechet_distance_equals_scipy(n, d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = 1.3 * rng.normal(size=(n, d)) + 0.2
    ours, ref = frechet_distance(*feature_stats(a), *feature_stats(b)), _scipy_frechet(*feature_stats(a),
                                                                                       *feature_stats(b))
    assert ours == pytest.approx(ref, rel=1e-6 if n < d else 1e-9)
    assert fvd(a, a) == pytest.approx(0.0, abs=1e-6 * np.trace(np.cov(a, rowvar=False)))


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    """An I3D state dict in the pytorch-i3d layout with random weights: He-normal convolutions and unit batch
    norms keep the activations alive through the 20 layers, so that different clips give different features."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, tensor in InceptionI3d().state_dict().items():
        if key.endswith("conv3d.weight"):
            fan_in = tensor[0].numel()
            state[key] = torch.randn(tensor.shape, generator=gen) * math.sqrt(2 / fan_in)
        elif key.endswith("num_batches_tracked"):
            continue  # the published file was saved before PyTorch kept this counter
        else:
            state[key] = tensor.clone()
    path = tmp_path_factory.mktemp("i3d") / "rgb_imagenet.pt"
    torch.save(state, path)
    return path, state


def test_i3d_loads_the_pytorch_i3d_layout_and_gives_400_features(i3d_file):
    path, state = i3d_file
    for key in ("Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_mean", "Mixed_3b.b0.conv3d.weight",
                "Mixed_5c.b2b.bn.running_var", "logits.conv3d.weight", "logits.conv3d.bias"):
        assert key in state
    assert tuple(state["Conv3d_1a_7x7.conv3d.weight"].shape) == (64, 3, 7, 7, 7)
    assert tuple(state["logits.conv3d.weight"].shape) == (400, 1024, 1, 1, 1)
    net = load_i3d(str(path))
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    save_file(state, str(path.with_suffix(".safetensors")))  # the same weights as safetensors load alike
    assert torch.equal(load_i3d(str(path.with_suffix(".safetensors"))).state_dict()["Mixed_4f.b2b.conv3d.weight"],
                       state["Mixed_4f.b2b.conv3d.weight"])

    clips = [render(ShapeClip("red", "circle", "left"), 9, 32, 48),
             render(ShapeClip("cyan", "square", "up"), 9, 32, 48)]
    x = preprocess(clips[0])
    assert tuple(x.shape) == (3, 9, 224, 224) and x.min() >= -1 and x.max() <= 1
    features = i3d_features(net, clips, batch=2)
    assert features.shape == (2, 400) and np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 1e-3 * np.abs(features).max()  # the clips are told apart


def test_a_wrong_i3d_file_is_refused_naming_file_and_key(i3d_file, tmp_path, capsys):
    from megawan.cli import main

    path, state = i3d_file
    wrong = dict(state, **{"Mixed_4c.b1b.conv3d.weight": torch.zeros(1, 1, 3, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(I3DWeightsError, match=r"wrong\.pt: key Mixed_4c\.b1b\.conv3d\.weight has shape"):
        load_i3d(str(tmp_path / "wrong.pt"))
    torch.save({k: v for k, v in state.items() if k != "Mixed_3b.b0.bn.weight"}, tmp_path / "short.pt")
    with pytest.raises(I3DWeightsError, match=r"short\.pt: missing key Mixed_3b\.b0\.bn\.weight"):
        load_i3d(str(tmp_path / "short.pt"))
    torch.save({"features.0.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(I3DWeightsError, match=r"other\.pt: no key logits\.conv3d\.weight"):
        load_i3d(str(tmp_path / "other.pt"))

    # the command checks the file before it loads the model or generates anything (no checkpoint is read)
    (tmp_path / "ref").mkdir()
    code = main(["eval", "--ckpt", str(tmp_path / "never-read"), "--reference", str(tmp_path / "ref"), "--i3d",
                 str(tmp_path / "wrong.pt"), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "--reference" in err and "holds 0 video" in err  # the reference folder is checked first
    for i in range(2):
        ref = str(tmp_path / "ref" / f"{i}.mp4")
        from megawan.utils.media import write_video

        write_video(ref, render(ShapeClip("red", "circle", "left"), 9, 32, 48, seed=i), fps=16)
    code = main(["eval", "--ckpt", str(tmp_path / "never-read"), "--reference", str(tmp_path / "ref"), "--i3d",
                 str(tmp_path / "wrong.pt"), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "wrong.pt: key Mixed_4c.b1b.conv3d.weight" in err, err
