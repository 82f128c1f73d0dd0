"""`ModelBatcher`, the dynamic batcher behind `cm3 serve`: batches fill from the queue that built up while the
model ran, in arrival order, by size; cancelled requests cost nothing; one batch's error reaches its callers only.

The model is a function that records each batch and, when asked, holds it until the test releases it, so the
tests decide what is queued while a batch runs without timing anything. Requests submitted while a batch is
held are created as tasks before the release is scheduled with `call_soon`: the event loop runs callbacks in
the order they were scheduled, so every one of them is queued before the held batch can finish.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from cm3.workflows.serve_batcher import ModelBatcher

GUARD_S = 60  # a batch that should close when full must not wait out a long window; this fails the test if it does


class Model:
    """Records the items of every batch; returns each item doubled. The first batch is held until `release`."""

    def __init__(self, hold_first: bool = True, fail_on=None):
        self.batches: list[list] = []
        self.started, self.released = threading.Event(), threading.Event()
        self.hold_first, self.fail_on = hold_first, fail_on
        if not hold_first:
            self.released.set()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        self.released.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"cannot run {self.fail_on}")
        return [2 * item if isinstance(item, int) else item for item in items]


async def _while_first_batch_runs(batcher: ModelBatcher, model: Model, first, queued: list, cancel=()):
    """Submits `first`, waits until its batch runs, queues `queued` meanwhile (cancelling `cancel`), releases."""
    first_task = asyncio.create_task(batcher.submit(first))
    await asyncio.to_thread(model.started.wait)
    tasks = [asyncio.create_task(batcher.submit(item)) for item in queued]
    loop = asyncio.get_running_loop()
    for index in cancel:
        loop.call_soon(tasks[index].cancel)
    loop.call_soon(model.released.set)  # runs after the tasks above have queued their items
    results = await asyncio.wait_for(asyncio.gather(first_task, *tasks, return_exceptions=True), GUARD_S)
    return results


def test_next_batch_takes_everything_that_queued_while_the_model_ran():
    async def scenario():
        model = Model()
        batcher = ModelBatcher(model, max_size=8, wait_s=0)
        results = await _while_first_batch_runs(batcher, model, 1, [2, 3, 4])
        return model, batcher, results

    model, batcher, results = asyncio.run(scenario())
    assert results == [2, 4, 6, 8]
    assert model.batches == [[1], [2, 3, 4]]
    assert batcher.batch_sizes == [1, 3]


def test_batches_are_filled_in_arrival_order_and_a_request_that_does_not_fit_waits_at_the_head():
    sizes = {"a": 1, "b3": 3, "c2": 2, "d1": 1}

    async def scenario():
        model = Model()
        batcher = ModelBatcher(model, max_size=4, wait_s=0, size_of=sizes.__getitem__)
        await _while_first_batch_runs(batcher, model, "a", ["b3", "c2", "d1"])
        return model, batcher

    model, batcher = asyncio.run(scenario())
    # d1 would fit beside b3, but it arrived after c2, which does not: no request overtakes another
    assert model.batches == [["a"], ["b3"], ["c2", "d1"]]
    assert batcher.batch_sizes == [1, 3, 3]


def test_a_request_cancelled_while_queued_takes_no_row():
    async def scenario():
        model = Model()
        batcher = ModelBatcher(model, max_size=8, wait_s=0)
        results = await _while_first_batch_runs(batcher, model, 1, [2, 3, 4], cancel=[1])
        return model, results

    model, results = asyncio.run(scenario())
    assert model.batches == [[1], [2, 4]]
    assert results[0] == 2 and results[1] == 4 and results[3] == 8
    assert isinstance(results[2], asyncio.CancelledError)


def test_a_cancelled_request_does_not_count_towards_a_full_batch():
    async def scenario():
        model = Model(hold_first=False)
        batcher = ModelBatcher(model, max_size=3, wait_s=3600)
        loop = asyncio.get_running_loop()
        first, gone, third = (asyncio.create_task(batcher.submit(item)) for item in (1, 2, 3))
        loop.call_soon(gone.cancel)
        late = []
        # scheduled twice over so that it runs after the batcher has looked at [1, cancelled 2, 3]: two live
        # rows of three, so the batch must wait for this one rather than close
        loop.call_soon(loop.call_soon, lambda: late.append(asyncio.create_task(batcher.submit(4))))
        results = await asyncio.wait_for(asyncio.gather(first, third), GUARD_S)
        return model, results, await asyncio.wait_for(late[0], GUARD_S)

    model, results, last = asyncio.run(scenario())
    assert model.batches == [[1, 3, 4]]
    assert results == [2, 6] and last == 8


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_still_runs():
    async def errors():
        model = Model(fail_on=3)
        batcher = ModelBatcher(model, max_size=8, wait_s=0)
        results = await _while_first_batch_runs(batcher, model, 1, [3, 4])
        after = await asyncio.wait_for(batcher.submit(5), GUARD_S)
        return model, results, after

    model, results, after = asyncio.run(errors())
    assert results[0] == 2
    assert all(isinstance(result, RuntimeError) and "cannot run 3" in str(result) for result in results[1:])
    assert after == 10
    assert model.batches == [[1], [3, 4], [5]]


def test_a_batch_closes_when_full_without_waiting_out_its_window():
    async def scenario():
        model = Model(hold_first=False)
        batcher = ModelBatcher(model, max_size=3, wait_s=3600)
        results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(3))), GUARD_S)
        return model, results

    model, results = asyncio.run(scenario())
    assert results == [0, 2, 4]
    assert model.batches == [[0, 1, 2]]


def test_requests_that_arrive_within_the_window_of_an_idle_model_share_a_batch():
    async def scenario():
        model = Model(hold_first=False)
        batcher = ModelBatcher(model, max_size=8, wait_s=3600)
        first = asyncio.create_task(batcher.submit(1))
        second = asyncio.create_task(batcher.submit(2))
        third = asyncio.create_task(batcher.submit(3))
        # the batch is not full, so it waits for its window; a request that fills it closes it at once
        fill = [asyncio.create_task(batcher.submit(i)) for i in range(4, 9)]
        results = await asyncio.wait_for(asyncio.gather(first, second, third, *fill), GUARD_S)
        return model, results

    model, results = asyncio.run(scenario())
    assert model.batches == [list(range(1, 9))]
    assert results == [2 * i for i in range(1, 9)]


def test_refuses_a_request_larger_than_a_batch_and_a_model_that_drops_results():
    async def too_large():
        batcher = ModelBatcher(Model(hold_first=False), max_size=4, wait_s=0, size_of=lambda item: item)
        await batcher.submit(5)

    with pytest.raises(ValueError, match="size 5 does not fit a batch of 4"):
        asyncio.run(too_large())

    async def drops_one():
        batcher = ModelBatcher(lambda items: items[:-1], max_size=4, wait_s=3600)
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(4)),
                                                     return_exceptions=True), GUARD_S)

    results = asyncio.run(drops_one())
    assert all(isinstance(result, RuntimeError) and "returned 3 results for 4 items" in str(result)
               for result in results)
    with pytest.raises(ValueError, match="max_size must be at least 1"):
        ModelBatcher(lambda items: items, max_size=0, wait_s=0)
