"""Sampling as the official Wan repos do it per model: steps, shift, guidance (A14B: one scale per expert),
frames, size, fps and the default negative prompt; and the diffusers scheduler config that samples the same way.
"""

from __future__ import annotations

from typing import Optional

# wan/configs/shared_config.py: the negative prompt every official Wan model samples with
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的"
                       "肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

# The official generate.py / wan/configs settings. guidance of A14B: (low-noise expert, high-noise expert).
_OFFICIAL = {
    "wan2.1-t2v-1.3b": dict(frames=81, height=480, width=832, steps=50, shift=5.0, guidance=5.0, fps=16),
    "wan2.1-t2v-14b": dict(frames=81, height=720, width=1280, steps=50, shift=5.0, guidance=5.0, fps=16),
    "wan2.1-i2v-14b": dict(frames=81, height=720, width=1280, steps=40, shift=5.0, guidance=5.0, fps=16),
    "wan2.1-flf2v-14b": dict(frames=81, height=720, width=1280, steps=50, shift=16.0, guidance=5.0, fps=16),
    "wan2.2-t2v-a14b": dict(frames=81, height=720, width=1280, steps=40, shift=12.0, guidance=(3.0, 4.0), fps=16),
    "wan2.2-i2v-a14b": dict(frames=81, height=720, width=1280, steps=40, shift=5.0, guidance=(3.5, 3.5), fps=16),
    "wan2.2-ti2v-5b": dict(frames=121, height=704, width=1280, steps=50, shift=5.0, guidance=5.0, fps=24),
}
_TINY = dict(frames=17, height=32, width=48, steps=25, shift=3.0, guidance=3.0, fps=16)


def official_defaults(preset: str, model_type: str = "t2v", expert_boundary: Optional[float] = None,
                      height: Optional[int] = None, width: Optional[int] = None, area: Optional[int] = None) -> dict:
    """Sampling defaults of a model preset as the official repos set them; tiny presets get the demo's.
    `area`: image-to-video sized from the image within this many pixels (the official --size of I2V)."""
    d = dict(_OFFICIAL.get(preset, _TINY))
    if preset not in _OFFICIAL and expert_boundary is not None:
        d["guidance"] = (d["guidance"], d["guidance"])
    # Wan2.1 generate.py: image-to-video at 480p samples with shift 3
    if preset == "wan2.1-i2v-14b" and ({height, width} == {480, 832} or area == 480 * 832):
        d["shift"] = 3.0
    d["negative_prompt"] = WAN_NEGATIVE_PROMPT
    return d


def diffusers_scheduler_config_json(cfg) -> dict:
    """diffusers' UniPCMultistepScheduler config.json sampling `cfg` (a DiTConfig) with its official shift."""
    d = official_defaults(cfg.name, cfg.model_type, cfg.expert_boundary)
    return {"_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0", "num_train_timesteps": 1000,
            "solver_order": 2, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
            "flow_shift": d["shift"], "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
            "final_sigmas_type": "zero", "thresholding": False, "timestep_spacing": "linspace"}
