"""Regenerate the bundled sample files: `python -m pipeline.sample_data.generate`.

Every row is written by us from the small topic bank below, in each source's real schema,
and seeded, so the files come out byte-identical on every run. Each file mixes what the
pipeline must handle: multi-turn prompts, ties, "N/A" ratings, duplicates, and a few broken
rows (invalid JSON or UTF-8, missing fields, wrong types, out-of-range scores) so the
quarantine and the curation funnel show something.
"""

from __future__ import annotations

import gzip
import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sample_data import EVAL_PROMPTS, SAMPLES

HERE = Path(__file__).parent
SEED = 20240601

# (prompt, follow-up question, good answer, fair answer, poor answer)
TOPICS: list[tuple[str, str, str, str, str]] = [
    (
        "How do I reverse a list in Python?",
        "And without changing the original list?",
        "Use `my_list.reverse()` to reverse in place, or `my_list[::-1]` for a reversed copy. "
        "`reversed(my_list)` gives an iterator if you only need to loop.",
        "You can call `my_list.reverse()`.",
        "Python lists cannot be reversed; build a new list by hand.",
    ),
    (
        "Explain photosynthesis to a ten-year-old.",
        "Why are leaves green then?",
        "Plants make their own food from sunlight. Their leaves catch light, take in air "
        "(carbon dioxide) and water from the roots, and turn them into sugar, giving off the "
        "oxygen we breathe.",
        "Plants use sunlight to make food.",
        "Plants eat soil, which is why they grow in the ground.",
    ),
    (
        "What is the difference between TCP and UDP?",
        "Which one should a video call use?",
        "TCP is connection-oriented: it orders packets, retransmits lost ones and controls "
        "congestion. UDP just sends datagrams with no delivery guarantee, which keeps latency "
        "low for games, voice and video.",
        "TCP is reliable and UDP is faster.",
        "UDP is the encrypted version of TCP.",
    ),
    (
        "Write a haiku about autumn rain.",
        "Now one about winter.",
        "Cold rain on maples,\nred leaves loosen one by one,\nthe gutter sings low.",
        "Rain falls in autumn,\nleaves are falling down as well,\nit is wet outside.",
        "Autumn rain is rain that falls in the autumn season of the year.",
    ),
    (
        "How many minutes are in a week?",
        "And in a leap year?",
        "A week has 7 days x 24 hours x 60 minutes = 10,080 minutes.",
        "About ten thousand minutes.",
        "There are 1,440 minutes in a week.",
    ),
    (
        "Summarize the causes of the French Revolution in three points.",
        "Which of these mattered most?",
        "1. A fiscal crisis: war debts and an unfair tax system. 2. Social tension between the "
        "privileged estates and the Third Estate. 3. Enlightenment ideas that questioned "
        "absolute monarchy, sharpened by bread shortages.",
        "Money problems, unhappy people and new ideas.",
        "It was caused by Napoleon wanting to become emperor.",
    ),
    (
        "How do I center a div with CSS?",
        "What about vertically too?",
        "Make the parent a flex container: `display: flex; justify-content: center; "
        "align-items: center;`. For horizontal centering alone, `margin: 0 auto` on a block "
        "with a width works.",
        "Use `margin: auto`.",
        "Use the `<center>` tag, CSS cannot do it.",
    ),
    (
        "What is a good way to start learning to run?",
        "How often should I run in the first month?",
        "Start with run-walk intervals, for example one minute running and two walking for "
        "twenty minutes, three times a week, and add running time gradually. Rest days matter "
        "as much as runs.",
        "Just go running a few times a week.",
        "Run as far as you can every day until it stops hurting.",
    ),
    (
        "Translate 'Where is the train station?' into Spanish.",
        "And into French?",
        "¿Dónde está la estación de tren?",
        "Donde esta la estacion?",
        "Where is el train station?",
    ),
    (
        "What does the `git rebase` command do?",
        "Is it safe on a shared branch?",
        "`git rebase` replays your branch's commits on top of another base commit, giving a "
        "linear history. It rewrites commit ids, so avoid it on branches others have pulled.",
        "It moves commits to another branch.",
        "It deletes the remote repository and starts again.",
    ),
    (
        "Give me a recipe idea for a quick vegetarian dinner.",
        "Can I make it without chickpeas?",
        "Chickpea and spinach curry: fry onion, garlic and ginger, add curry paste, a tin of "
        "chickpeas and a tin of tomatoes, simmer ten minutes, stir in spinach, serve with rice.",
        "Make pasta with vegetables.",
        "Grill a steak with a side salad.",
    ),
    (
        "Why is the sky blue?",
        "Then why are sunsets red?",
        "Air molecules scatter short (blue) wavelengths of sunlight much more than long (red) "
        "ones, an effect called Rayleigh scattering, so blue light reaches us from every "
        "direction of the sky.",
        "Because of how light scatters in the air.",
        "Because it reflects the colour of the oceans.",
    ),
    (
        "Write a SQL query that counts orders per customer.",
        "Only customers with more than five orders, please.",
        "SELECT customer_id, COUNT(*) AS orders\nFROM orders\nGROUP BY customer_id\n"
        "ORDER BY orders DESC;",
        "SELECT customer_id, COUNT(*) FROM orders GROUP BY customer_id;",
        "SELECT COUNT(customer_id) FROM customers;",
    ),
    (
        "What are the symptoms of dehydration?",
        "What should I drink to recover?",
        "Thirst, dark urine, tiredness, dizziness, headache and a dry mouth. Severe "
        "dehydration (confusion, fainting, no urine) needs medical help.",
        "Being thirsty and tired.",
        "Dehydration has no symptoms until it is too late.",
    ),
    (
        "Suggest a name for a coffee shop run by two cats.",
        "Something shorter?",
        "The Purrcolator: a pun on percolator that fits a shop run by cats.",
        "Cat Coffee.",
        "Dog House Diner.",
    ),
    (
        "How does compound interest work?",
        "How long until my money doubles at 6%?",
        "Interest is added to the balance, and the next period's interest is computed on "
        "that larger balance, so growth accelerates: balance = principal x (1 + r)^n.",
        "You earn interest on interest.",
        "Compound interest is the same as simple interest, paid monthly.",
    ),
    (
        "Explain what a hash map is.",
        "What happens on a collision?",
        "A hash map stores key-value pairs in an array of buckets; a hash function turns each "
        "key into a bucket index, giving average O(1) lookups, inserts and deletes.",
        "It maps keys to values quickly.",
        "A hash map is a sorted list searched with binary search.",
    ),
    (
        "What should I pack for a weekend hiking trip?",
        "And if rain is forecast?",
        "Layers (base, warm mid-layer, waterproof shell), sturdy boots, map and compass or GPS, "
        "headlamp, first-aid kit, water and purification, food, sun protection and a shelter.",
        "Boots, water and snacks.",
        "Just a phone, you can buy everything on the trail.",
    ),
    (
        "Write a polite email declining a meeting invitation.",
        "Make it shorter.",
        "Hi Sam,\n\nThank you for the invitation. Unfortunately I can't join on Thursday; "
        "could you share the notes afterwards? I'm happy to follow up by email.\n\nBest,\nAlex",
        "Sorry, I can't come to the meeting.",
        "I won't be attending. Don't invite me again.",
    ),
    (
        "What is the capital of Australia?",
        "Why not Sydney?",
        "Canberra. It was chosen as a compromise between Sydney and Melbourne.",
        "Canberra.",
        "Sydney.",
    ),
    (
        "How do vaccines train the immune system?",
        "Do they work against variants?",
        "A vaccine shows the immune system a harmless piece or copy of a pathogen, so it makes "
        "antibodies and memory cells; a later real infection is then recognised and fought "
        "off faster.",
        "They teach your body to fight germs.",
        "Vaccines kill every germ already in the body.",
    ),
    (
        "Give three tips for a better night's sleep.",
        "What if I work night shifts?",
        "Keep a regular wake-up time, keep the bedroom dark, cool and quiet, and avoid caffeine "
        "after early afternoon and screens in the last hour.",
        "Sleep more and drink less coffee.",
        "Have a large meal and a coffee right before bed.",
    ),
    (
        "What is the time complexity of binary search?",
        "And on a linked list?",
        "O(log n): each comparison halves the remaining range of a sorted array.",
        "It is logarithmic.",
        "O(n^2), because it compares every pair.",
    ),
    (
        "Write a short motivational message for a friend before an exam.",
        "Make it funnier.",
        "You've prepared for this, and it shows. Breathe, read each question twice, and trust "
        "what you know. Whatever happens, I'm proud of you. Good luck!",
        "Good luck, you will do fine.",
        "Exams don't matter anyway.",
    ),
]
LANGUAGES = [
    ("chinese", "请用一句话解释什么是机器学习。", "机器学习是让计算机从数据中学习规律的方法。"),
    ("french", "Explique la photosynthèse en une phrase.", "Les plantes transforment la lumière."),
    ("spanish", "¿Qué es un número primo?", "Un número divisible solo por 1 y por sí mismo."),
    ("german", "Was ist die Hauptstadt von Kanada?", "Die Hauptstadt von Kanada ist Ottawa."),
    ("korean", "물은 몇 도에서 끓나요?", "물은 해수면에서 섭씨 100도에서 끓습니다."),
]
MARKER = "\n<extra_id_1>"


