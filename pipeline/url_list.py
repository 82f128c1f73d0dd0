"""URL lists: validate them up front, then stream them in fixed-size chunks.

img2dataset's own reader loads a whole input file into memory before sharding it; on a
multi-gigabyte LAION part that is the memory spike its users complain about. Here every
format is read incrementally and re-batched into chunks of exactly ``chunk_rows`` rows
(the last one shorter), so chunk ``i`` is always rows ``[i*chunk_rows, (i+1)*chunk_rows)``
of the input: that stable numbering is what makes shard-level resume safe.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from cm3.core.errors import InputError

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
_SUFFIX_TO_FORMAT = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "txt",
}
# Column names tried, in order, when the user does not name one (LAION uses URL/TEXT).
URL_COLUMN_CANDIDATES = ("url", "URL", "image_url")
CAPTION_COLUMN_CANDIDATES = ("caption", "TEXT", "text")


@dataclass(frozen=True)
class UrlListSpec:
    """A validated URL list: where it is, how to parse it, which columns hold url and caption."""

    path: Path
    fmt: str
    url_col: str
    caption_col: str | None

    def fingerprint(self) -> dict:
        """What identifies this input for resume: same file, same size, same columns."""
        return {
            "path": str(self.path.resolve()),
            "size_bytes": self.path.stat().st_size,
            "format": self.fmt,
            "url_col": self.url_col,
            "caption_col": self.caption_col,
        }


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputError(f"{path}: unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    found = _SUFFIX_TO_FORMAT.get(path.suffix.lower())
    if found is None:
        raise InputError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; expected one of "
            f"{', '.join(sorted(_SUFFIX_TO_FORMAT))} or pass --input-format"
        )
    return found


def _header_columns(path: Path, fmt: str) -> list[str]:
    """Column names, read from the file's header or first record only."""
    try:
        if fmt == "parquet":
            return list(pq.ParquetFile(path).schema_arrow.names)
        if fmt in ("csv", "tsv"):
            reader = pa_csv.open_csv(path, parse_options=_csv_parse_options(fmt))
            return list(reader.schema.names)
        if fmt == "jsonl":
            with open(path, encoding="utf-8") as handle:
                for line_no, line in enumerate(handle, start=1):
                    if line.strip():
                        record = _parse_json_line(path, line_no, line)
                        return list(record)
            return []
    except InputError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot be read as {fmt}: {err}") from err
    return ["url"]  # txt: one URL per line


def _csv_parse_options(fmt: str) -> pa_csv.ParseOptions:
    return pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")


def _parse_json_line(path: Path, line_no: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: line {line_no} is not valid JSON: {err.msg}") from err
    if not isinstance(record, dict):
        raise InputError(f"{path}: line {line_no} is a JSON {type(record).__name__}, expected an object")
    return record


def _pick_column(path: Path, columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
                 required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"{path}: no {what} column {wanted!r}; the file has columns {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    if required:
        raise InputError(
            f"{path}: no {what} column; looked for {list(candidates)} in {columns} (name it with --{what}-col)"
        )
    return None


def open_url_list(path: str | os.PathLike, fmt: str | None = None, url_col: str | None = None,
                  caption_col: str | None = None) -> UrlListSpec:
    """Validate a URL list without reading it whole: it exists, parses, has the columns and a first row."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected one URL-list file")
    fmt = detect_format(path, fmt)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the URL list is empty (0 bytes)")
    columns = _header_columns(path, fmt)
    if fmt == "jsonl" and not columns:
        raise InputError(f"{path}: the URL list is empty (no JSON records)")
    if fmt == "txt":
        if caption_col is not None:
            raise InputError(f"{path}: a .txt URL list has no caption column (got --caption-col {caption_col!r})")
        spec = UrlListSpec(path, fmt, "url", None)
    else:
        spec = UrlListSpec(
            path,
            fmt,
            _pick_column(path, columns, url_col, URL_COLUMN_CANDIDATES, "url", required=True),
            _pick_column(path, columns, caption_col, CAPTION_COLUMN_CANDIDATES, "caption", required=False),
        )
    first = next(iter_chunks(spec, chunk_rows=1), None)
    if first is None or first.num_rows == 0:
        raise InputError(f"{path}: the URL list is empty (no rows)")
    return spec


def _raw_batches(spec: UrlListSpec, block_rows: int) -> Iterator[pa.Table]:
    """Yield tables of varying size straight from the file, only the url/caption columns."""
    path = spec.path
    columns = [spec.url_col] + ([spec.caption_col] if spec.caption_col else [])
    if spec.fmt == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=block_rows, columns=columns):
            yield pa.Table.from_batches([batch])
    elif spec.fmt in ("csv", "tsv"):
        convert = pa_csv.ConvertOptions(
            include_columns=columns, column_types={name: pa.string() for name in columns}
        )
        reader = pa_csv.open_csv(path, parse_options=_csv_parse_options(spec.fmt), convert_options=convert)
        for batch in reader:
            yield pa.Table.from_batches([batch])
    elif spec.fmt == "jsonl":
        rows: dict[str, list] = {name: [] for name in columns}
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = _parse_json_line(path, line_no, line)
                if spec.url_col not in record:
                    raise InputError(f"{path}: line {line_no} has no {spec.url_col!r} field")
                for name in columns:
                    value = record.get(name)
                    rows[name].append(None if value is None else str(value))
                if len(rows[spec.url_col]) >= block_rows:
                    yield pa.table(rows)
                    rows = {name: [] for name in columns}
        if rows[spec.url_col]:
            yield pa.table(rows)
    else:  # txt
        urls: list[str] = []
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                url = line.strip()
                if url:
                    urls.append(url)
                if len(urls) >= block_rows:
                    yield pa.table({"url": urls})
                    urls = []
        if urls:
            yield pa.table({"url": urls})


def iter_chunks(spec: UrlListSpec, chunk_rows: int) -> Iterator[pa.Table]:
    """Yield tables of exactly ``chunk_rows`` rows (last one shorter) with columns ``url`` and ``caption``.

    Memory stays at about one chunk plus one read block, whatever the file size.
    """
    if chunk_rows < 1:
        raise InputError(f"chunk size must be at least 1 row, got {chunk_rows}")
    pending: list[pa.Table] = []
    pending_rows = 0
    try:  # a file damaged past its header (bytes that are not UTF-8, a cut Parquet page) is named here
        for table in _raw_batches(spec, block_rows=max(1, min(chunk_rows, 65536))):
            table = _normalise(spec, table)
            while table.num_rows:
                take = min(chunk_rows - pending_rows, table.num_rows)
                pending.append(table.slice(0, take))
                pending_rows += take
                table = table.slice(take)
                if pending_rows == chunk_rows:
                    yield pa.concat_tables(pending).combine_chunks()
                    pending, pending_rows = [], 0
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise InputError(f"{spec.path}: cannot be read as {spec.fmt}: {err}") from err
    if pending_rows:
        yield pa.concat_tables(pending).combine_chunks()


def _normalise(spec: UrlListSpec, table: pa.Table) -> pa.Table:
    """Rename to the canonical ``url`` / ``caption`` columns as strings; a missing caption is null."""
    url = table.column(spec.url_col).cast(pa.string())
    if spec.caption_col:
        caption = table.column(spec.caption_col).cast(pa.string())
    else:
        caption = pa.nulls(table.num_rows, pa.string())
    return pa.table({"url": url, "caption": caption})
