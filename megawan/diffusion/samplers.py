"""Flow-matching samplers as the official Wan repos run them: Euler and UniPC on Wan's shifted sigma grid,
with classifier-free guidance batching the conditional and unconditional passes together.

    sampler = make_sampler("unipc", steps=50, shift=5.0)
    x0 = sample(velocity_fn, noise, sampler, guidance=5.0)
    # velocity_fn(x, timestep) sees x = [cond batch; uncond batch] (2B) when guidance != 1, else B

Wan's grid (wan/utils/fm_solvers_unipc.py): sigmas = linspace(0.999, 0, steps + 1)[:-1], shifted by
s·σ / (1 + (s - 1)·σ), then a final 0. The model is fed timesteps = int(1000·σ) (truncated to integers,
as the official scheduler stores them as int64) while the update uses the float sigmas. diffusers' default
UniPC flow grid starts at 1 - 1e-6 and ends at 1/1000 before the shift: a different grid.

UniPC (Zhao et al. 2023, arXiv 2302.04867) as Wan configures it: data prediction (x0 = x - σ·v), order 2,
B(h) = e^h - 1 ("bh2"), a corrector after every model call but the first, first order on the last step.
For flow matching α_t = 1 - σ_t and λ_t = log(α_t / σ_t).
"""

from __future__ import annotations

