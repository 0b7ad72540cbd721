"""The caption tokenizer Wan feeds umT5: sentencepiece with Wan's text cleaning, EOS, padding / truncation to
text_len and the attention mask.

    tok = UMT5Tokenizer("spiece.model", max_length=512)
    ids, mask = tok(["a red ball rolls left", ...])    # LongTensor [B, 512], [B, 512]

Cleaning as Wan's HuggingfaceTokenizer(clean="whitespace"): HTML entities unescaped (twice), text fixed by
ftfy when it is installed, runs of whitespace collapsed to one space, ends stripped.
"""

from __future__ import annotations

import html
import re

import torch


def clean_caption(text: str) -> str:
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    def __init__(self, model_file: str, max_length: int = 512):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.max_length = max_length
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        if self.eos_id < 0 or self.pad_id < 0:
            raise ValueError(f"{model_file}: a T5 sentencepiece model needs pad and eos ids (T5: pad 0, eos 1)")

    def encode(self, text: str) -> list:
        """Token ids of one caption: cleaned, truncated to max_length - 1, then EOS."""
        return self.sp.encode(clean_caption(text))[: self.max_length - 1] + [self.eos_id]

    def __call__(self, texts) -> tuple:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.encode(text)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask
