"""The curation job: every rank measures its slice of the manifest, rank 0 finds duplicates over all of them and
writes the report and the curated manifest.

    summary = run_curation(entries, "curated/", cfg, rank=0, world_size=1, barrier=None)

Files under the output folder:
    parts/rank00000.jsonl   one record per clip measured by that rank, appended and flushed clip by clip
    config.json             what the records were measured with (a re-run with other thresholds is refused)
    report.jsonl            one line per input clip, in manifest order (written last, tmp + rename)
    manifest.jsonl          the kept scenes (a letterbox's `crop` in the row), the format tools/precompute_latents.py
                            reads (tmp + rename)
    report.html, report/    histograms and thumbnails (megawan.curation.report)

Resuming: a re-run (any world size) reads every part file, skips the clips already there and measures the rest; a
line cut short by a kill is dropped (the rank's own file is trimmed back to its last whole line before
appending), so each clip ends up decided exactly once. Duplicates need every clip's hashes, so they are found
after the barrier, by rank 0, on the records of all ranks.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from megawan.config.curate import REASONS
from megawan.config.fields import config_to_dict
from megawan.curation.decide import failed, keep_of, measure_clip
from megawan.curation.duplicates import cluster
from megawan.curation.scorers import build_scorers
from megawan.utils.progress import Progress
from megawan.utils.user_errors import UserError

PARTS = "parts"
INTERNAL = ("hashes",)  # kept in the part files for the duplicates pass, left out of report.jsonl


def part_path(out: str, rank: int) -> str:
    return os.path.join(out, PARTS, f"rank{rank:05d}.jsonl")


def read_parts(out: str) -> dict:
    """{id: record} of every whole line of every part file (the first record of an id wins)."""
    folder, done = os.path.join(out, PARTS), {}
    if not os.path.isdir(folder):
        return done
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # cut short by a kill: that clip is measured again
                record = json.loads(line)
                done.setdefault(record["id"], record)
    return done


def trim_partial_line(path: str) -> None:
    """Drop a last line without its newline (the process was killed while writing it)."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_config(out: str, cfg) -> None:
    """Write out/config.json, or refuse a folder whose records were measured with another config (what is measured
    and decided: thresholds, analysis, scorers; the report section may change)."""
    path = os.path.join(out, "config.json")
    wanted = {"thresholds": config_to_dict(cfg.thresholds), "analysis": config_to_dict(cfg.analysis),
              "scorers": [config_to_dict(s) for s in cfg.scorers]}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) != wanted:
                raise UserError(f"{path}: this folder was curated with another config; give a new --out (or delete "
                                f"{os.path.join(out, PARTS)} to measure everything again)")
        return
    write_atomic(path, json.dumps(wanted, indent=1) + "\n")


def measure_safely(entry, cfg, scorers) -> dict:
    """measure_clip, with a library failing on one odd file recorded as that file's problem, not the run's end."""
    try:
        return measure_clip(entry, cfg, scorers)
    except (ImportError, NameError, AttributeError, TypeError, KeyError):
        raise  # our bug or a broken install
    except Exception as e:
        return failed(entry, "undecodable", f"{entry.path}: cannot be measured ({type(e).__name__}: {e})")


def measure_slice(entries: list, out: str, cfg, rank: int = 0, world_size: int = 1, progress: bool = True) -> dict:
    """Measure this rank's clips (entries[rank::world_size]) not yet in a part file; {"measured", "already_done"}."""
    os.makedirs(os.path.join(out, PARTS), exist_ok=True)
    done = read_parts(out)
    mine = entries[rank::world_size]
    todo = [e for e in mine if e.id not in done]
    scorers = build_scorers(cfg.scorers) if todo else []
    path = part_path(out, rank)
    trim_partial_line(path)
    bar = Progress(len(mine), desc=f"curate [rank {rank}]", unit="clips", enabled=progress,
                   initial=len(mine) - len(todo))
    kept = 0
    with open(path, "a", encoding="utf-8") as f:
        for entry in todo:
            record = measure_safely(entry, cfg, scorers)
            f.write(json.dumps(record) + "\n")
            f.flush()
            kept += record["keep"]
            bar.update(1, kept=kept)
    bar.close()
    return {"measured": len(todo), "already_done": len(mine) - len(todo)}


def scene_rows(record: dict, entry, min_duration: float) -> list:
    """The manifest rows of a kept clip: one per scene of at least `min_duration` seconds, with the clip's `crop`
    when it is letterboxed."""
    scenes = [s for s in record["scenes"] if s[1] - s[0] >= min_duration - 1e-6]
    m = record["measures"]
    rows = []
    for start, end in scenes:
        row = {"id": record["id"] if len(record["scenes"]) == 1 else f"{record['id']}@{start:g}",
               "path": record["path"], "caption": record["caption"], "start": start, "end": end}
        if entry is not None and entry.fps is not None:
            row["fps"] = entry.fps
        crop = record["crop"] or (list(entry.crop) if entry is not None and entry.crop else None)
        if crop:  # the letterbox's picture (else the input row's own crop): precompute cuts every frame to it
            row["crop"] = crop
        rows.append({**row, "duration": round(end - start, 4), "width": m["width"], "height": m["height"],
                     "source_fps": m["fps"]})
    return rows


def finalize(entries: list, out: str, cfg, extra_records: tuple = ()) -> dict:
    """The duplicates pass over every record, then report.jsonl and manifest.jsonl (atomically) and the HTML
    report. `extra_records`: clips rejected before measuring (a folder's unreadable files)."""
    done = read_parts(out)
    missing = [e.id for e in entries if e.id not in done]
    if missing:
        raise UserError(f"{out}: {len(missing)} clips have no record (first: {missing[0]!r}); run again to measure "
                        "them")
    records = [done[e.id] for e in entries] + [dict(r) for r in extra_records]
    hashed = [{"id": r["id"], "hashes": r["hashes"], "duration": r["measures"]["duration"],
               "pixels": r["measures"]["width"] * r["measures"]["height"], "order": i}
              for i, r in enumerate(records) if r.get("hashes")]
    kept_of = cluster(hashed, cfg.thresholds.duplicate_max_distance)
    by_id = {e.id: e for e in entries}
    rows, report = [], []
    for r in records:
        original = kept_of.get(r["id"], r["id"])
        if original != r["id"]:
            r["reasons"] = r["reasons"] + ["duplicate"]
            r["duplicate_of"] = original
            r["keep"] = keep_of(r["reasons"])
        if r["keep"]:
            rows += scene_rows(r, by_id.get(r["id"]), cfg.thresholds.min_duration_s)
        report.append({k: v for k, v in r.items() if k not in INTERNAL})
    write_atomic(os.path.join(out, "report.jsonl"), "".join(json.dumps(r) + "\n" for r in report))
    write_atomic(os.path.join(out, "manifest.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    counts = Counter(reason for r in report for reason in r["reasons"])
    summary = {"clips": len(report), "kept": sum(r["keep"] for r in report), "scenes": len(rows),
               "reasons": {k: counts[k] for k in list(REASONS) + sorted(set(counts) - set(REASONS)) if counts[k]},
               "report": os.path.join(out, "report.jsonl"), "manifest": os.path.join(out, "manifest.jsonl")}
    if cfg.report.html:
        from megawan.curation.report import write_html_report

        summary["html"] = write_html_report(out, report, cfg)
    return summary


def run_curation(entries: list, out: str, cfg, rank: int = 0, world_size: int = 1, barrier=None,
                 progress: bool = True, extra_records: tuple = ()) -> dict:
    """Measure this rank's slice, wait for every rank, and (rank 0) finalize. Returns the rank's counts, plus the
    finalize summary on rank 0."""
    os.makedirs(out, exist_ok=True)
    check_config(out, cfg)
    summary = measure_slice(entries, out, cfg, rank, world_size, progress)
    if barrier is not None:
        barrier()
    if rank == 0:
        summary.update(finalize(entries, out, cfg, extra_records))
    return summary
