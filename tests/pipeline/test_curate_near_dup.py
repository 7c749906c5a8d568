"""Near-duplicate prompts: MinHash against exact Jaccard, LSH candidates, groups on crafted
prompts, which pairs a group keeps, and byte-identical output."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from pipeline import near_dup
from pipeline.curate import CurateConfig, curate, write_curated
from tests.pipeline.test_curate import NO_RULES, _pairs, _user

PHOTOSYNTHESIS = (
    "Explain how photosynthesis works in plants, step by step, for a ten year old child."
)
FIBONACCI = "Write a Python function that returns the n-th Fibonacci number using memoization."
# Paraphrase-level edits of the two prompts above, and prompts unrelated to them.
PROMPTS = [
    PHOTOSYNTHESIS,
    PHOTOSYNTHESIS.replace("child", "kid"),  # a changed word
    PHOTOSYNTHESIS.replace(".", "?"),  # punctuation
    FIBONACCI,
    FIBONACCI.replace("n-th", "nth").upper(),  # spelling and case
    "What is the capital of France?",
    "What is the capital of Spain?",  # one word apart, but a different question
    "Summarize the plot of Hamlet in three sentences.",
]
NEAR = [{0, 1, 2}, {3, 4}]


def _normalized(texts: list[str]) -> pl.Series:
    return pl.Series([" ".join(t.lower().split()) for t in texts])


def _jaccard(a: str, b: str, n: int = 5) -> float:
    """The exact Jaccard similarity of two texts' character n-gram sets (the oracle)."""
    x, y = (
        {t[i : i + n] for i in range(len(t) - n + 1)} for t in (a.ljust(n, "\0"), b.ljust(n, "\0"))
    )
    return len(x & y) / len(x | y)


def test_crafted_prompts_are_clearly_near_or_far() -> None:
    """The fixture's own premise, by exact Jaccard: edits stay >= 0.85, others <= 0.6, so
    a threshold of 0.75 is over 3 standard errors of the estimate from either."""
    texts = _normalized(PROMPTS).to_list()
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            similar = any({i, j} <= group for group in NEAR)
            assert (_jaccard(texts[i], texts[j]) >= 0.85) == similar, (i, j)
            assert similar or _jaccard(texts[i], texts[j]) <= 0.6, (i, j)


def test_shingles_are_every_character_ngram_and_short_texts_one() -> None:
    owner, hashes = near_dup.shingle_hashes(pl.Series(["abcdef", "xbcdey", "ab", ""]), 5)
    assert np.bincount(owner).tolist() == [2, 2, 1, 1]  # len - n + 1, at least one
    assert len(set(hashes.tolist())) == 6  # six different n-grams, padded ones included
    owner, hashes = near_dup.shingle_hashes(pl.Series(["zzabcdezz", "abcde"]), 5)
    assert hashes[owner == 1][0] == hashes[owner == 0][2]  # "abcde" in both texts


def test_minhash_estimates_exact_jaccard() -> None:
    """Over 300 pairs of random edits, the estimate is unbiased and within 4 standard
    errors (sqrt(J(1-J)/128)) of the exact Jaccard similarity."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)]
    base = [" ".join(rng.choice(words, 30)) for _ in range(300)]
    edited = [" ".join(t.split()[: rng.integers(10, 30)]) + " tail" for t in base]
    signature = near_dup.signatures(pl.Series(base + edited), 5, seed=3)
    first, other = np.arange(300), np.arange(300, 600)
    estimate = near_dup.estimated_jaccard(signature, first, other)
    exact = np.array([_jaccard(a, b) for a, b in zip(base, edited, strict=True)])
    error = estimate - exact
    assert abs(error.mean()) < 0.01
    assert np.all(np.abs(error) <= 4 * np.sqrt(exact * (1 - exact) / 128) + 1e-9)


def test_lsh_bands_match_datasketch() -> None:
    """datasketch 2.0's `_optimal_param(threshold, 128, 0.1, 0.9)` gives these."""
    expected = {0.5: (32, 4), 0.7: (20, 6), 0.8: (14, 9), 0.9: (8, 16), 0.95: (5, 25)}
    assert {t: near_dup.lsh_bands(t) for t in expected} == expected


