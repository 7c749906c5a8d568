"""Chat templates: render a prompt and each response to the text the tokenizer sees.

A template is Jinja source in the Hugging Face convention: it receives `messages`
(`[{role, content}]`), `add_generation_prompt`, the special tokens (`bos_token`,
`eos_token`, ...) and may call `raise_exception` and `strftime_now` or use `tojson`. We
render it with the same sandboxed Jinja environment transformers uses (`trim_blocks`,
`lstrip_blocks`, `loopcontrols`), so a model folder's `chat_template` renders here
exactly as in `tokenizer.apply_chat_template`.

The prompt is rendered once, with the generation prompt; a response's text is what the
template renders for `prompt + [assistant: response]` *after* that prompt text, so it ends
with the template's end of turn (`<|im_end|>\\n`, `<|eot_id|>`, eos). A template for which
the prompt is not a prefix of the whole conversation cannot share a prefix and is refused.

Markers: `turn_markers` renders a probe conversation and reports the known special
markers it contains and the one an assistant turn ends with, for built-in and custom
templates alike, so a tokenizer can be checked to hold each as one token before any pair is
tokenized (a model that ends its turns with ordinary tokens never stops generating).

Turn openings: `turn_openings` finds, from probes, the marker every turn's text starts with
(`<|start_header_id|>`, `<|im_start|>`) and how a system turn starts, so the pack stage can
find a prompt's head (bos and system turns) and its turn boundaries in token ids and cut a
too-long prompt between whole turns.

Built-ins (`pipeline/chat_templates/*.jinja`): `chatml`, `llama3`, `plain`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN_TEMPLATES = ("chatml", "llama3", "plain")

# When a tokenizer is trained here (no tokenizer configured), these markers become atomic
# special tokens, and bos/eos are the ones the template family uses.
_BUILTIN_TOKENS: dict[str, dict[str, Any]] = {
    "chatml": {"special": ("<|im_start|>", "<|im_end|>"), "bos": None, "eos": "<|im_end|>"},
    "llama3": {
        "special": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
    },
    "plain": {"special": ("<|endoftext|>",), "bos": None, "eos": "<|endoftext|>"},
}

# Special markers of common chat templates beyond the built-ins' (Gemma, Phi-3, Llama 2 /
# Mistral, Llama 3 base): a custom template rendering one of them is checked for it.
_OTHER_MARKERS = ("<start_of_turn>", "<end_of_turn>", "<|end|>", "</s>", "<eos>", "<|end_of_text|>")
KNOWN_MARKERS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *(t for tokens in _BUILTIN_TOKENS.values() for t in tokens["special"]),
            *_OTHER_MARKERS,
        ]
    )
)

# The conversation rendered to find a template's markers; the reply is plain text that no
# template trims or rewrites, so what follows it is the template's end of turn.
_PROBE_PROMPT = [{"role": "user", "content": "Hi"}]
_PROBE_REPLY = "Hello"
_PROBE_SYSTEM = {"role": "system", "content": "Be brief."}

# Templates that print today's date would make shards depend on the day they were built;
# `strftime_now` renders this fixed date instead (Llama 3.1's own default date_string).
FIXED_NOW = datetime(2024, 7, 26)


class TemplateError(ValueError):
    """A template cannot be loaded or does not render a shareable prompt prefix."""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the tokens a tokenizer trained for it needs.

    Attributes:
        name: a built-in name, "tokenizer" (the model folder's own), or the file name.
        source: the Jinja source.
        special_tokens: markers that must be atomic tokens when we train a tokenizer.
        bos_token, eos_token: bos/eos for a tokenizer trained for this template.
    """

    name: str
    source: str
    special_tokens: tuple[str, ...] = ()
    bos_token: str | None = None
    eos_token: str | None = "<|endoftext|>"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def render(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool,
        bos_token: str | None,
        eos_token: str | None,
    ) -> str:
        """Render `messages` as transformers' `apply_chat_template(tokenize=False)` does."""
        # Like transformers, pass only the special tokens the tokenizer has: an absent one
        # is undefined in the template (`bos_token is defined` is False).
        tokens = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v}
        return _compile(self.source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **tokens,
        )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = FIXED_NOW.strftime
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(f"chat template does not compile: {err}") from err


def builtin_template(name: str) -> ChatTemplate:
    """One of BUILTIN_TEMPLATES, read from the package's `chat_templates/` folder."""
    if name not in BUILTIN_TEMPLATES:
        raise TemplateError(f"unknown built-in template {name!r}; known: {BUILTIN_TEMPLATES}")
    source = resources.files("pipeline.chat_templates").joinpath(f"{name}.jinja").read_text()
    tokens = _BUILTIN_TOKENS[name]
    return ChatTemplate(
        name=name,
        source=source,
        special_tokens=tokens["special"],
        bos_token=tokens["bos"],
        eos_token=tokens["eos"],
    )


