"""Chat templates: rendering matches transformers' apply_chat_template (the oracle), the
prompt/response split, and template resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from pipeline.templates import (
    BUILTIN_TEMPLATES,
    FIXED_NOW,
    ChatTemplate,
    TemplateError,
    TurnMarkers,
    builtin_template,
    render_pairs,
    resolve_template,
    turn_markers,
)
from tests.pipeline.factories import fixture_pairs

# An HF-style template exercising what model folders use: loop controls, namespace,
# raise_exception, tojson, a system message handled apart.
HF_STYLE = """{%- if messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}
{%- else -%}{%- set system = 'default system' -%}{%- endif -%}
{{ bos_token }}[SYS]{{ system | tojson }}[/SYS]
{% for message in messages %}
{% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}
{% if loop.index0 > 5 %}{% break %}{% endif %}
<{{ message['role'] }}>{{ message['content'] | trim }}</{{ message['role'] }}>{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}

{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def _hf_tokenizer(path: Path, template: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(path)), bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = template
    return tok


def _conversations() -> list[list[dict]]:
    table = fixture_pairs()
    prompts = table.column("prompt").to_pylist()
    chosen = table.column("chosen").to_pylist()
    return [[*p, {"role": "assistant", "content": c}] for p, c in zip(prompts, chosen, strict=True)]


@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, "hf_style"])
def test_render_matches_transformers(name: str, tiny_tokenizer_path: Path) -> None:
    template = ChatTemplate("hf_style", HF_STYLE) if name == "hf_style" else builtin_template(name)
    oracle = _hf_tokenizer(tiny_tokenizer_path, template.source)
    for conversation in _conversations():
        for messages, generation in ((conversation[:-1], True), (conversation, False)):
            expected = oracle.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
            assert template.render(messages, generation, "<s>", "</s>") == expected


def test_raise_exception_surfaces_as_template_error_naming_the_pair() -> None:
    template = ChatTemplate("hf_style", HF_STYLE)
    with pytest.raises(TemplateError, match=r"pair-x.*bad role"):
        render_pairs(
            [[{"role": "tool", "content": "x"}]], ["a"], ["b"], ["pair-x"], template, "", ""
        )


def test_strftime_now_renders_a_fixed_date() -> None:
    template = ChatTemplate("dated", "{{ strftime_now('%d %b %Y') }}")
    assert template.render([], False, None, None) == FIXED_NOW.strftime("%d %b %Y")


@pytest.mark.parametrize(
    ("name", "end_of_turn"),
    [("chatml", "<|im_end|>\n"), ("llama3", "<|eot_id|>"), ("plain", "</s>")],
)
def test_responses_follow_the_prompt_and_end_the_turn(name: str, end_of_turn: str) -> None:
    table = fixture_pairs()
    template = builtin_template(name)
    prompts = table.column("prompt").to_pylist()
    chosen = table.column("chosen").to_pylist()
    rejected = table.column("rejected").to_pylist()
    texts = render_pairs(
        prompts, chosen, rejected, table.column("pair_id").to_pylist(), template, "<s>", "</s>"
    )
    for i, messages in enumerate(prompts):
        for response, text in ((chosen[i], texts.chosen[i]), (rejected[i], texts.rejected[i])):
            whole = template.render(
                [*messages, {"role": "assistant", "content": response}], False, "<s>", "</s>"
            )
            assert texts.prompt[i] + text == whole
            assert text.endswith(end_of_turn)
            # llama3 trims contents; the others keep them verbatim.
            assert (response.strip() if name == "llama3" else response) in text


def test_a_template_whose_prompt_is_not_a_prefix_is_refused() -> None:
    # The generation prompt is only added at the end, so "x<gen>" is not a prefix of "xy".
    template = ChatTemplate(
        "suffix",
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<gen>{% endif %}",
    )
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(TemplateError, match=r"pair p7.*not a prefix"):
        render_pairs([messages], ["y"], ["z"], ["p7"], template, None, None)


def test_resolution_order(tmp_path: Path) -> None:
    assert resolve_template(None, "{{ 'folder' }}").name == "tokenizer"
    assert resolve_template(None, None).name == "chatml"
    assert resolve_template("llama3", "{{ 'folder' }}").name == "llama3"
    file = tmp_path / "mine.jinja"
    file.write_text("{{ messages[0]['content'] }}")
    assert resolve_template(str(file), None).source == "{{ messages[0]['content'] }}"
    with pytest.raises(TemplateError, match="nope"):
        resolve_template("nope", None)


def test_absent_special_tokens_are_undefined_as_in_transformers() -> None:
    template = ChatTemplate("t", "{{ 'B' if bos_token is defined else 'none' }}")
    assert template.render([], False, None, None) == "none"
    assert template.render([], False, "<s>", None) == "B"


@pytest.mark.parametrize(
    ("name", "bos", "eos", "expected"),
    [
        (
            "chatml",
            None,
            "<|endoftext|>",  # a base model's eos: chatml still ends turns with <|im_end|>
            TurnMarkers(("<|im_start|>", "<|im_end|>"), "<|im_end|>", "<|im_end|>\n"),
        ),
        (
            "llama3",
            "<|begin_of_text|>",
            "<|eot_id|>",
            TurnMarkers(
                ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                "<|eot_id|>",
                "<|eot_id|>",
            ),
        ),
        # llama3 renders the tokenizer's bos, so without one there is none to check.
        (
            "llama3",
            None,
            None,
            TurnMarkers(
                ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                "<|eot_id|>",
                "<|eot_id|>",
            ),
        ),
        # plain ends a turn with whatever eos the tokenizer has, or with nothing.
        ("plain", None, "</s>", TurnMarkers(("</s>",), "</s>", "</s>")),
        (
            "plain",
            None,
            "<|endoftext|>",
            TurnMarkers(("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>"),
        ),
        ("plain", None, None, TurnMarkers((), None, "")),
    ],
)
def test_turn_markers_of_builtins(
    name: str, bos: str | None, eos: str | None, expected: TurnMarkers
) -> None:
    assert turn_markers(builtin_template(name), bos, eos) == expected


def test_turn_markers_of_custom_templates_are_found_by_rendering() -> None:
    """A .jinja file carries no marker list: the known markers it renders are found, and
    the end of turn is the one a response ends with, after trailing whitespace."""
    copy = ChatTemplate("mine.jinja", builtin_template("chatml").source)
    assert turn_markers(copy, None, None) == turn_markers(builtin_template("chatml"), None, None)
    # HF_STYLE ends an assistant turn with the tokenizer's eos, then a blank line.
    hf = turn_markers(ChatTemplate("hf_style", HF_STYLE), "<s>", "</s>")
    assert hf == TurnMarkers(("</s>", "<s>"), "</s>", "</s>\n")
    bare = ChatTemplate("bare", "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert turn_markers(bare, None, "<|im_end|>") == TurnMarkers((), None, "")
