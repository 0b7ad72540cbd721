"""NVIDIA DALI video decoding, beside the PyAV path in `megawan.data.video` and with the same result.

    frames = decode_video_dali("clip.webm", fps=16, num_frames=81)                  # DALI on the CPU
    frames = decode_video_dali("clip.mp4", fps=16, device="gpu")                    # NVDEC on this rank's GPU

    clip = select_frames("clip.mp4", fps=16, num_frames=81, device="gpu")           # which frames; their size
    video = decode_clip_dali("clip.mp4", clip, height=480, width=832, device="gpu")  # the VAE's input, on the GPU

The op is `fn.decoders.video` (DALI >= 2.0; `fn.experimental.decoders.video` is its deprecated alias): it
decodes one in-memory file and takes an explicit list of frame indices (`frames=`), so the clip is chosen here,
by timestamps, exactly as the PyAV path chooses it (`decoding.frame_indices`). `fn.readers.video` and
`fn.experimental.readers.video` are epoch readers over file lists with a fixed sequence length and stride: they
cannot pick "the last frame shown at or before t" of a variable-frame-rate file, nor one window of one file.

Where each decoder runs:
- device="cpu": DALI's libavcodec build, which decodes VP8, VP9 and MJPEG only. It refuses H.264 / HEVC / AV1 /
  MPEG-4 (patent-encumbered codecs are left out of the CPU build), so those raise `UnsupportedCodecError` here,
  before DALI is asked (a refused file would otherwise poison the pipeline), and callers fall back to PyAV.
- device="gpu": the "mixed" op (container parsing on the CPU, NVDEC on the GPU), for H.264, HEVC, AV1, VP8,
  VP9, MJPEG and MPEG-4; only behind `megawan.capabilities.cuda_available()`, on the rank's own GPU
  (`device_id` defaults to `capabilities.rank_device()`, which `megawan.parallel.initialize` set from LOCAL_RANK).

`decode_clip_dali` also prepares the clip inside the pipeline, on the decoder's device: resize + centre crop to a
bucket with the CPU path's geometry (`buckets.cover_crop`), scaled to [-1, 1] and laid out [3, T, H, W] float32,
as `buckets.resize_center_crop` gives it; on the GPU the result is copied device to device into a CUDA torch
tensor and never visits the host.

Frame numbering: DALI numbers a file's frames by its video packets sorted by pts (dts where a packet has no pts;
a file with neither is refused). `_probe` reads the same packets with PyAV's demuxer (no decoding, cheap), so
index k here is DALI's frame k, which also makes variable-frame-rate files come out right.

DALI is imported inside the functions: megawan imports, and the PyAV path works, where DALI is not installed.
"""

from __future__ import annotations

import functools
import importlib
import threading
from typing import NamedTuple, Optional

import numpy as np

from megawan import capabilities
from megawan.data.buckets import CoverCrop, cover_crop
from megawan.data.decoding import DecodeError, UnsupportedCodecError, check_crop, frame_indices, open_video

# codec names as FFmpeg's avcodec_get_name gives them (PyAV: codec_context.codec.canonical_name)
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = frozenset({"h264", "hevc", "av1", "mpeg4", "vp8", "vp9", "mjpeg"})
DEVICES = ("cpu", "gpu")


@functools.lru_cache(maxsize=None)
def dali_available() -> bool:
    """DALI's Python package is importable (a CUDA device is asked separately, by megawan.capabilities)."""
    try:
        importlib.import_module("nvidia.dali.fn")
    except Exception:  # not installed (ImportError), or a wheel for another CUDA / Python failing at import
        return False
    return True


class Selection(NamedTuple):
    """The frames of a clip (DALI's frame indices, ascending, repeated where the target fps is above the
    source's) and the size they decode to."""

    frames: np.ndarray
    height: int
    width: int


def select_frames(path: str, fps: float = 16.0, num_frames: Optional[int] = None, start: Optional[float] = None,
                  end: Optional[float] = None, device: str = "cpu") -> Selection:
    """The clip `decode_video_dali` would decode, chosen from the container alone (nothing is decoded).

    Raises DecodeError for a file that cannot give the clip, UnsupportedCodecError (a DecodeError) for a codec
    this device's decoder does not take, RuntimeError for device="gpu" without CUDA or for DALI missing.
    """
    _check_device(device)
    codec, times, height, width = _probe(path)
    supported = CPU_CODECS if device == "cpu" else GPU_CODECS
    if codec not in supported:
        where = "on CPU" if device == "cpu" else "on GPU (NVDEC)"
        raise UnsupportedCodecError(path, codec, f"codec {codec} is not decodable by DALI {where} "
                                                 f"(it takes {', '.join(sorted(supported))}); decode it with PyAV")
    # the window as the PyAV path cuts it: frames shown from `start` (1 µs slack) until the first at or after `end`
    keep = np.ones(len(times), dtype=bool)
    if start is not None:
        keep &= times >= start - 1e-6
    if end is not None:
        keep &= times < end
    in_window = np.flatnonzero(keep)
    if len(in_window) == 0:
        raise DecodeError(path, "no decodable frames in the requested window")
    chosen = in_window[frame_indices(path, times[in_window], fps, num_frames, start, end)]
    return Selection(chosen.astype(np.int32), height, width)