def resolve_template(spec: str | None, tokenizer_template: str | None) -> ChatTemplate:
    """Pick the template: the configured one, else the tokenizer's own, else chatml.

    Args:
        spec: None, a built-in name, or a path to a `.jinja` file.
        tokenizer_template: the model folder's `chat_template`, if it has one.

    Raises:
        TemplateError: `spec` is neither a built-in name nor a readable file.
    """
    if spec is None:
        if tokenizer_template is not None:
            return ChatTemplate(name="tokenizer", source=tokenizer_template)
        return builtin_template("chatml")
    if spec in BUILTIN_TEMPLATES:
        return builtin_template(spec)
    path = Path(spec)
    if not path.is_file():
        raise TemplateError(f"template {spec!r} is neither {BUILTIN_TEMPLATES} nor a file")
    return ChatTemplate(name=path.name, source=path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class PairTexts:
    """Rendered text of a batch of pairs: the prompt once, each response after it."""

    prompt: list[str]
    chosen: list[str]
    rejected: list[str]


def render_pairs(
    prompts: list[list[dict[str, str]]],
    chosen: list[str],
    rejected: list[str],
    pair_ids: list[str],
    template: ChatTemplate,
    bos_token: str | None,
    eos_token: str | None,
) -> PairTexts:
    """Render each pair's prompt (with generation prompt) and its two responses.

    Jinja renders one conversation per call, so this loops over rows (the library's
    boundary); everything after it is batched.

    Raises:
        TemplateError: naming the template and the pair whose rendered prompt is not a
            prefix of the rendered conversation, or whose template raised.
    """
    prompt_texts: list[str] = []
    chosen_texts: list[str] = []
    rejected_texts: list[str] = []
    for messages, good, bad, pair_id in zip(prompts, chosen, rejected, pair_ids, strict=True):
        try:
            head = template.render(messages, True, bos_token, eos_token)
            with_good = template.render(
                [*messages, {"role": "assistant", "content": good}], False, bos_token, eos_token
            )
            with_bad = template.render(
                [*messages, {"role": "assistant", "content": bad}], False, bos_token, eos_token
            )
        except jinja2.exceptions.TemplateError as err:
            raise TemplateError(f"template {template.name!r}, pair {pair_id}: {err}") from err
        if not (with_good.startswith(head) and with_bad.startswith(head)):
            raise TemplateError(
                f"template {template.name!r}, pair {pair_id}: the rendered prompt is not a "
                "prefix of the rendered conversation, so the prompt cannot be shared"
            )
        prompt_texts.append(head)
        chosen_texts.append(with_good[len(head) :])
        rejected_texts.append(with_bad[len(head) :])
    return PairTexts(prompt_texts, chosen_texts, rejected_texts)


@dataclass(frozen=True)
class TurnMarkers:
    """The special markers a template renders, found from a probe conversation.

    Attributes:
        markers: every known marker (KNOWN_MARKERS, the template's own, the tokenizer's
            bos/eos) in the rendered conversation, in that order.
        end_of_turn: the marker an assistant response ends with (trailing whitespace
            aside), or None when it ends with none of them (e.g. `plain` without an eos).
        suffix: the probe response's text from `end_of_turn` on (`<|im_end|>\\n` for
            chatml), what a rendered response ends with; "" when `end_of_turn` is None.
    """

    markers: tuple[str, ...]
    end_of_turn: str | None
    suffix: str


def turn_markers(
    template: ChatTemplate, bos_token: str | None, eos_token: str | None
) -> TurnMarkers:
    """Render a one-turn probe with the tokenizer's bos/eos and read off its markers.

    Raises:
        TemplateError: the template fails on a plain user/assistant exchange.
    """
    texts = render_pairs(
        [_PROBE_PROMPT],
        [_PROBE_REPLY],
        [_PROBE_REPLY],
        ["(marker probe)"],
        template,
        bos_token,
        eos_token,
    )
    rendered = texts.prompt[0] + texts.chosen[0]
    named = (template.bos_token, template.eos_token, bos_token, eos_token)
    known = dict.fromkeys([*KNOWN_MARKERS, *template.special_tokens, *(t for t in named if t)])
    markers = tuple(m for m in known if m in rendered)
    after = texts.chosen[0].rpartition(_PROBE_REPLY)[2]
    ending = after.rstrip()
    end = max((m for m in markers if ending.endswith(m)), key=len, default=None)
    suffix = after[len(ending) - len(end) :] if end else ""
    return TurnMarkers(markers, end, suffix)


@dataclass(frozen=True)
class TurnOpenings:
    """How a template opens its turns, read off probe renders.

    Attributes:
        start: the marker every turn's text begins with (`<|start_header_id|>`).
        system: what a system turn begins with (`<|start_header_id|>system`), or None when
            the template has no system turn that starts so.
        generation_starts_turn: the generation prompt begins with `start`, so a prompt's
            last turn start opens the generation prompt, not a message.
    """

    start: str
    system: str | None
    generation_starts_turn: bool


def turn_openings(
    template: ChatTemplate, bos_token: str | None, eos_token: str | None
) -> TurnOpenings | None:
    """Render a system + user probe and find the marker each turn starts with.

    Returns:
        The openings, or None when turns start with no known marker (`plain`), the template
        refuses the probe, or a shorter conversation is not a prefix of a longer one.
    """
    conversation = [_PROBE_SYSTEM, *_PROBE_PROMPT]
    try:
        alone, both, prompt = (
            template.render(messages, generation, bos_token, eos_token)
            for messages, generation in (
                (conversation[:1], False),
                (conversation, False),
                (conversation, True),
            )
        )
    except jinja2.exceptions.TemplateError:
        return None
    if not (both.startswith(alone) and prompt.startswith(both)):
        return None
    user_turn = both[len(alone) :]
    known = [*KNOWN_MARKERS, *template.special_tokens]
    start = max((m for m in known if user_turn.startswith(m)), key=len, default=None)
    if start is None:
        return None
    system = start + "system"
    return TurnOpenings(
        start=start,
        system=system if system in alone else None,
        generation_starts_turn=prompt[len(both) :].startswith(start),
    )
