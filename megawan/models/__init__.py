"""Models: the Wan DiT (dit/; its pipeline stages, recompute and offload are applied from outside by
dit/parallelize.py), the Wan-VAE (vae/) and the umT5 text encoder and tokenizer (text/)."""
