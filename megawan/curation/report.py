"""The report a person reads: report.html with one histogram per measure (its threshold drawn) and thumbnails of
kept clips and of rejected ones per reason, so a threshold can be judged by eye before the data is trained on.

    path = write_html_report("curated/", records, cfg)       # curated/report.html, curated/report/*.png

Thumbnails are the middle frame of each shown clip, read again here (a few per reason, not one per clip).
"""

from __future__ import annotations

import html
import os

import numpy as np

from megawan.curation.frames import thumbnail

# (measure, threshold field, log x axis): the histograms drawn
HISTOGRAMS = (("duration", "min_duration_s", False), ("motion", "static_max", False), ("jitter", "shaky_min", False),
              ("overexposed", "overexposed_max", False), ("underexposed", "underexposed_max", False),
              ("blur", "blur_min", True), ("border", "letterbox_min", False))


def _histogram(path: str, name: str, values: list, threshold: float, log: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.6), dpi=80)
    data = np.asarray(values, dtype=float)
    if log:
        data = np.maximum(data, 1e-3)
        bins = np.geomspace(data.min(), max(data.max(), data.min() * 1.01), 30)
        ax.set_xscale("log")
    else:
        bins = 30
    ax.hist(data, bins=bins, color="#4a7ab5")
    ax.axvline(threshold, color="#c0392b", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_title(name)
    ax.set_ylabel("clips")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _thumb(out: str, name: str, record: dict) -> str:
    """The thumbnail's path relative to out ("" when the clip shows no frame)."""
    from PIL import Image

    scenes = record["scenes"]
    if not scenes:
        return ""
    frame = thumbnail(record["path"], (scenes[0][0] + scenes[-1][1]) / 2)
    if frame is None:
        return ""
    rel = os.path.join("report", "thumbs", name + ".png")
    Image.fromarray(frame).save(os.path.join(out, rel))
    return rel


def write_html_report(out: str, records: list, cfg) -> str:
    folder = os.path.join(out, "report")
    os.makedirs(os.path.join(folder, "thumbs"), exist_ok=True)
    parts = ["<!doctype html><meta charset=utf-8><title>curation report</title>",
             "<style>body{font-family:sans-serif}img{margin:2px}figure{display:inline-block;margin:4px;"
             "font-size:11px;max-width:180px;word-break:break-all}</style>",
             f"<h1>Curation: {sum(r['keep'] for r in records)} of {len(records)} clips kept</h1>"]
    counts = {}
    for r in records:
        for reason in r["reasons"] or ["kept"]:
            counts[reason] = counts.get(reason, 0) + 1
    parts.append("<table border=1 cellpadding=3><tr><th>reason</th><th>clips</th></tr>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in sorted(counts.items())) + "</table>")
    parts.append("<h2>Measures</h2>")
    for name, field, log in HISTOGRAMS:
        values = [r["measures"][name] for r in records if name in r.get("measures", {})]
        if not values:
            continue
        png = os.path.join("report", f"hist_{name}.png")
        _histogram(os.path.join(out, png), name, values, getattr(cfg.thresholds, field), log)
        parts.append(f'<img src="{png}" alt="{name}">')
    shown = 0
    for reason in ["kept"] + sorted(k for k in counts if k != "kept"):
        group = [r for r in records if (r["keep"] and reason == "kept") or reason in r["reasons"]]
        parts.append(f"<h2>{html.escape(reason)} ({len(group)})</h2>")
        for r in group[:cfg.report.thumbnails]:
            src = _thumb(out, f"{shown:05d}", r)
            shown += 1
            image = f'<img src="{src}" width=160><br>' if src else "<i>no frame</i><br>"
            label = html.escape(f"{r['id']}: {', '.join(r['reasons']) or 'kept'}"
                                + (f" (of {r['duplicate_of']})" if r["duplicate_of"] else ""))
            parts.append(f"<figure>{image}{label}</figure>")
    path = os.path.join(out, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return path
