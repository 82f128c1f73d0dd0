"""The training data path: each rank reads only its own row groups of the shards, converts their columns with
numpy, and a background thread lays out, CM3-transforms and packs them into the next steps' batches.

Order. The units of reading are the shards' row groups, split into equal pieces when there are fewer than
`UNITS_PER_RANK` per rank (a small data set; such a piece is read with its whole row group). Each epoch the
units are shuffled by `default_rng([seed, epoch])` and dealt out, each to the rank with the fewest rows so far;
inside a unit the rows are shuffled by `default_rng([seed, epoch, unit.first_row])`; each row's CM3 transform
draws from `default_rng([seed, epoch, row])`, `row` being its index in the whole data set. A rank's stream is
therefore a function of (seed, world size, rank) alone, and `DataPosition(epoch, row)`, the number of rows of
its share of that epoch already consumed, resumes it exactly: packing restarts at a row boundary.

Why not Ray Data: its per-worker splits are not a fixed function of the seed (resume would not be exact), and
its read tasks need CPUs that the train workers leave free. Reading in the worker costs one Parquet read per
unit, each row group read once per epoch by one rank, with no copy through the object store.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cm3.core.errors import InputError
from cm3.model.sequences import Packed, SequenceConfig, pack, transform, transformed_example
from cm3.tokenizers.vocabulary import Vocabulary

UNITS_PER_RANK = 4  # fewer row groups than this per rank: split them, so ranks get shares of nearly equal size


@dataclass(frozen=True)
class DataPosition:
    """Where a rank's stream continues: after `row` rows of its share of pass `epoch` over the shards."""

    epoch: int = 0
    row: int = 0


