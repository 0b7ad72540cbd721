#!/usr/bin/env python3
"""Inspect a latent store: its encoders and provenance, samples and bytes per bucket, one sample, a contact sheet.

    python tools/inspect_store.py --store latents.zarr
    python tools/inspect_store.py --store latents.zarr --sample 81x480x832:0
    python tools/inspect_store.py --store latents.zarr --id clip0042 --png clip0042.png --vae Wan2.1_VAE.pth

Per bucket ("FxHxW": frames x height x width in pixels): samples, parts (one per writer rank), bytes on disk
(every file under the bucket's directory, uncommitted rows included), bytes per sample (and of those the
latents' and the text states'), and how many times smaller one sample is than its raw fp32 pixels
(F*H*W*3*4 bytes) and than its latents in fp32. --png decodes the sample's latents with the VAE (official or
diffusers / megawan weights; the preset from --vae-config or the store's vae.preset) and writes up to
--frames evenly spaced frames in a grid of --columns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional

import numpy as np
import torch

from megawan.artifacts import load_vae as load_vae_weights
from megawan.capabilities import rank_device
from megawan.config import ConfigError
from megawan.config.vae_files import vae_config_named
from megawan.data.buckets import Bucket
from megawan.data.store import LatentStore
from megawan.data.store_metadata import StoreMetadata
from megawan.utils.images import contact_sheet, video_to_uint8
from megawan.utils.user_errors import UserError, run_main

ENCODER_KEYS = ("format_version", "vae", "text_encoder", "conditioning")


# ----------------------------------------------------------------------------------------------
# Summary


def parse_bucket(name: str) -> Optional[tuple]:
    """'81x480x832' -> (81, 480, 832); None if the name is not of that form."""
    try:
        bucket = Bucket.from_name(name)
    except ValueError:
        return None
    return bucket.frames, bucket.height, bucket.width


def dir_bytes(path: str) -> int:
    """Sum of the sizes of the files under `path` (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:  # a file removed while walking
                pass
    return total


def _ratio(raw: Optional[int], stored: Optional[float]) -> Optional[float]:
    return raw / stored if raw and stored else None


def summarize(store: LatentStore) -> dict:
    """{"attrs", "buckets": [per-bucket dict], "total", "store_bytes"}; byte counts are sizes of files on disk."""
    rows = []
    for name in store.buckets():
        bucket_dir = store.bucket_path(name)
        parts = store.parts(name)
        samples = store.count(name)
        latent_bytes = text_bytes = 0
        latent_shape, latent_dtype = None, None
        for part in parts:
            latent_bytes += dir_bytes(os.path.join(part.path, "latents")) + dir_bytes(os.path.join(part.path, "logvar"))
            text_bytes += dir_bytes(os.path.join(part.path, "text"))
            if latent_shape is None and part.latent_shape is not None:
                latent_shape, latent_dtype = part.latent_shape, part.latent_dtype
        total = dir_bytes(bucket_dir)
        pixels = parse_bucket(name)
        pixels_fp32 = pixels[0] * pixels[1] * pixels[2] * 3 * 4 if pixels else None
        latents_fp32 = math.prod(latent_shape) * 4 if latent_shape else None
        per_sample = total / samples if samples else None
        rows.append({
            "bucket": name, "samples": samples, "parts": len(parts), "bytes": total,
            "bytes_per_sample": per_sample,
            "latent_bytes_per_sample": latent_bytes / samples if samples else None,
            "text_bytes_per_sample": text_bytes / samples if samples else None,
            "latent_shape": latent_shape, "latent_dtype": latent_dtype,
            "pixels_fp32_bytes": pixels_fp32, "latents_fp32_bytes": latents_fp32,
            "ratio_pixels": _ratio(pixels_fp32, per_sample), "ratio_latents": _ratio(latents_fp32, per_sample),
        })
    samples = sum(r["samples"] for r in rows)
    total = sum(r["bytes"] for r in rows)
    pixels_fp32 = sum(r["pixels_fp32_bytes"] * r["samples"] for r in rows if r["pixels_fp32_bytes"])
    latents_fp32 = sum(r["latents_fp32_bytes"] * r["samples"] for r in rows if r["latents_fp32_bytes"])
    known = sum(r["bytes"] for r in rows if r["pixels_fp32_bytes"] and r["latents_fp32_bytes"])
    totals = {
        "samples": samples, "parts": sum(r["parts"] for r in rows), "bytes": total,
        "bytes_per_sample": total / samples if samples else None,
        "pixels_fp32_bytes": pixels_fp32, "latents_fp32_bytes": latents_fp32,
        "ratio_pixels": _ratio(pixels_fp32, known), "ratio_latents": _ratio(latents_fp32, known),
    }
    # the attributes as stored, every key: an inspection shows what is on disk (store.metadata, the typed view
    # the trainer reads, keeps only the fields it knows)
    return {"attrs": store.attrs, "buckets": rows, "total": totals, "store_bytes": dir_bytes(store.path)}


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _times(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}x"


def _describe(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in value.items())
    return json.dumps(value)


def format_summary(summary: dict) -> str:
    attrs = summary["attrs"]
    lines = [f"format version: {attrs.get('format_version')}",
             f"vae:            {_describe(attrs.get('vae', {}))}",
             f"text encoder:   {_describe(attrs.get('text_encoder', {}))}",
             f"conditioning:   {_describe(attrs['conditioning']) if 'conditioning' in attrs else '- (text-to-video)'}"]
    provenance = {k: v for k, v in attrs.items() if k not in ENCODER_KEYS}
    lines.append("provenance:     " + (_describe(provenance) if provenance else "-"))
    lines.append("")
    header = ("bucket", "samples", "parts", "bytes", "bytes/sample", "latents/sample", "text/sample",
              "latent shape", "fp32 px / disk", "fp32 lat / disk")
    table = []
    for r in summary["buckets"]:
        shape = "-" if r["latent_shape"] is None else "x".join(map(str, r["latent_shape"])) + f" {r['latent_dtype']}"
        table.append((r["bucket"], str(r["samples"]), str(r["parts"]), human_bytes(r["bytes"]),
                      human_bytes(r["bytes_per_sample"]), human_bytes(r["latent_bytes_per_sample"]),
                      human_bytes(r["text_bytes_per_sample"]), shape, _times(r["ratio_pixels"]),
                      _times(r["ratio_latents"])))
    t = summary["total"]
    table.append(("total", str(t["samples"]), str(t["parts"]), human_bytes(t["bytes"]), human_bytes(t["bytes_per_sample"]),
                  "", "", "", _times(t["ratio_pixels"]), _times(t["ratio_latents"])))
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt(row) for row in table[:-1])
    if table[:-1]:
        lines.append("  ".join("-" * w for w in widths))
    lines.append(fmt(table[-1]))
    lines.append(f"store on disk: {human_bytes(summary['store_bytes'])} ({summary['store_bytes']} bytes)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# One sample


def parse_sample_ref(ref: str) -> tuple:
    """'81x480x832:3' -> ('81x480x832', 3)."""
    bucket, sep, index = ref.rpartition(":")
    if not sep or not bucket or not index.lstrip("-").isdigit():
        raise ValueError(f"--sample wants BUCKET:INDEX, got {ref!r}")
    return bucket, int(index)


def _short_list(values, head: int = 8) -> str:
    values = [int(v) for v in values]
    if len(values) <= 2 * head:
        return str(values)
    return f"[{', '.join(map(str, values[:head]))}, ..., {', '.join(map(str, values[-2:]))}]"


def format_sample(sample: dict, bucket: str, index: int) -> str:
    lat = sample["latents"]
    lat32 = lat.float()
    frames = sample["frame_indices"]
    lines = [f"sample {bucket}:{index}",
             f"  id:            {sample['id']}",
             f"  source:        {sample['source']}",
             f"  caption:       {sample['caption']}",
             f"  fps:           {sample['fps']:g}",
             f"  frame indices: {_short_list(frames)} ({len(frames)} frames)",
             f"  text length:   {sample['text_length']} (states {'x'.join(map(str, sample['text'].shape))} "
             f"{str(sample['text'].dtype).replace('torch.', '')})" if "text" in sample else
             f"  text length:   {sample['text_length']}",
             f"  latents:       {'x'.join(map(str, lat.shape))} {str(lat.dtype).replace('torch.', '')}, "
             f"mean {lat32.mean().item():.4f}, std {lat32.std().item():.4f}, "
             f"min {lat32.min().item():.4f}, max {lat32.max().item():.4f}"]
    if "logvar" in sample:
        lines.append(f"  logvar:        mean {sample['logvar'].float().mean().item():.4f}")
    if "cond_latents" in sample:
        cond = sample["cond_latents"]
        lines.append(f"  cond latents:  {'x'.join(map(str, cond.shape))} {str(cond.dtype).replace('torch.', '')}, "
                     f"mean {cond.float().mean().item():.4f}, std {cond.float().std().item():.4f}")
    if "cond_mask" in sample:
        mask = sample["cond_mask"]
        given = [f"{t}:{''.join(str(int(v)) for v in mask[:, t])}" for t in range(mask.shape[1]) if mask[:, t].any()]
        lines.append(f"  cond mask:     {'x'.join(map(str, mask.shape))}, given latent frames (channels) "
                     f"{', '.join(given) or 'none'}")
    if "clip_tokens" in sample:
        clip = sample["clip_tokens"]
        lines.append(f"  clip tokens:   {'x'.join(map(str, clip.shape))} {str(clip.dtype).replace('torch.', '')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Decoding


def load_vae(weights: str, preset: str, device: str = "cpu"):
    """WanVAE of `preset` with the weights of a file in the megawan / diffusers or the official layout."""
    return load_vae_weights(weights, vae_config_named(preset), device=device)


def vae_preset_name(metadata: StoreMetadata) -> str:
    """The VAE preset the store's latents were made with."""
    vae = metadata.vae
    if vae.preset:
        return vae.preset
    try:  # stores written before "preset" was recorded may name the preset as their VAE name; a trained VAE's
        return vae_config_named(vae.name).name  # store names its exported config.json (tools/export_vae.py)
    except ConfigError:
        pass
    raise ValueError(f"the store does not name a VAE preset (vae = {vae}); pass --vae-config PRESET")


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Raw latents [z, T', H', W'] -> uint8 frames [T, H, W, 3]."""
    z = latents.unsqueeze(0).to(next(vae.parameters()).device)
    return video_to_uint8(vae.decode(z)[0])


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """0 shown; 2 a user error (one line: no such store, sample or id, an unreadable VAE file)."""
    return run_main("inspect_store.py", _main, argv)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="the latent store (.zarr directory)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--sample", metavar="BUCKET:INDEX", help="show this sample, e.g. 81x480x832:0")
    which.add_argument("--id", help="show the sample with this id")
    ap.add_argument("--png", metavar="OUT.png", help="decode the sample (default: the first one) to a contact sheet")
    ap.add_argument("--vae", metavar="WEIGHTS", help="VAE weights (.pth / .safetensors; official or diffusers names)")
    ap.add_argument("--vae-config", metavar="PRESET", help="VAE preset (default: the store's vae.preset)")
    ap.add_argument("--frames", type=int, default=8, help="frames on the sheet, evenly spaced (default 8)")
    ap.add_argument("--columns", type=int, default=4, help="frames per row (default 4)")
    ap.add_argument("--device", default=str(rank_device()))
    args = ap.parse_args(argv)

    try:
        store = LatentStore.open(args.store)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    print(format_summary(summarize(store)))

    bucket = index = None
    if args.id is not None:
        try:
            bucket, index = store.locate(args.id)
        except KeyError as e:
            raise UserError(e.args[0]) from None
    elif args.sample is not None:
        try:
            bucket, index = parse_sample_ref(args.sample)
        except ValueError as e:
            raise UserError(str(e)) from None
        if bucket not in store.buckets():
            raise UserError(f"no bucket {bucket!r} in {args.store} (buckets: {', '.join(store.buckets()) or 'none'})")
        if not 0 <= index < store.count(bucket):
            raise UserError(f"bucket {bucket} has {store.count(bucket)} samples; no index {index}")
    elif args.png:
        nonempty = [b for b in store.buckets() if store.count(b)]
        if not nonempty:
            raise UserError(f"{args.store} has no samples to decode")
        bucket, index = nonempty[0], 0
    if bucket is None:
        return 0

    sample = store.read(bucket, index)
    print()
    print(format_sample(sample, bucket, index))
    if args.png:
        if not args.vae:
            raise UserError("--png needs --vae WEIGHTS")
        try:  # --vae-config first: a store that names no preset (or lacks a field) still decodes with it
            preset = args.vae_config or vae_preset_name(store.metadata)
        except ValueError as e:  # no preset named; StoreMetadataError: a field readers need is missing
            raise UserError(str(e)) from None
        vae = load_vae(args.vae, preset, args.device)
        if vae.vae_config.z_dim != sample["latents"].shape[0]:
            raise UserError(f"the VAE has z_dim={vae.vae_config.z_dim}; the latents have {sample['latents'].shape[0]} "
                             f"channels")
        frames = decode_latents(vae, sample["latents"])
        sheet = contact_sheet(frames, columns=args.columns, max_frames=args.frames)
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        sheet.save(args.png)
        shown = min(args.frames, len(frames)) if args.frames else len(frames)
        print(f"\nwrote {args.png}: {sheet.width}x{sheet.height}, {shown} of {len(frames)} decoded "
              f"{frames.shape[1]}x{frames.shape[2]} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
