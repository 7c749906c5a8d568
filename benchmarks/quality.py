"""Does it learn: eval reward accuracy before and after DPO on pairs with a known rule.

    python -m benchmarks.quality [--pairs 2000] [--steps 200] [--seed 0] [--out DIR]

About a minute on 2 CPU cores (up to a few when the cores are busy). Prints the eval curve
and a before/after line, and writes benchmarks/results/quality.json (`--results` elsewhere).

The data: seeded preference pairs with a known rule. Each prompt asks to put a distinct set
of 3 to 8 common words in order; the chosen response lists them in a hidden fixed order (a
seeded ranking of the words, not alphabetical, so spelling gives no cue), the rejected one
lists the same words in another order. Both open with the same lead word, so both sides are
the same tokens (every word one BPE token after a space) and an untrained model has no
reason to prefer either; only the order, learned from the training pairs, tells them apart
on held-out prompts.

The pipeline, through the CLI only (the stable surface): `prefpack curate --eval-share 0.1`
holds out prompts for evaluation, `prefpack pack` trains a small byte-level BPE and packs
the training pairs, `prefpack pack --eval` packs the held-out ones with the same tokenizer,
`prefpack logps` scores the held-out pairs under the initial model, and `prefpack train
--config tiny --lr 1e-3` trains from that model (the same init seed), evaluating every
`--eval-every` steps and reusing those log-probs as the eval reference.

Before: at step 0 the policy is the reference, every implicit reward is 0 and the reward
accuracy (chosen strictly above rejected, TRL's definition) is 0 by construction, which
says nothing. So "before" is the share of held-out pairs whose chosen response the initial
model already gives the higher summed log-prob: chance level 0.5, the score of a ranker
that knows nothing of the rule. After: `eval/rewards/accuracies` (with the eval loss and
margin) at each evaluation, read from the run's metrics.jsonl; the first evaluation shows
how quickly the rule is picked up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import preference_pair

RESULTS = Path(__file__).parent / "results" / "quality.json"
REPO = Path(__file__).resolve().parents[1]

_TEXT = (
    "the a of to and in is it you that he was for on are with as his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come "
    "did number sound no most people my over know water than call first who may down side"
)
WORDS = _TEXT.split()
LEAD = "Here:"  # starts both responses, so every word has its leading space (same tokens)

# Pipeline settings: short pairs (about 35 tokens with the chat template), so a row of 256
# holds about 7 and a step of 4 rows (train's default) about 27 pairs; a BPE vocabulary of 512 (the tiny
# config's own) still makes every word of WORDS, after a space, a single token.
MAX_LEN = 256
BPE_VOCAB = 512
EVAL_SHARE = 0.1
LR = 1e-3


# -----------------------------------------------------------------------------
# Data with a known rule


def rule_pairs(n: int, seed: int) -> pa.Table:
    """n canonical pairs, each prompt a distinct set of 3 to 8 words to put in order.

    The rule: a hidden ranking of WORDS (a seeded permutation, so not alphabetical: no
    spelling cue). The chosen response lists the prompt's words in ranking order, the
    rejected one lists the same words in another order. Same tokens on both sides, so an
    untrained model has no reason to prefer either; only the order tells them apart.
    """
    rng = np.random.default_rng(seed)
    rank = {w: i for i, w in enumerate(rng.permutation(WORDS).tolist())}
    records, seen = [], set()
    while len(records) < n:
        drawn = rng.choice(WORDS, size=int(rng.integers(3, 9)), replace=False).tolist()
        if frozenset(drawn) in seen:  # one pair per word set: no eval answer is trained on
            continue
        seen.add(frozenset(drawn))
        prompt = [{"role": "user", "content": "Put in order: " + " ".join(drawn)}]
        ranked = sorted(drawn, key=rank.__getitem__)
        other = ranked
        while other == ranked:
            other = rng.permutation(drawn).tolist()
        chosen, rejected = " ".join([LEAD, *ranked]), " ".join([LEAD, *other])
        records.append(
            {
                "pair_id": preference_pair.make_pair_id("quality", prompt, chosen, rejected),
                "source": "quality",
                "split": "train",
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
            }
        )
    table = pa.Table.from_pylist(records, schema=preference_pair.SCHEMA)
    return preference_pair.CONTRACT.validate(table)


# -----------------------------------------------------------------------------
# The pipeline, through the CLI


def prefpack(*args: object) -> str:
    """Run one `prefpack` command; its stdout (the path it prints). Fails with its stderr."""
    command = [sys.executable, "-m", "prefpack", *map(str, args)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout.strip()


def initial_share(reference: Path) -> tuple[float, int, int]:
    """(share of pairs with chosen_logps > rejected_logps, ties, pairs) of a logps file."""
    with pa.memory_map(str(reference)) as source:
        table = pa.ipc.open_file(source).read_all()
    chosen = table.column("chosen_logps").to_numpy()
    rejected = table.column("rejected_logps").to_numpy()
    return float((chosen > rejected).mean()), int((chosen == rejected).sum()), len(chosen)


def run(pairs: int, steps: int, seed: int, eval_every: int, work: Path) -> dict:
    """Generate, curate, pack, score and train in `work`; the settings, numbers and times."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    pq.write_table(rule_pairs(pairs, seed), work / "pairs.parquet")
    prefpack(
        "curate",
        *("--pairs", work / "pairs.parquet", "--out", work / "curated"),
        *("--eval-share", EVAL_SHARE, "--seed", seed),
    )
    seconds["generate+curate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pack = ["pack", "--pairs", work / "curated", "--out", work / "store"]
    pack += ["--max-len", MAX_LEN, "--bpe-vocab-size", BPE_VOCAB]
    shards = prefpack(*pack)
    eval_shards = prefpack(*pack, "--eval")
    seconds["pack"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = ("--config", "tiny", "--init-seed", seed)
    reference = work / "eval_ref.arrow"
    prefpack("logps", "--shards", eval_shards, *model, "--out", reference, "--no-progress")
    before, ties, eval_pairs = initial_share(reference)
    seconds["logps"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prefpack(
        "train",
        *("--shards", shards, "--eval-shards", eval_shards, "--eval-reference", reference),
        *model,
        *("--lr", LR, "--steps", steps, "--eval-every", eval_every),
        *("--seed", seed, "--out", work / "run", "--no-progress"),
    )
    seconds["train"] = time.perf_counter() - t0

    lines = (work / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    curve = [
        {
            "step": m["step"],
            "eval_loss": m["eval/loss"],
            "eval_reward_accuracy": m["eval/rewards/accuracies"],
            "eval_reward_margin": m["eval/rewards/margins"],
        }
        for m in metrics
        if "eval/loss" in m
    ]
    last = metrics[-1]
    return {
        "settings": {
            "pairs": pairs,
            "steps": steps,
            "seed": seed,
            "eval_every": eval_every,
            "eval_share": EVAL_SHARE,
            "max_len": MAX_LEN,
            "bpe_vocab_size": BPE_VOCAB,
            "config": "tiny",
            "lr": LR,
            "rule": "chosen lists the prompt's words in a hidden fixed order; rejected, the "
            "same words in another order",
        },
        "train_pairs": pq.read_metadata(work / "curated" / "pairs.parquet").num_rows,
        "eval_pairs": eval_pairs,
        "train_pairs_seen": sum(m["pairs"] for m in metrics),
        "before": {"initial_logp_chosen_above_rejected": before, "initial_logp_ties": ties},
        "first_eval": curve[0],
        "after": curve[-1],
        "train_final": {
            "loss": last["loss"],
            "reward_accuracy": last["rewards/accuracies"],
            "reward_margin": last["rewards/margins"],
        },
        "curve": curve,
        "seconds": {**seconds, "total": sum(seconds.values())},
    }


# -----------------------------------------------------------------------------
# Report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="pairs generated (train + eval)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="data, eval split, init and order")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    parser.add_argument("--out", type=Path, default=None, help="new or empty work folder")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON written")
    args = parser.parse_args()
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty (a run never reuses an old one)")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args.pairs, args.steps, args.seed, args.eval_every, work)

    print(f"{result['eval_pairs']} held-out pairs; rule: {result['settings']['rule']}")
    print(f"{'step':>5} {'eval loss':>10} {'reward acc':>11} {'margin':>8}")
    for point in result["curve"]:
        print(
            f"{point['step']:>5} {point['eval_loss']:>10.4f} "
            f"{point['eval_reward_accuracy']:>11.3f} {point['eval_reward_margin']:>8.4f}"
        )
    first, after = result["first_eval"], result["after"]
    print(
        f"before: the initial model gives chosen the higher log-prob on "
        f"{result['before']['initial_logp_chosen_above_rejected']:.3f} of eval pairs "
        f"(chance 0.5); after: eval reward accuracy {first['eval_reward_accuracy']:.3f} at "
        f"step {first['step']}, {after['eval_reward_accuracy']:.3f} at step {after['step']}"
    )
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