def _rng(name: str) -> random.Random:
    return random.Random(f"{SEED}:{name}")


def _answers(topic: tuple[str, ...]) -> list[str]:
    return list(topic[2:5])


def _variant(text: str, i: int) -> str:
    """The i-th use of a topic's text: the first as is, later ones marked, so rows differ."""
    return text if i < len(TOPICS) else f"{text} (variant {i // len(TOPICS)})"


def _multi_turn(topic: tuple[str, ...], answer: str) -> str:
    """A HelpSteer2-style prompt with inline turn markers."""
    return f"{topic[0]}{MARKER}Assistant\n{answer}{MARKER}User\n{topic[1]}"


def _json_lines(rows: list[Any]) -> bytes:
    """JSON lines; a `bytes` row is written as is (broken lines)."""
    out = io.BytesIO()
    for row in rows:
        line = row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode()
        out.write(line + b"\n")
    return out.getvalue()


BROKEN_JSON = b'{"prompt": "Is this line complete?", "response": '
BROKEN_UTF8 = b'{"prompt": "caf\xe9 au lait?", "response": "latin-1 bytes"}'


def _helpsteer_attributes(rng: random.Random, quality: int) -> dict[str, int]:
    base = {0: 4, 1: 2, 2: 0}[quality]
    clip = lambda v: max(0, min(4, v))  # noqa: E731
    return {
        "helpfulness": clip(base + rng.choice((0, 0, -1))),
        "correctness": clip(base + rng.choice((0, 0, -1))),
        "coherence": clip(4 - quality + rng.choice((0, -1))),
        "complexity": rng.randint(0, 3),
        "verbosity": rng.randint(0, 3),
    }


