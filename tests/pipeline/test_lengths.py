"""LengthCounts against numpy on the lengths themselves."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.lengths import LengthCounts, power_of_two_edges


@given(
    batches=st.lists(st.lists(st.integers(0, 3000), max_size=40), min_size=1, max_size=6),
    edges=st.lists(st.integers(0, 3500), min_size=2, max_size=8, unique=True).map(sorted),
)
def test_counts_give_numpys_quantiles_histogram_and_total(batches, edges) -> None:
    counts = LengthCounts()
    for batch in batches:
        counts.add(np.array(batch, dtype=np.int64))
    x = np.array([v for batch in batches for v in batch], dtype=np.int64)
    assert (counts.items, counts.total) == (len(x), int(x.sum()))
    assert counts.histogram(np.array(edges)) == np.histogram(x, bins=edges)[0].tolist()
    if len(x) == 0:
        assert counts.quantiles() == {"p50": 0, "p90": 0, "p99": 0, "max": 0}
        return
    q = np.percentile(x, [50, 90, 99], method="lower")
    assert counts.quantiles() == {"p50": q[0], "p90": q[1], "p99": q[2], "max": x.max()}


@given(longest=st.integers(0, 1 << 20))
def test_power_of_two_edges_hold_the_longest_in_the_last_bin(longest: int) -> None:
    edges = power_of_two_edges(longest)
    assert edges[0] == 0 and edges[1] == 16 and np.all(edges[2:] == 2 * edges[1:-1])
    assert longest <= edges[-1] and (len(edges) == 2 or edges[-2] < longest)
