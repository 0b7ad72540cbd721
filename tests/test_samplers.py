"""The samplers against diffusers' schedulers run on Wan's grid, and on flows whose end point is known."""

import numpy as np
import pytest
import torch

from megawan.diffusion.samplers import make_sampler, sample, wan_sigmas

diffusers = pytest.importorskip("diffusers")


def _field(target):
    """A nonlinear velocity field (what a model would return) depending on x and t."""
    def velocity(x, t):
        s = (t.float() / 1000).view(-1, *([1] * (x.dim() - 1)))
        return 0.9 * (x - target) / (s + 0.05) + 0.1 * torch.sin(3 * x)
    return velocity


def _case(seed: int):
    """(noise, the nonlinear field of a random target) for a sampler comparison."""
    g = torch.Generator().manual_seed(seed)
    noise, target = torch.randn(2, 4, 3, 5, 6, generator=g), torch.randn(2, 4, 3, 5, 6, generator=g)
    return noise, _field(target)


@pytest.mark.parametrize("steps,shift", [(10, 5.0), (25, 3.0), (3, 1.0)])
def test_unipc_equals_diffusers_unipc_on_wans_grid(steps, shift):
    noise, velocity = _case(steps)
    ours = sample(velocity, noise, make_sampler("unipc", steps, shift))

    # Wan's FlowUniPCMultistepScheduler settings, in diffusers' UniPC given Wan's (unshifted) grid
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=shift, predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(sigmas=np.linspace(0.999, 0, steps + 1)[:-1])
    assert torch.equal(scheduler.timesteps, make_sampler("unipc", steps, shift).timesteps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t.expand(2)), t, x).prev_sample
    assert ((ours - x).abs().max() / x.abs().max()).item() < 1e-5


@pytest.mark.parametrize("steps,shift", [(10, 5.0), (20, 3.0)])
def test_dpmpp_equals_diffusers_dpm_solver_on_wans_grid(steps, shift):
    noise, velocity = _case(steps)
    ours = sample(velocity, noise, make_sampler("dpm++", steps, shift))

    # Wan's FlowDPMMultistepScheduler settings (dpm-solver++ 2M, midpoint, lower order final) in diffusers'
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=shift, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero")
    scheduler.set_timesteps(steps)  # its set_timesteps takes no sigmas: put Wan's grid in place
    grid = make_sampler("dpm++", steps, shift)
    scheduler.sigmas = torch.from_numpy(wan_sigmas(steps, shift)).float()
    scheduler.timesteps = grid.timesteps.clone()
    x = noise.clone()
    for t, model_t in zip(scheduler.timesteps, grid.timesteps):
        x = scheduler.step(velocity(x, model_t.expand(2)), t, x).prev_sample
    assert ((ours - x).abs().max() / x.abs().max()).item() < 1e-5


def test_per_expert_guidance_and_pinned_frames():
    """guidance as a function of the timestep (A14B: one scale per expert); pin keeps a frame fixed (TI2V)."""
    a, b = torch.randn(1, 4, 3, 4, 4), torch.randn(1, 4, 3, 4, 4)
    sampler = make_sampler("euler", 10, 5.0)
    seen = []

    def velocity(x, t):
        seen.append(float(t[0]))
        sigma = float(t[0]) / 1000
        cond, uncond = x.chunk(2)
        return torch.cat([(cond - a) / sigma, (uncond - b) / sigma])

    scales = lambda t: 4.0 if t >= 875 else 2.0  # noqa: E731
    first = torch.zeros(1, 4, 1, 4, 4)
    pin = lambda x: torch.cat([first, x[:, :, 1:]], dim=2)  # noqa: E731
    out = sample(velocity, torch.randn(1, 4, 3, 4, 4), sampler, guidance=scales, pin=pin)
    assert torch.equal(out[:, :, :1], first)
    assert any(t >= 875 for t in seen) and any(t < 875 for t in seen)
    # the last steps (low noise, scale 2) decide where it lands: near b + 2 (a - b)
    assert torch.allclose(out[:, :, 1:], (b + 2.0 * (a - b))[:, :, 1:], atol=5e-2)


def test_euler_equals_diffusers_flow_match_euler():
    noise, velocity = _case(1)
    ours = sample(velocity, noise, make_sampler("euler", 20, 5.0))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(sigmas=list(wan_sigmas(20, 5.0)[:-1]))
    x = noise.clone()
    for t, model_t in zip(scheduler.timesteps, make_sampler("euler", 20, 5.0).timesteps):
        x = scheduler.step(velocity(x, model_t.expand(2)), t, x).prev_sample
    assert ((ours - x).abs().max() / x.abs().max()).item() < 1e-6


def test_wan_grid_is_not_diffusers_default_grid():
    """Wan starts at 0.999 and ends at 0.999 / steps before the shift; diffusers' default flow grid does not."""
    ours = wan_sigmas(50, 5.0)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=5.0)
    scheduler.set_timesteps(50)
    assert ours[-1] == 0 and len(ours) == 51
    assert np.abs(ours[:-1] - scheduler.sigmas.numpy()[:-1]).max() > 1e-4
    assert ours[0] == pytest.approx(5 * 0.999 / (1 + 4 * 0.999))


@pytest.mark.parametrize("name", ["euler", "unipc", "dpm++"])
def test_samplers_reach_the_end_point_of_an_exact_flow(name):
    """For data concentrated at one point x*, the exact velocity is (x - x*) / σ: both solvers land on x*."""
    x_star = torch.randn(3, 4, 2, 4, 4)
    sampler = make_sampler(name, 12, 5.0)
    sigmas = iter(sampler.sigmas)
    out = sample(lambda x, t: (x - x_star) / float(next(sigmas)), torch.randn(3, 4, 2, 4, 4), sampler)
    assert torch.allclose(out, x_star, atol=1e-5)


def test_guidance_batches_both_halves_and_extrapolates():
    """cond half pulled to A, uncond half to B: guided sampling lands on B + g (A - B)."""
    a, b, g = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 4, 1, 4, 4), 4.0
    sampler = make_sampler("unipc", 8, 3.0)
    sigmas = iter(sampler.sigmas)
    batches = []

    def velocity(x, t):
        batches.append(x.shape[0])
        sigma = float(next(sigmas))
        cond, uncond = x.chunk(2)
        return torch.cat([(cond - a) / sigma, (uncond - b) / sigma])

    out = sample(velocity, torch.randn(2, 4, 1, 4, 4), sampler, guidance=g)
    assert batches == [4] * 8  # one model call per step carries cond + uncond
    assert torch.allclose(out, b + g * (a - b), atol=1e-4)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="sampler 'ddim'"):
        make_sampler("ddim", 10, 5.0)
    with pytest.raises(ValueError, match="at least one step"):
        wan_sigmas(0, 5.0)
