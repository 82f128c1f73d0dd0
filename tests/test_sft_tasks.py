"""SFT task shards: converters on hand-written public-format fixtures, layouts, the writer, the demo tasks."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cm3.core.shards import TMP_DIR, complete_shards, parquet_path, read_stats, stats_path
from cm3.core.errors import InputError
from cm3.pipeline.sft_examples import Example, Skips, task_rows
from cm3.pipeline.sft_readers import DEFAULT_FORMATS, Sources, formats
from cm3.pipeline.sft_tasks import (
    EDIT_SOURCE_PROMPTS,
    TEMPLATES,
    encode_images,
    layout_example,
    sft_schema,
    write_task_shards,
)
from cm3.synthetic.sft_tasks import demo_tasks
from cm3.synthetic.shapes import CANVAS, HELD_OUT, iter_dataset, render, spec_for
from cm3.tokenizers.layout import TASKS
from cm3.tokenizers.multimodal import MultimodalTokenizer
from cm3.tokenizers.text import TextTokenizer
from cm3.tokenizers.vqgan import VQGAN, VQGANConfig

FIXTURES = Path(__file__).parent / "fixtures" / "sft"
COCO = FIXTURES / "coco_captions.json"
QUESTIONS, ANSWERS = FIXTURES / "vqa_questions.json", FIXTURES / "vqa_annotations.json"
PIX2PIX, GROUNDED = FIXTURES / "instructpix2pix.jsonl", FIXTURES / "grounded.jsonl"
SIZES = {"000000397133.jpg": (640, 427)}  # the loader's images are 64x48 unless named here


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    """Tiny VQ-GAN encodes on a shared machine: extra threads only wait for each other."""


@pytest.fixture(scope="module")
def tokenizer() -> MultimodalTokenizer:
    torch.manual_seed(0)
    text = TextTokenizer.train([spec.caption for _, spec in iter_dataset(200)], vocab_size=300)
    vq = VQGAN(VQGANConfig(ch=8, ch_mult=(1, 2, 2), z_channels=16, embed_dim=16, n_embed=16, resolution=32,
                           norm_groups=8, num_res_blocks=1, attn_resolutions=())).eval()
    return MultimodalTokenizer(text, vq)


def loader(ref: str | int) -> Image.Image:
    """A distinct demo render per reference; names starting with 'missing' do not exist."""
    if str(ref).startswith("missing"):
        raise FileNotFoundError(f"no such image: {ref}")
    image = render(spec_for(zlib.crc32(str(ref).encode()) % 1000), 64)
    return image.resize(SIZES.get(ref, (64, 48)))


def rows_of(fmt: str, task: str, tokenizer: MultimodalTokenizer, source: Path, annotations: Path | None = None,
            skips: Skips | None = None, **options) -> list[dict]:
    """The rows of a format's reader through ``task_rows``, with this module's image loader."""
    items = formats()[fmt].read(fmt, task, Sources(source, annotations))
    return list(task_rows(task, items, tokenizer, loader, Skips() if skips is None else skips, **options))


def segments(tokenizer: MultimodalTokenizer, ids: list[int]) -> list[str | np.ndarray]:
    """<eod> ... <eod> split at <break>: text parts decoded to str, image parts as VQ codes."""
    vocab = tokenizer.vocab
    assert ids[0] == ids[-1] == vocab.eod and vocab.eod not in ids[1:-1]
    parts, current = [], []
    for token in ids[1:-1] + [vocab.break_]:
        if token != vocab.break_:
            current.append(token)
            continue
        ids_ = np.array(current)
        if vocab.is_image(ids_).all():
            assert len(current) == tokenizer.tokens_per_image
            parts.append(vocab.codes_from_ids(ids_))
        else:
            parts.append(tokenizer.text.decode(vocab.bpe_ids(ids_)))
        current = []
    return parts


def check_common(rows: list[dict], task: str, count: int) -> None:
    assert len(rows) == count and {r["task"] for r in rows} == {task}
    assert len({r["key"] for r in rows}) == count
    assert len({r["template"] for r in rows}) >= 2, "several templates should be drawn"
    for row in rows:
        assert row["instruction"] == TEMPLATES[task][row["template"]].format(text=row["input_text"])


# --- converters ---------------------------------------------------------------------------------------


def test_captioning_rows_are_image_first_with_the_caption_after_the_instruction(tokenizer):
    rows = rows_of("coco", "captioning", tokenizer, COCO, batch_size=3)
    check_common(rows, "captioning", 7)
    captions = {a["id"]: a["caption"].strip() for a in json.loads(COCO.read_text())["annotations"]}
    for row in rows:
        image, text = segments(tokenizer, row["ids"])
        assert np.array_equal(image, row["input_image_ids"]) and row["output_image_ids"] is None
        assert row["output_text"] == captions[int(row["key"].split(":")[1])]
        assert text == f"{row['instruction']} {row['output_text']}" and row["input_text"] is None
    first = encode_images(tokenizer, [loader("000000391895.jpg")])[0]
    assert np.array_equal(rows[0]["input_image_ids"], first) and np.array_equal(rows[1]["input_image_ids"], first)


def test_vqa_rows_answer_with_the_consensus_answer(tokenizer):
    rows = rows_of("vqa2", "vqa", tokenizer, QUESTIONS, ANSWERS, batch_size=2)
    check_common(rows, "vqa", 6)
    answers = {a["question_id"]: a["multiple_choice_answer"] for a in json.loads(ANSWERS.read_text())["annotations"]}
    questions = {q["question_id"]: q for q in json.loads(QUESTIONS.read_text())["questions"]}
    for row in rows:
        question = questions[int(row["key"].split(":")[1])]
        image, text = segments(tokenizer, row["ids"])
        assert np.array_equal(image, encode_images(tokenizer, [loader(question["image_id"])])[0])
        assert row["input_text"] == question["question"] and question["question"] in row["instruction"]
        assert row["output_text"] == answers[question["question_id"]]
        assert text == f"{row['instruction']} {row['output_text']}"


def test_text_to_image_rows_from_coco_and_from_examples_that_share_an_image(tokenizer):
    rows = rows_of("coco", "text_to_image", tokenizer, COCO)
    check_common(rows, "text_to_image", 7)
    for row in rows:
        text, image = segments(tokenizer, row["ids"])
        assert text == row["instruction"] and row["input_text"] in text
        assert np.array_equal(image, row["output_image_ids"]) and row["input_image_ids"] is None
    pairs = [("a.jpg", "a red circle"), ("b.jpg", "a blue square"), ("a.jpg", "a circle, red")]
    loaded = []

    def counting_loader(ref):
        loaded.append(ref)
        return loader(ref)

    examples = [Example(f"pair:{i}", f"pairs[{i}]", (ref,), caption=caption) for i, (ref, caption) in enumerate(pairs)]
    rows = list(task_rows("text_to_image", examples, tokenizer, counting_loader, Skips()))
    assert [r["input_text"] for r in rows] == ["a red circle", "a blue square", "a circle, red"]
    assert np.array_equal(rows[0]["output_image_ids"], rows[2]["output_image_ids"]) and loaded == ["a.jpg", "b.jpg"]
    loaded.clear()  # batches of one image: a.jpg is loaded again for the third example
    assert len(list(task_rows("text_to_image", examples, tokenizer, counting_loader, Skips(), batch_size=1))) == 3
    assert loaded == ["a.jpg", "b.jpg", "a.jpg"]


def test_editing_rows_use_the_two_image_layout(tokenizer):
    rows = rows_of("instructpix2pix", "image_editing", tokenizer, PIX2PIX, batch_size=4)
    check_common(rows, "image_editing", 5)
    records = [json.loads(line) for line in PIX2PIX.read_text().splitlines()]
    for row, record in zip(rows, records):
        source, image_in, edit, image_out = segments(tokenizer, row["ids"])
        assert source == EDIT_SOURCE_PROMPTS[row["template"]] and edit == row["instruction"]
        assert row["input_text"] == record.get("edit_prompt", record.get("edit"))
        before = encode_images(tokenizer, [loader(record.get("input_image", record.get("original_image"))),
                                           loader(record["edited_image"])])
        assert np.array_equal(image_in, before[0]) and np.array_equal(image_out, before[1])
        assert np.array_equal(row["input_image_ids"], before[0]) and np.array_equal(row["output_image_ids"], before[1])


def test_grounded_rows_normalise_boxes_to_the_centre_crop(tokenizer):
    skips = Skips()
    rows = rows_of("grounded", "grounded_generation", tokenizer, GROUNDED, skips=skips)
    assert [r["task"] for r in rows] == ["grounded_generation"] * 3  # the umbrella lies outside the crop
    assert skips.counts == {"no_boxes": 1} and skips.first["no_boxes"].endswith("grounded.jsonl: line 3")
    # The crop is the square that ingest's resize keeps: 640x427 -> 48x32 pixels at x 8..40, i.e. x 106.75..533.75
    # of the original; 64x48 -> 43x32 at x 5..37, i.e. x 7.5..55.5.
    assert [r["input_text"] for r in rows] == [
        "person at (66, 16) -> (92, 81), oven at (0, 50) -> (100, 100)",  # the bowl is dropped
        "refrigerator at (0, 0) -> (51, 100)",
        "bench at (18, 17) -> (68, 58), person at (68, 0) -> (84, 63)",  # y 62.5 rounds up
    ]
    for row in rows:
        text, image = segments(tokenizer, row["ids"])
        assert text == row["instruction"] and np.array_equal(image, row["output_image_ids"])


def test_every_task_has_templates_and_a_format_found_in_the_readers_folder():
    assert tuple(TEMPLATES) == TASKS
    found = formats()
    assert set(found) >= {"coco", "vqa2", "instructpix2pix", "grounded", "flickr30k", "image-paragraph",
                          "localized-narratives", "vizwiz", "okvqa", "scienceqa"}
    assert set(DEFAULT_FORMATS) == set(TASKS)
    assert all(task in found[DEFAULT_FORMATS[task]].tasks for task in TASKS)
    with pytest.raises(InputError, match="--format vqa2 needs --annotations: the VQA2 annotations JSON"):
        found["vqa2"].read("vqa2", "vqa", Sources(QUESTIONS))
    with pytest.raises(InputError, match="--format coco feeds captioning, text_to_image, not --task vqa"):
        found["coco"].read("coco", "vqa", Sources(COCO))
    with pytest.raises(InputError, match="--format coco takes no --split"):
        found["coco"].read("coco", "captioning", Sources(COCO, split="train"))


def test_templates_are_a_function_of_seed_and_key(tokenizer):
    again = [r["template"] for r in rows_of("coco", "captioning", tokenizer, COCO)]
    assert again == [r["template"] for r in rows_of("coco", "captioning", tokenizer, COCO)]
    other = [r["template"] for r in rows_of("coco", "captioning", tokenizer, COCO, seed=1)]
    assert other != again


def edited(path: Path, source: Path, change) -> Path:
    data = json.loads(source.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("case, message", [
    ("missing file", r"nope\.json: no such file"),
    ("missing caption", r"coco\.json: annotations\[2\]: missing required text field 'caption'"),
    ("unknown image id", r"coco\.json: annotations\[0\]: image_id 42 is not in the file's images"),
    ("no annotations", r"coco\.json: expected a COCO captions file: an object with lists 'images' and 'annotations'"),
])
def test_bad_coco_input_names_file_and_record(tokenizer, tmp_path, case, message):
    def change(data):
        if case == "missing caption":
            del data["annotations"][2]["caption"]
        elif case == "unknown image id":
            data["annotations"][0]["image_id"] = 42
        elif case == "no annotations":
            del data["annotations"]

    path = tmp_path / "nope.json" if case == "missing file" else edited(tmp_path / "coco.json", COCO, change)
    with pytest.raises(InputError, match=message):
        rows_of("coco", "captioning", tokenizer, path)


def test_coco_records_with_a_missing_image_or_an_empty_caption_are_skipped_and_counted(tokenizer, tmp_path):
    def change(data):
        data["images"][0]["file_name"] = "missing.jpg"  # two captions
        data["annotations"][4]["caption"] = "  "

    skips = Skips()
    rows = rows_of("coco", "captioning", tokenizer, edited(tmp_path / "coco.json", COCO, change), skips=skips)
    assert len(rows) == 4 and skips.counts == {"missing_image": 2, "empty_text": 1}
    assert skips.first == {"missing_image": f"{tmp_path / 'coco.json'}: annotations[0]: image 'missing.jpg'",
                           "empty_text": f"{tmp_path / 'coco.json'}: annotations[4]"}


def test_bad_vqa_and_record_input_names_file_and_record(tokenizer, tmp_path):
    def drop_annotation(data):
        del data["annotations"][1]

    def move_image(data):
        data["annotations"][3]["image_id"] = 7

    for change, message in [
        (drop_annotation, r"vqa_questions\.json: questions\[1\]: question_id 262148001 has no annotation"),
        (move_image, r"answers\.json: annotations\[3\]: image_id 7 does not match image_id 393225"),
    ]:
        answers = edited(tmp_path / "answers.json", ANSWERS, change)
        with pytest.raises(ValueError, match=message):
            rows_of("vqa2", "vqa", tokenizer, QUESTIONS, answers)

    bad_edit = tmp_path / "edits.jsonl"
    bad_edit.write_text(PIX2PIX.read_text() + '{"input_image": "x.jpg", "edited_image": "y.jpg"}\n')
    with pytest.raises(ValueError, match=r"edits\.jsonl: line 6: missing required text field 'edit_prompt' or 'edit'"):
        rows_of("instructpix2pix", "image_editing", tokenizer, bad_edit)
    bad_box = tmp_path / "boxes.jsonl"
    bad_box.write_text('{"image": "a.jpg", "objects": [{"name": "cat", "bbox": [1, 2, 0, 4]}]}\n')
    with pytest.raises(ValueError, match=r"boxes\.jsonl: line 1: objects\[0\]: 'bbox' must be \[x, y, w, h\]"):
        rows_of("grounded", "grounded_generation", tokenizer, bad_box)


def test_layout_rejects_an_unknown_task_and_a_wrong_sized_image(tokenizer):
    row = rows_of("coco", "captioning", tokenizer, COCO)[0]
    with pytest.raises(ValueError, match="unknown task"):
        layout_example(tokenizer, {**row, "task": "dreaming"})
    with pytest.raises(ValueError, match="input_image_ids must hold 64 codes"):
        layout_example(tokenizer, {**row, "input_image_ids": row["input_image_ids"][:10]})


# --- the writer ---------------------------------------------------------------------------------------


def test_writer_commits_readable_shards_and_resumes(tokenizer, tmp_path):
    rows = list(demo_tasks(tokenizer, 2))  # 14 rows, every task
    out = tmp_path / "sft"
    assert write_task_shards(rows, out, tokenizer.tokens_per_image, shard_rows=5) == [0, 1, 2]
    assert complete_shards(out) == [0, 1, 2] and not (out / TMP_DIR).exists()
    table = pq.read_table(parquet_path(out, 0))
    assert table.schema.equals(sft_schema(tokenizer.tokens_per_image))
    read = [row for s in range(3) for row in pq.read_table(parquet_path(out, s)).to_pylist()]
    assert [r["ids"] for r in read] == [r["ids"] for r in rows]
    for stored, row in zip(read, rows):
        for column in ("input_image_ids", "output_image_ids"):
            assert (stored[column] is None) == (row[column] is None)
            assert stored[column] is None or stored[column] == row[column].tolist()
        assert layout_example(tokenizer, stored) == row["ids"]
    tail = {"vqa": 1, "text_to_image": 1, "image_editing": 1, "grounded_generation": 1}  # rows 10..13
    assert read_stats(out, 2) == {"count": 4, "tasks": tail, "tokens_per_image": 64}
    assert write_task_shards(rows, out, tokenizer.tokens_per_image, shard_rows=5) == []
    stats_path(out, 1).unlink()  # as if killed between the parquet and the stats file
    (out / TMP_DIR / "00001-dead").mkdir(parents=True)
    assert write_task_shards(rows, out, tokenizer.tokens_per_image, shard_rows=5) == [1]
    assert pq.read_table(parquet_path(out, 1)).to_pylist() == read[5:10]
    with pytest.raises(ValueError, match=r"00000_stats\.json: tokens_per_image is 64, not 256"):
        write_task_shards(rows, out, 256, shard_rows=5)


# --- the embedded demo --------------------------------------------------------------------------------


def test_demo_tasks_cover_every_task_without_held_out_pairs(tokenizer):
    n = 12
    rows = list(demo_tasks(tokenizer, n, batch_size=5))
    assert len(rows) == 7 * n and {r["task"] for r in rows} == set(TASKS)
    held_out = [f"{colour} {shape}" for shape, colour in HELD_OUT]
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
        texts = " ".join(t for t in (row["instruction"], row["input_text"], row["output_text"]) if t)
        assert not any(pair in texts for pair in held_out)
        assert segments(tokenizer, row["ids"])  # a well-formed layout
    for i, (cap, edit, ground) in enumerate(zip(by_task["captioning"], by_task["image_editing"],
                                                by_task["grounded_generation"])):
        spec = spec_for(i)
        assert cap["output_text"] == spec.caption
        *_, shape, colour = edit["input_text"].split()
        assert shape == spec.shape and colour != spec.colour and (shape, colour) not in HELD_OUT
        assert np.array_equal(edit["input_image_ids"], cap["input_image_ids"])
        assert not np.array_equal(edit["output_image_ids"], edit["input_image_ids"])
        x0, y0, x1, y1 = (int(np.floor(v / CANVAS * 100 + 0.5)) for v in spec.bbox)
        assert ground["input_text"] == f"{spec.colour} {spec.shape} at ({x0}, {y0}) -> ({x1}, {y1})"
    answers = [(r["input_text"], r["output_text"]) for r in by_task["vqa"][:3]]
    spec = spec_for(0)
    assert answers == [("what colour is the shape?", spec.colour), ("what shape is it?", spec.shape),
                       ("where is the shape?", spec.position)]
    assert all(len({r["template"] for r in group}) >= 2 for group in by_task.values())
