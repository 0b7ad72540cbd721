"""A manifest row's `crop` (a letterbox's picture, as tools/curate.py writes it): precompute and the pixel loader
cut every frame to the box before the bucket choice and the resize, so a letterboxed clip with its crop gives the
latents of the same picture filmed without bars; a bad crop is refused naming the row and the field.

The clips are lossless (FFV1, RGB): the letterboxed file's picture decodes to exactly the bare file's pixels, so
the two clips must give bit-identical inputs to the VAE, hence identical fp32 latents."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from megawan.data.buckets import parse_buckets
from megawan.data.manifest import ManifestError, read_manifest
from megawan.data.pixel_loader import PixelLoader
from megawan.data.pixel_scan import scan_entry
from megawan.data.precompute import PrecomputeJob, prepare, run_precompute
from megawan.data.store import LatentStore
from megawan.demo.tiny_assets import write_tiny_encoders

BUCKETS = ["17x32x32", "17x32x48"]
CROP = [4, 10, 48, 32]  # x, y, w, h: bars 4 px left, 10 top, 8 bottom, none right (anchor order matters)
FRAME_H, FRAME_W = 50, 52


def write_lossless(path: str, frames: np.ndarray) -> None:
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("ffv1", rate=16)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """folder with picture.mkv (17 frames of 32x48) and letterbox.mkv (the same picture inside black bars)."""
    root = tmp_path_factory.mktemp("crop")
    rng = np.random.default_rng(0)
    picture = np.repeat(np.repeat(rng.integers(30, 230, (17, 8, 12, 3), dtype=np.uint8), 4, 1), 4, 2)
    picture = np.stack([np.roll(p, k, axis=1) for k, p in enumerate(picture)])  # a pan: frames differ
    boxed = np.zeros((17, FRAME_H, FRAME_W, 3), np.uint8)
    x, y, w, h = CROP
    boxed[:, y:y + h, x:x + w] = picture
    write_lossless(str(root / "picture.mkv"), picture)
    write_lossless(str(root / "letterbox.mkv"), boxed)
    rows = [{"id": "bare", "path": "picture.mkv", "caption": "a pan"},
            {"id": "cropped", "path": "letterbox.mkv", "caption": "a pan", "crop": CROP},
            {"id": "bars", "path": "letterbox.mkv", "caption": "a pan"}]
    with open(root / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root


def test_cropped_letterbox_gives_the_bare_pictures_latents(clips, tmp_path):
    entries = {e.id: e for e in read_manifest(str(clips / "manifest.jsonl"))}
    assert entries["cropped"].crop == tuple(CROP) and entries["bare"].crop is None
    buckets = parse_buckets(BUCKETS)
    bare, cropped = (prepare(entries[i], buckets, 16.0, "pyav") for i in ("bare", "cropped"))
    assert cropped.bucket == bare.bucket and cropped.bucket.name == "17x32x48"  # chosen from the box's 48x32
    assert torch.equal(cropped.video, bare.video)  # the decoded, cropped, resized clip: exactly the bare one
    assert prepare(entries["bars"], buckets, 16.0, "pyav").bucket.name == "17x32x32"  # 52x50 with the bars

    enc = write_tiny_encoders(str(tmp_path / "encoders"))
    job = PrecomputeJob(manifest=str(clips / "manifest.jsonl"), out=str(tmp_path / "s.zarr"), vae=enc["vae"],
                        vae_config=enc["vae_config"], text_encoder=enc["text_encoder"],
                        text_config=enc["text_config"], tokenizer=enc["tokenizer"], buckets=BUCKETS,
                        dtype="float32", decode_backend="pyav", decode_workers=1)
    assert run_precompute(job, progress=False)["written"] == 3
    store = LatentStore.open(job.out)
    found = {s["id"]: (b, s["latents"]) for b in store.buckets() for s in (store.read(b, i)
                                                                            for i in range(store.count(b)))}
    assert found["cropped"][0] == found["bare"][0] == "17x32x48" and found["bars"][0] == "17x32x32"
    torch.testing.assert_close(torch.as_tensor(np.asarray(found["cropped"][1])),
                               torch.as_tensor(np.asarray(found["bare"][1])), rtol=0, atol=1e-6)


def test_pixel_loader_decodes_the_box(clips):
    """train-vae's pixel loader: scanned at the box's size, and its centre crop is the bare picture's."""
    entries = {e.id: e for e in read_manifest(str(clips / "manifest.jsonl"))}
    scanned, reason = scan_entry(entries["cropped"], parse_buckets(BUCKETS), 16.0)
    assert reason is None and (scanned.height, scanned.width) == (32, 48)
    assert [b.name for b in scanned.buckets] == ["17x32x48"]
    loader = PixelLoader([entries["bare"], entries["cropped"]], ["17x32x48"], global_batch_size=1, num_workers=0,
                         decode="pyav", random_crop=False, verbose=False)
    (bare, bare_id), (cropped, cropped_id) = (loader.load_sample("17x32x48", 0, i, 0, centre=True) for i in (0, 1))
    assert (bare_id, cropped_id) == ("bare", "cropped") and torch.equal(bare, cropped)


def test_a_bad_crop_is_refused_naming_the_row_and_field(clips, tmp_path):
    for crop, why in (([0, 0, 0, 10], "w, h > 0"), ([-1, 0, 4, 4], "x, y >= 0"), ([1, 2, 3], "four integers"),
                      ([0, 0, 4.5, 4], "four integers"), ("0 0 4 x", "four integers"), (True, "four integers")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"path": "a.mp4", "caption": "c"}) + "\n"
                        + json.dumps({"path": "b.mp4", "caption": "c", "crop": crop}) + "\n")
        with pytest.raises(ManifestError) as e:
            read_manifest(str(path))
        assert str(e.value).startswith(f"{path}: row 2, field 'crop': ") and why in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    csv = tmp_path / "ok.csv"
    csv.write_text('path,caption,crop\na.mp4,c,"4 10 48 32"\nb.mp4,c,\n')
    assert [e.crop for e in read_manifest(str(csv))] == [tuple(CROP), None]
    # a box past the frame is that file's problem (reported as skipped), not the job's end
    past = replace(read_manifest(str(csv))[0], path=str(clips / "letterbox.mkv"), crop=(10, 20, 48, 32))
    item = prepare(past, parse_buckets(BUCKETS), 16.0, "pyav")
    assert item.skip_reason == f"crop [10, 20, 48, 32] reaches past the {FRAME_W}x{FRAME_H} frame"