def helpsteer(name: str, two_per_prompt: bool) -> list[Any]:
    """Rating rows: 1-4 responses per prompt (v1) or 2 (v2, multi-turn prompts too)."""
    rng = _rng(name)
    rows: list[Any] = []
    for i, topic in enumerate(TOPICS * 5):
        prompt = _variant(topic[0] if i < len(TOPICS) * 3 else _multi_turn(topic, topic[3]), i)
        if two_per_prompt:
            qualities = rng.sample(range(3), 2)
        else:
            qualities = [rng.randrange(3) for _ in range(rng.choice((1, 2, 3, 4)))]
        for q in qualities:
            rows.append(
                {"prompt": prompt, "response": _answers(topic)[q]} | _helpsteer_attributes(rng, q)
            )
    rows.append(dict(rows[0]))  # an exact duplicate rating row
    rows += [
        BROKEN_JSON,
        BROKEN_UTF8,
        {"prompt": "Where is the response?", "helpfulness": 3, "correctness": 3, "coherence": 4}
        | {"complexity": 1, "verbosity": 1},
        {"prompt": "Typed wrong.", "response": "A response.", "helpfulness": "four"}
        | {"correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 1},
        {"prompt": "Out of range.", "response": "A response.", "helpfulness": 7}
        | {"correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 1},
        {"prompt": "   ", "response": "Nothing was asked.", "helpfulness": 2}
        | {"correctness": 2, "coherence": 2, "complexity": 1, "verbosity": 1},
    ]
    return rows


def helpsteer2_preference() -> list[Any]:
    rng = _rng("helpsteer2_preference")
    rows: list[Any] = []
    for i, topic in enumerate(TOPICS * 6):
        a, b = rng.sample(_answers(topic), 2)
        prompt = _variant(topic[0] if i % 3 else _multi_turn(topic, topic[3]), i)
        strength = rng.choice((-3, -2, -1, 0, 1, 2, 3))
        rows.append(
            {
                "split": "validation" if i % 10 == 0 else "train",
                "prompt": prompt,
                "response_1": a,
                "response_2": b,
                "preference_strength": strength,
                "preference_statement": f"@Response {1 if strength <= 0 else 2} is better.",
                "preference_elaboration": "It is more accurate and more complete.",
                "three_most_similar_preferences": [],
                "all_preferences_unprocessed": [strength, strength, strength],
            }
        )
    rows.append(dict(rows[1]))
    rows += [
        BROKEN_JSON,
        {"split": "train", "prompt": "No second response.", "response_1": "x"}
        | {"preference_strength": 1},
        {"split": "train", "prompt": "Too strong.", "response_1": "a", "response_2": "b"}
        | {"preference_strength": 5},
    ]
    return rows


def helpsteer3() -> list[Any]:
    rng = _rng("helpsteer3")
    rows: list[Any] = []
    for i, topic in enumerate(TOPICS * 7):
        a, b = rng.sample(_answers(topic), 2)
        question = _variant(topic[0], i)
        if i % 4 == 0:
            context: Any = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": topic[3]},
                {"role": "user", "content": topic[1]},
            ]
        elif i % 4 == 1:
            context = question  # some copies hold the context as a string
        else:
            context = [{"role": "user", "content": question}]
        domain, language = ("code", "python") if "`" in topic[2] else ("general", "english")
        if i % 9 == 0:
            language_name, question, answer = LANGUAGES[i % len(LANGUAGES)]
            domain, language = "multilingual", language_name
            context, a, b = [{"role": "user", "content": question}], answer, f"{answer} ..."
        preference = rng.choice((-3, -2, -1, 0, 1, 2, 3))
        rows.append(
            {
                "domain": domain,
                "language": language,
                "context": context,
                "response1": a,
                "response2": b,
                "overall_preference": preference,
                "individual_preference": [
                    {
                        "score": preference,
                        "reasoning": f"@Response {1 if preference <= 0 else 2} answers better.",
                        "feedback1": "Clear.",
                        "feedback2": "Less clear.",
                    }
                ],
            }
        )
    rows.append(dict(rows[2]))
    last_assistant = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]
    rows += [
        BROKEN_UTF8,
        {"domain": "general", "language": "english", "context": last_assistant}
        | {"response1": "a", "response2": "b", "overall_preference": 1},
        {"domain": "general", "language": "english", "context": []}
        | {"response1": "a", "response2": "b", "overall_preference": 1},
        {"domain": "general", "language": "english", "context": [{"role": "user"}]}
        | {"response1": "a", "response2": "b", "overall_preference": -4},
    ]
    return rows


