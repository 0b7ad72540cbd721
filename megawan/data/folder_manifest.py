"""A manifest (megawan.data.manifest's JSONL) made from a folder of clips and images with captions, or from a CSV.

    summary = make_manifest("dataset/", "dataset/manifest.jsonl")       # clip.mp4 + clip.txt, photo.jpg + photo.txt
    summary = make_manifest("list.csv", "manifest.jsonl")               # columns path (or video), caption (or text)

A folder is searched recursively (hidden files and folders left out). Each video (VIDEO_SUFFIXES) or image
(IMAGE_SUFFIXES) takes its caption from the `.txt` file of the same name beside it (`a/clip.mp4` -> `a/clip.txt`),
the convention of musubi-tuner and most LoRA trainers. A CSV names each file in a `path` (or `video`) column and
its caption in `caption` (or `text`); relative paths are resolved against the CSV's folder, and `id`, `start`,
`end`, `fps` columns pass through to the manifest.

Every file is opened once: a video with PyAV (its stream's size, rate, frame count and duration; the first frame
decoded, so a file FFmpeg cannot decode is caught here), an image with PIL (decoded). Those numbers go into the
row as megawan.data.manifest.PROBE_FIELDS. A file that cannot be read, a clip without a caption and a repeated
id are not written: each is a row {"id", "path", "reason"} of `<out>.skipped.jsonl` (as precompute's report),
and the summary counts them. Ids are the path relative to the folder (or the CSV's folder) without its suffix,
stable across runs; two files of one stem (`a.mp4`, `a.png`) keep their suffix.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from megawan.data.decoding import DecodeError, decode_first_frame, open_video
from megawan.data.video import decode_image
from megawan.utils.progress import Progress
from megawan.utils.user_errors import UserError

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PATH_COLUMNS, CAPTION_COLUMNS = ("path", "video"), ("caption", "text")
PASSED_COLUMNS = ("start", "end", "fps")  # a CSV's clip window and sampling rate, as the manifest reads them
CHUNK = 1024  # files handed to the probing threads at once


@dataclass
class Candidate:
    """One file that may become a manifest row: `problem` says why it cannot (then it is reported instead)."""

    id: str
    path: str  # absolute
    caption: Optional[str] = None
    extra: dict = field(default_factory=dict)  # start / end / fps from a CSV
    problem: Optional[str] = None


def is_media(name: str) -> bool:
    return name.lower().endswith(VIDEO_SUFFIXES + IMAGE_SUFFIXES)


def _ids(paths: list, root: str) -> list:
    """Relative path without suffix ("a/clip"); files sharing a stem keep their suffix ("a/clip.mp4")."""
    rel = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
    stems = [os.path.splitext(r)[0] for r in rel]
    counts = Counter(stems)
    return [s if counts[s] == 1 else r for s, r in zip(stems, rel)]


def folder_candidates(folder: str) -> list:
    paths = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(parent, f) for f in sorted(files) if is_media(f) and not f.startswith(".")]
    out = []
    for sample_id, path in zip(_ids(paths, folder), paths):
        txt = os.path.splitext(path)[0] + ".txt"
        name = os.path.basename(txt)
        if not os.path.isfile(txt):
            out.append(Candidate(sample_id, path, problem=f"no caption ({name} is missing beside it)"))
            continue
        with open(txt, encoding="utf-8", errors="replace") as f:
            caption = f.read().strip()
        problem = None if caption else f"empty caption ({name} holds no text)"
        out.append(Candidate(sample_id, path, caption, problem=problem))
    return out


def _column(fields: list, names: tuple, csv_path: str) -> str:
    for name in names:
        if name in fields:
            return name
    raise UserError(f"{csv_path}: no {' or '.join(repr(n) for n in names)} column (its columns: {fields})")


def csv_candidates(csv_path: str) -> list:
    root = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        path_col, caption_col = _column(fields, PATH_COLUMNS, csv_path), _column(fields, CAPTION_COLUMNS, csv_path)
        rows = list(reader)
    paths = [os.path.join(root, (r.get(path_col) or "").strip()) for r in rows]
    out = []
    for number, (row, path, sample_id) in enumerate(zip(rows, paths, _ids(paths, root)), start=2):  # 1: header
        where = f"row {number}"
        extra, problem = {}, None
        for name in PASSED_COLUMNS:
            value = (row.get(name) or "").strip()
            if value:
                try:
                    extra[name] = float(value)
                except ValueError:
                    problem = f"{where}: {name} {value!r} is not a number"
        if "start" in extra:
            sample_id += f"@{extra['start']:g}"  # windows of one file
        sample_id = (row.get("id") or "").strip() or sample_id
        caption = (row.get(caption_col) or "").strip()
        if not (row.get(path_col) or "").strip():
            problem = f"{where}: empty {path_col}"
        elif not caption:
            problem = problem or f"{where}: no caption"
        out.append(Candidate(sample_id, os.path.abspath(path), caption or None, extra, problem))
    return out


def probe_video(path: str) -> dict:
    """{"duration", "source_fps", "frames", "width", "height"} of the first video stream; DecodeError if it
    cannot be read or its first frame not decoded. The frame count is the container's, else counted from its
    packets (webm and mkv do not store it; demuxing reads no pixels)."""
    container, stream = open_video(path)
    with container:
        rate = stream.average_rate or stream.guessed_rate
        first = decode_first_frame(container, stream, path)
        frames = stream.frames
        duration = float(stream.duration * stream.time_base) if stream.duration else None
        if not frames:
            container.seek(0)
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        if duration is None and container.duration:
            duration = container.duration / 1_000_000  # av.time_base: microseconds
    info = {"frames": int(frames), "width": first.width, "height": first.height}
    if rate:
        info["source_fps"] = round(float(rate), 4)
    if duration is None and rate:
        duration = frames / float(rate)
    if duration is not None:
        info["duration"] = round(duration, 4)
    return info


def probe(path: str) -> dict:
    """What the manifest row says of the file (PROBE_FIELDS); DecodeError for a file that cannot be read."""
    if path.lower().endswith(IMAGE_SUFFIXES):
        height, width = decode_image(path).shape[1:3]
        return {"frames": 1, "width": int(width), "height": int(height)}
    return probe_video(path)


def _probed(candidate: Candidate) -> tuple:
    if candidate.problem is not None:
        return candidate, None
    try:
        return candidate, probe(candidate.path)
    except DecodeError as e:
        candidate.problem = e.reason
    except Exception as e:  # a library choking on one odd file is that file's problem, not the whole listing's
        if isinstance(e, (ImportError, NameError, AttributeError, TypeError)):
            raise  # our bug or a broken install
        candidate.problem = f"cannot be read ({type(e).__name__}: {e})"
    return candidate, None


def _manifest_path(path: str, out_dir: str) -> str:
    """Relative to the manifest's folder when the file is inside it (the dataset can move), else absolute."""
    rel = os.path.relpath(path, out_dir)
    return path if rel.startswith("..") else rel.replace(os.sep, "/")


