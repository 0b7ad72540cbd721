"""Frames to files and back: a clip (more than one frame) is an H.264 mp4, a still (one frame) a png.

    path = os.path.join(folder, name + media_suffix(len(frames)))
    write_media(path, frames, fps=16)                 # uint8 [T, H, W, 3]: mp4 when T > 1, else png
    frames = read_media(path)                         # uint8 [T, H, W, 3] again (lossy for mp4)
    write_video("clip.webm", frames, codec="libvpx-vp9")

PyAV and PIL are imported when used: a png alone does not load FFmpeg.
"""

from __future__ import annotations

import os

import numpy as np

VIDEO_SUFFIX, IMAGE_SUFFIX = ".mp4", ".png"


def media_suffix(num_frames: int) -> str:
    """".mp4" for a clip, ".png" for a still (one frame)."""
    return VIDEO_SUFFIX if num_frames > 1 else IMAGE_SUFFIX


def write_video(path: str, frames: np.ndarray, fps: int = 16, codec: str = "libx264") -> None:
    """Encode uint8 [T, H, W, 3] frames with PyAV (mp4 / H.264 by default; `libvpx-vp9` for webm)."""
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_image(path: str, frame: np.ndarray) -> None:
    """One uint8 [H, W, 3] frame as an image (the format from the suffix: png, jpg, …)."""
    from PIL import Image

    Image.fromarray(frame).save(path)


def write_media(path: str, frames: np.ndarray, fps: int = 16) -> None:
    """uint8 [T, H, W, 3]: an mp4 when T > 1, else a png of the one frame (`path` names the file as given;
    media_suffix(T) says which suffix it should carry)."""
    if frames.shape[0] > 1:
        write_video(path, frames, fps=fps)
    else:
        write_image(path, frames[0])


def read_video(path: str) -> np.ndarray:
    """Every frame of a video file's first video stream, uint8 [T, H, W, 3]."""
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def read_media(path: str) -> np.ndarray:
    """uint8 [T, H, W, 3] of what write_media wrote: the frames of an mp4, or a png as one frame."""
    if os.path.splitext(path)[1].lower() == VIDEO_SUFFIX:
        return read_video(path)
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))[None]
