"""Near-duplicate prompts: MinHash of character n-grams, LSH banding, connected components.

Two texts are near-duplicates when the Jaccard similarity of their sets of character
n-grams ("shingles") is at least a threshold. Character n-grams, not word n-grams, because
prompts are short: a changed word or punctuation mark changes only the n-grams that
overlap it (about n + the word's length), where in a ten-word prompt one changed word
removes n of its word n-grams, and a prompt shorter than n words has none at all. They
also need no word splitting, which Chinese or Japanese text does not have.

The steps, all vectorised numpy over batches of texts (no Python per text):
1. shingles: a polynomial hash of each run of n code points, avalanched (MurmurHash3's
   64-bit finalizer) and cut to 32 bits; a text shorter than n is padded to one shingle.
2. MinHash: `PERMUTATIONS` affine permutations `a * h + b mod 2**32` (`a` odd, drawn from
   `seed`), datasketch's "affine32" scheme, and the minimum per text of each.
3. LSH: the signature is cut into `bands` bands of `rows` values, chosen for the threshold
   as datasketch's `MinHashLSH` chooses them, with false negatives weighted 9:1 (see
   `lsh_bands`). Texts with an equal band are candidates; each is paired with the
   first text of its bucket, not with every member (a bucket of thousands of templated
   prompts would otherwise give millions of pairs).
4. verification: a candidate pair is kept when the share of equal MinHash values (the
   estimate of its Jaccard similarity) is at least the threshold.
5. groups: connected components of the kept pairs (scipy), so near-duplicates chain
   (A~B, B~C puts A and C together even when A and C alone are less similar).

`Index` adds texts batch by batch and keeps their signatures and band keys on disk (512 +
8 x bands bytes per text), not in memory: finding the candidates reads one band at a time
(about 40 bytes per text at once), and verifying them reads one MinHash position of every
text at a time (4 bytes per text), counting the equal values of each candidate pair, so
memory holds the candidates and the groups, not the texts' signatures. (Reading the rows
of candidate pairs through a memory mapping of a signature file instead mapped far more
than the rows read: 1 GB more resident memory at six million prompts.)

datasketch computes the same signatures one text at a time in Python; on 100k generated
prompts this module is measured against it in `benchmarks/near_dedup.py`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

PERMUTATIONS = 128  # MinHash values per text (datasketch's default); error ~ 1/sqrt(128)
BATCH_TEXTS = 20_000  # texts shingled and hashed at once: bounds memory to ~100 MB
_PRIME = np.uint64(1_000_003)  # polynomial base of the shingle hash


@dataclass(frozen=True)
class NearDuplicates:
    """Groups of near-duplicate texts.

    Attributes:
        group: per text, the index of the first text of its group, or -1 for a text
            with no near-duplicate.
        bands: LSH bands used for the threshold.
        rows: MinHash values per band.
        candidate_pairs: distinct pairs that shared a band.
        similar_pairs: candidate pairs whose estimated Jaccard similarity reached the
            threshold (the edges of the groups).
    """

    group: np.ndarray
    bands: int
    rows: int
    candidate_pairs: int
    similar_pairs: int


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: a bijection that spreads every input bit."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def shingle_hashes(texts: pl.Series, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(owner text, 32-bit hash) of every character n-gram of each text, in order.

    A text shorter than n characters (the empty text too) is padded with NUL to one
    n-gram, so every text has at least one.
    """
    padded = texts.fill_null("").str.pad_end(n, "\0")
    lengths = padded.str.len_chars().to_numpy().astype(np.int64)
    if lengths.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.uint32)
    codes = np.frombuffer("".join(padded.to_list()).encode("utf-32-le"), np.uint32)
    count = codes.size - n + 1
    acc = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc = acc * _PRIME + codes[k : k + count]
    owner = np.repeat(np.arange(lengths.size), lengths)[:count]
    offset = np.arange(count) - (np.cumsum(lengths) - lengths)[owner]
    whole = offset <= lengths[owner] - n  # the n-gram ends inside its own text
    return owner[whole], (_fmix64(acc[whole]) >> np.uint64(32)).astype(np.uint32)


