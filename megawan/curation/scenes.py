"""Scene cuts: PySceneDetect's ContentDetector (HSV difference of consecutive frames) on the analysis frames,
fed one by one as read_clip decodes them (no frame is kept).

    shots = SceneSplitter(threshold=27.0, min_scene_frames=8)
    clip = read_clip(path, on_frame=shots.add)
    shots.scenes(clip.end)     # [[0.0, 1.0625], [1.0625, 2.5]]: [start_s, end_s) of each shot, seconds of the file

A cut is placed at the first frame of the new shot.
"""

from __future__ import annotations

import numpy as np


class SceneSplitter:
    def __init__(self, threshold: float = 27.0, min_scene_frames: int = 8):
        from scenedetect import ContentDetector

        self.detector = ContentDetector(threshold=threshold, min_scene_len=min_scene_frames)
        self.times, self.cuts = [], []

    def _timecode(self, i: int):
        from scenedetect.common import FrameTimecode

        return FrameTimecode(i, fps=100.0)  # frame numbers are what matter; the cuts come back as them

    def add(self, frame: np.ndarray, t: float) -> None:
        """The next frame (uint8 RGB [h, w, 3]) and its time in seconds."""
        # ContentDetector reads OpenCV's BGR
        found = self.detector.process_frame(self._timecode(len(self.times)), np.ascontiguousarray(frame[..., ::-1]))
        self.times.append(t)
        self.cuts += [c.frame_num for c in found]

    def scenes(self, end: float) -> list:
        """[[start_s, end_s], ...] covering the first frame's time .. end."""
        if not self.times:
            return []
        self.cuts += [c.frame_num for c in self.detector.post_process(self._timecode(len(self.times) - 1))]
        times = self.times
        bounds = [times[0]] + [times[i] for i in sorted(set(self.cuts)) if 0 < i < len(times)] + [float(end)]
        return [[round(a, 4), round(b, 4)] for a, b in zip(bounds[:-1], bounds[1:])]
