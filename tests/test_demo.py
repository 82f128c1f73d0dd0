"""`cm3 demo --small` end to end: every stage runs, the Ray dashboard shows the job, the report parses,
every metric is a number in range, and a re-run skips finished stages."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import urllib.request

from PIL import Image

from conftest import BIN, RAY_ENV, cm3

REPORT_PICTURES = ["generations.png", "captions.png", "vq_reconstructions.png", "retrieval_examples.png",
                   "loss_pretrain.png", "loss_sft.png"]


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def dashboard_jobs(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/jobs/", timeout=10) as response:
        return json.loads(response.read())


def fraction(value) -> bool:
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def test_demo_end_to_end_at_reduced_size(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.Popen([str(BIN / "cm3"), "demo", "--workdir", str(workdir), "--small"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **RAY_ENV})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    output, dashboard, seen_job = [], None, False
    deadline = time.time() + 1200
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            line = ""
        if line is None:
            break
        output.append(line)
        if dashboard is None and "dashboard: http://127.0.0.1:" in line:
            dashboard = line.split("dashboard: ")[1].strip()
        if dashboard and not seen_job:
            try:
                jobs = dashboard_jobs(dashboard)
            except OSError:
                continue
            seen_job = any(job.get("type") == "DRIVER" and job.get("status") == "RUNNING" for job in jobs)
    assert proc.wait(timeout=60) == 0, "".join(output)[-5000:]
    assert dashboard, "the demo never printed the dashboard URL"
    assert seen_job, "the running demo's job never showed on the dashboard's jobs API"

    report = workdir / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["ingest"]["urls"] == 60 and fraction(metrics["ingest"]["success_rate"])
    assert fraction(metrics["ingest"]["checker_colour_agreement"])
    assert isinstance(metrics["tokenizer"]["heldout_psnr_db"], float)
    assert fraction(metrics["retrieval"]["neighbour_colour_and_shape_agreement"])
    for key in ("colour_accuracy", "shape_accuracy"):
        assert fraction(metrics["text_to_image"][key])
        assert fraction(metrics["text_to_image"]["checker_on_vq_reconstructions"][key])
        assert all(fraction(result[key]) for result in metrics["ablations"].values())
    by_size = metrics["text_to_image"]["checker_on_vq_reconstructions"]["shape_accuracy_by_size"]
    assert set(by_size) <= {"small", "medium", "large"} and by_size and all(map(fraction, by_size.values()))
    image_nll = metrics["text_to_image"]["image_nll_given_caption"]
    assert set(image_nll) == {"pretrained", "tuned"}
    for figures in image_nll.values():
        assert set(figures) == {"training_images", "training_pairs_new_images", "held_out_pairs"}
        assert all(0 < value < 20 for value in figures.values()), image_nll  # nats per token; uniform: ln(vocab)
    reliance = metrics["text_to_image"]["caption_reliance"]
    assert set(reliance) == {"pretrained", "tuned"}
    for figures in reliance.values():
        assert set(figures) == {"full_caption", *(f"{a}_swapped" for a in ("colour", "shape", "size", "position",
                                                                            "background"))}
        assert 0 < figures["full_caption"] < 20 and all(abs(v) < 20 for v in figures.values()), reliance
    decoder = metrics["training"]["decoder"]
    assert (decoder["positions"], decoder["image_grid"]) == ("rope", 8)  # DemoSize's choices reached the model
    assert len(metrics["ablations"]) == 4
    assert fraction(metrics["image_to_text"]["colour_and_shape_named"])
    assert all("command" in metrics[section] for section in ("ingest", "tokenizer", "retrieval", "text_to_image"))
    for name in REPORT_PICTURES:
        assert Image.open(report / name).width > 0, name
    text = (report / "report.md").read_text()
    assert "## text_to_image" in text and "![generations.png](generations.png)" in text

    again = cm3("demo", "--workdir", str(workdir), "--small", "--stages", "ingest", check=True, timeout=600)
    assert "[ingest] done already" in again.stdout