def test_candidates_pair_each_bucket_member_with_its_first() -> None:
    signature = np.array([[1, 2, 3, 4], [9, 9, 3, 4], [1, 2, 7, 7], [1, 2, 3, 4]], np.uint32)
    first, other = near_dup.candidates(near_dup.band_key(signature, b, rows=2) for b in range(2))
    # band 0: {0, 2, 3} share (1, 2); band 1: {0, 1, 3} share (3, 4).
    assert list(zip(first.tolist(), other.tolist(), strict=True)) == [(0, 1), (0, 2), (0, 3)]


def test_groups_found_on_crafted_prompts() -> None:
    found = near_dup.near_duplicates(_normalized(PROMPTS), threshold=0.75, n=5, seed=0)
    assert found.group.tolist() == [0, 0, 0, 3, 3, -1, -1, -1]
    assert found.similar_pairs >= 3


TRANSLATE = (
    "Translate the following sentence into {}, keeping the tone formal: "
    '"Thank you for your patience while we review your application."'
)
REWORDED = [
    TRANSLATE.format("French"),
    TRANSLATE.format("German"),  # a template with another value
    PHOTOSYNTHESIS,
    "For a ten year old child, explain step by step how photosynthesis works in plants.",
    PHOTOSYNTHESIS + " Use simple words and one example.",  # a clause added
    "Write a haiku about autumn leaves falling in a quiet forest.",
    "Write a limerick about a cat who learns to play the piano.",  # same form, other task
]


def test_templates_reorderings_and_added_clauses_by_threshold() -> None:
    """A filled template is near at 0.75; reordered and added clauses (exact Jaccard about
    0.7, within the estimate's noise of 0.75) surely join their group at 0.5; two short
    'Write a ...' prompts never do."""
    texts = _normalized(REWORDED)
    assert _jaccard(texts[0], texts[1]) >= 0.85
    assert all(0.65 <= _jaccard(texts[2], texts[i]) < 0.75 for i in (3, 4))
    assert _jaccard(texts[5], texts[6]) < 0.2
    strict = near_dup.near_duplicates(texts, threshold=0.75, n=5, seed=0)
    assert strict.group[0] == strict.group[1] == 0
    assert strict.group[5] == strict.group[6] == -1
    loose = near_dup.near_duplicates(texts, threshold=0.5, n=5, seed=0)
    assert loose.group.tolist() == [0, 0, 2, 2, 2, -1, -1]


def test_near_duplicates_chain() -> None:
    """A~B and B~C group A with C even when A and C alone are below the threshold."""
    a = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    b = a.replace("alpha", "omega")
    c = b.replace("kappa", "sigma")
    assert _jaccard(a, c) < 0.75 <= min(_jaccard(a, b), _jaccard(b, c))
    found = near_dup.near_duplicates(pl.Series([a, b, c]), threshold=0.75, n=5, seed=0)
    assert found.group.tolist() == [0, 0, 0]


def test_index_verifies_candidates_as_whole_signatures_do(tmp_path) -> None:
    """Texts added in batches, verified one MinHash position at a time: the similar pairs
    (and so the groups) are those the estimate over whole signatures gives."""
    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) for _ in range(300)]
    texts = list(dict.fromkeys(texts))  # distinct, as curate adds them
    index = near_dup.Index(tmp_path, 0.6, 5, 0)
    for start in range(0, len(texts), 70):
        index.add(pl.Series(texts[start : start + 70]))
    found = index.find()
    signature = near_dup.signatures(pl.Series(texts), 5, 0)
    bands = (near_dup.band_key(signature, b, index.rows) for b in range(index.bands))
    first, other = near_dup.candidates(bands)
    similar = near_dup.estimated_jaccard(signature, first, other) >= 0.6
    assert found.candidate_pairs == len(first) > found.similar_pairs == int(similar.sum()) > 0


def test_no_texts_and_no_duplicates() -> None:
    assert near_dup.near_duplicates(pl.Series([], dtype=pl.String), 0.8, 5, 0).group.size == 0
    lone = near_dup.near_duplicates(pl.Series(["one thing", "quite another"]), 0.8, 5, 0)
    assert lone.group.tolist() == [-1, -1] and lone.similar_pairs == 0


# ---------------------------------------------------------------------------------------
# The curate rule


def _crafted(margins: list[float | None]):
    return _pairs(
        *({"prompt": _user(p), "margin": m} for p, m in zip(PROMPTS, margins, strict=True))
    )


ON = dataclasses.replace(NO_RULES, near_dup_threshold=0.75)