def decode_video_dali(path: str, fps: float = 16.0, num_frames: Optional[int] = None, start: Optional[float] = None,
                      end: Optional[float] = None, device: str = "cpu", device_id: Optional[int] = None,
                      output: str = "numpy"):
    """uint8 frames [T, H, W, 3] at `fps`, as `megawan.data.video.decode_video` gives them, decoded by DALI.

    device: "cpu" (VP8 / VP9 / MJPEG) or "gpu" (NVDEC on `device_id`, by default this rank's GPU). output:
    "numpy" (default), or "torch" for a torch tensor (on cuda:device_id when device="gpu", so the frames need not
    come back to the host). Raises as `select_frames` does.
    """
    if output not in ("numpy", "torch"):
        raise ValueError(f"unknown output {output!r} (numpy | torch)")
    chosen = select_frames(path, fps, num_frames, start, end, device).frames
    # each distinct frame is decoded once, in file order (DALI then reads forward instead of seeking back);
    # repeats (target fps above the source's) are copies made afterwards
    unique, inverse = np.unique(chosen, return_inverse=True)
    device_id = _device_id(device, device_id)
    (out,) = _run(path, unique, device, device_id)
    if device == "gpu":
        frames = _to_torch_cuda(out, device_id)[0] if output == "torch" else out.as_cpu().as_array()[0]
    else:
        frames = out.as_array()[0]  # a copy: DALI reuses its buffers on the next run
    if len(frames) != len(unique):
        raise DecodeError(path, f"DALI returned {len(frames)} frames, {len(unique)} asked")
    if output == "torch":
        import torch

        frames = frames if device == "gpu" else torch.from_numpy(frames)
        return frames[torch.as_tensor(inverse, device=frames.device)]
    return frames[inverse]


def decode_clip_dali(path: str, clip: Selection, height: int, width: int, device: str = "gpu",
                     device_id: Optional[int] = None, crop: Optional[tuple] = None):
    """The clip ready for the VAE: float32 [3, T, height, width] in [-1, 1], T = len(clip.frames).

    clip: what `select_frames` gave for this file (cut to a bucket's length: `clip._replace(frames=...[:n])`).
    crop: a manifest row's box (x, y, w, h) in source pixels (a letterbox's picture): the decoded frames are
    sliced to it on the decoder's device before the resize, which then sees a w x h clip.
    Decoded, resized and centre-cropped (`buckets.cover_crop`) by DALI on `device`: "gpu" gives a tensor on
    cuda:device_id (by default this rank's GPU) that never went through host memory; "cpu" runs the same graph
    on the CPU and gives a CPU tensor. The result is `resize_center_crop` of the decoded frames up to float
    rounding, except a level or so at the frame's border (DALI and torch end the antialiasing filter differently).
    """
    import torch

    _check_device(device)
    unique, inverse = np.unique(np.asarray(clip.frames, dtype=np.int32), return_inverse=True)
    device_id = _device_id(device, device_id)
    box_height, box_width = check_crop(crop, clip.height, clip.width, path)
    window = window_inputs(cover_crop(box_height, box_width, height, width))
    if crop is not None:
        window.update(box_inputs(crop))
    video, decoded = _run(path, unique, device, device_id, window)
    # the resize was sized from the probed frame size: a decoder that disagrees would distort the clip silently
    shape = tuple(int(v) for v in decoded.as_array()[0])  # [F, H, W, C] as decoded
    if shape != (len(unique), clip.height, clip.width, 3):
        raise DecodeError(path, f"DALI decoded {shape[0]} frames of {shape[2]}x{shape[1]}, "
                                f"{len(unique)} of {clip.width}x{clip.height} expected")
    video = _to_torch_cuda(video, device_id)[0] if device == "gpu" else torch.from_numpy(video.as_array()[0])
    if len(unique) != len(clip.frames):  # repeated frames: copies along T, made on the tensor's own device
        video = video[:, torch.as_tensor(inverse, device=video.device)]
    return video


