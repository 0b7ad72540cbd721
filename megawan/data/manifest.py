"""Manifests of videos and images with captions: JSONL or CSV rows with `path`, `caption` and optional
`start`, `end` (seconds), `fps` (sampling rate for this clip), `id` and `crop` ([x, y, w, h] in source pixels:
the picture inside a letterbox, as tools/curate.py finds it; precompute and the pixel loader cut every frame to it
before choosing the bucket, JSON list or, in CSV, "x y w h").

    entries = read_manifest("clips.jsonl")     # [ManifestEntry(id=..., path=..., caption=..., ...)]

Relative paths are resolved against the manifest's folder. A malformed row is an error that names the file,
the row and the field; ids must be unique (they key the latent store). The fields tools/make_manifest.py measures
(PROBE_FIELDS: duration, frames, width, height, source_fps) may stand beside them, for the reader's information;
precompute measures each file itself.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Optional

from megawan.utils.user_errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# what megawan.data.folder_manifest writes beside each row; `source_fps` is the file's own rate, not `fps`, which
# is the rate precompute samples the clip at
PROBE_FIELDS = ("duration", "frames", "width", "height", "source_fps")


class ManifestError(UserError, ValueError):
    """A malformed manifest row or file; the message names the file, the row and the field."""


@dataclass(frozen=True)
class ManifestEntry:
    id: str
    path: str
    caption: str
    start: Optional[float] = None
    end: Optional[float] = None
    fps: Optional[float] = None
    # why this row cannot give a sample (a WebDataset sample without a caption or a video): precompute reports it
    # as skipped, with this reason, and decodes nothing
    problem: Optional[str] = None
    crop: Optional[tuple] = None  # (x, y, w, h) source pixels: the frames are cut to this box before anything else

    @property
    def is_image(self) -> bool:
        return os.path.splitext(self.path)[1].lower() in IMAGE_EXTENSIONS


def _rows(path: str):
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}: row {number} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ManifestError(f"{path}: row {number} is not a JSON object")
                yield number, row
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.DictReader(f), start=2):  # row 1 is the header
                yield number, {k: v for k, v in row.items() if v not in (None, "")}
    else:
        raise ManifestError(f"{path}: a manifest is .jsonl or .csv (or WebDataset .tar shards, docs/data.md)")


def _number(value, path, number, field):
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{path}: row {number}, field '{field}': {value!r} is not a number") from None
    if out < 0:
        raise ManifestError(f"{path}: row {number}, field '{field}': {value!r} is negative")
    return out


def _crop(value, path, number):
    """[x, y, w, h] (JSON) or "x y w h" / "x,y,w,h" (CSV) -> a tuple of four ints, x, y >= 0 and w, h > 0."""
    items = value
    if isinstance(value, str):
        items = value.strip().strip("[]").replace(",", " ").split()
        try:
            items = [int(v) for v in items]
        except ValueError:
            items = None
    if (not isinstance(items, (list, tuple)) or len(items) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in items)):
        raise ManifestError(f"{path}: row {number}, field 'crop': {value!r} is not [x, y, w, h] (four integers)")
    x, y, w, h = items
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ManifestError(f"{path}: row {number}, field 'crop': {value!r} needs x, y >= 0 and w, h > 0")
    return tuple(items)


def read_manifest(path: str) -> list:
    root = os.path.dirname(os.path.abspath(path))
    entries, seen = [], {}
    known = {"id", "path", "caption", "start", "end", "fps", "crop"}
    for number, row in _rows(path):
        unknown = sorted(set(row) - known - set(PROBE_FIELDS))
        if unknown:
            raise ManifestError(f"{path}: row {number} has unknown field(s) {unknown}; known: {sorted(known)}")
        for field in ("path", "caption"):
            if not isinstance(row.get(field), str) or (field == "path" and not row[field].strip()):
                raise ManifestError(f"{path}: row {number}, field '{field}': missing or not a string")
        start = _number(row["start"], path, number, "start") if "start" in row else None
        end = _number(row["end"], path, number, "end") if "end" in row else None
        fps = _number(row["fps"], path, number, "fps") if "fps" in row else None
        crop = _crop(row["crop"], path, number) if row.get("crop") is not None else None
        if start is not None and end is not None and end <= start:
            raise ManifestError(f"{path}: row {number}, field 'end': {end} is not after start {start}")
        if fps is not None and fps == 0:
            raise ManifestError(f"{path}: row {number}, field 'fps': must be positive")
        media = row["path"] if os.path.isabs(row["path"]) else os.path.join(root, row["path"])
        sample_id = str(row.get("id", f"{os.path.splitext(row['path'])[0]}"
                                      f"{'' if start is None else f'@{start:g}'}"))
        if sample_id in seen:
            raise ManifestError(f"{path}: row {number}, field 'id': {sample_id!r} repeats row {seen[sample_id]}")
        seen[sample_id] = number
        entries.append(ManifestEntry(sample_id, media, row["caption"], start, end, fps, crop=crop))
    return entries