@dataclass(frozen=True)
class ShardUnit:
    """Rows [start, stop) of row group `row_group` of the shard at `path`; `first_row` is the index of its first
    row in the whole data set (shards in order, row groups in order)."""

    path: str
    row_group: int
    start: int
    stop: int
    first_row: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def shard_units(paths: list[str], world: int) -> list[ShardUnit]:
    """The units of reading of the shards at `paths` (footers only), fine enough for `world` ranks."""
    groups, first = [], 0
    for path in paths:
        metadata = pq.ParquetFile(path).metadata
        for index in range(metadata.num_row_groups):
            rows = metadata.row_group(index).num_rows
            if rows:
                groups.append((str(path), index, rows, first))
            first += rows
    pieces = -(-UNITS_PER_RANK * world // max(1, len(groups)))
    units = []
    for path, index, rows, first in groups:
        bounds = np.linspace(0, rows, min(pieces, rows) + 1).round().astype(int)
        units += [ShardUnit(path, index, int(a), int(b), first + int(a)) for a, b in zip(bounds[:-1], bounds[1:])]
    return units


def rank_units(units: list[ShardUnit], seed: int, epoch: int, rank: int, world: int) -> list[ShardUnit]:
    """This rank's units of one epoch, in reading order: the shuffled units dealt to the rank with fewest rows."""
    load = [0] * world
    mine = []
    for index in np.random.default_rng([seed, epoch]).permutation(len(units)):
        owner = min(range(world), key=load.__getitem__)
        load[owner] += units[index].rows
        if owner == rank:
            mine.append(units[index])
    return mine


class NumpyRows:
    """Row i of a table of list columns as a dict of numpy views: `list<int>` -> 1-D array, `list<list<int>>`
    -> list of 1-D arrays. No Python lists of ints are built (pyarrow's `to_pylist` would build every one)."""

    def __init__(self, table: pa.Table):
        self.columns = {name: _offsets_and_values(table.column(name).combine_chunks()) for name in table.column_names}
        self.num_rows = table.num_rows

    def __getitem__(self, i: int) -> dict:
        row = {}
        for name, (offsets, inner) in self.columns.items():
            a, b = offsets[i], offsets[i + 1]
            if isinstance(inner, tuple):
                inner_offsets, values = inner
                row[name] = [values[inner_offsets[j]:inner_offsets[j + 1]] for j in range(a, b)]
            else:
                row[name] = inner[a:b]
        return row


def _offsets_and_values(array: pa.Array):
    offsets, values = _list_parts(array)
    if _is_list(values.type):
        inner_offsets, inner_values = _list_parts(values)
        return offsets, (inner_offsets, inner_values.to_numpy(zero_copy_only=False))
    return offsets, values.to_numpy(zero_copy_only=False)


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _list_parts(array: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets, values) of a list array; a fixed-size list (e.g. an image's codes, as many for every image)
    has implicit offsets."""
    if pa.types.is_fixed_size_list(array.type):
        return np.arange(len(array) + 1, dtype=np.int64) * array.type.list_size, array.flatten()
    return array.offsets.to_numpy(), array.values


@dataclass(frozen=True)
class RankShards:
    """One rank's rows of the shards, epoch by epoch, in the seeded order of the module docstring."""

    units: list[ShardUnit]
    columns: list[str]
    seed: int
    rank: int = 0
    world: int = 1

    def rows(self, epoch: int, skip: int = 0) -> Iterator[tuple[int, dict]]:
        """(row index in the data set, row) of this rank's share of `epoch`, after its first `skip` rows."""
        for unit in rank_units(self.units, self.seed, epoch, self.rank, self.world):
            if skip >= unit.rows:
                skip -= unit.rows
                continue
            try:
                table = pq.ParquetFile(unit.path).read_row_group(unit.row_group, columns=self.columns)
            except (OSError, pa.ArrowException) as err:  # a damaged page behind an intact footer: name the file
                raise InputError(f"{unit.path}: row group {unit.row_group} cannot be read, the file is damaged "
                                 f"({err})") from err
            rows = NumpyRows(table.slice(unit.start, unit.rows))
            order = np.random.default_rng([self.seed, epoch, unit.first_row]).permutation(unit.rows)
            for i in order[skip:]:
                yield unit.first_row + int(i), rows[int(i)]
            skip = 0


def row_example(row: dict, vocab: Vocabulary, config: SequenceConfig,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights) for one row: an SFT row's laid-out `ids` as they are, a document row via `example_ids`
    (retrieved documents first); then the CM3 transform, cut to one window."""
    ids = row.get("ids")
    return transformed_example(row, vocab, config, rng) if ids is None else transform(ids, vocab, config, rng)


def packed_windows(shards: RankShards, vocab: Vocabulary, config: SequenceConfig,
                   start: DataPosition = DataPosition()) -> Iterator[tuple[Packed, DataPosition]]:
    """Endless packed windows over this rank's rows, each with the position the next window starts at:
    checkpoint that position, and resuming from it continues the same stream."""
    epoch, first = start.epoch, start.row
    while True:
        consumed = [first]

        def examples() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for n, (row_id, row) in enumerate(shards.rows(epoch, first), start=first):
                consumed[0] = n  # pack() yields a window when this example does not fit: it starts the next
                yield row_example(row, vocab, config, np.random.default_rng([shards.seed, epoch, row_id]))
            consumed[0] = -1

        produced = False
        for window in pack(examples(), config.seq_len, vocab.pad):
            produced = True
            yield window, DataPosition(epoch + 1, 0) if consumed[0] < 0 else DataPosition(epoch, consumed[0])
        if not produced and first == 0:
            raise ValueError(f"worker {shards.rank} of {shards.world} got no rows: the shards hold fewer rows "
                             "than workers")
        epoch, first = epoch + 1, 0


@dataclass
class Batch:
    inputs: torch.Tensor  # int64 [B, T]
    targets: torch.Tensor  # int64 [B, T]
    weights: torch.Tensor  # float32 [B, T]

    @classmethod
    def stack(cls, windows: list[Packed], pin: bool = False) -> Batch:
        """On the CPU; `pin`: in page-locked memory, so that `to(cuda)` copies asynchronously."""
        def tensor(name: str) -> torch.Tensor:
            t = torch.from_numpy(np.stack([getattr(w, name) for w in windows]))
            return t.pin_memory() if pin else t

        return cls(tensor("inputs"), tensor("targets"), tensor("weights"))

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.inputs, self.targets, self.weights)))


@dataclass
class StepData:
    micro_batches: list[Batch]
    position: DataPosition  # where the stream continues after this step
    wait_seconds: float = 0.0  # how long the training thread waited for it


class BatchProducer:
    """Runs the window stream in a daemon thread and keeps up to `prefetch` steps of micro-batches ready, pinned
    when they go to a GPU: the training thread only waits when the data path falls behind the model, and
    `StepData.wait_seconds` says how long it did."""

    def __init__(self, windows: Iterator[tuple[Packed, DataPosition]], batch_size: int, accumulation: int,
                 pin: bool = False, prefetch: int = 2):
        self._windows, self._batch_size, self._accumulation, self._pin = windows, batch_size, accumulation, pin
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cm3-batch-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                micro_batches = []
                for _ in range(self._accumulation):
                    windows = [next(self._windows) for _ in range(self._batch_size)]
                    micro_batches.append(Batch.stack([w for w, _ in windows], self._pin))
                self._put(StepData(micro_batches, windows[-1][1]))
        except BaseException as err:  # handed to the training thread, which raises it
            self._put(err)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self, device: torch.device | str) -> StepData:
        """The next step's micro-batches on `device`; raises what the producer raised."""
        started = time.perf_counter()
        item = self._queue.get()
        waited = time.perf_counter() - started
        if isinstance(item, BaseException):
            raise RuntimeError(f"the training data producer failed: {item}") from item
        return StepData([b.to(device) for b in item.micro_batches], item.position, waited)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
