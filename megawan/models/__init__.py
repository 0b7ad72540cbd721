"""Models: the Wan DiT (dit/; its pipeline stages, recompute and offload are applied from outside by
dit/parallelize.py), the Wan-VAE (vae/), the umT5 text encoder and tokenizer (text/)
and the CLIP image encoder of Wan2.1 I2V / FLF2V (clip.py)."""
