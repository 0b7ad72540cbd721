"""WebDataset tar shards as precompute's source, beside manifests: the layout Megatron's Energon (and the
`webdataset` package) reads video datasets in.

    entries = read_shards("shards/{000000..000003}.tar")     # also "shards/000000.tar" or the folder "shards/"
    entries = read_entries(job.manifest)                     # shards as above, or a manifest file
    with local_copy(entries[0].path) as path: ...            # the member as a file, while it is decoded

A shard is a plain (uncompressed) tar; a sample is the members sharing a key, the member name up to the first
dot of its base name (`clips/000123.mp4` and `clips/000123.txt`: key `clips/000123`, as webdataset splits it).
The member's type is the last suffix of the rest (`000123.clip.mp4`: an mp4). A sample gives a manifest entry with
- its (first) video (VIDEO_EXTENSIONS; else an image, IMAGE_EXTENSIONS) as `path`: `<shard>/<member>`, the shard's path
  followed by the member's name, which `member_of` splits and `local_copy` reads;
- its caption from `txt` (or `caption`, `text`) or from the `caption` (or `text`, `prompt`) field of `json`;
- the id `<shard>/<key>`, the shard's path relative to the shards' common folder without `.tar`: stable
  across runs (precompute resumes by id) and unique across shards.
The entries come in shard order (the expanded pattern, or the folder's sorted listing) and member order, so
every rank of a precompute job sees the same list. A sample without a caption or a video, or a shard that
cannot be read, becomes an entry with `problem` set: precompute reports it as skipped and goes on.

Members are read where they lie: the shard's member table (offset and size of each, from the tar headers;
tarfile seeks past the data) is kept for the last shards used, and `local_copy` copies one member's bytes to a
temporary file (TMPDIR) that PyAV, PIL and DALI all open like any file, removed once decoded. A shard is never
unpacked as a whole, and nothing is written beside it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from typing import Optional

from megawan.data.decoding import DecodeError
from megawan.data.manifest import ManifestEntry, read_manifest
from megawan.utils.user_errors import UserError

SHARD_SUFFIX = ".tar"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
TEXT_CAPTIONS = ("txt", "caption", "text")
JSON_CAPTION_FIELDS = ("caption", "text", "prompt")
_BRACES = re.compile(r"\{([^{}]*)\}")


class ShardError(UserError, ValueError):
    """A shard source that names no readable shards; the message names the pattern or file."""


def expand_braces(pattern: str) -> list:
    """webdataset's brace notation: `{000..003}` (zero padding kept as written) and `{a,b}`, any number of them."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise ShardError(f"{pattern}: the range {{{body}}} runs backwards")
        width = len(first) if first.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ShardError(f"{pattern}: {{{body}}} is neither a range {{000..009}} nor a list {{a,b}}")
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def is_shard_source(source: str) -> bool:
    """A .tar (or a compressed tar, refused later with the reason), a brace pattern, or a folder with .tar files."""
    if source.lower().endswith((SHARD_SUFFIX,) + COMPRESSED_SUFFIXES) or _BRACES.search(source):
        return True
    return os.path.isdir(source) and any(_tar_files(source))


def _tar_files(folder: str):
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.endswith(SHARD_SUFFIX) and not name.startswith("."):
                yield os.path.join(parent, name)


def shard_paths(source: str) -> list:
    """The shards `source` names, in order: a brace pattern expanded, a folder's .tar files sorted (recursively)."""
    if source.lower().endswith(COMPRESSED_SUFFIXES):
        raise ShardError(f"{source}: a compressed tar; precompute reads plain .tar shards, whose members it can "
                         "seek to (decompress it: gunzip / xz -d / zstd -d)")
    if os.path.isdir(source):
        paths = list(_tar_files(source))
        if not paths:
            raise ShardError(f"{source}: a folder without .tar shards")
        return [os.path.abspath(p) for p in paths]
    paths = expand_braces(source)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ShardError(f"{missing[0]}: shard not found ({len(missing)} of the {len(paths)} shards of {source} "
                         "are missing)")
    return [os.path.abspath(p) for p in paths]


