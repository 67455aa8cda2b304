"""Sets of row ids (the rows a job has done, or failed) as sorted, disjoint runs, so that the 10M
contiguous ids of a big job cost a few bytes and a membership test is a binary search."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence


class RowIdSet:
    """A set of non-negative ints stored as sorted, disjoint, non-adjacent [start, end) runs."""

    def __init__(self, intervals: Iterable[Sequence[int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._len = 0
        for start, end in intervals:
            self.add_range(start, end)

    def add(self, row_id: int) -> None:
        self.add_range(row_id, row_id + 1)

    def add_range(self, start: int, end: int) -> None:
        """Add the ids ``start <= id < end``."""
        if start >= end:
            return
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(ends, start)  # first run ending at or after `start` (touching)
        j = bisect.bisect_right(starts, end)  # first run starting after `end` (not touching)
        if i < j:
            start, end = min(start, starts[i]), max(end, ends[j - 1])
            self._len -= sum(e - s for s, e in zip(starts[i:j], ends[i:j], strict=True))
        starts[i:j] = [start]
        ends[i:j] = [end]
        self._len += end - start

    def end_of(self, row_id: int) -> int | None:
        """Exclusive end of the run containing ``row_id``, or None if it is not in the set."""
        if not self._ends or row_id >= self._ends[-1]:  # fast path: ids past the last run
            return None
        k = bisect.bisect_right(self._starts, row_id) - 1
        if k >= 0 and row_id < self._ends[k]:
            return self._ends[k]
        return None

    def __contains__(self, row_id: object) -> bool:
        return isinstance(row_id, int) and self.end_of(row_id) is not None

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for s, e in zip(self._starts, self._ends, strict=True):
            yield from range(s, e)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowIdSet) and self.intervals() == other.intervals()

    def __repr__(self) -> str:
        return f"RowIdSet({self.intervals()})"

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def update(self, other: RowIdSet) -> None:
        for s, e in other.intervals():
            self.add_range(s, e)

    def difference(self, other: RowIdSet) -> RowIdSet:
        """Ids in ``self`` but not in ``other``."""
        out = RowIdSet()
        cuts = other.intervals()
        for s, e in self.intervals():
            k = bisect.bisect_right(other._ends, s)  # first cut that ends after s
            while s < e and k < len(cuts) and cuts[k][0] < e:
                cs, ce = cuts[k]
                if cs > s:
                    out.add_range(s, cs)
                s = max(s, ce)
                k += 1
            if s < e:
                out.add_range(s, e)
        return out


def id_runs(sorted_ids: Iterable[int]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive ids in an ascending sequence."""
    runs: list[tuple[int, int]] = []
    start = prev = None
    for i in sorted_ids:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            runs.append((start, prev + 1))
        start = prev = i
    if start is not None:
        runs.append((start, prev + 1))
    return runs
