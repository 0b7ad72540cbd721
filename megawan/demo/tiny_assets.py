"""Tiny encoders for the demo and the tests: a Wan-VAE and a umT5 encoder of the tiny presets, saved in the
official layouts, and a sentencepiece tokenizer trained on the synthetic captions. Nothing here is downloaded;
everything is written as a real user's files would be.

    paths = write_tiny_encoders("work/encoders", vae_config="tiny-2.1")
    # {"vae": ".../Wan2.1_VAE.pth", "text_encoder": ".../models_t5_umt5-tiny-enc.pth", "tokenizer": ".../umt5"}

The umT5 encoder keeps random weights. The VAE is random too unless `train_vae_steps` > 0: then it is first
trained by `megawan train-vae` as an autoencoder of the synthetic shape clips and stills (megawan.demo.tiny_vae:
the report's image stage, then the inflated 3D VAE), so that decoded samples show the shapes in their colours
(TINY_VAE_STEPS is the recommended step count; the demo and the tests use it).
"""

from __future__ import annotations

import io
import os

import torch

from megawan.config import text_preset, vae_preset
from megawan.convert import convert_state_dict
from megawan.demo.shapes import COLORS, DIRECTIONS, SHAPES
from megawan.models.text import UMT5Encoder
from megawan.models.vae import WanVAE

TINY_VAE_STEPS = 500  # `megawan train-vae` (400 + 100 steps), ~1.5-2 min on 2 CPU cores


def _captions() -> list:
    words = [f"a {c} {s} moves {d}" for c in COLORS for s in SHAPES for d in DIRECTIONS]
    return words * 4 + ["a video", "an image", "moving shapes on a dark background"]


def train_tokenizer(folder: str, vocab_size: int = 120) -> str:
    """A sentencepiece model with T5's special ids (pad 0, eos 1, unk 2), as google/umt5-xxl's folder.

    BPE, not umT5's unigram: on these few repeated captions the unigram trainer shrinks to ~40 near-character
    pieces ("cyan" -> "▁c", "y", "an"), so a colour reached the random tiny umT5 as characters shared with
    other words and the demo's DiT confused neighbouring hues on about one held-out prompt in ten. BPE with 120
    pieces keeps every caption word whole, as umT5's 256k-piece vocabulary does for such words."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_captions()), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    return folder


def write_tiny_encoders(out_dir: str, vae_config: str = "tiny-2.1", text_config: str = "tiny", seed: int = 0,
                        train_vae_steps: int = 0, progress: bool = False) -> dict:
    """Write the tiny VAE, umT5 encoder and tokenizer; returns their paths and preset names.

    `train_vae_steps` = 0: the VAE keeps random weights (fast; what most tests need). > 0: it is trained by
    `megawan train-vae` first (megawan.demo.tiny_vae.train_tiny_vae, seeded by `seed`, in `out_dir`/vae_training:
    the report's image stage, then the inflated 3D VAE, from examples/configs/vae/tiny_demo_stage*.yaml), and the
    result also carries "vae_training" (the job's stats: steps, seconds, stages, held-out PSNR / SSIM). Either way
    the umT5 encoder's weights are the same for a given seed.
    """
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    vae_cfg, text_cfg = vae_preset(vae_config), text_preset(text_config)
    vae = WanVAE(vae_cfg)
    training = None
    if train_vae_steps > 0:
        from megawan.demo.tiny_vae import train_tiny_vae  # torch + megatron-core: only when training

        with torch.random.fork_rng(devices=[]):  # the text encoder below: the same weights as without training
            state, _, training = train_tiny_vae(os.path.join(out_dir, "vae_training"), train_vae_steps, seed=seed,
                                                vae_config=vae_config, progress=progress)
        vae.load_state_dict(state)
    vae_path = os.path.join(out_dir, "Wan2.2_VAE.pth" if vae_cfg.is_residual else "Wan2.1_VAE.pth")
    torch.save(convert_state_dict(vae.state_dict(), "megawan", "official", vae_cfg), vae_path)
    text = UMT5Encoder(text_cfg)
    text_sd = {k: v for k, v in text.state_dict().items() if not k.endswith("_extra_state")}
    text_path = os.path.join(out_dir, f"models_t5_umt5-{text_config}-enc.pth")
    torch.save(convert_state_dict(text_sd, "megawan", "official", text_cfg), text_path)
    tokenizer = train_tokenizer(os.path.join(out_dir, "umt5-tokenizer"), vocab_size=min(120, text_cfg.vocab_size))
    paths = {"vae": vae_path, "vae_config": vae_config, "text_encoder": text_path, "text_config": text_config,
             "tokenizer": tokenizer}
    if training is not None:
        paths["vae_training"] = training
    return paths
