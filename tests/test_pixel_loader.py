"""The VAE's pixel loader (megawan.data.pixel_loader): global batches that DP ranks slice, exact resume, workers
that change nothing, images as 1-frame samples, and bad files skipped up front or replaced mid-run, with a report.

The clips are tiny H.264 files written here: frame k of clip c is a horizontal ramp over a flat level 20 + 8 k + c,
so a decoded sample says which frames it holds and where it was cropped."""

import io
import json
import pathlib
import sys
import tarfile

import numpy as np
import pytest
import torch

from megawan.config.fields import ConfigError
from megawan.data.buckets import parse_buckets, resize_center_crop
from megawan.data.pixel_loader import PixelLoader, to_bucket
from megawan.data.pixel_scan import buckets_for
from megawan.data.video import decode_image, decode_video
from megawan.parallel.launch import spawn_local
from megawan.utils.media import write_image, write_video

BUCKETS = ["9x32x32", "1x32x32"]


def ramp(frames: int, height: int, width: int, clip: int) -> np.ndarray:
    level = 20 + 8 * np.arange(frames)[:, None, None, None] + clip
    x = np.arange(width)[None, None, :, None] * (60 // width + 1)
    return np.broadcast_to(level + x, (frames, height, width, 3)).clip(0, 255).astype(np.uint8)


def write_manifest(folder, rows) -> str:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixels")
    rows = []
    for c, (frames, height, width) in enumerate([(13, 32, 48), (9, 32, 32), (11, 40, 32), (16, 32, 32)]):
        write_video(str(folder / f"clip{c}.mp4"), ramp(frames, height, width, c), fps=16)
        rows.append({"id": f"clip{c}", "path": f"clip{c}.mp4", "caption": "x"})
    for i in range(2):
        write_image(str(folder / f"still{i}.png"), ramp(1, 36, 44, 50 + 30 * i)[0])
        rows.append({"id": f"still{i}", "path": f"still{i}.png", "caption": "x"})
    return folder, write_manifest(folder, rows)


def loader(manifest, **kw) -> PixelLoader:
    args = dict(buckets=BUCKETS, global_batch_size=4, seed=3, num_workers=0, verbose=False)
    return PixelLoader(manifest, **{**args, **kw})


def take(it, steps: int) -> list:
    return [next(it) for _ in range(steps)]


def same(a: list, b: list) -> None:
    assert [x["bucket"] for x in a] == [y["bucket"] for y in b]
    for x, y in zip(a, b):
        assert x["ids"] == y["ids"] and x["step"] == y["step"] and x["epoch"] == y["epoch"]
        assert torch.equal(x["video"], y["video"])


def test_dp_slices_make_one_ranks_global_batch_and_workers_change_nothing(data):
    _, manifest = data
    whole = take(iter(loader(manifest)), 6)
    assert {b["bucket"] for b in whole} == set(BUCKETS)  # both buckets are drawn
    for b in whole:
        frames = int(b["bucket"].split("x")[0])
        assert b["video"].shape == (4, 3, frames, 32, 32) and b["video"].dtype == torch.float32
        assert b["video"].min() >= -1 and b["video"].max() <= 1 and b["global_samples"] == 4
    ranks = [take(iter(loader(manifest, dp_rank=r, dp_size=2, num_workers=2)), 6) for r in range(2)]
    for step, b in enumerate(whole):
        halves = [ranks[r][step] for r in range(2)]
        assert [h["sample_index"] for h in halves] == [[0, 1], [2, 3]]
        assert halves[0]["ids"] + halves[1]["ids"] == b["ids"]
        assert torch.equal(torch.cat([h["video"] for h in halves]), b["video"])
    same(take(iter(loader(manifest, num_workers=2, prefetch=3)), 6), whole)


def test_resume_gives_the_batches_that_follow(data, tmp_path, capsys):
    folder, manifest = data
    whole = take(iter(loader(manifest)), 7)
    first = loader(manifest, num_workers=2)
    take(iter(first), 3)
    state = json.loads(json.dumps(first.state_dict()))  # saved with the checkpoint as JSON
    assert state["step"] == 3
    resumed = loader(manifest)
    resumed.load_state_dict(state)
    same(take(iter(resumed), 4), whole[3:])
    with pytest.raises(ValueError, match="seed"):
        loader(manifest, seed=4).load_state_dict(state)
    # a file lost since the save: said in one line, and training goes on from the saved position
    fewer = [json.loads(line) for line in open(manifest)][1:]
    changed = loader(write_manifest(tmp_path, [{**r, "path": str(folder / r["path"])} for r in fewer]))
    changed.load_state_dict(state)
    assert "the usable samples differ" in capsys.readouterr().out
    assert next(iter(changed))["step"] == 3 and changed.state_dict()["fingerprint"] != state["fingerprint"]


def test_images_are_one_frame_samples_and_crops_are_seeded(data):
    folder, manifest = data
    centre = loader(manifest, random_crop=False, buckets=["1x32x32"])
    batch = next(iter(centre))
    assert batch["video"].shape == (4, 3, 1, 32, 32)
    # with only an image bucket, each clip gives its first frame (centre crop) and each still itself
    for video, sample_id in zip(batch["video"], batch["ids"]):
        path = str(folder / (f"{sample_id}.png" if sample_id.startswith("still") else f"{sample_id}.mp4"))
        frames = decode_image(path) if sample_id.startswith("still") else decode_video(path, fps=16, num_frames=1)
        assert torch.equal(video, resize_center_crop(np.array(frames), 32, 32))
    clip = decode_video(str(folder / "clip2.mp4"), fps=16)  # 11 frames of 40 x 32: resized in chunks, the same
    assert torch.equal(to_bucket(clip, 24, 24), resize_center_crop(clip, 24, 24))
    # clip0 is 48 px wide: a random crop moves across it with the epoch, centre crops never do
    crops = {}
    for random_crop in (True, False):
        got = loader(manifest, random_crop=random_crop, buckets=["9x32x32"], global_batch_size=2)
        lefts = set()
        for b in take(iter(got), 12):
            for video, sample_id in zip(b["video"], b["ids"]):
                if sample_id == "clip0":
                    # the ramp: the first frame's left column says the crop's left (and the first frame taken)
                    lefts.add(round(float((video[0, 0, :, 0].mean() + 1) * 127.5)))
        crops[random_crop] = lefts
    assert len(crops[False]) == 1 and len(crops[True]) > 1
    # the fixed validation set: the first samples of each bucket, centre crops, the same on every call
    held = loader(manifest, buckets=BUCKETS).held_out(per_bucket=2)
    assert [(h["id"], h["bucket"]) for h in held] == [("still0", "1x32x32"), ("still1", "1x32x32"),
                                                      ("clip0", "9x32x32"), ("clip1", "9x32x32")]
    again = loader(manifest, buckets=BUCKETS, random_crop=False).held_out(per_bucket=2)
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(held, again))