def make_manifest(source: str, out: str, workers: int = 8, progress: bool = True) -> dict:
    """Write the manifest `out` (JSONL) and `<out>.skipped.jsonl`; returns {"written", "videos", "images",
    "skipped": [{"id", "path", "reason"}], "out", "skipped_report"}. UserError when `source` is neither a
    folder nor a .csv, or when no file is usable (the skipped report is written all the same)."""
    if not os.path.exists(source):
        raise UserError(f"{source}: not found (give a folder of clips with .txt captions, or a .csv)")
    if os.path.isdir(source):
        candidates = folder_candidates(source)
    elif source.lower().endswith(".csv"):
        candidates = csv_candidates(source)
    else:
        raise UserError(f"{source}: neither a folder nor a .csv (columns path, caption)")
    if not candidates:
        raise UserError(f"{source}: no videos ({' '.join(VIDEO_SUFFIXES)}) or images "
                        f"({' '.join(IMAGE_SUFFIXES)}) in it")
    out_dir = os.path.dirname(os.path.abspath(out))
    rows, skipped, seen = [], [], {}
    bar = Progress(len(candidates), desc="probe", unit="files", enabled=progress)
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:  # PyAV and PIL release the GIL while reading
        probed = (result for start in range(0, len(candidates), CHUNK)  # a bounded number of futures at a time
                  for result in pool.map(_probed, candidates[start:start + CHUNK]))
        for candidate, info in probed:
            if candidate.problem is None and candidate.id in seen:
                candidate.problem = f"id {candidate.id!r} repeats {seen[candidate.id]}"
            if candidate.problem is not None:
                skipped.append({"id": candidate.id, "path": candidate.path, "reason": candidate.problem})
            else:
                seen[candidate.id] = candidate.path
                rows.append({"id": candidate.id, "path": _manifest_path(candidate.path, out_dir),
                             "caption": candidate.caption, **candidate.extra, **info})
            bar.update(1, skipped=len(skipped))
    bar.close()
    report = out + ".skipped.jsonl"
    os.makedirs(out_dir, exist_ok=True)
    with open(report, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in skipped)
    if not rows:
        raise UserError(f"{source}: none of its {len(candidates)} files is usable (reasons in {report})")
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    images = sum(1 for r in rows if r["path"].lower().endswith(IMAGE_SUFFIXES))
    return {"written": len(rows), "videos": len(rows) - images, "images": images, "skipped": skipped, "out": out,
            "skipped_report": report}
