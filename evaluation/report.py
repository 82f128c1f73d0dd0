"""What a ``cm3 eval`` run leaves for people and programs: ``DIR/metrics.json`` (the run's inputs and one row per
setting, each metric with its sample count) and ``DIR/report.md`` (the table, then prompts or images with what the
model made of them). Both are written whole or not at all (``cm3.core.files.atomic_write``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cm3.core.files import atomic_write, write_json

METRIC_NAMES = {"fid": "FID", "fd_clip": "FD-CLIP", "clip_score": "CLIP score", "cider": "CIDEr", "bleu4": "BLEU-4",
                "vqa_accuracy": "VQA accuracy"}
SETTING_KEYS = ("retrieved", "guidance", "method")


def _table(rows: Sequence[Mapping]) -> list[str]:
    settings = [key for key in SETTING_KEYS if key in rows[0]]
    metrics = [key for key in METRIC_NAMES if key in rows[0]]
    header = [*settings, *(METRIC_NAMES[m] for m in metrics), "samples"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [str(row[key]) for key in settings] + [f"{row[m]['value']:.4g}" for m in metrics]
        counts = sorted({row[m]["samples"] for m in metrics})
        lines.append("| " + " | ".join([*values, "/".join(map(str, counts))]) + " |")
    return lines


def _run_lines(run: Mapping) -> list[str]:
    return [f"- {key}: `{value}`" for key, value in run.items() if value is not None]


def write_report(out: Path, run: Mapping, rows: Sequence[Mapping], prompts: Sequence[str],
                 grid: Mapping[str, Mapping[int, np.ndarray]]) -> dict:
    """Text-to-image: the table, then a grid of the first prompts (rows) by setting (columns), images as PNGs in
    ``DIR/grid/<setting>/``."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"run": dict(run), "rows": list(rows)}
    lines = ["# cm3 eval text-to-image", "", *_run_lines(run), "", *_table(rows), "", "## Samples", "",
             "| prompt | " + " | ".join(grid) + " |", "|" + "---|" * (len(grid) + 1)]
    for i, prompt in enumerate(prompts):
        cells = []
        for name, images in grid.items():
            if i in images:
                path = out / "grid" / name / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda staged, pixels=images[i]: Image.fromarray(pixels).save(staged, "PNG"))
                cells.append(f"![]({path.relative_to(out).as_posix()})")
            else:
                cells.append("")
        lines.append(f"| {prompt.replace('|', '/')} | " + " | ".join(cells) + " |")
    write_json(out / "metrics.json", metrics)
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    return metrics


def write_text_report(out: Path, run: Mapping, row: Mapping, examples: Sequence[tuple[str, str, str]]) -> dict:
    """Captioning or VQA: the table, then (image, question or "", answer, references) examples."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"run": dict(run), "rows": [dict(row)]}
    lines = [f"# cm3 eval {run['task']}", "", *_run_lines(run), "", *_table([row]), "", "## Examples", "",
             "| image | model | references |", "|---|---|---|"]
    lines += [f"| {image} | {answer.replace('|', '/')} | {refs.replace('|', '/')} |" for image, answer, refs in examples]
    write_json(out / "metrics.json", metrics)
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    return metrics
