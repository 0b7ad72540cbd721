"""The VAE's losses, per sample (the trainer sums them and divides by the global batch, as the DiT trainer
does, so a data-parallel run's gradient is one rank's).

    l1_loss(x, x_hat, weight=None)         [B]  mean |x - x_hat| over pixels in [-1, 1] (weighted: weight-normalised)
    mse_loss(x, x_hat, weight=None)        [B]  mean (x - x_hat)^2, likewise
    foreground_mask(x, thr)                [B, 1, T, H, W]  1 on pixels unlike their frame's median colour, else 0
    foreground_weights(x, weight, thr)     [B, 1, T, H, W]  1 + weight * foreground_mask
    foreground_color_loss(x, x_hat, mask)  [B]  squared error of the mean colour over a sample's foreground pixels
    kl_loss(mean, logvar)                  [B]  KL(N(mean, exp(logvar)) || N(0, 1)), mean over latent elements
    lpips_loss(net, x, x_hat)              [B]  LPIPS per frame (megawan.models.vae.lpips), frames averaged
    hinge_generator_loss(logits_fake)      [B]  -mean(D(x_hat))
    hinge_discriminator_loss(real, fake)   [B]  (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) / 2
    adaptive_gan_weight(rec, gan, weight)       VQGAN's ||grad_w rec|| / (||grad_w gan|| + 1e-4), clamped
    latent_moments_loss(z, count)               per-channel mean^2 + (std - 1)^2 of normalised posterior means
    latent_color_loss(z, x, mask, ...)          1 - R^2 of a linear map from objects' colours to their latents

KL: the report's weight 3e-6 (as LDM's) multiplies a KL summed over the latent elements of a sample; here it is
averaged, so the same weight pulls (latent elements) times less. That keeps the weight's meaning when the
resolution or length changes; scale loss.kl by the latent elements per sample (e.g. 16 x 5 x 16 x 16 = 20480 for
Wan2.1 at 17x128x128) to reproduce a summed KL exactly.

Batch statistics (the adaptive weight, the latent moments) are all-reduced over data parallelism, so DP2 over a
micro-batch equals one rank over the two halves together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

ADAPTIVE_EPS = 1e-4  # taming-transformers' calculate_adaptive_weight
ADAPTIVE_MAX = 1e4


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def _weighted_mean(values: torch.Tensor, weight) -> torch.Tensor:
    if weight is None:
        return _per_sample_mean(values)
    weight = weight.expand_as(values)
    return _per_sample_mean(weight * values) / _per_sample_mean(weight)


def l1_loss(x: torch.Tensor, x_hat: torch.Tensor, weight=None) -> torch.Tensor:
    return _weighted_mean((x.float() - x_hat.float()).abs(), weight)


def mse_loss(x: torch.Tensor, x_hat: torch.Tensor, weight=None) -> torch.Tensor:
    return _weighted_mean((x.float() - x_hat.float()).pow(2), weight)


@torch.no_grad()
def foreground_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, 1, T, H, W] of `x` [B, 3, T, H, W]: 1 where some channel differs from the frame's median colour by more
    than `threshold`, else 0 (the objects on a flat background)."""
    median = x.float().flatten(3).median(dim=3).values[..., None, None]  # [B, 3, T, 1, 1]
    return ((x.float() - median).abs().amax(dim=1, keepdim=True) > threshold).float()


def foreground_weights(x: torch.Tensor, weight: float, threshold: float) -> torch.Tensor:
    """Per-pixel weights [B, 1, T, H, W]: 1 + `weight` on the foreground (`foreground_mask`), else 1. For data on
    flat backgrounds (rendered scenes, screen content, product shots) whose objects cover a few percent of a
    frame: with plain means a small VAE learns the background first and draws objects grey for a long while
    (measured on the demo's shapes: docs/vae_training.md)."""
    return 1.0 + weight * foreground_mask(x, threshold)


