"""`cm3 eval` end to end on a tiny checkpoint: the report, the ablation rows, reuse of kept samples, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cm3.core.files import write_json
from cm3.core.shards import parquet_path, stats_path
from cm3.evaluation.caption_scores import caption_scores
from cm3.evaluation.vqa_accuracy import vqa_accuracy
from cm3.synthetic.shapes import render, spec_for
from conftest import cm3
from factories import TINY_F32, captions, make_tokenizer, save_random_clip, save_random_inception


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny checkpoint (64-pixel images of 2x2 tokens), prompts, reference images, Inception and CLIP files."""
    from cm3.model.checkpoint import save_checkpoint
    from cm3.model.config import CM3Config
    from cm3.model.decoder import CM3

    root = tmp_path_factory.mktemp("eval")
    tokenizer = make_tokenizer(root / "tokenizer", {**TINY_F32, "resolution": 64}, captions())
    torch.manual_seed(0)
    model = CM3(CM3Config(vocab_size=tokenizer.vocab.size, n_layers=1, d_model=32, n_heads=4, max_seq_len=64))
    save_checkpoint(root / "ckpt", model, tokenizer, {"stage": "test"})
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": c}) + "\n" for c in captions(3)))
    (root / "real").mkdir()
    for i in range(4):
        render(spec_for(100 + i), 64).save(root / "real" / f"{i}.png")
    clip = save_random_clip(root / "clip.safetensors")
    return {"root": root, "ckpt": root / "ckpt", "prompts": root / "prompts.jsonl", "real": root / "real",
            "inception": save_random_inception(root / "inception.pth"),
            "clip": ["--clip-model", clip["model_name"], "--clip-pretrained", clip["pretrained"]]}


def text_to_image(world: dict, out: Path, *extra: str, **kwargs):
    return cm3("eval", "text-to-image", "--checkpoint", str(world["ckpt"]), "--prompts", str(world["prompts"]),
               "--references", str(world["real"]), "--out", str(out), "--inception", str(world["inception"]),
               "--device", "cpu", *world["clip"], *extra, **kwargs)


def test_text_to_image_reports_each_ablation_row_and_reuses_the_kept_samples(world, tmp_path):
    out = tmp_path / "run"
    first = ["--samples", "2", "--rerank", "--batch-size", "4"]  # 2 prompts (4 images) per shard: 2 shards
    text_to_image(world, out, *first, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    [row] = metrics["rows"]
    assert (row["setting"], row["retrieved"], row["guidance"], row["method"]) == ("k0-g3-top_p", 0, 3.0, "top_p")
    assert row["fid"]["samples"] == row["fd_clip"]["samples"] == row["clip_score"]["samples"] == 3  # 1 of 2 kept
    assert row["fid"]["references"] == row["fd_clip"]["references"] == 4
    assert row["fid"]["value"] > 0 and row["fd_clip"]["value"] > 0 and 0 <= row["clip_score"]["value"] <= 100
    assert metrics["run"]["samples_per_prompt"] == 2 and metrics["run"]["seed"] == 0
    report = (out / "report.md").read_text()
    assert "| retrieved | guidance | method | FID | FD-CLIP | CLIP score | samples |" in report
    links = [cell.split("](")[1].split(")")[0] for line in report.splitlines() for cell in line.split(" | ")
             if cell.startswith("![](")]
    assert len(links) == 3 and all((out / link).is_file() for link in links)
    shards = sorted((out / "samples").rglob("*.parquet"))
    assert [pq.read_metadata(s).num_rows for s in shards] == [4, 2]
    stamps = [s.stat().st_mtime_ns for s in shards]

    again = text_to_image(world, out, *first, "--guidance", "1,3", "--metrics", "clip_score", check=True)
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["k0-g1-top_p", "k0-g3-top_p"] and "k0-g1-top_p: clip_score" in again.stdout
    assert rows[1]["clip_score"] == row["clip_score"] and "fid" not in rows[1]  # the same images, scored again
    assert [s.stat().st_mtime_ns for s in shards] == stamps
    assert len(list((out / "samples").rglob("*.parquet"))) == 4


def test_text_to_image_fails_clearly_before_generating(world, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    pq.write_table(pa.table({"key": ["0"], "caption": ["a"]}), parquet_path(tokens, 0))
    write_json(stats_path(tokens, 0), {"count": 1})
    cases = {
        "missing weights": (["--inception", str(tmp_path / "absent.pth")], "weights-inception-2015-12-05"),
        "empty prompts": (["--prompts", str(empty)], f"{empty}: holds no prompts"),
        "token shards as references": (["--references", str(tokens)], "has no column 'jpg'"),
        "a file as references": (["--references", str(empty)], "references must be a folder"),
    }
    for name, (extra, message) in cases.items():
        proc = text_to_image(world, tmp_path / "out", *extra)
        assert proc.returncode == 2 and message in proc.stderr, (name, proc.stderr)
    assert not (tmp_path / "out" / "samples").exists()


def test_caption_and_vqa_score_the_kept_answers(world, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        render(spec_for(i), 64).save(images / f"COCO_{i:03d}.png")
    coco = {"images": [{"id": i, "file_name": f"COCO_{i:03d}.png"} for i in range(3)],
            "annotations": [{"image_id": i, "id": 10 + i, "caption": spec_for(i).caption} for i in range(3)]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    common = ["--checkpoint", str(world["ckpt"]), "--images", str(images), "--device", "cpu", "--max-new-tokens", "4"]
    cm3("eval", "caption", *common, "--references", str(tmp_path / "captions.json"), "--out",
        str(tmp_path / "cap"), check=True)
    predicted = json.loads((tmp_path / "cap" / "predictions.json").read_text())["predictions"]
    row = json.loads((tmp_path / "cap" / "metrics.json").read_text())["rows"][0]
    direct = caption_scores({i: [spec_for(i).caption] for i in range(3)}, dict(enumerate(predicted)))
    assert row == {"cider": {"value": direct["cider"], "samples": 3}, "bleu4": {"value": direct["bleu4"], "samples": 3}}

    questions = {"questions": [{"image_id": i, "question": "what colour is it?", "question_id": 100 + i}
                               for i in range(3)]}
    answers = {"annotations": [{"question_id": 100 + i, "image_id": i,
                                "answers": [{"answer": spec_for(i).colour}] * 10} for i in range(3)]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    vqa = ["eval", "vqa", *common, "--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
           "--out", str(tmp_path / "vqa")]
    cm3(*vqa, "--image-pattern", "COCO_{:03d}.png", check=True)
    predicted = json.loads((tmp_path / "vqa" / "predictions.json").read_text())["predictions"]
    row = json.loads((tmp_path / "vqa" / "metrics.json").read_text())["rows"][0]
    direct = vqa_accuracy(dict(enumerate(predicted)), {i: [spec_for(i).colour] * 10 for i in range(3)})
    assert row == {"vqa_accuracy": {"value": direct["vqa_accuracy"], "samples": 3}}
    missing = cm3(*vqa, "--image-pattern", "{}.png")
    assert missing.returncode == 2 and "0.png: no such image file" in missing.stderr
