"""Flow matching: the shift, the noising path, the velocity target and the TI2V first-frame rule."""

import torch

from megawan.config import dit_preset
from megawan.diffusion import FlowMatching, shift_timesteps
from megawan.models.dit import WanDiT


def test_shift_matches_wan_formula_and_favours_noise():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_timesteps(t, 1.0), t)
    shifted = shift_timesteps(t, 5.0)
    assert torch.allclose(shifted, 5 * t / (1 + 4 * t))
    assert (shifted[1:-1] > t[1:-1]).all() and shifted[0] == 0 and shifted[-1] == 1


def test_timestep_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = FlowMatching(distribution="uniform").sample_timesteps(20000, generator=g)
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    logit = FlowMatching(distribution="logit_normal").sample_timesteps(20000, generator=g)
    assert abs(logit.mean() - 0.5) < 0.01 and logit.std() < uniform.std()  # concentrated in the middle
    shifted = FlowMatching(shift=5.0).sample_timesteps(20000, generator=g)
    assert shifted.mean() > 0.7


def test_noised_path_and_target():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 5, 2, 2, generator=g), torch.randn(3, 4, 5, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.5, 1.0])
    x_t, target = FlowMatching.noised(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], noise[2])
    assert torch.allclose(x_t[1], 0.5 * (x0[1] + noise[1]))
    assert torch.equal(target, noise - x0)
    # the target is dx_t/dt along the path: exact for a straight line
    dt = 1e-3
    x_t2, _ = FlowMatching.noised(x0, noise, t.clamp(max=1 - dt) + dt)
    assert torch.allclose((x_t2 - FlowMatching.noised(x0, noise, t.clamp(max=1 - dt))[0]) / dt, target, atol=1e-2)


def test_clean_first_frame_for_ti2v():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 3, 3, 4, 4, generator=g), torch.randn(2, 3, 3, 4, 4, generator=g)
    t = torch.tensor([0.3, 0.9])
    x_t, target, token_t, mask = FlowMatching.clean_first_frame(x0, noise, t)
    assert torch.equal(x_t[:, :, 0], x0[:, :, 0])
    assert token_t.shape == (2, 3 * 2 * 2)
    assert (token_t[:, :4] == 0).all() and torch.allclose(token_t[:, 4:], (t * 1000).view(2, 1).expand(2, 8))
    # the masked loss ignores the first frame entirely
    pred = target.clone()
    pred[:, :, 0] += 100.0
    assert FlowMatching.loss(pred, target, mask) == 0
    assert FlowMatching.loss(pred, target) > 0
    assert torch.equal(FlowMatching.per_sample_loss(pred, target, mask), torch.zeros(2))
    unmasked = FlowMatching.per_sample_loss(pred, target)
    assert unmasked.shape == (2,) and (unmasked > 0).all()
    assert torch.allclose(unmasked.mean(), FlowMatching.loss(pred, target))  # equal sizes: the same mean


def flow_matching_loss(model, x0: torch.Tensor, text: torch.Tensor, flow: FlowMatching, noise: torch.Tensor,
                       t: torch.Tensor, clean_first_frame: bool = False) -> torch.Tensor:
    """MSE between the model's velocity at (x_t, t) and noise - x0 (t in 0-1, already shifted).
    clean_first_frame: Wan2.2 TI2V's image-to-video mode, where the first latent frame stays clean, gets
    t = 0 and is left out of the loss."""
    mask = None
    if clean_first_frame:
        x_t, target, timestep, mask = flow.clean_first_frame(x0, noise, t, model.dit_config.patch_size)
    else:
        x_t, target = flow.noised(x0, noise, t)
        timestep = flow.model_timesteps(t)
    return flow.loss(model(x_t, timestep, text), target, mask)


def test_flow_matching_loss_trains_a_tiny_dit():
    """The step is differentiable end to end and a few AdamW steps on one batch lower the loss; TI2V's
    clean-first-frame mode runs with per-token timesteps."""
    torch.manual_seed(0)
    for preset, clean in (("tiny", False), ("tiny-ti2v", True)):
        cfg = dit_preset(preset)
        model = WanDiT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        x0 = torch.randn(2, cfg.in_dim, 3, 4, 4, generator=g)
        text = torch.randn(2, 8, cfg.text_dim, generator=g)
        noise, t = torch.randn(x0.shape, generator=g), torch.tensor([0.3, 0.7])
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = flow_matching_loss(model, x0, text, FlowMatching(shift=3.0), noise=noise, t=t, clean_first_frame=clean)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.9 * losses[0], (preset, losses)
