"""The tiny image-to-video task: the first frame fixes the shape and its colour, the caption says where it moves.

Its metric reads generated frames the way the colour metric does (shape pixels = far from the background):
`motion_direction` follows the centroid of those pixels from the first to the last frame that shows them.
"""

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
