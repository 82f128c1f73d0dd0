"""The rank-sharded data path: every rank reads only its own row groups, in an order fixed by the seed; columns
become numpy arrays equal to pyarrow's own lists; a stream resumed from any checkpointed position continues
exactly; the background producer hands over what the stream made, and the stream's errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cm3.model.sequences import SequenceConfig
from cm3.model.train_data import (UNITS_PER_RANK, BatchProducer, NumpyRows, RankShards, packed_windows, rank_units,
                                  shard_units)
from cm3.tokenizers.vocabulary import Vocabulary

VOCAB = Vocabulary(text_vocab_size=300, image_vocab_size=16)
COLUMNS = ["text_ids", "image_ids", "neighbour_text_ids", "neighbour_image_ids"]


def write_shards(folder, rows_per_shard=(30, 25, 17), row_group_size=10) -> list[str]:
    """Document rows whose text encodes their own index (row r: [r % 40, ...]), neighbours of varying count."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, index = [], 0
    for shard, rows in enumerate(rows_per_shard):
        records = []
        for _ in range(rows):
            text = [index % 40] + [(index * 7 + k) % 300 for k in range(3 + index % 5)]
            image = [(index + k) % 16 for k in range(8)]
            records.append({"text_ids": text, "image_ids": image,
                            "neighbour_text_ids": [text[1:3]] * (index % 3),
                            "neighbour_image_ids": [image] * (index % 3)})
            index += 1
        path = folder / f"{shard:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
        paths.append(str(path))
    return paths


def all_rows(paths: list[str]) -> list[dict]:
    return pa.concat_tables([pq.read_table(p, columns=COLUMNS) for p in paths]).to_pylist()


def plain(row: dict) -> dict:
    return {k: [x.tolist() for x in v] if isinstance(v, list) else v.tolist() for k, v in row.items()}


def test_units_are_row_groups_split_when_too_few_for_the_ranks(tmp_path):
    paths = write_shards(tmp_path)  # row groups: 10 10 10 | 10 10 5 | 10 7
    assert [(u.rows, u.first_row) for u in shard_units(paths, 1)][:4] == [(10, 0), (10, 10), (10, 20), (10, 30)]
    for world in (1, 2, 4):
        units = shard_units(paths, world)
        assert len(units) >= UNITS_PER_RANK * world
        rows = [u.first_row + i for u in units for i in range(u.rows)]
        assert sorted(rows) == list(range(72))  # every row in exactly one unit


def test_each_rank_reads_only_its_row_groups_once_per_epoch_in_a_seeded_order(tmp_path, monkeypatch):
    paths = write_shards(tmp_path, rows_per_shard=(40, 40, 40, 40), row_group_size=10)  # 16 row groups
    reads: Counter = Counter()  # (path, row group) -> times read: the real reader, observed
    opened, read = pq.ParquetFile.__init__, pq.ParquetFile.read_row_group

    def remember_source(self, source, *args, **kwargs):
        opened(self, source, *args, **kwargs)
        self.cm3_source = str(source)

    def counted(self, i, *args, **kwargs):
        reads[(self.cm3_source, i)] += 1
        return read(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "__init__", remember_source)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    units = shard_units(paths, 2)
    assert len(units) == 16  # enough row groups: none split
    rows = {rank: [r for r, _ in RankShards(units, COLUMNS, seed=3, rank=rank, world=2).rows(epoch=0)]
            for rank in (0, 1)}
    assert sorted(rows[0] + rows[1]) == list(range(160)) and len(rows[0]) == len(rows[1]) == 80
    owned = {rank: {(u.path, u.row_group) for u in rank_units(units, 3, 0, rank, 2)} for rank in (0, 1)}
    assert not owned[0] & owned[1] and set(reads) == owned[0] | owned[1]
    assert set(reads.values()) == {1}  # each row group read once in the epoch, by the rank that owns it
    assert rows[0] == [r for r, _ in RankShards(units, COLUMNS, seed=3, rank=0, world=2).rows(epoch=0)]
    assert rows[0] != [r for r, _ in RankShards(units, COLUMNS, seed=3, rank=0, world=2).rows(epoch=1)]
    assert rows[0] != [r for r, _ in RankShards(units, COLUMNS, seed=4, rank=0, world=2).rows(epoch=0)]