def test_short_and_corrupt_files_are_skipped_and_reported(data, tmp_path, capsys):
    folder, _ = data
    write_video(str(tmp_path / "short.mp4"), ramp(5, 32, 32, 0), fps=16)
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 100)
    good = [{"id": f"clip{c}", "path": str(folder / f"clip{c}.mp4"), "caption": "x"} for c in range(4)]
    manifest = write_manifest(tmp_path, good + [
        {"id": "short", "path": "short.mp4", "caption": "x"},
        {"id": "garbage", "path": "garbage.mp4", "caption": "x"},
        {"id": "missing", "path": "missing.mp4", "caption": "x"},
        {"id": "still", "path": str(folder / "still0.png"), "caption": "x"}])
    report = tmp_path / "run" / "skipped.jsonl"
    got = PixelLoader(manifest, buckets=["9x32x32"], global_batch_size=2, num_workers=0, report=str(report))
    assert "4 samples" in capsys.readouterr().out
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert got.skipped == lines and [r["id"] for r in lines] == ["short", "garbage", "missing", "still"]
    rows = {r["id"]: r["reason"] for r in lines}
    assert "too short: 5 frames" in rows["short"] and "not a readable media file" in rows["garbage"]
    assert "not found" in rows["missing"] and "no image bucket" in rows["still"]
    assert next(iter(got))["video"].shape == (2, 3, 9, 32, 32)


def test_a_file_failing_mid_run_is_replaced_and_reported(data, tmp_path):
    folder, _ = data
    rows = []
    for c in range(3):
        write_video(str(tmp_path / f"c{c}.mp4"), ramp(9, 32, 32, 10 * c), fps=16)
        rows.append({"id": f"c{c}", "path": f"c{c}.mp4", "caption": "x"})
    manifest = write_manifest(tmp_path, rows)
    report = tmp_path / "report.jsonl"
    runs = []
    for workers in (0, 2):
        got = loader(manifest, buckets=["9x32x32"], global_batch_size=3, report=str(report), num_workers=workers)
        (tmp_path / "c1.mp4").write_bytes(b"\0" * 64)  # damaged after the scan
        runs.append(take(iter(got), 2))
        write_video(str(tmp_path / "c1.mp4"), ramp(9, 32, 32, 10), fps=16)
        failed = [json.loads(line) for line in report.read_text().splitlines()]
        assert [(r["id"], r["step"]) for r in failed] == [("c1", 0)] and got.failed == failed
    same(runs[0], runs[1])
    for b in runs[0]:
        assert "c1" not in b["ids"] and b["ids"].count("c2") == 2  # c1's place: the next sample, c2


@pytest.mark.parametrize("kw, field", [(dict(global_batch_size=3, dp_size=2), "data.global_batch_size"),
                                       (dict(buckets=["10x32x32"]), "data.buckets"),
                                       (dict(buckets=["9x36x32"]), "data.buckets"),
                                       (dict(decode="ffmpeg"), "data.decode")])
def test_bad_settings_name_the_field(data, kw, field):
    with pytest.raises(ConfigError, match=field):
        loader(data[1], **kw)


