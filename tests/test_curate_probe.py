"""The probe curation records per clip (report.jsonl `probe`): container, codec, duration, fps, size, rotation
and audio, read in the one PyAV pass that measures the clip, on clips written with an audio stream and with a
display matrix (PyAV's set_display_rotation, as phones record portrait video)."""

import numpy as np
import pytest

from megawan.curation.frames import display_rotation, read_clip


def write_clip(path: str, rotation=None, audio: bool = False, frames: int = 16) -> None:
    """An H.264 mp4 of 32x24 grey frames at 16 fps, with a display rotation and / or a 1 s AAC track
    (as megawan.demo.shapes.write_broken writes its audio-only file)."""
    import av

    with av.open(path, mode="w") as container:
        video = container.add_stream("libx264", rate=16)
        video.width, video.height, video.pix_fmt = 32, 24, "yuv420p"
        if rotation is not None:
            video.set_display_rotation(rotation)
        sound = container.add_stream("aac", rate=16000) if audio else None
        for k in range(frames):
            picture = np.full((24, 32, 3), 8 * k, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            samples = (np.sin(np.linspace(0, 200, 16000)) * 0.2).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in [*sound.encode(frame), *sound.encode()]:
                container.mux(packet)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    kinds = {"plain": {}, "audio_rotated": dict(rotation=90, audio=True), "clockwise": dict(rotation=-90)}
    out = {}
    for name, kwargs in kinds.items():
        write_clip(str(root / f"{name}.mp4"), **kwargs)
        out[name] = read_clip(str(root / f"{name}.mp4"), side=32, key_frames=1, pairs=1).probe
    return out


def test_probe_without_audio_or_rotation(probes):
    assert probes["plain"] == {"container": "mov,mp4,m4a,3gp,3g2,mj2", "codec": "h264", "duration_s": 1.0,
                               "fps": 16.0, "width": 32, "height": 24, "rotation": 0, "has_audio": False,
                               "audio_codec": None}


def test_probe_with_audio_and_rotation(probes):
    p = probes["audio_rotated"]
    assert p["has_audio"] is True and p["audio_codec"] == "aac"
    assert p["rotation"] == 90 and (p["width"], p["height"]) == (32, 24)  # stored size; display turns it
    assert p["codec"] == "h264" and p["fps"] == 16.0
    assert probes["clockwise"]["rotation"] == 270 and probes["clockwise"]["has_audio"] is False


def test_display_matrix_parser_agrees_with_pyav(tmp_path):
    """display_rotation (the parser behind `rotation`) against PyAV's own VideoFrame.rotation on every angle the
    writer can store, 45 degrees included (not a multiple of 90)."""
    import av

    for degrees in (45, 90, 180, 270):  # 0: no matrix is stored (the plain clip, rotation 0)
        path = str(tmp_path / f"r{degrees}.mp4")
        write_clip(path, rotation=degrees, frames=2)
        with av.open(path) as container:
            frame = next(container.decode(container.streams.video[0]))
            matrix = [bytes(d) for d in frame.side_data if "DISPLAYMATRIX" in str(d.type).upper()]
            assert len(matrix) == 1, degrees
            assert round(display_rotation(matrix[0])) % 360 == round(frame.rotation) % 360 == degrees