def window_inputs(crop: CoverCrop) -> dict:
    """What the resizing pipeline is fed for one clip: `size` (resize to crop.resized, [H, W]), `crop` (the
    window's [H, W]) and `crop_pos` ([y, x]). DALI places a window by a fraction of the slack, x = pos * (W -
    crop_W), truncated to an integer; aiming the fraction at the middle of the wanted pixel keeps float32
    rounding from moving the window by one."""
    slack = (crop.resized[0] - crop.height, crop.resized[1] - crop.width)
    pos = [(offset + 0.5) / extra if extra else 0.0 for offset, extra in zip((crop.top, crop.left), slack)]
    return {"size": np.array(crop.resized, dtype=np.float32),
            "crop": np.array([crop.height, crop.width], dtype=np.float32),
            "crop_pos": np.array(pos, dtype=np.float32)}


def box_inputs(crop: tuple) -> dict:
    """What the cropping pipeline is fed beside `window_inputs`: the box's `box_anchor` [y, x] and `box_shape`
    [h, w] in source pixels, for the slice of the decoded [F, H, W, C] frames along H and W."""
    x, y, w, h = crop
    return {"box_anchor": np.array([y, x], dtype=np.int32), "box_shape": np.array([h, w], dtype=np.int32)}


def resize_args() -> dict:
    """The fixed arguments of the resize + crop, the same on both devices: antialiased linear filtering like
    torch's F.interpolate(mode="bilinear", antialias=True) in `resize_center_crop`, float output (nothing is
    rounded to uint8 between the resize and the [-1, 1] scaling), truncating window placement (`window_inputs`)."""
    import nvidia.dali.types as types

    return {"interp_type": types.INTERP_LINEAR, "antialias": True, "dtype": types.FLOAT, "rounding": "truncate"}


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"unknown DALI device {device!r} (cpu | gpu)")
    if device == "gpu" and not capabilities.cuda_available():
        raise RuntimeError("DALI GPU decoding (dali-gpu) needs a CUDA device; use dali-cpu (VP8 / VP9 / MJPEG) "
                           "or pyav (every codec)")
    if not dali_available():
        raise RuntimeError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda120); use the PyAV backend")


def _device_id(device: str, device_id: Optional[int]) -> Optional[int]:
    """The GPU a "gpu" decode runs on: the one asked, else this rank's. Resolved in the calling thread, since
    torch's current device is per thread (a decoding thread pool would otherwise see cuda:0)."""
    if device != "gpu":
        return None
    return capabilities.rank_device().index if device_id is None else device_id


def _probe(path: str) -> tuple:
    """(codec name, presentation time in seconds of each frame in DALI's numbering, frame height, frame width),
    from the container alone."""
    import av

    container, stream = open_video(path)  # file not found / empty / unreadable / no video stream, as PyAV says
    with container:
        codec = stream.codec_context.codec
        name = getattr(codec, "canonical_name", None) or codec.name
        ticks = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # PyAV's end-of-stream flush packet; DALI's av_read_frame never sees it
                    continue
                ticks.append(packet.pts if packet.pts is not None else packet.dts)
        except av.FFmpegError:
            pass  # truncated: keep the packets read so far, as DALI's index does
        time_base = stream.time_base
        height, width = stream.codec_context.height, stream.codec_context.width
    if not ticks:
        raise DecodeError(path, "no decodable frames in the requested window")
    if any(t is None for t in ticks):
        # DALI indexes frames by timestamp and refuses such files; PyAV decodes them (see decode_video_pyav)
        raise UnsupportedCodecError(path, name, "video packets without timestamps are not decodable by DALI; "
                                                "decode it with PyAV")
    return name, np.sort(np.asarray(ticks, dtype=np.int64)) * float(time_base), height, width


# One pipeline per (thread, device, device_id, resize), built once and fed a file, its frame list (and the
# resize window) per call: building costs little on the CPU but opens CUDA streams and decoder state on the GPU.
# A pipeline is not thread-safe (feed then run), hence per thread; after an error DALI marks it invalid, so it
# is dropped and rebuilt.
_pipelines = threading.local()