import abc
import math
from typing import Callable, Optional

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def wan_sigmas(steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Wan's sampling grid: `steps` shifted sigmas from 0.999 towards 0, then 0 ([steps + 1], float64)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least one step, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigma_max = 1.0 - 1.0 / num_train_timesteps  # the first of the 1000 training sigmas; the last is 0
    sigmas = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.concatenate([sigmas, [0.0]])


class FlowSampler(abc.ABC):
    """Walks the grid one model call at a time: `step(velocity, x)` returns x at the next sigma."""

    name = "base"

    def __init__(self, steps: int, shift: float, sigmas: Optional[np.ndarray] = None):
        grid = wan_sigmas(steps, shift) if sigmas is None else np.asarray(sigmas, dtype=np.float64)
        # what the DiT sees: 1000 σ truncated to integers (from the float64 grid), as Wan's scheduler keeps them
        self.timesteps = torch.from_numpy(grid[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.int64)
        self.sigmas = grid.astype(np.float32)  # what the updates use, float32 as in the official scheduler
        self.index = 0

    def __len__(self) -> int:
        return len(self.timesteps)

    @abc.abstractmethod
    def step(self, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x at sigma[index + 1] given the model's velocity at (x, sigma[index]); advances the index."""


class EulerSampler(FlowSampler):
    """x_{i+1} = x_i + (σ_{i+1} - σ_i) v: the first-order solver of the flow ODE."""

    name = "euler"

    def step(self, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = float(self.sigmas[self.index]), float(self.sigmas[self.index + 1])
        self.index += 1
        return (x.float() + (sigma_next - sigma) * velocity.float()).to(x.dtype)


def _lambda(sigma: float) -> float:
    """log-SNR of flow matching: log((1 - σ) / σ); +inf at σ = 0."""
    return math.inf if sigma == 0 else math.log(1 - sigma) - math.log(sigma)


class UniPCSampler(FlowSampler):
    """UniPC-p / UniPC-c (bh2) in data prediction, order 2, lower order on the final step."""

    name = "unipc"

    def __init__(self, steps: int, shift: float, sigmas: Optional[np.ndarray] = None, order: int = 2):
        super().__init__(steps, shift, sigmas)
        self.order = order
        self.x0_preds: list = []  # the last `order` data predictions, oldest first
        self.last_sample: Optional[torch.Tensor] = None
        self.this_order = 1

    def _coefficients(self, h: float, rks: list, order: int):
        """h·φ terms of the bh2 variant: (h_phi_1, B(h), rhs b) for the linear systems of UniPC."""
        hh = -h  # data prediction
        over_hh = 0.0 if math.isinf(hh) else 1.0 / hh  # the last step goes to sigma 0: h = inf
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 * over_hh - 1
        b_h = h_phi_1  # bh2: B(h) = e^h - 1 (of -h here)
        factorial, b = 1, []
        for i in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k * over_hh - 1 / factorial
        r = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, order + 1)], dtype=np.float64)
        return h_phi_1, b_h, r, np.array(b, dtype=np.float64)

    def _step_terms(self, s0: int, t: int, order: int):
        """Shared by predictor and corrector, stepping from grid point s0 to t with the stored data predictions:
        sigma_t, alpha_t, the newest prediction m0, the scaled differences D1 and the bh2 coefficients."""
        sigma_s0, sigma_t = float(self.sigmas[s0]), float(self.sigmas[t])
        lam_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lam_s0
        m0 = self.x0_preds[-1]
        rks, d1s = [], []
        for k in range(1, order):
            rk = (_lambda(float(self.sigmas[s0 - k])) - lam_s0) / h
            rks.append(rk)
            d1s.append((self.x0_preds[-(k + 1)] - m0) / rk)
        h_phi_1, b_h, r, b = self._coefficients(h, rks + [1.0], order)
        return sigma_t / sigma_s0, 1 - sigma_t, m0, d1s, h_phi_1, b_h, r, b

    def _predict(self, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniPC-p: x at sigma[index + 1] from x at sigma[index] and the stored data predictions."""
        ratio, alpha_t, m0, d1s, h_phi_1, b_h, r, b = self._step_terms(self.index, self.index + 1, order)
        x_t = ratio * x - alpha_t * h_phi_1 * m0
        if d1s:
            rhos = [0.5] if order == 2 else list(np.linalg.solve(r[:-1, :-1], b[:-1]))
            x_t = x_t - alpha_t * b_h * sum(rho * d for rho, d in zip(rhos, d1s))
        return x_t

    def _correct(self, x0_now: torch.Tensor, x_prev: torch.Tensor, x_now: torch.Tensor, order: int) -> torch.Tensor:
        """UniPC-c: refine x at sigma[index] with the data prediction just made there."""
        ratio, alpha_t, m0, d1s, h_phi_1, b_h, r, b = self._step_terms(self.index - 1, self.index, order)
        rhos = [0.5] if order == 1 else list(np.linalg.solve(r, b))
        x_t = ratio * x_prev - alpha_t * h_phi_1 * m0
        correction = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) if d1s else 0
        return x_t - alpha_t * b_h * (correction + rhos[-1] * (x0_now - m0))

    def step(self, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x, velocity = x.float(), velocity.float()
        x0 = x - float(self.sigmas[self.index]) * velocity  # data prediction
        if self.index > 0 and self.last_sample is not None:
            x = self._correct(x0, self.last_sample, x, self.this_order)
        self.x0_preds = (self.x0_preds + [x0])[-self.order:]
        remaining = len(self.timesteps) - self.index
        self.this_order = min(self.order, remaining, len(self.x0_preds))
        self.last_sample = x
        x_next = self._predict(x, self.this_order)
        self.index += 1
        return x_next.to(dtype)


class DPMSolverPPSampler(FlowSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), midpoint form, data prediction, as Wan's
    `--sample_solver dpm++` runs it: second order from the second step on, first order on the last step
    (which lands on σ = 0, where the update is the data prediction itself)."""

    name = "dpm++"

    def __init__(self, steps: int, shift: float, sigmas: Optional[np.ndarray] = None):
        super().__init__(steps, shift, sigmas)
        self.previous: Optional[torch.Tensor] = None  # the data prediction of the step before

    def step(self, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x, velocity = x.float(), velocity.float()
        i = self.index
        sigma_s, sigma_t = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x0 = x - sigma_s * velocity
        last = i == len(self.timesteps) - 1
        if sigma_t == 0.0:
            x_next = x0  # λ_t = inf: e^{-h} = 0
        else:
            h = _lambda(sigma_t) - _lambda(sigma_s)
            alpha_t, phi = 1.0 - sigma_t, math.expm1(-h)  # e^{-h} - 1
            x_next = (sigma_t / sigma_s) * x - alpha_t * phi * x0
            if self.previous is not None and not last:
                r = (_lambda(sigma_s) - _lambda(float(self.sigmas[i - 1]))) / h
                x_next = x_next - 0.5 * alpha_t * phi * (x0 - self.previous) / r
        self.previous = x0
        self.index += 1
        return x_next.to(dtype)


SAMPLERS = {"euler": EulerSampler, "unipc": UniPCSampler, "dpm++": DPMSolverPPSampler}


def make_sampler(name: str, steps: int, shift: float) -> FlowSampler:
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](steps, shift)


def guide(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + g (v_c - v_u)."""
    return v_uncond + guidance * (v_cond - v_uncond)


def sample(velocity_fn: Callable, noise: torch.Tensor, sampler: FlowSampler, guidance=1.0,
           callback: Optional[Callable] = None, pin: Optional[Callable] = None) -> torch.Tensor:
    """Integrate from `noise` (σ = 1) to data along the sampler's grid; fp32 latents as Wan keeps them.

    velocity_fn(x, timestep) -> velocity, timestep [N] in model units. With guidance != 1, x holds the batch
    twice — conditional half first, unconditional half second — so one model call does both.
    guidance: a number, or a function of the step's model timestep (A14B: one scale per expert); with a
    function the batch is always doubled. pin(x) -> x is applied to the start and after every step (TI2V keeps
    its clean first frame there).
    """
    x = noise.float()
    if pin is not None:
        x = pin(x)
    guided = callable(guidance) or guidance != 1.0
    for i, t in enumerate(sampler.timesteps):
        x_in = torch.cat([x, x]) if guided else x
        v = velocity_fn(x_in, t.float().expand(x_in.shape[0])).float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = guide(v_cond, v_uncond, guidance(float(t)) if callable(guidance) else guidance)
        x = sampler.step(v, x)
        if pin is not None:
            x = pin(x)
        if callback is not None:
            callback(i, x)
    return x
