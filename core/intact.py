"""Cheap checks that an input file is whole, done in the driver before any work so a damaged file is named.

A truncated or overwritten file otherwise fails deep inside a Ray worker (and is retried there), or with a
library's message that does not say which file it read. Each check reads only what locates the data: a
Parquet file's footer, a safetensors file's header (whose offsets must cover the file exactly), a JSON file.
They raise ``InputError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from cm3.core.errors import InputError
from cm3.core.files import PathLike

MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors library's own limit


def parquet_metadata(path: PathLike):
    """The file's ``pyarrow.parquet.FileMetaData`` (footer and schema), or InputError naming the file."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata
    except FileNotFoundError as err:
        raise InputError(f"{path}: file not found") from err
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a truncated or foreign file
        raise InputError(f"{path}: unreadable Parquet file, truncated or damaged ({err})") from err


def parquet_pages(path: PathLike, columns: list[str] | None = None) -> None:
    """Read every row group of a file (its data pages, not only the footer): InputError naming the file and the
    row group that fails. Costs a full read, so callers use it to explain a failure, not before every job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    metadata = parquet_metadata(path)
    file = pq.ParquetFile(path)
    for group in range(metadata.num_row_groups):
        try:
            file.read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException) as err:
            reason = " ".join(str(err).split())  # arrow's message spans lines; the error stays one
            raise InputError(f"{path}: row group {group} cannot be read, the file is damaged ({reason})") from err


def safetensors_header(path: PathLike) -> dict:
    """The header of a safetensors file, after checking that its tensors' offsets cover the file exactly (a
    truncated file, or one with bytes appended, is refused)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: not a safetensors file ({size} bytes, truncated or empty)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise InputError(f"{path}: not a safetensors file or truncated (a header of {length} bytes in a "
                                 f"file of {size})")
            header = json.loads(handle.read(length))
    except FileNotFoundError as err:
        raise InputError(f"{path}: file not found") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a safetensors file (its header is not JSON: {err})") from err
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InputError(f"{path}: tensor {name!r} has no valid data_offsets in the header")
        end = max(end, offsets[1])
    data = size - 8 - length
    if end != data:
        state = "truncated" if end > data else "longer than its header says"
        raise InputError(f"{path}: {state}: the header's tensors take {end} bytes, the file holds {data} after it")
    return header


def load_json(path: PathLike) -> object:
    """A JSON file's content, or InputError naming the file (missing, not UTF-8, not JSON, truncated)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise InputError(f"{path}: file not found") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not valid JSON, truncated or damaged ({err})") from err