def define_pipeline(device: str, device_id: Optional[int], resize: bool, box: bool = False):
    """(pipeline, its outputs), defined but not built: the outputs are the decoded uint8 frames [F, H, W, 3], or,
    with `resize`, the prepared clip [3, F, H, W] float32 in [-1, 1] and the decoded frames' shape; with `box`
    too, the frames are sliced to a box (`box_inputs`) on the decoder's device before the resize. Building
    needs the device; defining does not, so the graph of a GPU pipeline can be read on any machine."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    # batch of one file; device_id=None keeps a CPU pipeline off CUDA entirely (works without a GPU);
    # prefetch_queue_depth=1: each run() consumes exactly the one file fed before it
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=device_id if device == "gpu" else None,
                    prefetch_queue_depth=1)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        if device == "gpu":
            # affine=False: the decoder's host threads float, so several decoding processes on one node do
            # not all pin themselves to the same cores
            video = fn.decoders.video(encoded, frames=frames, device="mixed", affine=False)
        else:
            video = fn.decoders.video(encoded, frames=frames, device="cpu")
        outputs = (video,)
        if resize:
            size, crop, pos = (fn.external_source(name=name, dtype=types.FLOAT, ndim=1)
                               for name in ("size", "crop", "crop_pos"))
            if box:
                # the letterbox's picture, cut exactly (no resampling) before the resize sees the frames
                anchor, shape = (fn.external_source(name=name, dtype=types.INT32, ndim=1)
                                 for name in ("box_anchor", "box_shape"))
                video_in = fn.slice(video, anchor, shape, axes=[1, 2], device=device)
            else:
                video_in = video
            # resize then crop, fused: one resampling pass over the source region that maps onto the window
            clip = fn.resize_crop_mirror(video_in, device=device, size=size, crop=crop, crop_pos_y=pos[0],
                                         crop_pos_x=pos[1], **resize_args())
            clip = fn.transpose(clip, device=device, perm=[3, 0, 1, 2])  # FHWC -> CFHW: the VAE's [3, T, H, W]
            clip = dmath.clamp(clip / 127.5 - 1.0, -1.0, 1.0)  # as resize_center_crop scales
            outputs = (clip, video.shape())  # the shape is host metadata: no copy of the frames
        pipe.set_outputs(*outputs)
    return pipe, outputs


def _pipeline(device: str, device_id: Optional[int], resize: bool, box: bool = False):
    cache = _pipelines.__dict__.setdefault("cache", {})
    key = (device, device_id, resize, box)
    if key not in cache:
        pipe, _ = define_pipeline(device, device_id, resize, box)
        pipe.build()
        cache[key] = pipe
    return cache[key]


def _run(path: str, frames: np.ndarray, device: str, device_id: Optional[int], window: Optional[dict] = None):
    """The pipeline's outputs (DALI tensor lists, batch of one, valid until this thread's next run) for `frames`
    (ascending DALI frame indices) of one file; with `window` (`window_inputs`), the resizing pipeline's, and
    with `box_inputs` in it, the cropping one's."""
    # DALI decodes from memory: the whole file is read (fine for clips; a window of a long film reads it all)
    encoded = np.fromfile(path, dtype=np.uint8)
    key = (device, device_id, window is not None, "box_anchor" in (window or {}))
    pipe = _pipeline(*key)
    try:
        pipe.feed_input("encoded", [encoded])
        pipe.feed_input("frames", [np.asarray(frames, dtype=np.int32)])
        for name, value in (window or {}).items():
            pipe.feed_input(name, [value])
        return pipe.run()
    except (RuntimeError, IndexError) as e:
        _pipelines.cache.pop(key, None)
        raise DecodeError(path, f"corrupt video stream (DALI: {_dali_reason(e)})") from None


def _to_torch_cuda(tensors, device_id: int):
    """Copy a DALI TensorListGPU (a uniform batch) into a new torch tensor on cuda:device_id, device to device,
    ordered on torch's current stream there (DALI orders the copy after the work that produced the data)."""
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray
    from nvidia.dali.plugin.pytorch.torch_utils import to_torch_type

    tensor = tensors.as_tensor()
    result = torch.empty(tuple(tensor.shape()), dtype=to_torch_type[tensor.dtype], device=f"cuda:{device_id}")
    feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(result.device))
    return result


def _dali_reason(error: Exception) -> str:
    """The useful part of a DALI error, which wraps it in the pipeline's definition traceback and C++ context:
    '... encountered:\n\nAssert on "..." failed: Failed to create video decoder for "memory file"\nC++ context...'
    """
    text = str(error)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    for line in (line.strip() for line in text.splitlines()):
        if not line or line.startswith(("C++ context", "Current pipeline object", "Critical error")):
            continue
        if line.startswith("Assert on") and "failed: " in line:
            line = line.split("failed: ", 1)[1]
        return line
    return type(error).__name__