def _aspects(rng: random.Random, quality: int, legacy: bool) -> dict[str, Any]:
    out = {}
    for aspect in ("instruction_following", "honesty", "truthfulness", "helpfulness"):
        rating = str(max(1, min(5, 5 - 2 * quality + rng.choice((0, 0, -1)))))
        if aspect == "honesty" and rng.random() < 0.15:
            rating = "N/A"
        entry = {"Rating": rating, "Rationale": f"{aspect.replace('_', ' ').capitalize()}: ok."}
        if aspect in ("truthfulness", "helpfulness"):
            entry |= {"Type": ["1"], "Rationale For Rating": "Mostly accurate."}
        out[aspect] = [entry] if legacy else entry
    return out


def ultrafeedback() -> list[Any]:
    rng = _rng("ultrafeedback")
    models = ["model-a-7b", "model-b-13b", "model-c-70b", "model-d-chat"]
    rows: list[Any] = []
    for i, topic in enumerate(TOPICS * 6):
        completions = []
        for j, model in enumerate(models):
            quality = (j + i) % 3
            completions.append(
                {
                    "annotations": _aspects(rng, quality, legacy=False),
                    "critique": f"The answer is {('strong', 'acceptable', 'weak')[quality]}.",
                    "custom_system_prompt": "You are a helpful assistant.",
                    "fine-grained_score": 0.0,
                    "model": model,
                    "overall_score": float(9 - 3 * quality),
                    "principle": "helpfulness",
                    "response": _answers(topic)[quality] + ("" if j < 3 else " (model d)"),
                }
            )
        if i % 11 == 0:  # a tie: every completion rated the same
            for c in completions:
                c["annotations"] = _aspects(random.Random(i), 1, legacy=False)
        rows.append(
            {
                "source": ("evol_instruct", "flan_v2_niv2", "sharegpt", "ultrachat")[i % 4],
                "instruction": _variant(topic[0], i),
                "models": models,
                "completions": completions,
                "correct_answers": ["None"],
                "incorrect_answers": ["None"],
            }
        )
    rows.append(json.loads(json.dumps(rows[3])))
    all_na = json.loads(json.dumps(rows[4]))
    for c in all_na["completions"][1:]:
        for aspect in c["annotations"].values():
            aspect["Rating"] = "N/A"
    bad_rating = json.loads(json.dumps(rows[5]))
    bad_rating["completions"][0]["annotations"]["honesty"]["Rating"] = "ten"
    bad_overall = json.loads(json.dumps(rows[6]))
    bad_overall["completions"][2]["overall_score"] = 12.0
    no_instruction = {k: v for k, v in rows[7].items() if k != "instruction"}
    rows += [all_na, bad_rating, bad_overall, no_instruction, BROKEN_JSON]
    return rows