def test_numpy_rows_equal_pyarrows_lists(tmp_path):
    paths = write_shards(tmp_path)
    expected = all_rows(paths)
    units = shard_units(paths, 2)
    for rank in (0, 1):
        for row_id, row in RankShards(units, COLUMNS, seed=0, rank=rank, world=2).rows(epoch=0):
            assert plain(row) == expected[row_id]
            assert isinstance(row["text_ids"], np.ndarray)
    table = pa.concat_tables([pq.read_table(p, columns=COLUMNS) for p in paths]).slice(5, 30)  # chunked, sliced
    rows = NumpyRows(table)
    assert [plain(rows[i]) for i in range(rows.num_rows)] == table.to_pylist()



def test_numpy_rows_read_fixed_size_list_columns():
    """Shards may store an image's codes as a fixed-size list (every image has as many tokens)."""
    codes = pa.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], pa.list_(pa.int32(), 3))
    neighbours = pa.array([[[1, 1, 1]], [[2, 2, 2], [3, 3, 3]], [], [[4, 4, 4]]], pa.list_(pa.list_(pa.int32(), 3)))
    table = pa.table({"image_ids": codes, "neighbour_image_ids": neighbours,
                      "text_ids": pa.array([[1], [2, 3], [], [4]])}).slice(1, 3)
    rows = NumpyRows(pa.concat_tables([table.slice(0, 1), table.slice(1)]))  # chunked and sliced
    assert [plain(rows[i]) for i in range(rows.num_rows)] == table.to_pylist()

@pytest.mark.parametrize("world", [1, 2])
def test_a_stream_resumed_from_any_position_continues_exactly(tmp_path, world):
    paths = write_shards(tmp_path, rows_per_shard=(12, 9), row_group_size=4)
    config = SequenceConfig(seq_len=48, retrieved_min=0, retrieved_max=2)
    units = shard_units(paths, world)
    shards = RankShards(units, COLUMNS, seed=7, rank=world - 1, world=world)
    stream = packed_windows(shards, VOCAB, config)
    run = [next(stream) for _ in range(60)]  # several epochs of this rank's share
    assert len({position.epoch for _, position in run}) >= 3
    for k in (0, 1, 7, 19, 33):
        resumed = packed_windows(shards, VOCAB, config, run[k][1])
        for (window, position), (expected, expected_position) in zip((next(resumed) for _ in range(12)), run[k + 1:]):
            assert position == expected_position
            np.testing.assert_array_equal(window.inputs, expected.inputs)
            np.testing.assert_array_equal(window.weights, expected.weights)


def test_a_rank_without_rows_fails_clearly(tmp_path):
    paths = write_shards(tmp_path, rows_per_shard=(1,))
    shards = RankShards(shard_units(paths, 2), COLUMNS, seed=0, rank=1, world=2)
    with pytest.raises(ValueError, match="worker 1 of 2 got no rows"):
        next(packed_windows(shards, VOCAB, SequenceConfig(seq_len=48)))


def test_the_producer_hands_over_the_streams_batches_and_its_errors(tmp_path):
    paths = write_shards(tmp_path)
    config = SequenceConfig(seq_len=48, retrieved_min=0)
    shards = RankShards(shard_units(paths, 1), COLUMNS, seed=1)
    expected = packed_windows(shards, VOCAB, config)
    producer = BatchProducer(packed_windows(shards, VOCAB, config), batch_size=3, accumulation=2, prefetch=2)
    try:
        for _ in range(4):
            step = producer.next("cpu")
            assert step.wait_seconds >= 0 and len(step.micro_batches) == 2
            for batch in step.micro_batches:
                windows = [next(expected) for _ in range(3)]
                np.testing.assert_array_equal(batch.inputs.numpy(), np.stack([w.inputs for w, _ in windows]))
                np.testing.assert_array_equal(batch.weights.numpy(), np.stack([w.weights for w, _ in windows]))
            assert step.position == windows[-1][1]
    finally:
        producer.close()

    def failing():
        stream = packed_windows(shards, VOCAB, config)
        for _ in range(4):
            yield next(stream)
        raise OSError("shard vanished")

    producer = BatchProducer(failing(), batch_size=2, accumulation=1)
    try:
        producer.next("cpu")
        producer.next("cpu")
        with pytest.raises(RuntimeError, match="shard vanished"):
            producer.next("cpu")
    finally:
        producer.close()
    assert not producer._thread.is_alive()
