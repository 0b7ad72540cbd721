"""Scene cuts: PySceneDetect's ContentDetector (HSV difference of consecutive frames) on the analysis frames.

    scenes = split_scenes(clip.small, clip.times, end=clip.end, threshold=27.0, min_scene_frames=8)
    # [[0.0, 1.0625], [1.0625, 2.5]]: [start_s, end_s) of each shot, seconds of the file

The frames are the ones read_clip already decoded, so the clip is read once. A cut is placed at the first frame
of the new shot.
"""

from __future__ import annotations

import numpy as np


def split_scenes(frames: np.ndarray, times: np.ndarray, end: float, threshold: float = 27.0,
                 min_scene_frames: int = 8) -> list:
    """[[start_s, end_s], ...] covering times[0] .. end; frames uint8 RGB [T, h, w, 3]."""
    from scenedetect import ContentDetector
    from scenedetect.common import FrameTimecode

    detector = ContentDetector(threshold=threshold, min_scene_len=min_scene_frames)
    cuts = []
    for i, frame in enumerate(frames):
        # ContentDetector reads OpenCV's BGR; the frame number is what its cuts come back as
        found = detector.process_frame(FrameTimecode(i, fps=100.0), np.ascontiguousarray(frame[..., ::-1]))
        cuts += [c.frame_num for c in found]
    cuts += [c.frame_num for c in detector.post_process(FrameTimecode(len(frames) - 1, fps=100.0))]
    bounds = [float(times[0])] + [float(times[i]) for i in sorted(set(cuts)) if 0 < i < len(times)] + [float(end)]
    return [[round(a, 4), round(b, 4)] for a, b in zip(bounds[:-1], bounds[1:])]
