"""One `megawan train-vae` step: the VAE's forward and losses over this rank's micro-batches, the generator's
GAN term, then the discriminator's own step (megawan.training.vae_trainer runs it and the optimizers).

    parts = VAEStep(cfg, vae_ddp, disc_ddp, lpips, device, dtype, dp_group, dp_size).run(batch, step)

The VAE reconstructs through the posterior: z = mean + exp(logvar / 2) * noise, the noise of each sample drawn
from a generator seeded by (train.seed, step, the sample's place in the global batch), so it does not depend on
the data-parallel layout and needs no saved RNG state. The whole clip runs in one pass (WanVAE's `chunked=False`,
the same result as the causal chunked stream) and the reconstruction is not clamped (a clamp has no gradient
outside [-1, 1]). Per-sample losses are summed and divided by the global batch; each is multiplied by the DP size
because megatron's DDP averages the gradients over DP. Batch statistics (the adaptive GAN weight, the latent
moments) are taken per micro-batch index over every DP rank: with one micro-batch per rank (micro_batch_size >=
the local batch) they are the global batch's, as one rank computes them.

GAN (loss.gan > 0, from loss.gan_start): the generator adds gan_weight * hinge -D(x_hat), gan_weight = loss.gan
(times VQGAN's adaptive weight on the decoder's last conv when loss.adaptive_gan_weight); the discriminator's
gradients of that pass are discarded, then it trains on D(x) against D(x_hat.detach()) with the hinge loss.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint as activation_checkpoint

from megawan.config.vae_run import VAERunConfig
from megawan.models.vae.causal import StreamCache
from megawan.models.vae.model import patchify, unpatchify
from megawan.training.schedule import finalize_model_grads
from megawan.training.vae_losses import (adaptive_gan_weight, foreground_color_loss, foreground_mask,
                                         hinge_discriminator_loss, hinge_generator_loss, kl_loss, l1_loss,
                                         latent_color_loss, latent_moments_loss, lpips_loss, mse_loss)


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The posterior noise of one sample: (seed, step, its place in the global batch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + index)


def _encode(vae, x: torch.Tensor) -> torch.Tensor:
    return vae.encoder(x, StreamCache())  # a fresh cache inside: a recompute starts from the same state


def _decode(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decoder(z, StreamCache())


def reconstruct(vae, video: torch.Tensor, noise: torch.Tensor | None, recompute: bool = False) -> tuple:
    """(mean, logvar, reconstruction) of `video` [B, 3, T, H, W] through the posterior sample (noise None: the
    mean). recompute: the encoder and the decoder each keep only their input; the backward recomputes them."""
    p = vae.vae_config.patch_size or 1
    x = patchify(video, p) if p > 1 else video

    def run(fn, inp):
        if recompute and torch.is_grad_enabled():
            return activation_checkpoint.checkpoint(fn, vae, inp, use_reentrant=False)
        return fn(vae, inp)

    mean, logvar = vae.quant_conv(run(_encode, x)).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)  # as WanVAE.encode
    z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.to(mean)
    out = run(_decode, vae.post_quant_conv(z))
    return mean, logvar, unpatchify(out, p) if p > 1 else out


def last_decoder_weight(vae) -> torch.nn.Parameter:
    """The decoder's last conv weight: where VQGAN's adaptive weight compares the two gradients."""
    return vae.decoder.conv_out.weight


class VAEStep:
    def __init__(self, cfg: VAERunConfig, vae_ddp, disc_ddp, lpips, device, dtype, dp_group, dp_size: int):
        self.cfg, self.vae_ddp, self.disc_ddp, self.lpips = cfg, vae_ddp, disc_ddp, lpips
        self.device, self.dtype, self.group, self.dp_size = device, dtype, dp_group, dp_size
        self.vae = vae_ddp.module.vae

    def _noise(self, mean_shape, indices, step: int) -> torch.Tensor:
        return torch.stack([torch.randn(mean_shape, generator=sample_generator(self.cfg.train.seed, step, i))
                            for i in indices])

    def _latent_shape(self, video: torch.Tensor) -> tuple:
        cfg = self.vae.vae_config
        t = video.shape[2]
        lt = 1 if getattr(cfg, "image_only", False) else (t - 1) // cfg.temporal_stride + 1
        s = cfg.spatial_stride
        return cfg.z_dim, lt, video.shape[3] // s, video.shape[4] // s

    def run(self, batch: dict, step: int, gan_on: bool) -> dict:
        """Forward + backward of this rank's slice; the gradients are reduced over DP (megatron's DDP) and ready
        for the optimizers. Returns the global batch's loss parts (all-reduced sums / global samples), for
        logging and the finite check."""
        cfg, loss = self.cfg, self.cfg.loss
        video, indices = batch["video"], list(batch["sample_index"])
        global_samples = int(batch.get("global_samples", cfg.data.global_batch_size))
        mbs = cfg.data.micro_batch_size
        slices = [slice(s, s + mbs) for s in range(0, video.shape[0], mbs)]
        scale = self.dp_size / global_samples
        ddps = [self.vae_ddp] + ([self.disc_ddp] if self.disc_ddp is not None else [])
        for ddp in ddps:
            ddp.zero_grad_buffer()
        # per-sample sums: l1, kl, lpips, mse (unweighted, for PSNR), gan_g, gan_d, the mse term, the colour term
        sums = torch.zeros(8, dtype=torch.float64)
        # batch statistics, the same on every rank
        shared = {"latent_moments": 0.0, "latent_color": 0.0, "gan_weight": 0.0}
        fakes = []
        # the discriminator's gradients of the generator pass are discarded: no reduction may start meanwhile
        no_disc_sync = self.disc_ddp.no_sync() if self.disc_ddp is not None else contextlib.nullcontext()
        with no_disc_sync:
            for k, sl in enumerate(slices):
                last = k == len(slices) - 1
                with contextlib.nullcontext() if last else self.vae_ddp.no_sync():
                    x = video[sl].to(self.device, self.dtype)
                    noise = self._noise(self._latent_shape(x), indices[sl], step).to(self.device)
                    mean, logvar, x_hat = reconstruct(self.vae, x, noise, cfg.train.recompute)
                    needs_mask = loss.foreground_weight > 0 or loss.foreground_color > 0 or loss.latent_color > 0
                    mask = foreground_mask(x, loss.foreground_threshold) if needs_mask else None
                    pixel_weight = 1.0 + loss.foreground_weight * mask if loss.foreground_weight > 0 else None
                    l1, kl = l1_loss(x, x_hat, pixel_weight), kl_loss(mean, logvar)
                    rec = loss.l1 * l1
                    if loss.mse > 0:
                        mse = mse_loss(x, x_hat, pixel_weight)
                        rec = rec + loss.mse * mse
                        sums[6] += mse.detach().double().sum()
                    if loss.foreground_color > 0:
                        color = foreground_color_loss(x, x_hat, mask)
                        rec = rec + loss.foreground_color * color
                        sums[7] += color.detach().double().sum()
                    lp = None
                    if loss.lpips > 0:
                        lp = lpips_loss(self.lpips, x, x_hat)
                        rec = rec + loss.lpips * lp
                    total = (rec + loss.kl * kl).sum() * scale
                    sums[0] += l1.detach().double().sum()
                    sums[1] += kl.detach().double().sum()
                    sums[2] += 0.0 if lp is None else lp.detach().double().sum()
                    error = x.float() - x_hat.detach().float().clamp(-1, 1)  # the PSNR the metrics log
                    sums[3] += error.pow(2).flatten(1).mean(1).double().sum()
                    normalized = self.vae.normalize(mean) if loss.latent_moments > 0 or loss.latent_color > 0 else None
                    if loss.latent_moments > 0:
                        moments = latent_moments_loss(normalized, x.shape[0] * self.dp_size, self.group)
                        total = total + loss.latent_moments * moments * self.dp_size / len(slices)
                        shared["latent_moments"] += moments.item() / len(slices)
                    if loss.latent_color > 0:
                        vcfg = self.vae.vae_config
                        lc = latent_color_loss(normalized, x, mask, vcfg.temporal_stride, vcfg.spatial_stride,
                                               self.group)
                        total = total + loss.latent_color * lc * self.dp_size / len(slices)
                        shared["latent_color"] += lc.item() / len(slices)
                    if gan_on:
                        g = hinge_generator_loss(self.disc_ddp(x_hat))
                        weight = torch.tensor(loss.gan)
                        if loss.adaptive_gan_weight:
                            # the global batch's mean losses (summed over DP in there): taming's eps 1e-4 is
                            # added to a norm, so the scale must not depend on the layout
                            weight = loss.gan * adaptive_gan_weight(rec.sum() / global_samples,
                                                                    g.sum() / global_samples,
                                                                    last_decoder_weight(self.vae), self.group)
                        total = total + weight.to(g) * g.sum() * scale
                        sums[4] += g.detach().double().sum()
                        shared["gan_weight"] += float(weight) / len(slices)
                        fakes.append((x, x_hat.detach()))
                    total.backward()
        finalize_model_grads([self.vae_ddp])
        if gan_on:
            self.disc_ddp.zero_grad_buffer()  # what the generator pass left in the discriminator's buffers
            for k, (x, x_hat) in enumerate(fakes):
                with contextlib.nullcontext() if k == len(fakes) - 1 else self.disc_ddp.no_sync():
                    d = hinge_discriminator_loss(self.disc_ddp(x), self.disc_ddp(x_hat))
                    (d.sum() * scale).backward()
                    sums[5] += d.detach().double().sum()
            finalize_model_grads([self.disc_ddp])
        if torch.distributed.is_initialized():
            reduced = sums.to(self.device)
            torch.distributed.all_reduce(reduced, group=self.group)
            sums = reduced.cpu()
        values = (sums / global_samples).tolist()
        parts = {"l1": values[0], "kl": values[1], "mse": values[3]}
        total = loss.l1 * values[0] + loss.kl * values[1]
        if loss.mse > 0:
            parts["mse_term"] = values[6]
            total += loss.mse * values[6]
        if loss.foreground_color > 0:
            parts["foreground_color"] = values[7]
            total += loss.foreground_color * values[7]
        if loss.lpips > 0:
            parts["lpips"] = values[2]
            total += loss.lpips * values[2]
        if loss.latent_moments > 0:
            parts["latent_moments"] = shared["latent_moments"]
            total += loss.latent_moments * shared["latent_moments"]
        if loss.latent_color > 0:
            parts["latent_color"] = shared["latent_color"]
            total += loss.latent_color * shared["latent_color"]
        if gan_on:
            parts.update({"gan_g": values[4], "gan_weight": shared["gan_weight"], "gan_d": values[5]})
            total += shared["gan_weight"] * values[4]
        parts["loss"] = total
        return parts
