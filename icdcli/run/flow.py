"""The one edit-item pipeline: read ahead on worker threads, edit in batches, write on a worker thread.

`BatchPipeline` knows nothing about images or models. It is given four functions:

- `prepare(item)`: on a reader thread, everything before the networks (check the input, claim the output,
  decide whether it is needed, decode the image). Returns a prepared item, or an outcome to report at once
  (a skip); raises for a failure.
- `run_group(prepared)`: on the caller's thread, the networks for a group of prepared items that share a
  `group_key` (working size, sampler, method). Returns one result per item, an Exception for an item that
  failed alone.
- `write(prepared, result)`: on the writer thread, encode and store one result; returns its outcome.
- `report(item, outcome)`: on the caller's thread, in the items' order; False stops the run.

The first group is one item, so the first result (or the first error) comes at once; every later group fills
up to its batch limit (`batch_limit(prepared)`). Growing the groups step by step (1, 2, 4, ...) was measured
to cost about a tenth of a 100-item batch's throughput on a CPU, as small groups run the networks at a higher
cost per item. The networks never wait for a
file: the next images are decoded while a batch runs, and finished ones are written meanwhile.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class Prepared:
    """An item ready for the networks: what `prepare` made of it (`data`), and how to undo its claim."""

    item: Any
    data: Any
    discard: Callable[[], None] = lambda: None


@dataclass
class _Slot:
    """An item's place in the report order: its outcome once known (or the write that will give it)."""

    item: Any
    outcome: Any = None
    write: Future | None = None
    known: bool = False

    def ready(self, wait: bool) -> bool:
        if self.write is not None:
            if not (wait or self.write.done()):
                return False
            self.outcome, self.write, self.known = self.write.result(), None, True
        return self.known


class ItemError(Exception):
    """Wraps the exception one item's step raised, so the caller's `report` gets it as that item's outcome."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class BatchPipeline:
    """Read ahead, edit in groups, write behind (see the module docstring)."""

    def __init__(
        self,
        *,
        prepare: Callable[[Any], Prepared | Any],
        group_key: Callable[[Prepared], Hashable],
        batch_limit: Callable[[Prepared], int],
        run_group: Callable[[list[Prepared]], list[Any]],
        write: Callable[[Prepared, Any], Any],
        report: Callable[[Any, Any], bool],
        should_stop: Callable[[], bool] = lambda: False,
        readers: int = 2,
    ):
        self.prepare, self.group_key, self.batch_limit = prepare, group_key, batch_limit
        self.run_group, self.write, self.report, self.should_stop = run_group, write, report, should_stop
        self.readers = readers
        self.cap = 1
        self.ahead = 1  # the largest batch limit seen: how far to read ahead
        self.stopped = False
        self.draining = False
        self.halted = False  # `report` said stop
        self.groups: dict[Hashable, list[tuple[Prepared, _Slot]]] = {}
        self.slots: deque[_Slot] = deque()

    def run(self, items: Iterable[Any]) -> bool:
        """Process every item (until `report` says stop or `should_stop`); False when the run stopped early."""
        reader = ThreadPoolExecutor(self.readers, thread_name_prefix="icd-read")
        writer = ThreadPoolExecutor(1, thread_name_prefix="icd-write")
        reads: deque[tuple[Any, Future]] = deque()
        source = iter(items)
        try:
            self._fill(reads, source, reader)
            while reads and not self.stopped:
                item, future = reads.popleft()
                ready = self._take(item, future)
                if self.should_stop():  # asked while this item was read: a group not yet started never runs
                    self.stopped = True
                    break
                self._fill(reads, source, reader)  # sized by the batch limit `_take` may just have learnt
                if ready is not None:
                    self._flush(ready, writer)
                self._report_ready(wait=False)
                if self.should_stop():
                    self.stopped = True
            while self.groups and not self.stopped:
                if self.should_stop():
                    self.stopped = True
                    break
                key = next(iter(self.groups))
                self._flush(key, writer)
                self.stopped = self.stopped or self.should_stop()
        finally:
            self.draining = True
            self._abandon(reads)
            reader.shutdown(wait=True)
            writer.shutdown(wait=True)
            self._report_ready(wait=True)
        return not self.stopped  # after the last writes' reports: one of them may have stopped the run

    def _fill(self, reads: deque, source: Any, reader: ThreadPoolExecutor) -> None:
        """Keep about two batches of items being read ahead (of the batch limit, once an item has told it: the items
        of the first full group are read while the first item runs alone)."""
        while len(reads) < 2 * max(self.ahead, self.readers):
            item = next(source, _END)
            if item is _END:
                return
            reads.append((item, reader.submit(self._guard, self.prepare, item)))

    @staticmethod
    def _guard(step: Callable[..., Any], *args: Any) -> Any:
        try:
            return step(*args)
        except Exception as error:  # reported as this item's outcome on the caller's thread
            return ItemError(error)

    def _take(self, item: Any, future: Future) -> Hashable | None:
        """Add a read item to its group; the group's key when it is full and should run now."""
        outcome = future.result()
        slot = _Slot(item)
        self.slots.append(slot)
        if not isinstance(outcome, Prepared):
            slot.outcome, slot.known = outcome, True
            return None
        key = self.group_key(outcome)
        group = self.groups.setdefault(key, [])
        group.append((outcome, slot))
        limit = self.batch_limit(outcome)
        self.ahead = max(self.ahead, limit)
        return key if len(group) >= min(self.cap, limit) else None

    def _flush(self, key: Hashable, writer: ThreadPoolExecutor) -> None:
        group = self.groups.pop(key)
        try:
            results = self.run_group([prepared for prepared, _ in group])
        except Exception as error:  # the whole group failed the same way
            results = [error] * len(group)
        except BaseException:
            for prepared, _ in group:
                prepared.discard()
            raise
        for (prepared, slot), result in zip(group, results, strict=True):
            if isinstance(result, Exception):
                prepared.discard()
                slot.outcome, slot.known = ItemError(result), True
            else:
                slot.write = writer.submit(self._guard, self.write, prepared, result)
        self.cap = max(1, self.batch_limit(group[0][0]))
        self._report_ready(wait=False)

    def _report_ready(self, wait: bool) -> None:
        """Report the outcomes known so far, in the items' order (after a stop, the ones never run are left out)."""
        while self.slots:
            slot = self.slots[0]
            if not slot.ready(wait):
                if not (wait and self.draining):
                    return
                self.slots.popleft()  # prepared but never run: its claim was released
                continue
            self.slots.popleft()
            if self.halted and isinstance(slot.outcome, ItemError):
                continue  # behind a failure that stopped the run: left for the rerun, like the items never run
            if not self.report(slot.item, slot.outcome):
                self.stopped = self.halted = True

    def _abandon(self, reads: deque) -> None:
        """Undo what was prepared but will not run: the groups not run, and items still being read."""
        for group in self.groups.values():
            for prepared, _ in group:
                prepared.discard()
        self.groups.clear()
        for _, future in reads:
            if future.cancel():
                continue
            outcome = future.result()
            if isinstance(outcome, Prepared):
                outcome.discard()
        reads.clear()


_END = object()
