"""The pieces of curation a whole run cannot pin down: the banded duplicate search finds exactly the pairs a
comparison of every pair finds, the kept clip of a cluster follows the documented rule, and a part file cut short
by a kill is trimmed back to its last whole record."""

from __future__ import annotations

import itertools
import json
import random

from megawan.curation.duplicates import MAX_DISTANCE, cluster, distance
from megawan.curation.runner import read_parts, trim_partial_line


def _near(h: int, bits: int, rng) -> int:
    for b in rng.sample(range(64), bits):
        h ^= 1 << b
    return h


def _brute_force(records, max_distance):
    parent = list(range(len(records)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(len(records)), 2):
        if distance(records[i]["hashes"], records[j]["hashes"]) <= max_distance:
            parent[root(j)] = root(i)
    groups = {}
    for i in range(len(records)):
        groups.setdefault(root(i), set()).add(records[i]["id"])
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def test_banded_search_finds_every_pair_within_the_threshold():
    rng = random.Random(0)
    records = []
    for family in range(40):  # each family: an original and copies 0 - 9 bits away on each key frame
        base = [rng.getrandbits(64) for _ in range(3)]
        for copy in range(4):
            hashes = base if copy == 0 else [_near(h, rng.randint(0, 9), rng) for h in base]
            records.append({"id": f"f{family}c{copy}", "hashes": [f"{h:016x}" for h in hashes],
                            "duration": 1.0, "pixels": 1, "order": len(records)})
    for max_distance in (0, 3, MAX_DISTANCE):
        kept = cluster(records, max_distance)
        groups = {}
        for clip, keeper in kept.items():
            groups.setdefault(keeper, set()).add(clip)
        assert sorted(sorted(g) for g in groups.values()) == _brute_force(records, max_distance)


def test_the_kept_clip_is_the_longest_then_largest_then_first():
    same = ["0123456789abcdef"] * 2

    def rec(i, duration, pixels):
        return {"id": i, "hashes": same, "duration": duration, "pixels": pixels, "order": int(i[1:])}

    assert set(cluster([rec("c0", 2.0, 100), rec("c1", 3.0, 10), rec("c2", 3.0, 10)], 0).values()) == {"c1"}
    assert set(cluster([rec("c0", 2.0, 100), rec("c1", 2.0, 400), rec("c2", 2.0, 10)], 0).values()) == {"c1"}
    assert set(cluster([rec("c0", 2.0, 100), rec("c1", 2.0, 100)], 0).values()) == {"c0"}


def test_a_record_cut_short_is_dropped_and_trimmed(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    whole = json.dumps({"id": "a", "keep": True}) + "\n"
    (parts / "rank00000.jsonl").write_text(whole + '{"id": "b", "ke')
    assert set(read_parts(str(tmp_path))) == {"a"}
    trim_partial_line(str(parts / "rank00000.jsonl"))
    assert (parts / "rank00000.jsonl").read_text() == whole