def foreground_color_loss(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample: the squared difference between the mean reconstructed and the mean true colour over its
    foreground pixels (`mask`), averaged over the channels; 0 for a sample without foreground. A pixel loss is
    satisfied by many small errors; this one asks each object's colour as a whole to be right, which spreads
    the objects' colours apart in the latent space (the demo's DiT tells colours apart by it:
    docs/vae_training.md)."""
    count = mask.flatten(1).sum(dim=1).clamp_min(1.0)  # [B]
    diff = ((x_hat.float() - x.float()) * mask).flatten(2).sum(dim=2) / count[:, None]  # [B, 3]
    return diff.pow(2).mean(dim=1)


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """0.5 (mean^2 + var - 1 - logvar), averaged over the latent elements of each sample."""
    mean, logvar = mean.float(), logvar.float()
    return _per_sample_mean(0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar))


def lpips_loss(net, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """LPIPS of each frame ([B, 3, T, H, W]), frames of a clip averaged; gradients flow to x_hat."""
    from megawan.models.vae.lpips import lpips_video  # helper 1's network (VGG16 + linear heads)

    return lpips_video(net, x.float(), x_hat.float())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -_per_sample_mean(logits_fake.float())


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    real = _per_sample_mean(F.relu(1.0 - logits_real.float()))
    fake = _per_sample_mean(F.relu(1.0 + logits_fake.float()))
    return 0.5 * (real + fake)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _summed_over_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """`local` summed over the data-parallel `group`, keeping the graph of this rank's part only (the other ranks'
    parts are constants here): each rank's gradient is its share of the batch statistic."""
    total = _all_reduce(local.detach().clone(), group)
    return local + (total - local.detach())


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_weight: torch.Tensor,
                        group=None) -> torch.Tensor:
    """VQGAN's balance of the GAN loss against the reconstruction (Esser et al. 2021, eq. 7): the ratio of their
    gradient norms at the decoder's last layer, detached, clamped to [0, 1e4]. The gradients are summed over the
    data-parallel `group` first: each rank passes its samples' losses divided by the global batch, so the sum is
    the gradient of the global-batch mean and every rank gets the weight one rank computes over the whole batch
    (the 1e-4 in the denominator makes the weight depend on the losses' scale, not only their ratio)."""
    g_rec = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)[0].detach().float()
    g_gan = torch.autograd.grad(gan_loss, last_weight, retain_graph=True)[0].detach().float()
    both = _all_reduce(torch.stack([g_rec, g_gan]), group)
    weight = both[0].norm() / (both[1].norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()


def latent_moments_loss(z: torch.Tensor, count: int, group=None) -> torch.Tensor:
    """z: this rank's normalised posterior means [b, C, T, H, W]; count: the samples of all ranks together.
    sum_c mean_c^2 + (std_c - 1)^2 over every latent of the global batch (per channel), so that the config's
    latents_mean / latents_std keep normalising the latents to zero mean and unit variance for the DiT. The
    sums are all-reduced over `group`; each rank's gradient is its share (the sums' local parts keep their
    graph), to be scaled by the data-parallel size like the per-sample losses."""
    n = count * z[0, 0].numel()  # latents per channel in the global batch
    z = z.float().transpose(0, 1).flatten(1)  # [C, this rank's latents per channel]
    sums = _summed_over_ranks(torch.stack([z.sum(dim=1), z.pow(2).sum(dim=1)]), group)  # [2, C]
    mean = sums[0] / n
    var = (sums[1] / n - mean.pow(2)).clamp_min(1e-12)
    return (mean.pow(2) + (var.sqrt() - 1.0).pow(2)).sum()


def latent_color_loss(z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, temporal_stride: int,
                      spatial_stride: int, group=None) -> torch.Tensor:
    """How far the objects' latents are from a linear function of their colours: 1 - R^2 of the least-squares map
    (no intercept) from each sample's foreground colour offset to its foreground latent offset, over a micro-batch
    of every data-parallel rank together (the whole global batch without gradient accumulation).

    z: normalised posterior means [b, C, t, h, w]; x: the pixels [b, 3, T, H, W] in [-1, 1]; mask: foreground_mask
    of x. Per sample, colour offset = mean foreground colour - mean background colour; latent offset = the slope of
    the latent cells' offsets from the mean cell without foreground against the share of foreground pixels each
    cell covers.
    Real VAEs' latents are close to linear in colour (latent previews are one linear map to RGB); a small VAE
    trained on a few colours places them anywhere, differently for every seed (measured on the demo's shapes:
    docs/vae_training.md, "The demo's tiny VAE").
    The fit uses sums (X'X, X'D, D'D) all-reduced over `group`, so data parallelism equals one rank; each
    rank's gradient is its share, to be scaled by the data-parallel size like the per-sample losses. Samples
    without foreground or without background count for nothing; 0 when no sample has both."""
    z, x, mask = z.float(), x.float(), mask.float()
    share = F.avg_pool3d(mask, (1, spatial_stride, spatial_stride))  # [b, 1, T, h, w]
    if share.shape[2] > 1:  # the causal chunking: frame 0 alone, then temporal_stride frames per latent frame
        rest = share[:, :, 1:].unflatten(2, (-1, temporal_stride)).mean(dim=3)
        share = torch.cat([share[:, :, :1], rest], dim=2)
    share = share[:, :, : z.shape[2]]
    background = (share == 0).float()
    fg_count, bg_count = share.pow(2).flatten(1).sum(1), background.flatten(1).sum(1)
    valid = ((fg_count > 0) & (bg_count > 0)).float()  # [b]
    # the cells' offsets from the background regressed on their foreground share: a cell half covered by the
    # object counts half (a linear encoder's offsets are exactly share x its colour's offset)
    z_bg = (z * background).flatten(2).sum(2) / bg_count.clamp_min(1e-6)[:, None]  # [b, C]
    d = ((z - z_bg[..., None, None, None]) * share).flatten(2).sum(2) / fg_count.clamp_min(1e-6)[:, None]
    fg_pixels, bg_pixels = mask.flatten(2).sum(2).clamp_min(1.0), (1 - mask).flatten(2).sum(2).clamp_min(1.0)
    c = (x * mask).flatten(2).sum(2) / fg_pixels - (x * (1 - mask)).flatten(2).sum(2) / bg_pixels  # [b, 3]
    d, c = d * valid[:, None], c * valid[:, None]
    sums = _summed_over_ranks(torch.cat([(c.T @ c).flatten(), (c.T @ d).flatten(), d.pow(2).sum().reshape(1)]), group)
    k, ch = c.shape[1], d.shape[1]
    xx = sums[: k * k].reshape(k, k) + 1e-6 * torch.eye(k, device=z.device)
    xd = sums[k * k: k * k + k * ch].reshape(k, ch)
    dd = sums[-1]
    explained = (xd * torch.linalg.solve(xx, xd)).sum()  # tr(XD' (X'X)^-1 XD)
    # no sample with both foreground and background: 0 (decided on the device, no host round trip)
    return torch.where(dd > 0, 1.0 - explained / dd.clamp_min(1e-30), dd * 0.0)