def test_rule_keeps_the_best_pair_of_each_group() -> None:
    """Photosynthesis: margins 1, 3, 3 keep the first 3 (largest, then input order);
    Fibonacci: no margin ranks last, so 2 wins; unrelated prompts all stay."""
    table = _crafted([1.0, 3.0, 3.0, None, 2.0, 1.0, 1.0, 1.0])
    result = curate(table, ON)
    assert result.pairs["prompt"].to_pylist() == [_user(PROMPTS[i]) for i in (1, 4, 5, 6, 7)]
    assert result.report["dropped"] == {"near_duplicate": 3}
    assert result.dropped["position"].to_pylist() == [0, 2, 3]
    assert result.dropped["reason"].to_pylist() == ["near_duplicate"] * 3
    summary = result.report["near_duplicates"]
    assert (summary["groups"], summary["prompts_in_groups"], summary["largest_group"]) == (2, 5, 3)
    assert summary["prompts"] == len(PROMPTS)
    assert summary["examples"][0] == [" ".join(PROMPTS[i].lower().split()) for i in (0, 1, 2)]
    assert (summary["bands"], summary["rows"]) == near_dup.lsh_bands(0.75)


def test_rule_caps_pairs_per_group_and_leaves_lone_prompts_alone() -> None:
    """A group is capped as a whole (its exact-same prompts included); a prompt without a
    near-duplicate keeps all its pairs (the per-prompt cap is another rule)."""
    table = _pairs(
        {"prompt": _user(PROMPTS[0]), "chosen": "a", "margin": 1.0},
        {"prompt": _user(PROMPTS[0]), "chosen": "b", "margin": 4.0},
        {"prompt": _user(PROMPTS[1]), "chosen": "c", "margin": 2.0},
        {"prompt": _user(PROMPTS[7]), "chosen": "d", "margin": 1.0},
        {"prompt": _user(PROMPTS[7]), "chosen": "e", "margin": 1.0},
    )
    kept = curate(table, dataclasses.replace(ON, near_dup_max_pairs=2)).pairs
    assert kept["chosen"].to_pylist() == ["b", "c", "d", "e"]
    assert curate(table, dataclasses.replace(ON, near_dup_max_pairs=3)).pairs.num_rows == 5


def test_rule_compares_margins_across_sources_by_their_standing_in_each() -> None:
    """A group spanning two scales: HelpSteer3-like margins 1-3 and UltraFeedback-like
    1-10. The photosynthesis pair of margin 3 is its source's largest, the paraphrase's 5
    the other source's smallest: the first is kept, though 5 > 3."""
    rows = [(0, "hs3", 3.0), (5, "hs3", 1.0), (6, "hs3", 2.0)]
    rows += [(1, "uf", 5.0), (7, "uf", 9.0), (3, "uf", 8.0)]
    table = _pairs(
        *({"prompt": _user(PROMPTS[i]), "source": s, "margin": m} for i, s, m in rows),
        metadata={"hs3": "margin 0-3", "uf": "scores 1-10"},
    )
    result = curate(table, ON)
    assert result.report["dropped"] == {"near_duplicate": 1}
    assert result.dropped["position"].to_pylist() == [3]  # the "uf" paraphrase
    one_scale = curate(table.set_column(1, "source", pa.array(["uf"] * 6)), ON)
    assert one_scale.dropped["position"].to_pylist() == [0]  # raw margins: 5 beats 3


def test_rule_compares_only_pairs_that_reached_it() -> None:
    """A near-duplicate dropped by an earlier rule neither takes its group's place nor
    is counted twice."""
    table = _crafted([5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    config = dataclasses.replace(ON, max_margin=4.0)
    result = curate(table, config)
    assert result.report["dropped"] == {"margin_above_max": 1, "near_duplicate": 2}
    assert result.pairs["prompt"].to_pylist()[0] == _user(PROMPTS[1])


def test_rule_is_off_by_default_and_deterministic(tmp_path) -> None:
    table = _crafted([1.0] * len(PROMPTS))
    assert CurateConfig().near_dup_threshold is None
    assert "near_duplicate" not in curate(table, NO_RULES).report["dropped"]
    assert curate(table, NO_RULES).report["near_duplicates"] is None
    for name in ("a", "b"):
        write_curated(curate(table, ON), tmp_path / name)
    for name in ("pairs.parquet", "dropped.parquet", "report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_clear_groups_do_not_depend_on_the_seed(seed: int) -> None:
    table = _crafted([1.0] * len(PROMPTS))
    config = dataclasses.replace(ON, seed=seed)
    assert curate(table, config).report["dropped"] == {"near_duplicate": 3}