def ultrafeedback_binarized() -> pa.Table:
    rng = _rng("ultrafeedback_binarized")
    rows = []
    for i, topic in enumerate(TOPICS * 8):
        prompt = _variant(topic[0], i)
        good, fair, poor = _answers(topic)
        rejected = rng.choice((fair, poor))
        score_chosen = rng.choice((7.0, 8.0, 8.5, 9.0, 10.0))
        score_rejected = score_chosen if i % 13 == 0 else rng.choice((3.0, 4.0, 5.0, 6.5))
        user = {"content": prompt, "role": "user"}
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": f"{i:064x}",
                "chosen": [user, {"content": good, "role": "assistant"}],
                "rejected": [user, {"content": rejected, "role": "assistant"}],
                "messages": [user, {"content": good, "role": "assistant"}],
                "score_chosen": score_chosen,
                "score_rejected": score_rejected,
            }
        )
    rows.append(dict(rows[5]))
    broken = [dict(rows[1]), dict(rows[2]), dict(rows[3]), dict(rows[4])]
    broken[0]["chosen"] = broken[0]["chosen"][:1]  # no assistant turn
    broken[1]["score_chosen"] = 11.0  # out of range
    broken[2]["rejected"] = [{"content": "another prompt", "role": "user"}, rows[2]["chosen"][1]]
    broken[3]["rejected"] = [rows[4]["rejected"][0], {"content": "  ", "role": "assistant"}]
    return pa.Table.from_pylist(rows + broken)


def generic() -> list[Any]:
    rng = _rng("generic")
    rows: list[Any] = []
    for i, topic in enumerate(TOPICS * 6):
        good, fair, poor = _answers(topic)
        rejected = rng.choice((fair, poor))
        question = _variant(topic[0], i)
        shape = i % 4
        if shape == 0:  # plain strings, scored
            row: dict[str, Any] = {"prompt": question, "chosen": good, "rejected": rejected}
            row |= {"score_chosen": 9.0, "score_rejected": 4.0 if rejected == poor else 6.0}
        elif shape == 1:  # role/content conversations
            user = {"role": "user", "content": question}
            row = {
                "chosen": [user, {"role": "assistant", "content": good}],
                "rejected": [user, {"role": "assistant", "content": rejected}],
            }
        elif shape == 2:  # ShareGPT from/value
            row = {
                "prompt": [{"from": "human", "value": question}],
                "chosen": [{"from": "gpt", "value": good}],
                "rejected": [{"from": "gpt", "value": rejected}],
            }
        else:  # HelpSteer2-style inline turn markers
            prompt = _variant(_multi_turn(topic, fair), i)
            row = {"prompt": prompt, "chosen": good, "rejected": rejected}
        rows.append(row)
    rows.append(dict(rows[0]))
    rows += [
        BROKEN_JSON,
        {"prompt": "Only one side.", "chosen": "Here it is."},
        {"prompt": "Scores disagree.", "chosen": "a", "rejected": "b"}
        | {"score_chosen": 2.0, "score_rejected": 8.0},
        {
            "prompt": [{"from": "narrator", "value": "Who speaks?"}],
            "chosen": [{"from": "gpt", "value": "Me."}],
            "rejected": [{"from": "gpt", "value": "You."}],
        },
    ]
    return rows


def eval_prompts() -> str:
    """A few prompts that also occur in the samples: the contamination check finds them."""
    return "\n".join([TOPICS[0][0], TOPICS[5][0], TOPICS[11][0], "An unrelated question?"]) + "\n"


def _gzip(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as f:
        f.write(data)
    return out.getvalue()


WRITERS: dict[str, Callable[[], Any]] = {
    "helpsteer": lambda: helpsteer("helpsteer", two_per_prompt=False),
    "helpsteer2": lambda: helpsteer("helpsteer2", two_per_prompt=True),
    "helpsteer2_preference": helpsteer2_preference,
    "helpsteer3": helpsteer3,
    "ultrafeedback": ultrafeedback,
    "ultrafeedback_binarized": ultrafeedback_binarized,
    "generic": generic,
}


def main(out_dir: Path = HERE) -> None:
    """Write every sample file (and the eval prompts) into `out_dir`."""
    for source, make in WRITERS.items():
        path = out_dir / SAMPLES[source]
        content = make()
        if isinstance(content, pa.Table):
            pq.write_table(content, path, compression="zstd")
            continue
        data = _json_lines(content)
        path.write_bytes(_gzip(data) if path.name.endswith(".gz") else data)
    (out_dir / EVAL_PROMPTS).write_text(eval_prompts(), encoding="utf-8")


if __name__ == "__main__":
    main()
