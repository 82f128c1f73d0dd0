"""Fuzzing the readers of user files (issue #22): URL lists, SFT records, shard folders get random bytes, random
JSON and hostile image paths. Each either reads them or raises InputError (exit 2 in the CLI), never another
exception, and no file outside the folders it was given is opened (Python's audit hook sees every open)."""

from __future__ import annotations

import itertools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cm3.core.errors import InputError
from factories import captions, make_tokenizer

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)
TINY_VQ = dict(ch=8, ch_mult=(1, 2, 2), z_channels=16, embed_dim=16, n_embed=16, resolution=32, norm_groups=8,
               num_res_blocks=1, attn_resolutions=())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
# keys the readers look for, so random records get past the first checks sometimes
FIELDS = ["images", "annotations", "id", "image_id", "file_name", "caption", "question", "answers", "answer",
          "image", "questions", "question_id", "multiple_choice_answer", "input", "edit", "output", "text",
          "filename", "sentences", "raw", "split", "url", "URL", "TEXT"]
records = st.recursive(
    st.none() | st.integers(-2, 3) | st.text(max_size=12) | st.sampled_from(["../secret.png", "/etc/hostname"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), children,
                                                                      max_size=5),
    max_leaves=25)

CASES = itertools.count()  # one folder per example (hypothesis replays examples)

# Opens seen while a reader runs (path, resolved); the hook stays installed (audit hooks cannot be removed) but
# records only inside `opened_paths`.
_SEEN: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _SEEN is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _SEEN.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)
SYSTEM = ("/dev/", "/proc/", "/sys/", "/usr/")  # devices, the kernel's files, system libraries and time zones
LIBRARIES = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, Path(__file__).parents[1])}


@contextmanager
def only_opens_under(*roots: Path):
    """Fail if anything opens a file outside ``roots`` (Python's own modules and libraries aside)."""
    global _SEEN
    _SEEN = []
    try:
        yield
    finally:
        seen, _SEEN = _SEEN, None
    allowed = [os.path.realpath(r) for r in roots] + sorted(LIBRARIES)
    outside = [p for p in seen if not any(p == a or p.startswith(a + os.sep) for a in allowed)
               and not p.startswith(SYSTEM)]
    assert not outside, outside


def read_or_refuse(read) -> None:
    try:
        read()
    except InputError:
        pass


# URL lists


@FUZZ
@given(data=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
       suffix=st.sampled_from([".txt", ".csv", ".tsv", ".jsonl", ".parquet"]))
def test_url_lists_of_random_bytes_are_read_or_refused(tmp_path, data, suffix):
    from cm3.pipeline.url_list import iter_chunks, open_url_list

    folder = tmp_path / f"u{next(CASES)}"
    folder.mkdir()
    path = folder / f"urls{suffix}"
    path.write_bytes(data)
    with only_opens_under(folder):
        read_or_refuse(lambda: [t.num_rows for t in iter_chunks(open_url_list(path), 4)])


# SFT records


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder, TINY_VQ, captions(100))
    return MultimodalTokenizer.load(folder)


@FUZZ
@given(content=records | json_values, name=st.sampled_from(sorted(
    ["coco", "flickr30k", "grounded", "image-paragraph", "instructpix2pix", "localized-narratives", "okvqa",
     "scienceqa", "vizwiz", "vqa2"])), lines=st.booleans())
def test_sft_records_of_random_json_are_read_or_refused(tmp_path, content, name, lines):
    from cm3.pipeline.sft_readers import Sources, formats

    fmt = formats()[name]
    folder = tmp_path / f"s{next(CASES)}"
    folder.mkdir()
    source = folder / ("source.jsonl" if lines else "source.json")
    source.write_text("\n".join(json.dumps(c) for c in content) if lines and isinstance(content, list)
                      else json.dumps(content))
    second = folder / "second.json"
    second.write_text(json.dumps(content))
    sources = Sources(source, annotations=second if fmt.annotations else None,
                      splits=second if fmt.splits else None, split="train" if fmt.split or fmt.splits else None)
    with only_opens_under(folder):
        read_or_refuse(lambda: list(fmt.read(name, fmt.tasks[0], sources)))


@FUZZ
@given(names=st.lists(st.text(max_size=16) | st.sampled_from(
    ["a.png", "../secret.png", "sub/../../secret.png", "escape/secret.png", "alias.png", "/SECRET", "a.png/..",
     ".", "", "\x00", "sub/../a.png"]), min_size=1, max_size=5))
def test_sft_image_names_never_open_a_file_outside_images(tmp_path, tokenizer, names):
    """COCO records naming images by random and hostile paths: converted or skipped, never opened outside."""
    from cm3.pipeline.image_folder import ImageFolder
    from cm3.pipeline.sft_convert import convert
    from cm3.pipeline.sft_readers import Sources, formats
    from cm3.synthetic.shapes import render, spec_for

    case = tmp_path / f"c{next(CASES)}"
    images, data = case / "images", case / "data"
    images.mkdir(parents=True)
    data.mkdir()
    render(spec_for(0), 32).save(images / "a.png")
    secret = case / "secret.png"
    render(spec_for(1), 32).save(secret)
    (images / "escape").symlink_to(case, target_is_directory=True)
    (images / "alias.png").symlink_to(secret)
    names = [n.replace("/SECRET", str(secret)) for n in names]
    source = data / "captions.json"
    source.write_text(json.dumps({"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                                  "annotations": [{"image_id": i, "id": i, "caption": f"picture {i}"}
                                                  for i in range(len(names))]}))
    out = case / "out"
    with only_opens_under(images, data, out):
        read_or_refuse(lambda: convert("coco", formats()["coco"], "captioning", Sources(source), ImageFolder(images),
                                       tokenizer, out, shard_rows=4))


# Shard folders


@FUZZ
@given(shard=st.binary(max_size=200), stats=st.binary(max_size=60) | json_values.map(json.dumps).map(str.encode),
       config=json_values | st.fixed_dictionaries({"tokenizer_sha256": json_values}), valid_parquet=st.booleans())
def test_shard_folders_of_random_bytes_are_read_or_refused(tmp_path, shard, stats, config, valid_parquet):
    from cm3.core.shards import complete_shards
    from cm3.index.build import check_build_inputs
    from cm3.pipeline.tokenize import check_tokenize_inputs, recorded_tokenizer
    from cm3.workflows.train import shard_columns, training_shards

    folder = tmp_path / f"f{next(CASES)}"
    folder.mkdir()
    if valid_parquet:
        pq.write_table(pa.table({"text_ids": [[1, 2]], "image_ids": [[3]], "ids": [[4]]}), folder / "00000.parquet")
    else:
        (folder / "00000.parquet").write_bytes(shard)
    (folder / "00000_stats.json").write_bytes(stats)
    (folder / "tokenize_config.json").write_text(json.dumps(config))
    tokenizer = folder / "no-tokenizer"
    with only_opens_under(folder):
        read_or_refuse(lambda: complete_shards(folder))
        read_or_refuse(lambda: recorded_tokenizer(folder))
        read_or_refuse(lambda: check_build_inputs(folder, {"model_name": "x", "pretrained": None}, folder / "index",
                                                  folder / "augmented"))
        read_or_refuse(lambda: check_tokenize_inputs(folder, tokenizer, folder / "tokens"))
        for stage in ("pretrain", "sft"):
            read_or_refuse(lambda: shard_columns(training_shards(folder), stage, 0))
