"""`cm3 sft convert` for every published format: fixtures written here in each data set's own structure (field
names, nesting, id types as the published files have them), real image files with every kind of broken record,
and the task shards read back and checked row by row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from cm3.core.errors import InputError
from cm3.core.shards import complete_shards, parquet_path
from cm3.pipeline.image_folder import ImageFolder, OutsideRoot
from cm3.pipeline.sft_convert import Conversion, convert
from cm3.pipeline.sft_readers import Sources, formats
from cm3.pipeline.sft_readers._records import json_items
from cm3.pipeline.sft_tasks import encode_images, layout_example
from cm3.synthetic.shapes import render, spec_for
from cm3.tokenizers.multimodal import MultimodalTokenizer
from conftest import cm3
from factories import captions, make_tokenizer

TINY_VQ = dict(ch=8, ch_mult=(1, 2, 2), z_channels=16, embed_dim=16, n_embed=16, resolution=32, norm_groups=8,
               num_res_blocks=1, attn_resolutions=())
VG = "https://cs.stanford.edu/people/rak248"


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    """Tiny VQ-GAN encodes on a shared machine: extra threads only wait for each other."""


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder, TINY_VQ, captions(200))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> MultimodalTokenizer:
    return MultimodalTokenizer.load(tokenizer_dir)


def picture(path: Path, index: int, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    render(spec_for(index), 64).resize(size).save(path)
    return path


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF truncated")
    return path


def dump(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def converted(tokenizer, tmp_path: Path, name: str, task: str, sources: Sources, root: Path,
              pattern: str = "{}") -> tuple[Conversion, list[dict]]:
    """Convert into a fresh folder (2 rows a shard) and read every row back from the shards."""
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    done = convert(name, formats()[name], task, sources, ImageFolder(root, pattern), tokenizer, out, shard_rows=2)
    rows = [row for shard in complete_shards(out) for row in pq.read_table(parquet_path(out, shard)).to_pylist()]
    assert done.rows == len(rows) and done.written == complete_shards(out)
    return done, rows


def check_rows(tokenizer, rows: list[dict], task: str, expected: list[tuple[str, str | None, str | None, Path]]):
    """Each row is (key, input_text, output_text, image file) of ``expected``, in order, with that image's codes
    in the task's image column and the task's layout in ``ids``."""
    assert [row["key"] for row in rows] == [key for key, *_ in expected]
    codes = encode_images(tokenizer, [Image.open(image) for *_, image in expected])
    column = "input_image_ids" if task in ("captioning", "vqa") else "output_image_ids"
    for row, (key, input_text, output_text, _), image_codes in zip(rows, expected, codes):
        assert row["task"] == task, key
        assert (row["input_text"], row["output_text"]) == (input_text, output_text), key
        assert row[column] == image_codes.tolist(), key
        assert row["ids"] == layout_example(tokenizer, row), key


# --- Flickr30k ---------------------------------------------------------------------------------------------


def karpathy_image(imgid: int, filename: str, split: str, raws: list[str], first_sentid: int) -> dict:
    sentences = [{"tokens": raw.lower().strip(" .").replace(",", "").split(), "raw": raw, "imgid": imgid,
                  "sentid": first_sentid + k} for k, raw in enumerate(raws)]
    return {"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences, "split": split,
            "filename": filename}


def flickr30k_files(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "flickr30k-images"
    picture(root / "1000092795.jpg", 1), picture(root / "10002456.jpg", 2), picture(root / "1000268201.jpg", 3)
    corrupt(root / "1001773457.jpg")
    picture(tmp_path / "outside.jpg", 4)  # a real image: were it opened, a row would come out of it
    karpathy = dump(tmp_path / "dataset_flickr30k.json", {"images": [
        karpathy_image(0, "1000092795.jpg", "train", [
            "Two young guys with shaggy hair look at their hands while hanging out in the yard.",
            "Two young, White males are outside near many bushes."], 0),
        karpathy_image(1, "10002456.jpg", "train", [
            "Several men in hard hats are operating a giant pulley system.", "   "], 2),
        karpathy_image(2, "1000268201.jpg", "test", [
            "A child in a pink dress is climbing up a set of stairs in an entry way."], 4),
        karpathy_image(3, "1000344755.jpg", "train", ["Someone in a blue shirt and hat is standing on stair."], 5),
        karpathy_image(4, "1001773457.jpg", "train", ["A black dog and a spotted dog are fighting"], 6),
        karpathy_image(5, "../outside.jpg", "train", ["A little girl covered in paint sits in front of a rainbow."], 7),
    ], "dataset": "flickr30k"})
    return karpathy, root


def test_flickr30k_karpathy_file_keeps_one_split_and_skips_broken_records(tokenizer, tmp_path):
    karpathy, root = flickr30k_files(tmp_path)
    done, rows = converted(tokenizer, tmp_path, "flickr30k", "captioning", Sources(karpathy, split="train"), root)
    check_rows(tokenizer, rows, "captioning", [
        ("dataset_flickr30k.json:0", None,
         "Two young guys with shaggy hair look at their hands while hanging out in the yard.", root / "1000092795.jpg"),
        ("dataset_flickr30k.json:1", None, "Two young, White males are outside near many bushes.",
         root / "1000092795.jpg"),
        ("dataset_flickr30k.json:2", None, "Several men in hard hats are operating a giant pulley system.",
         root / "10002456.jpg"),
    ])
    assert done.skips.counts == {"empty_text": 1, "missing_image": 1, "unreadable_image": 1, "outside_root": 1}
    assert done.skips.first["outside_root"] == f"{karpathy}: images[5]: sentences[0]: image '../outside.jpg'"
    assert done.written == [0, 1]
    _, every = converted(tokenizer, tmp_path, "flickr30k", "captioning", Sources(karpathy), root)
    assert [row["key"] for row in every] == [f"dataset_flickr30k.json:{i}" for i in (0, 1, 2, 4)]
    with pytest.raises(InputError, match="--split 'dev': Karpathy's splits are train, val, test, restval"):
        converted(tokenizer, tmp_path, "flickr30k", "captioning", Sources(karpathy, split="dev"), root)


def test_flickr30k_token_file(tokenizer, tmp_path):
    _, root = flickr30k_files(tmp_path)
    token = tmp_path / "results_20130124.token"
    token.write_text("1000092795.jpg#0\tTwo young guys with shaggy hair look at their hands while hanging out in "
                     "the yard .\n"
                     "1000092795.jpg#1\tTwo young , White males are outside near many bushes .\n"
                     "10002456.jpg#0\tSeveral men in hard hats are operating a giant pulley system .\n"
                     "10002456.jpg#1\t \n"
                     "1000344755.jpg#0\tSomeone in a blue shirt and hat is standing on stair .\n")
    done, rows = converted(tokenizer, tmp_path, "flickr30k", "text_to_image", Sources(token), root)
    check_rows(tokenizer, rows, "text_to_image", [
        ("results_20130124.token:1000092795.jpg#0",
         "Two young guys with shaggy hair look at their hands while hanging out in the yard .", None,
         root / "1000092795.jpg"),
        ("results_20130124.token:1000092795.jpg#1", "Two young , White males are outside near many bushes .", None,
         root / "1000092795.jpg"),
        ("results_20130124.token:10002456.jpg#0", "Several men in hard hats are operating a giant pulley system .",
         None, root / "10002456.jpg"),
    ])
    assert done.skips.counts == {"empty_text": 1, "missing_image": 1}
    with pytest.raises(InputError, match="the token file has no splits"):
        converted(tokenizer, tmp_path, "flickr30k", "captioning", Sources(token, split="train"), root)
    token.write_text(token.read_text() + "1000092795.jpg Two young guys\n")
    with pytest.raises(InputError, match=r"results_20130124\.token: line 6: expected '<image file>#<n><TAB><caption>'"):
        converted(tokenizer, tmp_path, "flickr30k", "captioning", Sources(token), root)


# --- Stanford image paragraphs ------------------------------------------------------------------------------


def paragraph_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "visual_genome"
    picture(root / "VG_100K" / "2356347.jpg", 5), picture(root / "VG_100K_2" / "2388350.jpg", 6)
    picture(root / "VG_100K_2" / "2388351.jpg", 7), picture(root / "VG_100K" / "2356348.jpg", 8)
    corrupt(root / "VG_100K" / "2400001.jpg")
    picture(tmp_path / "outside.jpg", 9)
    paragraphs = dump(tmp_path / "paragraphs_v1.json", [
        {"url": f"{VG}/VG_100K/2356347.jpg", "image_id": 2356347,
         "paragraph": "A large building with bars on the windows in front of it. There is people walking in front "
                      "of the building. "},
        {"url": f"{VG}/VG_100K_2/2388350.jpg", "image_id": 2388350,
         "paragraph": "Two women are sitting at a table. One of them is holding a cup. The table is brown."},
        {"url": f"{VG}/VG_100K/2356347.jpg", "image_id": 2356347, "paragraph": "A building seen from a street."},
        {"url": f"{VG}/VG_100K/2400001.jpg", "image_id": 2400001, "paragraph": "A dog on a couch."},
        {"url": f"{VG}/VG_100K_2/2400002.jpg", "image_id": 2400002, "paragraph": "A train at a station."},
        {"url": f"{VG}/VG_100K_2/2388351.jpg", "image_id": 2388351, "paragraph": ""},
        {"url": f"{VG}/../outside.jpg", "image_id": 2400003, "paragraph": "A red bus on a road."},
        {"url": f"{VG}/VG_100K/2356348.jpg", "image_id": 2356348, "paragraph": "A plate of food on a table."},
    ])
    split = dump(tmp_path / "test_split.json", [2356347, 2388350, 2400001, 2400002, 2388351, 2400003])
    return paragraphs, split, root


def test_image_paragraph_split_file_duplicates_and_broken_records(tokenizer, tmp_path):
    paragraphs, split, root = paragraph_files(tmp_path)
    done, rows = converted(tokenizer, tmp_path, "image-paragraph", "captioning", Sources(paragraphs, splits=split),
                           root)
    check_rows(tokenizer, rows, "captioning", [
        ("paragraphs_v1.json:2356347", None, "A large building with bars on the windows in front of it. There is "
                                             "people walking in front of the building.",
         root / "VG_100K" / "2356347.jpg"),
        ("paragraphs_v1.json:2388350", None,
         "Two women are sitting at a table. One of them is holding a cup. The table is brown.",
         root / "VG_100K_2" / "2388350.jpg"),
    ])
    assert done.skips.counts == {"duplicate": 1, "unreadable_image": 1, "missing_image": 1, "empty_text": 1,
                                 "outside_root": 1}
    assert done.skips.first["duplicate"] == f"{paragraphs}: record 2"
    _, every = converted(tokenizer, tmp_path, "image-paragraph", "text_to_image", Sources(paragraphs), root)
    assert [row["key"] for row in every] == ["paragraphs_v1.json:2356347", "paragraphs_v1.json:2388350",
                                             "paragraphs_v1.json:2356348"]
    assert every[2]["input_text"] == "A plate of food on a table."


# --- Localized Narratives --------------------------------------------------------------------------------


def narrative(image_id: str, annotator_id: int, caption: str, timed=None, traces=None) -> dict:
    record = {"dataset_id": "mscoco_val2017", "image_id": image_id, "annotator_id": annotator_id, "caption": caption}
    if timed is not None:  # the full files; the *_captions.jsonl files stop at the caption
        record.update(timed_caption=[{"utterance": u, "start_time": s, "end_time": e} for u, s, e in timed],
                      traces=[[{"x": x, "y": y, "t": t} for x, y, t in segment] for segment in traces],
                      voice_recording=f"coco_val/coco_val_{image_id}_{annotator_id}.ogg")
    return record


COWS = "In this image there are group of cows standing on the grass."


def narrative_files(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "val2017"
    picture(root / "000000137576.jpg", 10, size=(64, 64)), picture(root / "000000397133.jpg", 11)
    picture(root / "000000037777.jpg", 12)
    corrupt(root / "000000252219.jpg")
    timed = [("In this", 0.0, 0.4), ("image", 0.4, 0.6), ("there are", 0.6, 1.0), ("group of cows", 1.0, 2.0),
             ("standing", 2.0, 2.2), ("on the grass.", 2.6, 3.4)]
    traces = [[(0.9, 0.1, 0.2), (0.8, 0.2, 0.5)],  # while "In this image" is said: no object
              [(0.25, 0.5, 1.1), (0.75, 0.6, 1.5), (0.5, 0.9, 1.9)],  # "group of cows"; nothing while "standing"
              [(-0.05, 0.8, 2.7), (1.02, 1.1, 3.3)]]  # "on the grass", a little beyond the image: clipped
    path = tmp_path / "coco_val_localized_narratives.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in [
        narrative("137576", 93, COWS, timed, traces),
        narrative("397133", 12, "A man is standing in a kitchen near an oven."),
        narrative("252219", 7, "A dog on a road.", [("a dog", 0.0, 1.0)], [[(0.1, 0.1, 0.5), (0.9, 0.9, 0.8)]]),
        narrative("87038", 5, "A bench in a park."),
        narrative("37777", 3, " "),
    ]) + "\n")
    return path, root


def test_localized_narratives_captions(tokenizer, tmp_path):
    path, root = narrative_files(tmp_path)
    done, rows = converted(tokenizer, tmp_path, "localized-narratives", "captioning", Sources(path), root,
                           pattern="{:0>12}.jpg")
    check_rows(tokenizer, rows, "captioning", [
        ("coco_val_localized_narratives.jsonl:137576:93", None, COWS, root / "000000137576.jpg"),
        ("coco_val_localized_narratives.jsonl:397133:12", None, "A man is standing in a kitchen near an oven.",
         root / "000000397133.jpg"),
    ])
    assert done.skips.counts == {"unreadable_image": 1, "missing_image": 1, "empty_text": 1}


def test_localized_narratives_traces_become_grounded_boxes(tokenizer, tmp_path):
    path, root = narrative_files(tmp_path)
    done, rows = converted(tokenizer, tmp_path, "localized-narratives", "grounded_generation", Sources(path), root,
                           pattern="{:0>12}.jpg")
    # A 64x64 image is its own centre crop: boxes are the traces' fractions in hundredths.
    check_rows(tokenizer, rows, "grounded_generation", [
        ("coco_val_localized_narratives.jsonl:137576:93",
         "group of cows at (25, 50) -> (75, 90), on the grass at (0, 80) -> (100, 100)", None,
         root / "000000137576.jpg"),
    ])
    assert done.skips.counts == {"no_boxes": 3, "unreadable_image": 1}  # three narratives without traces


# --- VizWiz -------------------------------------------------------------------------------------------------


def vizwiz_record(image: str, question: str, answers: list[str], answerable: int = 1,
                  answer_type: str = "other") -> dict:
    return {"image": image, "question": question,
            "answers": [{"answer_confidence": "yes" if k % 3 else "maybe", "answer": a} for k, a in enumerate(answers)],
            "answer_type": answer_type, "answerable": answerable}


def vizwiz_files(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "val"
    for k in (0, 1, 2, 5):
        picture(root / f"VizWiz_val_0000000{k}.jpg", 20 + k)
    corrupt(root / "VizWiz_val_00000004.jpg")
    picture(tmp_path / "VizWiz_secret.jpg", 26)
    path = dump(tmp_path / "Annotations" / "val.json", [
        vizwiz_record("VizWiz_val_00000000.jpg", "Ok. There is another picture I hope it is a better one.",
                      ["unanswerable"] * 7 + ["blank", "blank", "nothing"], answerable=0,
                      answer_type="unanswerable"),
        vizwiz_record("VizWiz_val_00000001.jpg", "Can you tell me what this medicine is please?",
                      ["tylenol cold", "night time", "tylenol cold", "night time", "tylenol cold", "night time",
                       "cold medicine", "unanswerable", "tylenol", "night time tylenol"]),  # a tie: the first wins
        vizwiz_record("VizWiz_val_00000002.jpg", "What is this?", ["coke"] * 2 + ["coca cola"] * 6 + ["coke"] * 2),
        vizwiz_record("VizWiz_val_00000003.jpg", "What color is this shirt?", ["blue"] * 10),
        vizwiz_record("VizWiz_val_00000004.jpg", "What is in this can?", ["corn"] * 10),
        vizwiz_record("../VizWiz_secret.jpg", "What does this say?", ["exit"] * 10),
        vizwiz_record("VizWiz_val_00000005.jpg", "", ["unanswerable"] * 10, answerable=0),
    ])
    return path, root


def test_vizwiz_consensus_answers_and_unanswerable_questions(tokenizer, tmp_path):
    path, root = vizwiz_files(tmp_path)
    done, rows = converted(tokenizer, tmp_path, "vizwiz", "vqa", Sources(path), root)
    check_rows(tokenizer, rows, "vqa", [
        ("val.json:VizWiz_val_00000000.jpg", "Ok. There is another picture I hope it is a better one.",
         "unanswerable", root / "VizWiz_val_00000000.jpg"),
        ("val.json:VizWiz_val_00000001.jpg", "Can you tell me what this medicine is please?", "tylenol cold",
         root / "VizWiz_val_00000001.jpg"),
        ("val.json:VizWiz_val_00000002.jpg", "What is this?", "coca cola", root / "VizWiz_val_00000002.jpg"),
    ])
    assert done.skips.counts == {"missing_image": 1, "unreadable_image": 1, "outside_root": 1, "empty_text": 1}


# --- OK-VQA ------------------------------------------------------------------------------------------------


def okvqa_annotation(image_id: int, question_id: int, raw_answers: list[tuple[str, str]]) -> dict:
    answers = [{"answer_id": k + 1, "raw_answer": raw, "answer_confidence": "yes", "answer": answer}
               for k, (raw, answer) in enumerate(raw_answers)]
    return {"image_id": image_id, "answer_type": "other", "question_type": "four", "question_id": question_id,
            "answers": answers, "confidence": 3}


def okvqa_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "val2014"
    picture(root / "COCO_val2014_000000297147.jpg", 30), picture(root / "COCO_val2014_000000196610.jpg", 31)
    corrupt(root / "COCO_val2014_000000075160.jpg")
    header = {"license": {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"},
              "data_subtype": "val2014", "info": {"year": 2019, "version": "1.0", "description": "OK-VQA"},
              "data_type": "mscoco"}
    questions = dump(tmp_path / "OpenEnded_mscoco_val2014_questions.json", {**header, "task_type": "Open-Ended",
        "questions": [
            {"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475},
            {"image_id": 393225, "question": "What is the name of this breed of dog?", "question_id": 3932255},
            {"image_id": 75160, "question": "What is the red item used for?", "question_id": 751605},
            {"image_id": 196610, "question": "What is the fence made of?", "question_id": 1966105},
            {"image_id": 297147, "question": " ", "question_id": 2971476},
        ]})
    annotations = dump(tmp_path / "mscoco_val2014_annotations.json", {**header, "annotations": [
        okvqa_annotation(297147, 2971475, [("racing", "race"), ("racing", "race"), ("motocross", "motocross"),
                                           ("motocross", "motocross"), ("racing", "race"), ("racing", "race"),
                                           ("riding", "ride"), ("riding", "ride"), ("race", "race"), ("race", "race")]),
        okvqa_annotation(393225, 3932255, [("pug", "pug")] * 10),
        okvqa_annotation(75160, 751605, [("cooking", "cook")] * 10),
        okvqa_annotation(196610, 1966105, [("metal", "metal"), ("wooden", "wood")] * 4 + [("wire", "wire")] * 2),
        okvqa_annotation(297147, 2971476, [("sport", "sport")] * 10),
    ]})
    return questions, annotations, root


def test_okvqa_questions_answered_by_the_most_common_answer(tokenizer, tmp_path):
    questions, annotations, root = okvqa_files(tmp_path)
    done, rows = converted(tokenizer, tmp_path, "okvqa", "vqa", Sources(questions, annotations), root,
                           pattern="COCO_val2014_{:012d}.jpg")
    check_rows(tokenizer, rows, "vqa", [
        ("OpenEnded_mscoco_val2014_questions.json:2971475", "What sport can you use this for?", "race",
         root / "COCO_val2014_000000297147.jpg"),
        ("OpenEnded_mscoco_val2014_questions.json:1966105", "What is the fence made of?", "metal",
         root / "COCO_val2014_000000196610.jpg"),
    ])
    assert done.skips.counts == {"empty_text": 1, "missing_image": 1, "unreadable_image": 1}


# --- ScienceQA ----------------------------------------------------------------------------------------------


def problem(question: str, choices: list[str], answer: int, hint: str, image: str | None, split: str) -> dict:
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": "grade5", "subject": "social science", "topic": "geography",
            "category": "Geography", "skill": "Read a map: cardinal directions", "lecture": "Maps have four "
            "cardinal directions, or main directions.", "solution": "To find the answer, look at the compass rose.",
            "split": split}


def scienceqa_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "scienceqa" / "images"
    picture(root / "train" / "1" / "image.png", 40), picture(root / "train" / "7" / "image.png", 41)
    picture(root / "train" / "5" / "image.png", 42), picture(root / "test" / "4" / "image.png", 43)
    corrupt(root / "train" / "6" / "image.png")
    problems = dump(tmp_path / "scienceqa" / "problems.json", {
        "1": problem("Which of these states is farthest north?", ["West Virginia", "Louisiana", "Arizona",
                                                                  "Oklahoma"], 0, "", "image.png", "train"),
        "2": problem("Which tense does the sentence use?", ["past tense", "future tense", "present tense"], 1, "",
                     None, "train"),
        "3": problem("Identify the question that Tom's experiment can best answer.", ["Yes", "No"], 0,
                     "The passage below describes an experiment.", "image.png", "train"),
        "4": problem("Which animal's mouth is adapted to tear through meat?", ["sea otter", "copperband butterflyfish"],
                     0, "", "image.png", "test"),
        "5": problem("", ["A", "B"], 0, "", "image.png", "train"),
        "6": problem("Which is the main persuasive appeal used in this ad?", ["pathos", "ethos", "logos"], 2, "",
                     "image.png", "train"),
        "7": problem("Think about the magnetic force between the magnets in each pair. Which statement is true?",
                     ["The magnitude of the magnetic force is greater in Pair 1.",
                      "The magnitude of the magnetic force is greater in Pair 2."], 1,
                     "The images below show two pairs of magnets.", "image.png", "train"),
    })
    splits = dump(tmp_path / "scienceqa" / "pid_splits.json", {"train": ["1", "2", "3", "5", "6", "7"], "val": [],
                                                                "test": ["4"], "minival": []})
    return problems, splits, root


def test_scienceqa_multiple_choice_as_text_for_the_problems_with_an_image(tokenizer, tmp_path):
    problems, splits, root = scienceqa_files(tmp_path)
    done, rows = converted(tokenizer, tmp_path, "scienceqa", "vqa", Sources(problems, splits=splits, split="train"),
                           root)
    check_rows(tokenizer, rows, "vqa", [
        ("problems.json:1", "Which of these states is farthest north? Options: (A) West Virginia (B) Louisiana "
                            "(C) Arizona (D) Oklahoma", "(A) West Virginia", root / "train" / "1" / "image.png"),
        ("problems.json:7", "Think about the magnetic force between the magnets in each pair. Which statement is "
                            "true? Context: The images below show two pairs of magnets. Options: (A) The magnitude "
                            "of the magnetic force is greater in Pair 1. (B) The magnitude of the magnetic force is "
                            "greater in Pair 2.", "(B) The magnitude of the magnetic force is greater in Pair 2.",
         root / "train" / "7" / "image.png"),
    ])
    assert done.skips.counts == {"no_image": 1, "missing_image": 1, "empty_text": 1, "unreadable_image": 1}
    _, test = converted(tokenizer, tmp_path, "scienceqa", "vqa", Sources(problems, splits=splits, split="test"), root)
    assert [row["key"] for row in test] == ["problems.json:4"]
    with pytest.raises(InputError, match=r"pid_splits\.json: no split 'dev'; it has train, val, test, minival"):
        converted(tokenizer, tmp_path, "scienceqa", "vqa", Sources(problems, splits=splits, split="dev"), root)
    with pytest.raises(InputError, match="takes --splits .* and --split .* together"):
        converted(tokenizer, tmp_path, "scienceqa", "vqa", Sources(problems, split="train"), root)


# --- reading and images -------------------------------------------------------------------------------------


def test_json_records_are_streamed_one_at_a_time(tmp_path):
    path = tmp_path / "val.json"
    path.write_text("[" + ", ".join(json.dumps({"image": f"{k}.jpg", "question": "x" * 100}) for k in range(2000))
                    + ", !!!")  # about 250 kB, broken at the very end
    records = json_items(path, "item", "a list of records")
    assert next(records) == {"image": "0.jpg", "question": "x" * 100}  # before the parser has reached the end
    with pytest.raises(InputError, match=r"val\.json: not valid JSON \(.+\); expected a list of records"):
        list(records)


def test_image_folder_refuses_names_that_leave_it(tmp_path):
    root = tmp_path.resolve() / "images"
    images = ImageFolder(root, "COCO_val2014_{:012d}.jpg")
    assert images.locate(42) == root / "COCO_val2014_000000000042.jpg"
    plain = ImageFolder(root)
    assert plain.locate("a/../b.jpg") == root / "b.jpg"
    (root / "sub").mkdir(parents=True)
    (root / "inside").symlink_to(root / "sub", target_is_directory=True)
    (root / "out").symlink_to(tmp_path, target_is_directory=True)
    assert plain.locate("inside/b.jpg") == root / "sub" / "b.jpg"  # a link within the folder: the file it names
    for name in ("../b.jpg", "a/../../b.jpg", "/etc/passwd", ".", "out/b.jpg", "sub/../../b.jpg"):
        with pytest.raises(OutsideRoot):
            plain.locate(name)
    with pytest.raises(FileNotFoundError):
        plain.locate("b\x00.jpg")
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    assert ImageFolder(tmp_path / "link").locate("b.jpg") == root / "b.jpg"  # --images itself may be a link
    with pytest.raises(InputError, match=r"--image-pattern 'COCO_val2014_\{:012d\}\.jpg' does not apply to the "
                                         r"image reference '42'"):
        images.locate("42")


def test_records_naming_images_outside_the_folder_are_skipped_and_never_opened(tokenizer, tmp_path):
    root = tmp_path / "images"
    picture(root / "inside.jpg", 1)
    secret = picture(tmp_path / "secret.png", 2)  # a real image next to --images: were it opened, a row would come out
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    (root / "alias.png").symlink_to(secret)
    outside = [str(secret), "../secret.png", "sub/../../secret.png", "escape/secret.png", "alias.png"]
    names = ["inside.jpg", *outside, "nul\x00.jpg"]
    captions = dump(tmp_path / "captions.json", {
        "images": [{"id": i, "file_name": name} for i, name in enumerate(names)],
        "annotations": [{"image_id": i, "id": i, "caption": f"picture {i}"} for i in range(len(names))]})
    done, rows = converted(tokenizer, tmp_path, "coco", "captioning", Sources(captions), root)
    check_rows(tokenizer, rows, "captioning", [("captions.json:0", None, "picture 0", root / "inside.jpg")])
    assert done.skips.counts == {"outside_root": len(outside), "missing_image": 1}
    assert done.skips.first["outside_root"] == f"{captions}: annotations[1]: image {str(secret)!r}"
    inside_codes, secret_codes = (codes.tolist() for codes in encode_images(
        tokenizer, [Image.open(root / "inside.jpg"), Image.open(secret)]))
    assert inside_codes != secret_codes  # so the check below can tell the two images apart
    assert all(row["input_image_ids"] != secret_codes for row in rows)


# --- the command ------------------------------------------------------------------------------------------


def test_cli_converts_a_format_and_reports_what_it_skipped(tokenizer_dir, tmp_path):
    path, root = vizwiz_files(tmp_path)
    out = tmp_path / "sft"
    proc = cm3("sft", "convert", "--task", "vqa", "--format", "vizwiz", "--source", str(path), "--images", str(root),
               "--tokenizer", str(tokenizer_dir), "--out", str(out), "--shard-rows", "2", check=True)
    assert f"{out}: 2 task shard(s) written, 3 vqa rows; 4 skipped: empty_text 1 (first: {path}: record 6)" \
           in proc.stdout
    assert "outside_root 1 (first: " in proc.stdout and "unreadable_image 1" in proc.stdout
    assert complete_shards(out) == [0, 1]


def malformed(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """The arguments of a conversion whose files are broken in one way, and the error it must give."""
    if case == "not json":
        path, root = vizwiz_files(tmp_path)
        path.write_text(path.read_text()[:-40])
        return ["--task", "vqa", "--format", "vizwiz", "--source", str(path), "--images", str(root)], \
            rf"{re.escape(str(path))}: not valid JSON \(.+\); expected a VizWiz VQA annotations file"
    if case == "missing field":
        path, root = vizwiz_files(tmp_path)
        data = json.loads(path.read_text())
        del data[4]["answers"]  # as in VizWiz's test.json
        dump(path, data)
        return ["--task", "vqa", "--format", "vizwiz", "--source", str(path), "--images", str(root)], \
            rf"{re.escape(str(path))}: record 4: missing required field 'answers'"
    if case == "unknown split ids":
        paragraphs, split, root = paragraph_files(tmp_path)
        dump(split, [2356347, 9])
        return ["--task", "captioning", "--format", "image-paragraph", "--source", str(paragraphs), "--splits",
                str(split), "--images", str(root)], \
            rf"{re.escape(str(split))}: \[1\]: image id 9 is not in {re.escape(str(paragraphs))}"
    if case == "unknown problem ids":
        problems, splits, root = scienceqa_files(tmp_path)
        dump(splits, {"train": ["1", "99"]})
        return ["--task", "vqa", "--format", "scienceqa", "--source", str(problems), "--splits", str(splits),
                "--split", "train", "--images", str(root)], \
            rf"{re.escape(str(splits))}: 'train': problem id '99' is not in {re.escape(str(problems))}"
    if case == "no annotation":
        questions, annotations, root = okvqa_files(tmp_path)
        data = json.loads(annotations.read_text())
        del data["annotations"][3]
        dump(annotations, data)
        return ["--task", "vqa", "--format", "okvqa", "--source", str(questions), "--annotations", str(annotations),
                "--images", str(root)], \
            rf"{re.escape(str(questions))}: questions\[3\]: question_id 1966105 has no annotation"
    if case == "bad trace":
        path, root = narrative_files(tmp_path)
        lines = path.read_text().splitlines()
        record = json.loads(lines[0])
        del record["traces"][1][2]["t"]
        path.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
        return ["--task", "grounded_generation", "--format", "localized-narratives", "--source", str(path),
                "--images", str(root)], \
            rf"{re.escape(str(path))}: line 1: traces\[1\]\[2\]: missing required field 't'"
    if case == "bad pattern":
        path, root = vizwiz_files(tmp_path)
        return ["--task", "vqa", "--format", "vizwiz", "--source", str(path), "--images", str(root),
                "--image-pattern", "{:012d}"], \
            r"--image-pattern '\{:012d\}' does not apply to the image reference 'VizWiz_val_00000000\.jpg'"
    assert case == "wrong task"
    path, root = vizwiz_files(tmp_path)
    return ["--task", "captioning", "--format", "vizwiz", "--source", str(path), "--images", str(root)], \
        "--format vizwiz feeds vqa, not --task captioning"


@pytest.mark.parametrize("case", ["not json", "missing field", "unknown split ids", "unknown problem ids",
                                  "no annotation", "bad trace", "bad pattern", "wrong task"])
def test_cli_malformed_files_exit_2_and_write_nothing(tokenizer_dir, tmp_path, case):
    from cm3.workflows.cli import app

    args, message = malformed(tmp_path, case)
    out = tmp_path / "sft"
    result = CliRunner().invoke(app, ["sft", "convert", *args, "--tokenizer", str(tokenizer_dir), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not out.exists()
