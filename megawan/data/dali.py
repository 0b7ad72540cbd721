"""NVIDIA DALI video decoding, beside the PyAV path in `megawan.data.video` and with the same result.

    frames = decode_video_dali("clip.webm", fps=16, num_frames=81)                  # DALI on the CPU
    frames = decode_video_dali("clip.mp4", fps=16, device="gpu", device_id=0)       # NVDEC ("mixed")

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
  VP9, MJPEG and MPEG-4; only behind `megawan.capabilities.cuda_available()`.

Frame numbering: DALI numbers a file's frames by its video packets sorted by pts (dts where a packet has no pts;
a file with neither is refused). `_probe` reads the same packets with PyAV's demuxer (no decoding, cheap), so
index k here is DALI's frame k, which also makes variable-frame-rate files come out right.

DALI is imported inside the functions: megawan imports, and the PyAV path works, where DALI is not installed.
"""

from __future__ import annotations

import functools
import threading
from typing import Optional

import numpy as np

from megawan import capabilities
from megawan.data.decoding import DecodeError, UnsupportedCodecError, frame_indices, open_video

# codec names as FFmpeg's avcodec_get_name gives them (PyAV: codec_context.codec.canonical_name)
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = frozenset({"h264", "hevc", "av1", "mpeg4", "vp8", "vp9", "mjpeg"})
DEVICES = ("cpu", "gpu")


@functools.lru_cache(maxsize=None)
def dali_available() -> bool:
    """DALI's Python package is importable (a CUDA device is asked separately, by megawan.capabilities)."""
    try:
        import nvidia.dali.fn  # noqa: F401
    except Exception:  # not installed (ImportError), or a wheel for another CUDA / Python failing at import
        return False
    return True


def decode_video_dali(path: str, fps: float = 16.0, num_frames: Optional[int] = None, start: Optional[float] = None,
                      end: Optional[float] = None, device: str = "cpu", device_id: int = 0, output: str = "numpy"):
    """uint8 frames [T, H, W, 3] at `fps`, as `megawan.data.video.decode_video` gives them, decoded by DALI.

    device: "cpu" (VP8 / VP9 / MJPEG) or "gpu" (NVDEC on `device_id`). output: "numpy" (default), or "torch"
    for a torch tensor (on cuda:device_id when device="gpu", so the frames need not come back to the host).
    Raises DecodeError for a file that cannot give the clip, UnsupportedCodecError (a DecodeError) for a codec
    this device's decoder does not take, RuntimeError for device="gpu" without CUDA or DALI.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown DALI device {device!r} (cpu | gpu)")
    if output not in ("numpy", "torch"):
        raise ValueError(f"unknown output {output!r} (numpy | torch)")
    if device == "gpu":
        if not capabilities.cuda_available():
            raise RuntimeError("DALI GPU decoding needs a CUDA device; use device='cpu' (VP8 / VP9 / MJPEG) or PyAV")
    if not dali_available():
        raise RuntimeError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda120); use the PyAV backend")

    codec, times = _probe(path)
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
    # each distinct frame is decoded once, in file order (DALI then reads forward instead of seeking back);
    # repeats (target fps above the source's) are copies made afterwards
    unique, inverse = np.unique(chosen, return_inverse=True)
    frames = _run(path, unique.astype(np.int32), device, device_id, output)
    if len(frames) != len(unique):
        raise DecodeError(path, f"DALI returned {len(frames)} frames, {len(unique)} asked")
    if output == "torch":
        import torch

        return frames[torch.as_tensor(inverse, device=frames.device)]
    return frames[inverse]


def _probe(path: str) -> tuple[str, np.ndarray]:
    """(codec name, presentation time in seconds of each frame in DALI's numbering), from the container alone."""
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
    if not ticks:
        raise DecodeError(path, "no decodable frames in the requested window")
    if any(t is None for t in ticks):
        # DALI indexes frames by timestamp and refuses such files; PyAV decodes them (see decode_video_pyav)
        raise UnsupportedCodecError(path, name, "video packets without timestamps are not decodable by DALI; "
                                                "decode it with PyAV")
    return name, np.sort(np.asarray(ticks, dtype=np.int64)) * float(time_base)


# One pipeline per (thread, device, device_id), built once and fed a file and its frame list per call: building
# costs little on the CPU but opens CUDA streams and decoder state on the GPU. A pipeline is not thread-safe
# (feed then run), hence per thread; after an error DALI marks it invalid, so it is dropped and rebuilt.
_pipelines = threading.local()


def _pipeline(device: str, device_id: int):
    cache = _pipelines.__dict__.setdefault("cache", {})
    key = (device, device_id)
    if key not in cache:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        # batch of one file; device_id=None keeps a CPU pipeline off CUDA entirely (works without a GPU);
        # prefetch_queue_depth=1: each run() consumes exactly the one file fed before it
        @pipeline_def(batch_size=1, num_threads=1, device_id=device_id if device == "gpu" else None,
                      prefetch_queue_depth=1)
        def decode():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            if device == "gpu":
                # affine=False: the decoder's host threads float, so several decoding processes on one node do
                # not all pin themselves to the same cores
                return fn.decoders.video(encoded, frames=frames, device="mixed", affine=False)
            return fn.decoders.video(encoded, frames=frames, device="cpu")

        pipe = decode()
        pipe.build()
        cache[key] = pipe
    return cache[key]


def _run(path: str, frames: np.ndarray, device: str, device_id: int, output: str):
    """Decode `frames` (ascending DALI frame indices) of one file: numpy [F, H, W, 3], or a torch tensor."""
    # DALI decodes from memory: the whole file is read (fine for clips; a window of a long film reads it all)
    encoded = np.fromfile(path, dtype=np.uint8)
    pipe = _pipeline(device, device_id)
    try:
        pipe.feed_input("encoded", [encoded])
        pipe.feed_input("frames", [frames])
        (out,) = pipe.run()
        if device == "gpu":
            if output == "torch":
                return _to_torch_cuda(out.as_tensor(), device_id)[0]
            return out.as_cpu().as_array()[0]
        array = out.as_array()[0]  # a copy: DALI reuses its buffers on the next run
        if output == "torch":
            import torch

            return torch.from_numpy(array)
        return array
    except (RuntimeError, IndexError) as e:
        _pipelines.cache.pop((device, device_id), None)
        raise DecodeError(path, f"corrupt video stream (DALI: {_dali_reason(e)})") from None


def _to_torch_cuda(tensor, device_id: int):
    """Copy a DALI TensorGPU into a new torch CUDA tensor, ordered on torch's current stream."""
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray

    result = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=f"cuda:{device_id}")
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
