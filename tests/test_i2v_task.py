"""The tiny image-to-video task: the first frame fixes the shape and its colour, the caption says where it moves.

Its metric reads generated frames the way the colour metric does (shape pixels = far from the background):
`motion_direction` follows the centroid of those pixels from the first to the last frame that shows them.
The task itself (`megawan demo --task i2v`) trains a tiny Wan2.2-I2V-style model on one CPU rank from an
image-conditioned store and samples the 24 held-out clips from their first frames: at least 90 % must keep the
first frame's colour and at least 80 % must move the way their caption says.
"""

import json

import numpy as np

from megawan.demo.shapes import (BACKGROUND, COLORS, DIRECTIONS, SHAPES, ShapeClip, caption_direction,
                                 centroid_track, motion_direction, render)


def test_motion_direction_reads_every_rendered_clip():
    for color in COLORS:
        for shape in SHAPES:
            for direction in DIRECTIONS:
                clip = ShapeClip(color, shape, direction)
                assert caption_direction(clip.caption) == direction
                for seed in range(2):
                    assert motion_direction(render(clip, 17, 32, 48, seed=seed)) == direction


def test_a_still_shape_or_an_empty_clip_has_no_direction():
    still = np.repeat(render(ShapeClip("red", "circle", "left"), 1, 32, 48)[:1], 17, axis=0)
    assert motion_direction(still) is None
    empty = np.empty((5, 32, 48, 3), dtype=np.uint8)
    empty[:] = BACKGROUND
    assert centroid_track(empty) == [None] * 5 and motion_direction(empty) is None
    assert caption_direction("a red circle") is None


def test_tiny_i2v_model_keeps_the_first_frame_and_moves_it_as_the_caption_says(tmp_path, trained_encoders):
    from megawan.demo.i2v_task import I2V_STEPS, run_i2v_task

    summary = run_i2v_task(str(tmp_path / "i2v"), encoders=trained_encoders)
    accuracy = json.load(open(tmp_path / "i2v" / "i2v_accuracy.json"))
    assert accuracy["total"] == 24 and summary["validation"].endswith(f"step-{I2V_STEPS:07d}")
    assert accuracy["color_accuracy"] >= 0.9, accuracy
    assert accuracy["direction_accuracy"] >= 0.8, accuracy
