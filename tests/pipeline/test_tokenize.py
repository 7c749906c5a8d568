"""Tokenizer loading, BPE training, batch tokenization and the boundary-agreement report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from core.errors import TokenizerError
from pipeline import ragged
from pipeline.templates import ChatTemplate, builtin_template, render_pairs, turn_markers
from pipeline.tokenize import (
    BoundaryReport,
    EndingReport,
    MarkerError,
    boundary_agreement,
    check_markers,
    load_tokenizer,
    tokenize_pairs,
    train_tokenizer,
)
from tests.conftest import FIXTURES
from tests.pipeline.factories import fixture_pairs, pair_table, random_pairs

GPT2 = FIXTURES / "gpt2_small_tokenizer.json"  # GPT-2's BPE, no chat markers
CHATML_FOLDER = FIXTURES / "chatml_tokenizer"  # a SmolLM2-style model folder


def _render(table, template: ChatTemplate, bos=None, eos="<|im_end|>"):
    return render_pairs(
        table.column("prompt").to_pylist(),
        table.column("chosen").to_pylist(),
        table.column("rejected").to_pylist(),
        table.column("pair_id").to_pylist(),
        template,
        bos,
        eos,
    )


def test_bare_file_guesses_bos_eos_from_special_tokens(tiny_tokenizer_path: Path) -> None:
    loaded = load_tokenizer(tiny_tokenizer_path)
    # The tiny tokenizer was trained for chatml: its only special tokens are its markers.
    assert (loaded.bos_token, loaded.eos_token) == (None, "<|im_end|>")
    assert loaded.json_bytes == tiny_tokenizer_path.read_bytes()
    assert loaded.chat_template is None


def test_model_folder_reads_config_and_template_file(tiny_tokenizer_path: Path, tmp_path: Path):
    (tmp_path / "tokenizer.json").write_bytes(tiny_tokenizer_path.read_bytes())
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "chat_template": [{"name": "default", "template": "from-config"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_token, loaded.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert loaded.chat_template == "from-config"
    # transformers >= 4.43 saves the template as its own file, which wins.
    (tmp_path / "chat_template.jinja").write_text("from-file")
    assert load_tokenizer(tmp_path).chat_template == "from-file"


def test_fingerprint_follows_special_tokens(tiny_tokenizer_path: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(tiny_tokenizer_path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_start|>"}))
    assert load_tokenizer(tmp_path).fingerprint != load_tokenizer(tiny_tokenizer_path).fingerprint


def test_unloadable_tokenizers_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match=str(bad)):
        load_tokenizer(bad)


def test_training_is_deterministic_across_processes(tmp_path: Path) -> None:
    texts = [t for pair in random_pairs(50).column("chosen").to_pylist() for t in [pair]]
    here = train_tokenizer(texts, 320, builtin_template("llama3")).json_bytes
    script = (
        "import sys, json\n"
        "from pipeline.templates import builtin_template\n"
        "from pipeline.tokenize import train_tokenizer\n"
        "texts = json.load(open(sys.argv[1]))\n"
        "sys.stdout.buffer.write(train_tokenizer(texts, 320, builtin_template('llama3')).json_bytes)"
    )
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    other = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "texts.json")],
        check=True,
        capture_output=True,
    ).stdout
    assert here == other
    trained = Tokenizer.from_str(here.decode())
    # The template's markers are atomic tokens.
    assert len(trained.encode("<|start_header_id|>", add_special_tokens=False).ids) == 1


def test_prompt_ids_match_transformers_apply_chat_template(tiny_tokenizer_path: Path) -> None:
    table = fixture_pairs()
    template = builtin_template("chatml")
    loaded = load_tokenizer(tiny_tokenizer_path)
    texts = _render(table, template)
    tokenized = tokenize_pairs(texts, table.column("pair_id").to_pylist(), loaded.tokenizer)
    oracle = PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer, eos_token="<|im_end|>")
    oracle.chat_template = template.source
    prompts = table.column("prompt").to_pylist()
    chosen = table.column("chosen").to_pylist()
    got_prompt = tokenized.column("prompt_ids").to_pylist()
    got_chosen = tokenized.column("chosen_ids").to_pylist()
    for i, messages in enumerate(prompts):
        expected = oracle.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert got_prompt[i] == list(expected)
        whole = oracle.apply_chat_template(
            [*messages, {"role": "assistant", "content": chosen[i]}], tokenize=False
        )
        assert (
            loaded.tokenizer.decode(got_chosen[i], skip_special_tokens=False)
            == whole[len(texts.prompt[i]) :]
        )


def test_boundary_report_counts_what_a_brute_force_comparison_finds(
    tiny_tokenizer_path: Path,
) -> None:
    """A generation prompt ending in a space splits " word" in two when tokenized apart,
    so most responses disagree; the report must count exactly the disagreeing ones."""
    table = random_pairs(30, seed=3)
    template = ChatTemplate(
        "space",
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
    )
    loaded = load_tokenizer(tiny_tokenizer_path)
    texts = _render(table, template)
    tokenized = tokenize_pairs(texts, table.column("pair_id").to_pylist(), loaded.tokenizer)
    report = BoundaryReport("space", "tiny")
    boundary_agreement(texts, tokenized, loaded.tokenizer, report)

    agree = 0
    examples = []
    rows = tokenized.to_pylist()
    for i, row in enumerate(rows):
        for key, text in (("chosen_ids", texts.chosen[i]), ("rejected_ids", texts.rejected[i])):
            joined = loaded.tokenizer.encode(texts.prompt[i] + text, add_special_tokens=False).ids
            if joined == row["prompt_ids"] + row[key]:
                agree += 1
            elif row["pair_id"] not in examples:
                examples.append(row["pair_id"])
    assert report.checked == 2 * len(rows)
    assert report.agreed == agree
    assert agree < report.checked  # this template really does split tokens
    assert set(report.examples) <= set(examples) and len(report.examples) == min(5, len(examples))


@pytest.mark.parametrize("name", ["chatml", "llama3", "plain"])
def test_trained_bpe_agrees_at_the_boundary_of_builtin_templates(name: str) -> None:
    """The trained tokenizer keeps newline runs whole, so a generation prompt ending in
    "\n" or "\n\n" splits the same alone and before a word (GPT-2's split would not)."""
    table = random_pairs(30, seed=4)
    template = builtin_template(name)
    corpus = _render(table, template, template.bos_token, template.eos_token)
    loaded = train_tokenizer(corpus.prompt + corpus.chosen + corpus.rejected, 400, template)
    texts = _render(table, template, template.bos_token, template.eos_token)
    tokenized = tokenize_pairs(texts, table.column("pair_id").to_pylist(), loaded.tokenizer)
    report = BoundaryReport(name, "tiny")
    boundary_agreement(texts, tokenized, loaded.tokenizer, report)
    assert (report.checked, report.agreed, report.rate) == (60, 60, 1.0)


def test_tokenized_lists_line_up_with_each_text(tiny_tokenizer_path: Path) -> None:
    table = random_pairs(20, seed=5)
    loaded = load_tokenizer(tiny_tokenizer_path)
    texts = _render(table, builtin_template("chatml"))
    tokenized = tokenize_pairs(texts, table.column("pair_id").to_pylist(), loaded.tokenizer)
    assert tokenized.column("pair_id").to_pylist() == table.column("pair_id").to_pylist()
    for column, strings in (("prompt_ids", texts.prompt), ("rejected_ids", texts.rejected)):
        values, offsets = ragged.list_parts(tokenized.column(column))
        for i, text in enumerate(strings):
            expected = loaded.tokenizer.encode(text, add_special_tokens=False).ids
            assert values[offsets[i] : offsets[i + 1]].tolist() == expected


def _check(tokenizer: str | Path, template: ChatTemplate) -> None:
    loaded = load_tokenizer(tokenizer)
    check_markers(loaded, template, turn_markers(template, loaded.bos_token, loaded.eos_token))


def test_gpt2_with_chatml_is_refused_naming_markers_template_and_fixes() -> None:
    loaded = load_tokenizer(GPT2)
    assert len(loaded.tokenizer.encode("<|im_end|>", add_special_tokens=False).ids) == 7
    with pytest.raises(MarkerError) as caught:
        _check(GPT2, builtin_template("chatml"))
    message = str(caught.value)
    assert "\n" not in message  # one line, as the CLI prints it
    assert "template 'chatml'" in message and "tokenizer 'gpt2_small_tokenizer.json'" in message
    assert "'<|im_start|>' -> 8 tokens, '<|im_end|>' -> 7 tokens" in message
    assert "--template plain, which ends a turn with its eos '<|endoftext|>'" in message
    assert "--allow-multi-token-markers" in message


def test_a_custom_template_is_checked_for_the_markers_it_renders() -> None:
    """A .jinja copy of chatml lists no markers; rendering finds them all the same."""
    copy = ChatTemplate("mine.jinja", builtin_template("chatml").source)
    with pytest.raises(MarkerError, match=r"template 'mine\.jinja'.*'<\|im_end\|>' -> 7"):
        _check(GPT2, copy)


@pytest.mark.parametrize(
    ("tokenizer", "template"),
    [
        (GPT2, builtin_template("plain")),  # ends turns with GPT-2's own <|endoftext|>
        (CHATML_FOLDER, builtin_template("chatml")),
        (CHATML_FOLDER, ChatTemplate("tokenizer", load_tokenizer(CHATML_FOLDER).chat_template)),
        (GPT2, ChatTemplate("bare", "{% for m in messages %}{{ m.content }}{% endfor %}")),
    ],
    ids=["gpt2-plain", "folder-chatml", "folder-own-template", "gpt2-no-markers"],
)
def test_templates_whose_markers_are_single_tokens_pass(
    tokenizer: Path, template: ChatTemplate
) -> None:
    _check(tokenizer, template)


def test_trained_bpe_makes_the_markers_of_a_custom_template_atomic() -> None:
    """With no tokenizer given, the markers a custom template renders become special
    tokens, so the trained tokenizer passes the marker check."""
    copy = ChatTemplate("mine.jinja", builtin_template("chatml").source)
    trained = train_tokenizer(["some words"] * 10, 300, copy)
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert len(trained.tokenizer.encode(marker, add_special_tokens=False).ids) == 1
    check_markers(trained, copy, turn_markers(copy, trained.bos_token, trained.eos_token))


def _ending(
    tokenizer: Tokenizer, template: ChatTemplate, eos: str | None, table: pa.Table
) -> EndingReport:
    texts = _render(table, template, None, eos)
    tokenized = tokenize_pairs(texts, table.column("pair_id").to_pylist(), tokenizer)
    report = EndingReport.for_markers(tokenizer, turn_markers(template, None, eos))
    report.add(tokenized.column("chosen_ids"))
    report.add(tokenized.column("rejected_ids"))
    return report


RESPONSES = pair_table(
    [
        ([{"role": "user", "content": "hi"}], "Sure.", "No "),  # GPT-2 merges " <" in "No <|"
        ([{"role": "user", "content": "why"}], "Because", "ok  "),
        ([{"role": "user", "content": "yo"}], "fine\n", "x"),
    ]
)


def test_ending_counts_responses_whose_ids_end_with_the_end_of_turn() -> None:
    """GPT-2 (markers allowed): chatml's "<|im_end|>\\n" is 8 ordinary tokens, and a
    response ending in a space merges it into " <", so those two of six do not end with
    them. With the markers as special tokens every response ends with [<|im_end|>, "\\n"]."""
    gpt2 = load_tokenizer(GPT2).tokenizer
    report = _ending(gpt2, builtin_template("chatml"), "<|endoftext|>", RESPONSES)
    suffix = gpt2.encode("<|im_end|>\n", add_special_tokens=False).ids
    assert len(report.token_ids) == 7 and len(suffix) == 8
    assert report.to_dict() == {
        "token": "<|im_end|>",
        "token_ids": report.token_ids,
        "suffix": "<|im_end|>\n",
        "count": 4,
        "of": 6,
        "rate": 4 / 6,
    }
    folder = load_tokenizer(CHATML_FOLDER).tokenizer
    report = _ending(folder, builtin_template("chatml"), "<|im_end|>", RESPONSES)
    assert (report.token_ids, report.count, report.of, report.rate) == ([1282], 6, 6, 1.0)


def test_a_template_without_end_of_turn_ends_no_response() -> None:
    """`plain` with a tokenizer that has no eos ends turns with nothing: rate 0, no token."""
    gpt2 = load_tokenizer(GPT2).tokenizer
    report = _ending(gpt2, builtin_template("plain"), None, RESPONSES)
    assert report.to_dict() == {
        "token": None,
        "token_ids": [],
        "suffix": "",
        "count": 0,
        "of": 6,
        "rate": 0.0,
    }
