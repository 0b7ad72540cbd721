"""Judging a trained model: `megawan eval` (runner) generates for a prompt set and scores it (synthetic_suite:
colour / shape / direction of the shape clips; fvd + i3d: Fréchet Video Distance; VAE reconstruction through
megawan.vae_eval), one comparable row per run (results). docs/evaluation.md."""
