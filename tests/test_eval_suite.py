"""The synthetic suite of `megawan eval` (megawan.evaluation.synthetic_suite) on clips with known answers: every
colour x shape x direction rendered by megawan.demo.shapes (what the demo trains on) is read right on all three
checks, also after an H.264 round trip (what generated clips go through); a clip that shows something else is
scored wrong on that check."""

import itertools

import numpy as np

from megawan.demo.shapes import COLORS, DIRECTIONS, SHAPES, ShapeClip, render
from megawan.evaluation.synthetic_suite import score_clip, shape_of, suite_accuracy, suite_prompts
from megawan.utils.media import read_video, write_video

ALL = [ShapeClip(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]


def _caption_clip(caption):
    _, color, shape, _, direction = caption.split()
    return ShapeClip(color, shape, direction)


def test_the_suite_reads_every_rendered_clip_right():
    for height, width in ((32, 48), (64, 64)):  # the demo's sample size, and its training clips'
        rows = [score_clip(render(clip, 17, height, width, seed=i), clip.caption, str(i)) for i, clip in enumerate(ALL)]
        summary = suite_accuracy(rows)
        print(height, width, {k: summary[k] for k in ("color", "shape", "direction")})
        assert (summary["color"], summary["shape"], summary["direction"]) == (1.0, 1.0, 1.0)
        assert summary["shape_total"] == len(ALL) == 72
    assert shape_of(render(ShapeClip("red", "triangle", "up"), 1, 64, 64)[0]) == "triangle"  # one image


def test_the_suite_prompts_through_h264_and_a_wrong_clip(tmp_path):
    prompts = suite_prompts()
    clips = [_caption_clip(p) for p in prompts]
    # each colour in two shapes, each shape and direction equally often
    assert len(set(prompts)) == 12 and len({(c.color, c.shape) for c in clips}) == 12
    assert sorted(c.shape for c in clips) == sorted(SHAPES * 4)
    rows = []
    for i, (prompt, clip) in enumerate(zip(prompts, clips)):
        path = str(tmp_path / f"{i}.mp4")
        write_video(path, render(clip, 17, 32, 48, seed=i), fps=16)
        rows.append(score_clip(read_video(path), prompt, str(i)))
    summary = suite_accuracy(rows)
    assert (summary["color"], summary["shape"], summary["direction"]) == (1.0, 1.0, 1.0), summary

    # a blue square that moves down, scored against another caption; a still clip has no direction
    wrong = score_clip(render(ShapeClip("blue", "square", "down"), 17, 32, 48), "a red circle moves up")
    assert (wrong["color"], wrong["shape"], wrong["direction"]) == ("blue", "square", "down")
    assert not (wrong["color_ok"] or wrong["shape_ok"] or wrong["direction_ok"])
    still = np.repeat(render(ShapeClip("green", "circle", "left"), 1, 32, 48), 9, axis=0)
    row = score_clip(still, "a green circle moves left")
    assert row["color_ok"] and row["shape_ok"] and row["direction"] is None and row["direction_ok"] is False
    # a prompt that names no shape is not judged on shape
    assert suite_accuracy([score_clip(still, "something green")])["shape"] is None
