"""umT5 text encoder and its sentencepiece tokenizer."""

from megawan.models.text.encoder import UMT5Encoder
from megawan.models.text.tokenizer import UMT5Tokenizer

__all__ = ["UMT5Encoder", "UMT5Tokenizer"]
