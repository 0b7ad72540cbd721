"""Models: the Wan DiT (dit/), and later the Wan-VAE and umT5 text encoder."""
