"""The results of `megawan eval` runs, comparable across checkpoints: one row per run in DIR/results.jsonl (appended)
and the table of every row so far, DIR/results.md (rewritten from the rows after each run).

    rows = read_rows("eval")                       # [] before the first run
    append_row("eval", {"label": "step-600", "color": 1.0, ...})   # then results.md holds every run
"""

from __future__ import annotations

import json
import os

from megawan.utils.user_errors import UserError

ROWS = "results.jsonl"
TABLE = "results.md"
# (column title, row key, format) of results.md; a value the run did not measure is shown as "-"
COLUMNS = (("run", "label", "{}"), ("checkpoint", "ckpt", "{}"), ("prompts", "prompts", "{}"),
           ("samples", "samples", "{}"), ("colour", "color", "{:.1%}"), ("shape", "shape", "{:.1%}"),
           ("direction", "direction", "{:.1%}"), ("FVD", "fvd", "{:.2f}"), ("VAE PSNR", "vae_psnr", "{}"),
           ("VAE SSIM", "vae_ssim", "{}"), ("VAE LPIPS", "vae_lpips", "{}"), ("settings", "settings", "{}"),
           ("date", "date", "{}"))


def read_rows(out: str) -> list:
    """The rows of `out`/results.jsonl (every earlier run), [] when there is none; a damaged line is named."""
    path = os.path.join(out, ROWS)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {number} is not valid JSON ({e.msg}); fix or remove it") from None
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, dict):  # per-VAE numbers: "label 31.2, other 29.8"
        return ", ".join(f"{k} {v:.4g}" for k, v in value.items())
    return fmt.format(value).replace("|", "\\|")


def format_table(rows: list) -> str:
    """A Markdown table: one line per run, in the order they ran."""
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def append_row(out: str, row: dict) -> list:
    """Append `row` to `out`/results.jsonl and rewrite `out`/results.md from every row; returns the rows."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ROWS), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    rows = read_rows(out)
    _write_atomic(os.path.join(out, TABLE), "# megawan eval\n\n" + format_table(rows))
    return rows
