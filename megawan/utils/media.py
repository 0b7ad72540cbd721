"""Frames to files and back: a clip (more than one frame) is an H.264 mp4, a still (one frame) a png.

    path = os.path.join(folder, name + media_suffix(len(frames)))
    write_media(path, frames, fps=16)                 # uint8 [T, H, W, 3]: mp4 (+ a .webp preview) when T > 1,
                                                      # else png
    frames = read_media(path)                         # uint8 [T, H, W, 3] again (lossy for mp4)
    write_video("clip.webm", frames, codec="libvpx-vp9")

A clip written by write_media gets an animated preview beside it, the same name with `.webp` (small frames
enlarged, megawan.utils.images.enlarge_frames): a browser, a file manager, GitHub or a chat shows it moving
where an mp4 needs a player. write_video writes the one file it is asked for (training clips stay alone in
their folders, where a folder scan must not take a preview for a clip).

PyAV and PIL are imported when used: a png alone does not load FFmpeg.
"""

from __future__ import annotations

import os

import numpy as np

VIDEO_SUFFIX, IMAGE_SUFFIX, PREVIEW_SUFFIX = ".mp4", ".png", ".webp"
PREVIEW_MIN_HEIGHT, PREVIEW_MAX_SIDE = 128, 640  # tiny demo frames shown 4x; 720p clips shrunk to a preview


def media_suffix(num_frames: int) -> str:
    """".mp4" for a clip, ".png" for a still (one frame)."""
    return VIDEO_SUFFIX if num_frames > 1 else IMAGE_SUFFIX


def write_video(path: str, frames: np.ndarray, fps: int = 16, codec: str = "libx264", crf: int = 18) -> None:
    """Encode uint8 [T, H, W, 3] frames with PyAV (mp4 / H.264 by default, at x264's `crf`; `libvpx-vp9` for
    webm). The same frames give the same bytes in every process: x264's macroblock-tree rate control is off
    (mbtree=0). With it on, identical frames were encoded differently from run to run whenever processes ran side by
    side (the demo's 64 clips of 17 x 32 x 32: 8 concurrent processes, 5 to 8 different decoded results, with one
    x264 thread too; with mbtree=0, 16 of 16 identical, any thread count), and the demo's VAE trained on them
    came out different."""
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_image(path: str, frame: np.ndarray) -> None:
    """One uint8 [H, W, 3] frame as an image (the format from the suffix: png, jpg, …)."""
    from PIL import Image

    Image.fromarray(frame).save(path)


def write_media(path: str, frames: np.ndarray, fps: int = 16, preview: bool = True) -> None:
    """uint8 [T, H, W, 3]: an mp4 when T > 1 (and with `preview` its animated preview, preview_path(path)),
    else a png of the one frame (`path` names the file as given; media_suffix(T) says which suffix it should
    carry)."""
    if frames.shape[0] > 1:
        write_video(path, frames, fps=fps)
        if preview:
            write_preview(preview_path(path), frames, fps=fps)
    else:
        write_image(path, frames[0])


def preview_path(path: str) -> str:
    """Where the animated preview of the clip `path` goes: the same name, `.webp`."""
    return os.path.splitext(path)[0] + PREVIEW_SUFFIX


def write_preview(path: str, frames: np.ndarray, fps: int = 16) -> None:
    """uint8 [T, H, W, 3] as an animated image that loops (WebP; a `.gif` path writes a GIF): frames lower than
    PREVIEW_MIN_HEIGHT enlarged by a whole factor (nearest neighbour), a longer side above PREVIEW_MAX_SIDE shrunk.
    """
    from PIL import Image

    from megawan.utils.images import enlarge_frames  # here: images.py imports torch, a png write needs none

    pictures = [Image.fromarray(f) for f in enlarge_frames(frames, PREVIEW_MIN_HEIGHT, PREVIEW_MAX_SIDE)]
    options = {"quality": 90} if path.lower().endswith(PREVIEW_SUFFIX) else {}
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0,
                     **options)


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