def test_every_length_and_resolution_a_clip_can_give():
    buckets = parse_buckets(["9x32x32", "9x16x16", "5x32x32", "17x32x32", "9x32x64", "1x32x32", "1x16x16"],
                            grid=16)
    names = lambda found: sorted(b.name for b in found)  # noqa: E731
    assert names(buckets_for(buckets, 13, 32, 40)) == ["5x32x32", "9x16x16", "9x32x32"]  # square is nearest 5:4
    assert names(buckets_for(buckets, 13, 20, 20)) == ["9x16x16"]  # 32 px would upscale it
    assert names(buckets_for(buckets, 13, 8, 8)) == ["9x16x16"]  # smaller than all: the smallest, upscaled
    assert names(buckets_for(buckets, 3, 32, 32)) == ["1x16x16", "1x32x32"]  # too short: a frame of it
    assert names(buckets_for(buckets, 40, 30, 62)) == ["9x32x64"]  # the nearest aspect only
    assert buckets_for(parse_buckets(["9x32x32"]), 3, 32, 32) == ()


def test_a_later_start_keeps_the_clip_evenly_sampled(tmp_path):
    """A 30 fps source sampled at 16 fps: frame k of every sample is source frame f0 + floor(k * 30 / 16), whatever
    frame f0 the seeded offset starts it on (a window starting between two frames would begin one frame late)."""
    frames = np.broadcast_to((6 * np.arange(40))[:, None, None, None].astype(np.uint8), (40, 32, 32, 3))
    write_video(str(tmp_path / "a.mp4"), frames.copy(), fps=30)
    got = loader(write_manifest(tmp_path, [{"id": "a", "path": "a.mp4", "caption": "x"}]), buckets=["9x32x32"],
                 global_batch_size=1)
    starts = set()
    for b in take(iter(got), 8):
        source = np.round(((b["video"][0].mean(dim=(0, 2, 3)) + 1) * 127.5).numpy() / 6).astype(int)
        assert source.tolist() == [source[0] + k * 30 // 16 for k in range(9)]
        starts.add(int(source[0]))
    assert len(starts) > 1 and not got.failed


def test_webdataset_shards_give_the_manifests_samples(data, tmp_path):
    """The same files as WebDataset samples (key.mp4 / key.png + key.txt): the same batches (centre crops; a
    random crop is seeded by the sample's id, which names the shard); a broken member and one without a caption
    are skipped with their reason."""
    folder, manifest = data
    rows = [json.loads(line) for line in open(manifest)]
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for r in rows:
            add(r["path"], (folder / r["path"]).read_bytes())
            add(f"{r['id']}.txt", b"x")
        add("zbroken.mp4", b"not a video" * 50)
        add("zbroken.txt", b"x")
        add("zuncaptioned.mp4", (folder / "clip0.mp4").read_bytes())
    shard = loader(str(tmp_path / "000000.tar"), random_crop=False)
    assert {r["id"]: r["reason"] for r in shard.skipped}.keys() == {"000000/zbroken", "000000/zuncaptioned"}
    same_videos = zip(take(iter(shard), 4), take(iter(loader(manifest, random_crop=False)), 4))
    for a, b in same_videos:
        assert [i.split("/")[1] for i in a["ids"]] == b["ids"] and torch.equal(a["video"], b["video"])


def _scan_rank(rank, manifest, out):
    import torch.distributed as dist

    got = PixelLoader(manifest, buckets=BUCKETS, global_batch_size=2, seed=3, dp_rank=rank, dp_size=2, num_workers=0,
                      verbose=False, scan_group=dist.group.WORLD)
    batches = take(iter(got), 3)
    torch.save({"samples": {n: [s.entry.id for s in v] for n, v in got.samples.items()}, "skipped": got.skipped,
                "ids": [b["ids"] for b in batches]}, f"{out}/rank{rank}.pt")


def test_ranks_share_the_scan_and_agree(data, tmp_path):
    """Two gloo ranks split the scan (each probes half the rows, then all gather): both end with the one-process
    scan's samples, and their slices make its batches."""
    folder, manifest = data
    rows = [json.loads(line) for line in open(manifest)] + [{"id": "bad", "path": "nothing.mp4", "caption": "x"}]
    manifest = write_manifest(tmp_path, [{**r, "path": str(folder / r["path"])} for r in rows])
    spawn_local(_scan_rank, world_size=2, args=(manifest, str(tmp_path)))
    alone = loader(manifest, global_batch_size=2)
    expected = {n: [s.entry.id for s in v] for n, v in alone.samples.items()}
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert got["samples"] == expected and got["skipped"] == alone.skipped
    assert [a + b for a, b in zip(ranks[0]["ids"], ranks[1]["ids"])] == [b["ids"] for b in take(iter(alone), 3)]


def test_bench_pixel_loader_smoke(tmp_path, capsys):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    from bench_pixel_loader import main

    out = tmp_path / "pixels.json"
    assert main(["--make", "2", "--source", "9x32x48", "--bucket", "9x32x32", "--steps", "2", "--workers", "0", "2",
                 "--need", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [0, 2] and all(r["samples_per_s"] > 0 for r in rows)
    assert "x need" in capsys.readouterr().out
