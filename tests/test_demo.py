"""`cm3 demo --small` end to end: every stage runs, the Ray dashboard shows the job, the report parses,
every metric is a number in range, and a re-run skips finished stages."""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import threading
import time
import urllib.request

from conftest import BIN, RAY_ENV, cm3
from PIL import Image

from cm3.tokenizers.vqgan import VQGANConfig

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
    size = metrics["run"]["size"]
    # the keys a user reads first, each a fraction; the sample counts are what the size asked for
    for group in ("seen", "held_out"):
        figures = metrics["text_to_image"][group]
        assert fraction(figures["colour"]) and fraction(figures["shape"])
        assert figures["samples"] == size["prompts"] * size["samples"]
        assert fraction(metrics["captions"][group]["colour_and_shape"])
        assert metrics["captions"][group]["images"] == size["caption_images"]
        for name in ("retrieval", "no_guidance", "cd_k"):
            ablation = metrics["ablations"][name][group]
            assert fraction(ablation["colour"]) and fraction(ablation["shape"])
            assert ablation["samples"] == figures["samples"]
    ablations = metrics["ablations"]
    assert (metrics["text_to_image"]["retrieved"], ablations["retrieval"]["retrieved"],
            ablations["no_guidance"]["guidance"], ablations["cd_k"]["method"]) == (0, 2, 1.0, "cd_k")
    assert fraction(metrics["retrieval"]["agreement"]) and metrics["retrieval"]["neighbours"] > 0
    assert 0 < metrics["wall_minutes"] < 60
    # relations a broken pipeline fails: the downloaded pixels match their captions, training lowered the loss
    # from the uniform ln(vocab), and the tuned decoder scores the true image codes better than uniform
    assert metrics["ingest"]["urls"] == 60 and metrics["ingest"]["success_rate"] == 1.0
    assert metrics["ingest"]["checker_colour_agreement"] == metrics["ingest"]["checker_shape_agreement"] == 1.0
    # BPE plus the demo VQ's codes (plus a few specials)
    vocab_nats = math.log(size["vocab_size"] + VQGANConfig.preset("demo").n_embed)
    assert all(metrics["training"][stage]["final_loss"] < vocab_nats for stage in ("pretrain", "sft"))
    for figures in metrics["diagnostics"]["image_nll_given_caption"].values():
        assert set(figures) == {"training_images", "training_pairs_new_images", "held_out_pairs"}
        assert all(0 < value < vocab_nats for value in figures.values()), figures
    reliance = metrics["diagnostics"]["caption_reliance"]
    assert set(reliance) == {"pretrained", "tuned"}
    for figures in reliance.values():
        assert set(figures) == {"full_caption", *(f"{a}_swapped" for a in ("colour", "shape", "position",
                                                                            "background"))}
    decoder = metrics["training"]["decoder"]
    assert (decoder["positions"], decoder["image_grid"]) == ("rope", 8)  # DemoSize's choices reached the model
    assert all("command" in metrics[section] for section in ("ingest", "tokenizer", "retrieval", "text_to_image",
                                                             "captions"))
    for name in REPORT_PICTURES:
        assert Image.open(report / name).width > 0, name
    text = (report / "report.md").read_text()
    assert "| text -> image, seen pairs: colour / shape |" in text and "![generations](generations.png)" in text

    again = cm3("demo", "--workdir", str(workdir), "--small", "--stages", "ingest", check=True, timeout=600)
    assert "[ingest] done already" in again.stdout
    other = cm3("demo", "--workdir", str(workdir), "--small", "--seed", "1", "--stages", "ingest", timeout=600)
    assert other.returncode == 2 and "seed" in other.stderr, other.stderr
