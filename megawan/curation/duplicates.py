"""Near-duplicate clips: perceptual hashes (imagehash's pHash) of each clip's key frames, clustered.

    hashes = clip_hashes(clip.keys, crop)                      # ["c3a1...", ...] one 64-bit hex per key frame
    groups = cluster(records, max_distance=6)                 # {id: id of the clip kept for its cluster}

Two clips are duplicates when every key frame's hash is within `max_distance` bits of the other's (key frames
are taken at the same fractions of each clip's length, inside the crop, so a re-encoded, rescaled or
letterboxed copy hashes alike). Clusters are the connected groups of that relation. The clip kept for a cluster
is the longest, then the largest (width x height), then the first in the manifest; the others are rejected with
reason `duplicate` and `duplicate_of` naming it.

Candidate pairs come from bands: each 64-bit hash is 8 bands of 8 bits, and two hashes within 7 bits agree on
some band (pigeonhole), so clips are bucketed by (a band of the first key frame, a band of the second): the
search misses no pair within 7 bits, and compares about n^2 / 1024 pairs, not n^2 (spread hashes).
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np

BANDS, BAND_CHARS = 8, 2  # 8 bands of 8 bits (2 hex digits) per 64-bit hash
MAX_DISTANCE = BANDS - 1  # the farthest pair the banded search is sure to find


def clip_hashes(keys: np.ndarray, crop: list) -> list:
    import imagehash
    from PIL import Image

    x, y, w, h = crop
    return [str(imagehash.phash(Image.fromarray(np.ascontiguousarray(k[y:y + h, x:x + w])))) for k in keys]


def distance(a: list, b: list) -> int:
    """The largest Hamming distance over the key frames (len differs: as far apart as can be)."""
    if len(a) != len(b) or not a:
        return 64
    return max(bin(int(p, 16) ^ int(q, 16)).count("1") for p, q in zip(a, b))


def _better(a: dict, b: dict) -> bool:
    """Whether record `a` is kept before `b`: longer, then more pixels, then earlier in the manifest."""
    ka = (a["duration"], a["pixels"], -a["order"])
    kb = (b["duration"], b["pixels"], -b["order"])
    return ka > kb


def cluster(records: list, max_distance: int) -> dict:
    """records: [{"id", "hashes", "duration", "pixels", "order"}]; returns {id: kept id} for every clip in a cluster
    of two or more (the kept one maps to itself)."""
    parent = list(range(len(records)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    buckets = defaultdict(list)
    for i, r in enumerate(records):
        bands = [[h.rjust(16, "0")[b * BAND_CHARS:(b + 1) * BAND_CHARS] for b in range(BANDS)]
                 for h in r["hashes"][:2]]
        for key in itertools.product(*[list(enumerate(frame)) for frame in bands]):
            buckets[key].append(i)
    checked = set()
    for members in buckets.values():
        for a_pos, i in enumerate(members):
            for j in members[a_pos + 1:]:
                if (i, j) in checked or root(i) == root(j):
                    continue
                checked.add((i, j))
                if distance(records[i]["hashes"], records[j]["hashes"]) <= max_distance:
                    parent[root(j)] = root(i)
    groups = defaultdict(list)
    for i in range(len(records)):
        groups[root(i)].append(i)
    kept = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        best = members[0]
        for i in members[1:]:
            if _better(records[i], records[best]):
                best = i
        kept.update({records[i]["id"]: records[best]["id"] for i in members})
    return kept
