"""A tiny joint image + video dataset, precomputed end to end: the demo and the trainer tests train on it.

    store, encoders = make_tiny_dataset("work", videos=24, images=16)   # -> work/latents.zarr, work/encoders/...
"""

from __future__ import annotations

import json
import os
import random

from megawan.data.precompute import PrecomputeJob, run_precompute
from megawan.demo.shapes import COLORS, DIRECTIONS, SHAPES, ShapeClip, render, write_synthetic_dataset
from megawan.demo.tiny_assets import write_tiny_encoders
from megawan.utils.media import write_image

VIDEO_BUCKET = "17x32x48"
IMAGE_BUCKET = "1x32x32"


def write_images(folder: str, count: int, size: int = 32, seed: int = 1) -> list:
    """PNG stills of the shapes (caption: "a red circle"), as manifest rows."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        clip = ShapeClip(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS)))
        frame = render(clip, 2, size, size, seed=seed * 7919 + i)[0]
        name = f"image_{i:05d}.png"
        write_image(os.path.join(folder, name), frame)
        rows.append({"id": f"image_{i:05d}", "path": os.path.join(folder, name), "caption": f"a {clip.color} {clip.shape}"})
    return rows


def make_tiny_dataset(root: str, videos: int = 24, images: int = 16, broken: int = 0, seed: int = 0,
                      progress: bool = False, held_out_videos: int = 0, held_out_images: int = 0,
                      encoders: dict | None = None, train_vae_steps: int = 0,
                      conditioning: str | None = None) -> tuple:
    """(store path, encoder paths): synthetic clips + stills -> tiny encoders -> a precomputed store.

    held_out_videos / held_out_images > 0 also write <root>/held_out.zarr from other clips and stills (other
    seeds), encoded by the same encoders: the validation store. `encoders` reuses existing encoder files;
    `train_vae_steps` trains the tiny VAE as an autoencoder of the shapes first (so decoded samples show them).
    `conditioning` ("i2v" | "flf2v") precomputes image-conditioned stores (the image-to-video task): clips only,
    so `images` and `held_out_images` must be 0.
    """
    if conditioning and (images or held_out_images):
        raise ValueError(f"an image-conditioned store ({conditioning}) holds clips only: images and held_out_images "
                         "must be 0")
    root = os.path.abspath(root)
    if encoders is None:
        kwargs = {"train_vae_steps": train_vae_steps} if train_vae_steps else {}
        encoders = write_tiny_encoders(os.path.join(root, "encoders"), seed=seed, progress=progress, **kwargs)
    store = _precompute_split(root, "latents", encoders, videos, images, broken, seed, progress, conditioning)
    if held_out_videos or held_out_images:
        _precompute_split(root, "held_out", encoders, held_out_videos, held_out_images, 0, seed + 7_777, progress,
                          conditioning)
    return store, encoders


def _precompute_split(root: str, name: str, encoders: dict, videos: int, images: int, broken: int, seed: int,
                      progress: bool, conditioning: str | None = None) -> str:
    video_dir = os.path.join(root, "videos" if name == "latents" else f"{name}_videos")
    manifest = write_synthetic_dataset(video_dir, count=videos, frames=17, height=32, width=48, broken=broken,
                                       seed=seed)
    rows = [json.loads(line) for line in open(manifest, encoding="utf-8")]
    for row in rows:
        row["path"] = os.path.join(video_dir, row["path"])
        row["id"] = f"{name}_{row['id']}" if name != "latents" else row["id"]
    image_rows = write_images(os.path.join(root, "images" if name == "latents" else f"{name}_images"), images,
                              seed=seed + 1)
    for row in image_rows:
        row["id"] = f"{name}_{row['id']}" if name != "latents" else row["id"]
    rows += image_rows
    joint = os.path.join(root, "manifest.jsonl" if name == "latents" else f"{name}.jsonl")
    with open(joint, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    store = os.path.join(root, f"{name}.zarr")
    job = PrecomputeJob(manifest=joint, out=store, vae=encoders["vae"], vae_config=encoders["vae_config"],
                        text_encoder=encoders["text_encoder"], text_config=encoders["text_config"],
                        tokenizer=encoders["tokenizer"], buckets=[VIDEO_BUCKET] if conditioning else
                        [VIDEO_BUCKET, IMAGE_BUCKET], conditioning=conditioning, decode_workers=2)
    run_precompute(job, progress=progress)
    return store
