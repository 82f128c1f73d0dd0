"""URL lists: every format streams in exact chunks; bad lists fail early with a message that names the problem."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cm3.core.errors import InputError
from cm3.pipeline.url_list import iter_chunks, open_url_list

ROWS = [{"url": f"http://127.0.0.1:1/images/{i}.jpg", "caption": f"caption {i}"} for i in range(23)]


def write_list(path, rows, url="url", caption="caption"):
    frame = pd.DataFrame(rows).rename(columns={"url": url, "caption": caption})
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=5)
    elif path.suffix in (".csv", ".tsv"):
        frame.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    else:
        path.write_text("".join(r[url] + "\n" for r in frame.to_dict("records")))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl", ".txt"])
@pytest.mark.parametrize("chunk", [1, 4, 5, 23, 100])
def test_every_format_streams_exact_chunks(tmp_path, suffix, chunk):
    spec = open_url_list(write_list(tmp_path / f"urls{suffix}", ROWS))
    chunks = list(iter_chunks(spec, chunk))
    assert [c.num_rows for c in chunks[:-1]] == [chunk] * (len(chunks) - 1)
    assert sum(c.num_rows for c in chunks) == len(ROWS)
    assert chunks[0].column_names == ["url", "caption"]
    urls = [u for c in chunks for u in c.column("url").to_pylist()]
    assert urls == [r["url"] for r in ROWS]
    captions = [x for c in chunks for x in c.column("caption").to_pylist()]
    assert captions == ([None] * len(ROWS) if suffix == ".txt" else [r["caption"] for r in ROWS])


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_laion_style_columns_are_found(tmp_path, suffix):
    spec = open_url_list(write_list(tmp_path / f"laion{suffix}", ROWS, url="URL", caption="TEXT"))
    assert (spec.url_col, spec.caption_col) == ("URL", "TEXT")
    first = next(iter_chunks(spec, 3))
    assert first.column("caption").to_pylist() == ["caption 0", "caption 1", "caption 2"]


def test_named_columns_override_the_defaults(tmp_path):
    rows = [{"link": r["url"], "alt": r["caption"]} for r in ROWS]
    path = tmp_path / "custom.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    spec = open_url_list(path, url_col="link", caption_col="alt")
    assert next(iter_chunks(spec, 2)).column("url").to_pylist() == [ROWS[0]["url"], ROWS[1]["url"]]


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.parquet: no such file"):
        open_url_list(tmp_path / "nope.parquet")


def test_unknown_format(tmp_path):
    path = tmp_path / "urls.xlsx"
    path.write_text("x")
    with pytest.raises(InputError, match=r"urls\.xlsx: cannot tell the format.*\.parquet"):
        open_url_list(path)
    with pytest.raises(InputError, match="unknown input format 'xml'"):
        open_url_list(path, fmt="xml")


def test_missing_columns_name_what_exists(tmp_path):
    path = write_list(tmp_path / "urls.parquet", ROWS, url="link")
    with pytest.raises(InputError, match=r"no url column; looked for .*'link'"):
        open_url_list(path)
    with pytest.raises(InputError, match=r"no caption column 'alt'"):
        open_url_list(write_list(tmp_path / "ok.csv", ROWS), caption_col="alt")


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl", ".txt"])
def test_empty_list(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"url": pa.array([], pa.string())}), path)
    elif suffix == ".csv":
        path.write_text("url,caption\n")
    else:
        path.write_text("\n\n")
    with pytest.raises(InputError, match="empty"):
        open_url_list(path)


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "urls.jsonl"
    path.write_text('{"url": "http://a/1.jpg"}\n{"url": "http://a/2.jpg"\n')
    spec = open_url_list(path)
    with pytest.raises(InputError, match=r"line 2 is not valid JSON"):
        list(iter_chunks(spec, 10))
