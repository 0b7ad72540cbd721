"""Tiny random encoders for the demo and the tests: a Wan-VAE and a umT5 encoder of the tiny presets with
random weights, saved in the official layouts, and a sentencepiece tokenizer trained on the synthetic
captions. Nothing here is downloaded; everything is written as a real user's files would be.

    paths = write_tiny_encoders("work/encoders", vae_config="tiny-2.1")
    # {"vae": ".../Wan2.1_VAE.pth", "text_encoder": ".../models_t5_umt5-tiny-enc.pth", "tokenizer": ".../umt5"}
"""

from __future__ import annotations

import io
import os

import torch

from megawan.data.synthetic import COLORS, DIRECTIONS, SHAPES


def _captions() -> list:
    words = [f"a {c} {s} moves {d}" for c in COLORS for s in SHAPES for d in DIRECTIONS]
    return words * 4 + ["a video", "an image", "moving shapes on a dark background"]


def train_tokenizer(folder: str, vocab_size: int = 120) -> str:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2), as google/umt5-xxl's folder."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_captions()), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    return folder


def write_tiny_encoders(out_dir: str, vae_config: str = "tiny-2.1", text_config: str = "tiny", seed: int = 0) -> dict:
    from megawan.config import text_preset, vae_preset
    from megawan.convert import convert_state_dict
    from megawan.models.text import UMT5Encoder
    from megawan.models.vae import WanVAE

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    vae_cfg, text_cfg = vae_preset(vae_config), text_preset(text_config)
    vae = WanVAE(vae_cfg)
    vae_path = os.path.join(out_dir, "Wan2.2_VAE.pth" if vae_cfg.is_residual else "Wan2.1_VAE.pth")
    torch.save(convert_state_dict(vae.state_dict(), "megawan", "official", vae_cfg), vae_path)
    text = UMT5Encoder(text_cfg)
    text_sd = {k: v for k, v in text.state_dict().items() if not k.endswith("_extra_state")}
    text_path = os.path.join(out_dir, f"models_t5_umt5-{text_config}-enc.pth")
    torch.save(convert_state_dict(text_sd, "megawan", "official", text_cfg), text_path)
    tokenizer = train_tokenizer(os.path.join(out_dir, "umt5-tokenizer"), vocab_size=min(120, text_cfg.vocab_size))
    return {"vae": vae_path, "vae_config": vae_config, "text_encoder": text_path, "text_config": text_config,
            "tokenizer": tokenizer}
