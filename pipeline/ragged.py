"""Ragged arrays as flat numpy values plus offsets, and their Arrow list form.

Token ids live in flat int32 buffers; a list of sequences is (values, offsets) with
`offsets[i]:offsets[i+1]` the i-th sequence. These helpers move between that form and
Arrow `list<...>` arrays without copies where Arrow allows, and gather many sub-ranges
at once, so no stage loops over rows in Python.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def list_parts(array: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, int64 offsets from 0) of a list array; zero copy for one unsliced chunk."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]


def lengths_of(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """int64 length of each list."""
    return np.diff(list_parts(array)[1])


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """int64 offsets [0, l0, l0+l1, ...] for these lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def list_array(values: np.ndarray | pa.Array, offsets: np.ndarray) -> pa.ListArray:
    """An Arrow list array with int32 offsets over `values`."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def ranges(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For concatenated ranges of these lengths: (owner index, offset within the range)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(
        offsets_of(lengths)[:-1], lengths
    )
    return owner, within


def gather(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of `values[s:s+l]` for each (s, l), in one vectorised take."""
    owner, within = ranges(lengths)
    return values[np.asarray(starts, dtype=np.int64)[owner] + within]
