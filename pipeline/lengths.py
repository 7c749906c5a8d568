"""Token-length statistics over a stream of batches, in memory bounded by the longest length.

A stage sees millions of pairs but wants exact quantiles and histograms of their lengths.
Keeping every length costs memory in proportion to the pairs; `LengthCounts` keeps one
count per distinct length instead (`np.bincount`, summed batch by batch), from which
quantiles and histograms follow exactly.
"""

from __future__ import annotations

import numpy as np

QUANTILES = {"p50": 50, "p90": 90, "p99": 99}


class LengthCounts:
    """How many items had each length; feed batches with `add`."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)  # counts[n] = items of length n

    def add(self, lengths: np.ndarray) -> None:
        """Count a batch of non-negative integer lengths."""
        batch = np.bincount(np.asarray(lengths, dtype=np.int64))
        if len(batch) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(batch) - len(self.counts)))
        self.counts[: len(batch)] += batch

    @property
    def items(self) -> int:
        return int(self.counts.sum())

    @property
    def total(self) -> int:
        """Sum of all lengths counted."""
        return int(np.dot(self.counts, np.arange(len(self.counts))))

    @property
    def longest(self) -> int:
        """The largest length counted (0 when empty)."""
        nonzero = np.flatnonzero(self.counts)
        return int(nonzero[-1]) if len(nonzero) else 0

    def quantiles(self) -> dict[str, int]:
        """p50, p90, p99 and max, as `np.percentile(lengths, q, method="lower")` gives them.

        All zero when nothing was counted.
        """
        n = self.items
        if n == 0:
            return {**dict.fromkeys(QUANTILES, 0), "max": 0}
        # numpy's "lower": the sorted value at index floor(q / 100 * (n - 1)).
        index = np.floor(np.array(list(QUANTILES.values())) / 100 * (n - 1)).astype(np.int64)
        values = np.searchsorted(np.cumsum(self.counts), index, side="right")
        return {**dict(zip(QUANTILES, values.tolist(), strict=True)), "max": self.longest}

    def histogram(self, edges: np.ndarray) -> list[int]:
        """Counts per bin, as `np.histogram(lengths, bins=edges)[0]` gives them.

        Args:
            edges: increasing integer bin edges; bins are [e_i, e_i+1), the last one closed.
        """
        below = np.concatenate([[0], np.cumsum(self.counts)])  # below[n] = items < n
        bounds = np.asarray(edges, dtype=np.int64).copy()
        bounds[-1] += 1  # the last bin includes its right edge
        return np.diff(below[np.clip(bounds, 0, len(self.counts))]).tolist()


def power_of_two_edges(longest: int) -> np.ndarray:
    """Edges 0, 16, 32, 64, ... up to the first power of two >= `longest` (at least 16)."""
    top = max(4, (longest - 1).bit_length())
    return np.array([0, *(2**k for k in range(4, top + 1))], dtype=np.int64)
