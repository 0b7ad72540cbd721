"""How a clip moves: OpenCV's Farneback dense optical flow on frame pairs spread over the clip.

    m = motion_measures(clip.pairs, crop_small)
    # {"motion": 1.9, "camera_motion": 1.7, "object_motion": 0.4, "jitter": 0.05}
    motion_class(m, static_max=0.1, shaky_min=0.6)          # "static" | "shaky" | "camera" | "good"

Per pair of consecutive frames: the camera's motion is the median flow vector (most of the picture moves with
the camera), the objects' the mean distance of the flow from it. Over the pairs: `motion` is the mean flow
magnitude, `jitter` how much the camera's vector varies from pair to pair (its standard deviation as a vector):
a pan or a dolly keeps it steady, a shaking hand flips it. All in % of the frame's longer side per source frame.
"""

from __future__ import annotations

import numpy as np


def motion_measures(pairs: list, crop: list) -> dict:
    """pairs [(frame, next frame)] uint8 RGB [h, w, 3] (read_clip's); crop [x, y, w, h] in their pixels (the
    picture inside black bars)."""
    import cv2

    x, y, w, h = crop

    def gray(frame):
        return cv2.cvtColor(np.ascontiguousarray(frame[y:y + h, x:x + w]), cv2.COLOR_RGB2GRAY)

    scale = 100.0 / max(w, h)
    camera, magnitude, objects = [], [], []
    for a, b in pairs:
        flow = cv2.calcOpticalFlowFarneback(gray(a), gray(b), None, pyr_scale=0.5, levels=3, winsize=9,
                                            iterations=3, poly_n=5, poly_sigma=1.1, flags=0).reshape(-1, 2)
        median = np.median(flow, axis=0)
        camera.append(median)
        magnitude.append(float(np.linalg.norm(flow, axis=1).mean()))
        objects.append(float(np.linalg.norm(flow - median, axis=1).mean()))
    if not camera:  # one frame: nothing moves
        return {"motion": 0.0, "camera_motion": 0.0, "object_motion": 0.0, "jitter": 0.0}
    camera = np.stack(camera)
    jitter = float(np.sqrt(((camera - camera.mean(axis=0)) ** 2).sum(axis=1).mean()))
    return {"motion": round(float(np.mean(magnitude)) * scale, 4),
            "camera_motion": round(float(np.linalg.norm(camera, axis=1).mean()) * scale, 4),
            "object_motion": round(float(np.mean(objects)) * scale, 4), "jitter": round(jitter * scale, 4)}


def motion_class(m: dict, static_max: float, shaky_min: float) -> str:
    """static (nothing moves), shaky (the camera's motion flips between pairs), camera (mostly the camera
    moves: a pan, a dolly) or good (the objects move)."""
    if m["motion"] < static_max:
        return "static"
    if m["jitter"] >= shaky_min:
        return "shaky"
    if m["camera_motion"] >= m["object_motion"]:
        return "camera"
    return "good"
