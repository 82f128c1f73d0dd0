"""`cm3 demo` at a reduced size: every stage runs, the report parses, a re-run skips finished stages."""

from __future__ import annotations

import json

from PIL import Image

from conftest import cm3


def test_demo_end_to_end_at_reduced_size(tmp_path):
    workdir = tmp_path / "demo"
    proc = cm3("demo", "--workdir", str(workdir), "--n", "60", check=True, timeout=600)
    assert "dashboard: http://127.0.0.1:" in proc.stdout
    assert (workdir / "raw" / ".done").exists()

    metrics = json.loads((workdir / "report" / "metrics.json").read_text())["ingest"]
    assert metrics["urls"] == 60
    assert 0.95 <= metrics["success_rate"] <= 1.0
    assert metrics["images_per_second"] > 0
    assert 0.95 <= metrics["checker_colour_agreement"] <= 1.0
    assert 0.95 <= metrics["checker_shape_agreement"] <= 1.0
    grid = Image.open(workdir / "report" / "ingested_samples.png")
    assert grid.width == 4 * 192 and grid.height >= 4 * 192
    assert "ingested_samples.png" in (workdir / "report" / "report.md").read_text()

    again = cm3("demo", "--workdir", str(workdir), "--n", "60", check=True, timeout=600)
    assert "[ingest] done already" in again.stdout