def permutations(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the `PERMUTATIONS` affine maps `a * h + b mod 2**32`, `a` odd (a
    bijection, so the permutation adds no collisions)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**31, PERMUTATIONS, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.integers(0, 2**32, PERMUTATIONS, dtype=np.uint64).astype(np.uint32)
    return a, b


def signatures(texts: pl.Series, n: int, seed: int) -> np.ndarray:
    """MinHash signature of each text's set of character n-grams: (texts, PERMUTATIONS)
    uint32; equal values at a position estimate the Jaccard similarity."""
    a, b = permutations(seed)
    out = np.empty((len(texts), PERMUTATIONS), np.uint32)
    for first in range(0, len(texts), BATCH_TEXTS):
        batch = texts.slice(first, BATCH_TEXTS)
        owner, hashes = shingle_hashes(batch, n)
        starts = np.flatnonzero(np.diff(owner, prepend=-1))  # every text owns >= 1 shingle
        block = out[first : first + len(batch)]
        for k in range(PERMUTATIONS):
            block[:, k] = np.minimum.reduceat(hashes * a[k] + b[k], starts)
    return out


def lsh_bands(threshold: float, permutations: int = PERMUTATIONS) -> tuple[int, int]:
    """(bands, rows per band), bands * rows <= permutations, minimising 0.1 x the false
    positive mass (pairs below `threshold` that share a band) + 0.9 x the false negative
    mass (pairs above it that share none), as datasketch's `MinHashLSH` with those weights.
    Recall is weighted up because every candidate is verified: a false positive costs one
    comparison, a false negative a missed near-duplicate."""
    below, above = np.linspace(0, threshold, 201), np.linspace(threshold, 1, 201)
    best, chosen = np.inf, (1, permutations)
    for bands in range(1, permutations + 1):
        for rows in range(1, permutations // bands + 1):
            false_pos = np.trapezoid(1 - (1 - below**rows) ** bands, below)
            false_neg = np.trapezoid((1 - above**rows) ** bands, above)
            error = 0.1 * false_pos + 0.9 * false_neg
            if error < best:
                best, chosen = error, (bands, rows)
    return chosen


def band_key(signature: np.ndarray, band: int, rows: int) -> np.ndarray:
    """Per text, one u64 key of its MinHash values in `band` (`rows` values each): texts
    with an equal key are candidates."""
    values = signature[:, band * rows : (band + 1) * rows].astype(np.uint64)
    key = np.zeros(len(signature), np.uint64)
    with np.errstate(over="ignore"):
        for column in values.T:
            key = key * _PRIME + column
    return key


def candidates(band_keys: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(first, other) index pairs of texts with an equal key in some band (one array of
    keys per band, a key per text), each text paired with the first text of its bucket,
    distinct and sorted."""
    found = np.empty(0, np.int64)
    texts = 0
    for key in band_keys:
        texts = len(key)
        order = np.argsort(key, kind="stable")  # a bucket's texts stay in text order
        sorted_keys = key[order]
        opens = np.ones(texts, bool)  # the first text of each bucket
        opens[1:] = sorted_keys[1:] != sorted_keys[:-1]
        anchor = order[opens][np.cumsum(opens) - 1]
        member = anchor != order
        found = np.union1d(found, anchor[member] * texts + order[member])
    return found // max(texts, 1), found % max(texts, 1)


def estimated_jaccard(signature: np.ndarray, first: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Share of equal MinHash values of each pair (in blocks, to bound memory)."""
    out = np.empty(len(first))
    for i in range(0, len(first), 65_536):
        block = slice(i, i + 65_536)
        out[block] = (signature[first[block]] == signature[other[block]]).mean(axis=1)
    return out


class Index:
    """MinHash signatures and LSH band keys of texts added batch by batch, on disk in
    `directory` (which the caller removes), then grouped by `find`.

    Args:
        directory: an empty directory for the index's files.
        threshold: Jaccard similarity in (0, 1].
        n: shingle size in characters.
        seed: seed of the MinHash permutations; the same seed gives the same groups.
    """

    def __init__(self, directory: Path, threshold: float, n: int, seed: int) -> None:
        self.directory, self.threshold, self.n, self.seed = directory, threshold, n, seed
        self.bands, self.rows = lsh_bands(threshold)
        self.texts = 0

    def _file(self, name: str) -> Path:
        return self.directory / f"{name}.bin"

    def add(self, texts: pl.Series) -> None:
        """Append `texts` (normalized, distinct: equal texts always group), in order."""
        signature = signatures(texts, self.n, self.seed)
        for k in range(PERMUTATIONS):  # one file per position: verifying reads one at once
            with open(self._file(f"minhash{k}"), "ab") as out:
                np.ascontiguousarray(signature[:, k]).tofile(out)
        for band in range(self.bands):
            with open(self._file(f"band{band}"), "ab") as out:
                band_key(signature, band, self.rows).tofile(out)
        self.texts += len(texts)

    def find(self) -> NearDuplicates:
        """Group the texts added whose estimated Jaccard similarity reaches the threshold,
        directly or through a chain of such texts."""
        keys = (
            np.fromfile(self._file(f"band{band}"), np.uint64) if self.texts else np.empty(0)
            for band in range(self.bands)
        )
        first, other = candidates(keys)
        # Equal MinHash values of each candidate pair, one position of all texts at a time:
        # the share is `estimated_jaccard`'s, to the bit (an exact count over PERMUTATIONS).
        equal = np.zeros(len(first), np.uint8)
        if len(first):
            for k in range(PERMUTATIONS):
                value = np.fromfile(self._file(f"minhash{k}"), np.uint32)
                equal += value[first] == value[other]
                del value
        similar = equal / PERMUTATIONS >= self.threshold
        size = self.texts
        graph = coo_array(
            (np.ones(int(similar.sum()), np.int8), (first[similar], other[similar])),
            (size, size),
        )
        _, label = connected_components(graph, directed=False)
        _, lowest = np.unique(label, return_index=True)  # the first text of each component
        members = np.bincount(label)
        group = np.where(members[label] > 1, lowest[label], -1)
        return NearDuplicates(group, self.bands, self.rows, len(first), int(similar.sum()))


def near_duplicates(texts: pl.Series, threshold: float, n: int, seed: int) -> NearDuplicates:
    """Group `texts` whose character n-gram sets have an estimated Jaccard similarity of at
    least `threshold`, directly or through a chain of such texts (an `Index` of them).

    Args:
        texts: the texts to compare (normalized, distinct: equal texts always group).
        threshold: Jaccard similarity in (0, 1].
        n: shingle size in characters.
        seed: seed of the MinHash permutations; the same seed gives the same groups.
    """
    with tempfile.TemporaryDirectory(prefix="prefpack-near-dup-") as directory:
        index = Index(Path(directory), threshold, n, seed)
        index.add(texts)
        return index.find()