def split_key(name: str) -> tuple:
    """("clips/000123", "mp4") from "clips/000123.mp4": the key ends at the first dot of the base name."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _caption(ext: str, data: bytes, member: str):
    """-> (caption or None, problem or None)."""
    text = data.decode("utf-8", errors="replace")
    if ext in TEXT_CAPTIONS:
        return (text.strip(), None) if text.strip() else (None, f"empty caption ({member})")
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"{member} is not valid JSON ({e.msg})"
    for name in JSON_CAPTION_FIELDS if isinstance(fields, dict) else ():
        if isinstance(fields.get(name), str) and fields[name].strip():
            return fields[name].strip(), None
    keys = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
    return None, f"no caption: {member} has no {' / '.join(JSON_CAPTION_FIELDS)} field (it holds {keys})"


def _samples(shard: str) -> dict:
    """key -> {"media": member, "caption": str, "problem": str}, in member order."""
    samples: dict = {}
    with tarfile.open(shard, mode="r:") as tar:  # "r:": plain tar only, read with seeks (no decompression)
        for info in tar:
            if not info.isfile():
                continue
            name = info.name[2:] if info.name.startswith("./") else info.name
            key, ext = split_key(name)
            ext = ext.rsplit(".", 1)[-1]  # a field "clip.mp4" or "caption.txt" is an mp4 or a txt
            sample = samples.setdefault(key, {})
            is_video, is_image = ext in VIDEO_EXTENSIONS, ext in IMAGE_EXTENSIONS
            if (is_video and not sample.get("video")) or (is_image and "media" not in sample):  # clip > thumbnail
                sample["media"], sample["video"] = name, is_video
            elif (ext in TEXT_CAPTIONS or ext == "json") and "caption" not in sample:
                caption, problem = _caption(ext, tar.extractfile(info).read(), name)
                if caption is not None:
                    sample["caption"] = caption
                    sample.pop("problem", None)
                else:
                    sample.setdefault("problem", problem)
    return samples


def read_shards(source: str) -> list:
    """ManifestEntry for every sample of the shards `source` names (see the module docstring)."""
    shards = shard_paths(source)
    root = os.path.commonpath([os.path.dirname(s) for s in shards])
    entries = []
    for shard in shards:
        shard_id = os.path.relpath(shard, root)[: -len(SHARD_SUFFIX)].replace(os.sep, "/")
        try:
            samples = _samples(shard)
        except (tarfile.TarError, OSError) as e:
            entries.append(ManifestEntry(shard_id, shard, "", problem=f"unreadable shard ({type(e).__name__}: {e})"))
            continue
        for key, sample in samples.items():
            media = sample.get("media")
            path = os.path.join(shard, media) if media else os.path.join(shard, key)
            problem = None
            if media is None:
                problem = f"no video or image member for key {key!r} ({' '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)})"
            elif "caption" not in sample:
                problem = sample.get("problem") or f"no caption member for key {key!r} (txt or json)"
            entries.append(ManifestEntry(f"{shard_id}/{key}", path, sample.get("caption", ""), problem=problem))
    if not any(e.problem is None for e in entries):
        first = next((e for e in entries), None)
        raise ShardError(f"{source}: no sample with a video or image and a caption"
                         + (f" (e.g. {first.id}: {first.problem})" if first else ""))
    return entries


def read_entries(source: str) -> list:
    """Precompute's rows from `source`: WebDataset shards (`is_shard_source`) or a manifest file (.jsonl / .csv)."""
    if is_shard_source(source):
        return read_shards(source)
    if os.path.isdir(source):
        raise ShardError(f"{source}: a folder without .tar shards; for clips with .txt captions beside them, make a "
                         f"manifest first: python tools/make_manifest.py {source} --out manifest.jsonl")
    return read_manifest(source)


def member_of(path: str) -> Optional[tuple]:
    """(shard, member) when `path` is `<shard>.tar/<member>` (an entry of `read_shards`), else None."""
    at = path.find(SHARD_SUFFIX + "/")
    while at >= 0:
        shard = path[: at + len(SHARD_SUFFIX)]
        if os.path.isfile(shard):
            return shard, path[len(shard) + 1:]
        at = path.find(SHARD_SUFFIX + "/", at + 1)
    return None


@functools.lru_cache(maxsize=16)
def _members(shard: str, mtime_ns: int, size: int) -> dict:
    """member name -> (offset of its data, size) for a shard (its headers only); cached per version of the file."""
    with tarfile.open(shard, mode="r:") as tar:
        return {(i.name[2:] if i.name.startswith("./") else i.name): (i.offset_data, i.size) for i in tar if i.isfile()}


@contextmanager
def local_copy(path: str):
    """`path` itself for a file; for a shard member (`member_of`), a temporary copy of its bytes with the
    member's suffix, removed on exit. DecodeError (with the reason) for a member that cannot be read."""
    found = member_of(path)
    if found is None:
        yield path
        return
    shard, member = found
    try:
        stat = os.stat(shard)
        offset, size = _members(shard, stat.st_mtime_ns, stat.st_size)[member]
    except KeyError:
        raise DecodeError(path, f"no member {member!r} in the shard") from None
    except (tarfile.TarError, OSError) as e:
        raise DecodeError(path, f"unreadable shard ({type(e).__name__}: {e})") from None
    fd, local = tempfile.mkstemp(prefix="megawan-", suffix=os.path.splitext(member)[1])
    try:
        with open(shard, "rb") as src, os.fdopen(fd, "wb") as dst:
            src.seek(offset)
            shutil.copyfileobj(_Limited(src, size), dst)
        if os.path.getsize(local) != size:
            raise DecodeError(path, f"truncated shard: the member has {os.path.getsize(local)} of {size} bytes")
        yield local
    finally:
        os.unlink(local)


class _Limited:
    """The next `size` bytes of a file, for shutil.copyfileobj."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data
