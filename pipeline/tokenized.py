"""The tokenize stage: preference pairs -> a verified directory of tokenized pairs.

`build_tokenized` is the entry the CLI and Dagster call (the `tokenized_pairs` asset). It
streams a `preference_pair` parquet in batches: render each pair with the chat template,
tokenize the prompt once and each response on its own, compare the first
`boundary_check_pairs` pairs with the joined text, drop pairs that break the
`tokenized_pair` rules (counted by rule), and write `<store>/tokenized/<key>/`. Before any
pair is read it refuses a template whose turn markers or end of turn the given tokenizer
has no single token for (`pipeline.tokenize.check_markers`), unless
`allow_multi_token_markers` says to train them as several ordinary tokens. It writes:

- `tokenized.parquet`: `tokenized_pair` rows in input order, in row groups of exactly
  `ROW_GROUP` pairs (so how the input is read never changes the bytes);
- `tokenizer.json` + `tokenizer_config.json`: the tokenizer (trained here when none is
  given) and a minimal config (bos/eos, chat template) that transformers loads; its
  `eos_token` is the template's end of turn when that is one token (chatml's `<|im_end|>`
  even for a tokenizer whose own eos is `<|endoftext|>`), so generation stops where the
  trained responses end;
- `report.json` (`data_contracts.tokenized_report`), written last: key, input,
  tokenizer, template, row accounting, boundary agreement, the share of responses that
  end with the end of turn (`responses_ending_with_eos`), token-length quantiles and
  histograms, and the size and sha256 of every other file.

The key hashes the input file, the tokenizer, the template, every `TokenizeConfig`
setting and the code and contract versions, and nothing of packing: a new max_len or
layout repacks these pairs (`pipeline.pack.build_shards`) without tokenizing again. The
directory is written under a temp name and renamed, so it is complete or absent; an
existing one with the key is reused when it proves itself, and rebuilt otherwise.

`tokenize_like` tokenizes other pairs (a curate output's eval pairs) exactly as a
tokenized directory's were: its tokenizer as recorded (a trained BPE is reused, never
trained again on the new pairs), its template and its settings (`pipeline.eval_shards`).

Speed: the work is the tokenizer's. `encode_batch` runs on the library's Rayon pool (one
thread per core) with the GIL released, so reading and rendering the next batch, and
checking and writing the last one, run on threads of their own beside it
(`pipeline.ahead`); each step still takes the batches one at a time in input order, so
the bytes are the serial path's. `benchmarks.tokenize_speed` measures tokenize + pack
against `encode_batch` of the same texts.

Proof, as for a shard directory (`pipeline.shards`): report.json's `key` is the
directory's name; its `checksum` (`data_contracts.manifest.checksum`) covers every other
field and the file is exactly the text written, so an edited value (a listed sha256
included) is blamed on report.json; `files` gives the size and sha256 of every other file.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tokenizers

from core.atomic import keyed_directory
from core.progress import progress
from core.settings import check_settings, setting
from data_contracts import preference_pair, tokenized_pair, tokenized_report
from pipeline import ragged
from pipeline.ahead import ahead
from pipeline.io import pairs_path, rechunk
from pipeline.lengths import LengthCounts, power_of_two_edges
from pipeline.shards import (
    TOKENIZER,
    TOKENIZER_CONFIG,
    ShardError,
    check_files,
    file_entries,
    read_sealed,
    sha256_file,
    write_sealed,
)
from pipeline.templates import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    PairTexts,
    TurnMarkers,
    builtin_template,
    render_pairs,
    resolve_template,
    turn_markers,
)
from pipeline.tokenize import (
    BoundaryReport,
    EndingReport,
    LoadedTokenizer,
    boundary_agreement,
    check_markers,
    load_tokenizer,
    stored_tokenizer,
    token_ids,
    tokenize_pairs,
    train_tokenizer,
)

# Bump when this module's code would write different bytes for the same inputs.
TOKENIZE_VERSION = "3"
TOKENIZED = "tokenized.parquet"
REPORT = "report.json"
READ_BATCH = 1024  # pairs rendered and tokenized at once (does not change the bytes)
ROW_GROUP = 8192  # pairs per parquet row group of tokenized.parquet
DATA_FILES = (TOKENIZED, TOKENIZER, TOKENIZER_CONFIG)  # listed with sha256 in the report


@dataclass(frozen=True)
class TokenizeConfig:
    """Every setting of the tokenize stage; all of them are part of its cache key."""

    template: str | None = setting(
        None,
        "chatml | llama3 | plain | path.jinja; none: the tokenizer folder's chat_template, "
        "else chatml",
    )
    bpe_vocab_size: int = setting(
        8192, "vocabulary of the byte-level BPE trained when no --tokenizer is given", ge=300
    )
    boundary_check_pairs: int = setting(
        1000,
        "pairs (the first ones) whose split tokenization is checked against the joined text",
        ge=0,
    )
    allow_multi_token_markers: bool = setting(
        False,
        "tokenize even when the template's turn markers or end of turn are not single tokens "
        "of the tokenizer (e.g. chatml with GPT-2's); the model then ends its turns with "
        "ordinary tokens that no generation loop stops on",
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class TokenizedResult:
    """What `build_tokenized` made (or found).

    Attributes:
        directory: the tokenized directory, `<store>/tokenized/<key>`.
        key: its cache key (use it as the data version).
        reused: True when a verified directory with this key already existed.
        report: the parsed report.json.
    """

    directory: Path
    key: str
    reused: bool
    report: dict


def tokenized_key(
    input_sha256: str,
    tokenizer: LoadedTokenizer | None,
    template: ChatTemplate,
    config: TokenizeConfig,
) -> str:
    """Hash of everything that changes the bytes: data, tokenizer, template, config, code.

    With no tokenizer, the trained one is a function of the data, the template and
    `bpe_vocab_size` (in the config) and the `tokenizers` version, all in the key.
    """
    payload = {
        "contracts": _contract_versions(),
        "code": TOKENIZE_VERSION,
        "input": input_sha256,
        "tokenizer": tokenizer.fingerprint if tokenizer else "trained-bpe",
        "tokenizers": tokenizers.__version__,
        "template": template.sha256,
        "config": asdict(config),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _contract_versions() -> dict[str, str]:
    return {
        "preference_pair": preference_pair.VERSION,
        "tokenized_pair": tokenized_pair.VERSION,
        "tokenized_report": tokenized_report.VERSION,
    }


# ------------------------------------------------------------------------ reading pairs


def _pair_batches(path: Path) -> Iterator[pa.Table]:
    """The preference_pair file in validated batches; errors name the file and rows."""
    # pre_buffer=False: with it, pyarrow keeps every row group read so far in memory.
    file = pq.ParquetFile(path, pre_buffer=False)
    start = 0
    for batch in file.iter_batches(batch_size=READ_BATCH):
        source = f"{path} (rows {start}..{start + batch.num_rows - 1})"
        yield preference_pair.CONTRACT.validate(pa.Table.from_batches([batch]), source)
        start += batch.num_rows


def _pair_ids(table: pa.Table) -> list[str]:
    return table.column("pair_id").to_pylist()


def _render(table: pa.Table, template: ChatTemplate, bos_eos: tuple) -> PairTexts:
    return render_pairs(
        table.column("prompt").to_pylist(),
        table.column("chosen").to_pylist(),
        table.column("rejected").to_pylist(),
        _pair_ids(table),
        template,
        *bos_eos,
    )


def _training_texts(path: Path, template: ChatTemplate) -> Iterator[str]:
    """Rendered prompts and responses, the corpus of a trained tokenizer, in order; read
    and rendered on a thread (`pipeline.ahead`) while the trainer counts the last batch."""
    bos_eos = (template.bos_token, template.eos_token)
    for texts in ahead(_render(table, template, bos_eos) for table in _pair_batches(path)):
        yield from texts.prompt
        yield from texts.chosen
        yield from texts.rejected


# ---------------------------------------------------------------------------- writing


def _stop_token(tokenizer: LoadedTokenizer, markers: TurnMarkers) -> str | None:
    """The eos to export: the end of turn responses end with, when it is one token, so a
    generation loop stops where training put the end; else the tokenizer's own eos (naming
    a multi-token marker would make transformers add it as a new, untrained token)."""
    end = markers.end_of_turn
    if end is not None and len(token_ids(tokenizer.tokenizer, end)) == 1:
        return end
    return tokenizer.eos_token


def _tokenizer_config(
    tokenizer: LoadedTokenizer, template: ChatTemplate, markers: TurnMarkers
) -> dict:
    """A minimal tokenizer_config.json so transformers can load the stored tokenizer."""
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tokenizer.bos_token:
        config["bos_token"] = tokenizer.bos_token
    if eos := _stop_token(tokenizer, markers):
        config["eos_token"] = eos
    config.update({"chat_template": template.source, "clean_up_tokenization_spaces": False})
    return config


class _Stats:
    """Accounting and token lengths of the written pairs, for the report."""

    def __init__(self, boundary: BoundaryReport, ending: EndingReport) -> None:
        self.pairs_in = 0
        self.dropped: Counter[str] = Counter()
        self.boundary = boundary
        self.ending = ending
        self.lengths = {part: LengthCounts() for part in tokenized_report.LENGTH_PARTS}

    def add(self, kept: pa.Table) -> None:
        p, c, r = (
            ragged.lengths_of(kept.column(n)) for n in ("prompt_ids", "chosen_ids", "rejected_ids")
        )
        for part, x in zip(tokenized_report.LENGTH_PARTS, (p, c, r, p + c + r), strict=True):
            self.lengths[part].add(x)
        self.ending.add(kept.column("chosen_ids"))
        self.ending.add(kept.column("rejected_ids"))

    def to_dict(self) -> dict:
        edges = power_of_two_edges(self.lengths["pair"].longest)
        return {
            "pairs_in": self.pairs_in,
            "pairs_out": self.lengths["pair"].items,
            "dropped": dict(sorted(self.dropped.items())),
            "tokens": {part: x.total for part, x in self.lengths.items()},
            "lengths": {part: x.quantiles() for part, x in self.lengths.items()},
            "length_histograms": {
                "edges": edges.tolist(),
                **{part: x.histogram(edges) for part, x in self.lengths.items()},
            },
            "boundary_agreement": self.boundary.to_dict(),
            "responses_ending_with_eos": self.ending.to_dict(),
        }


def _tokenized_batches(
    pairs: Path,
    tokenizer: LoadedTokenizer,
    template: ChatTemplate,
    config: TokenizeConfig,
    stats: _Stats,
    rows_in: int,
) -> Iterator[pa.Table]:
    """Render, tokenize, check boundaries and drop by rule, batch by batch, counting.

    Three steps on three threads (`pipeline.ahead`), each over the batches in order: one
    reads and renders, one tokenizes (`encode_batch` on the tokenizer's Rayon pool, GIL
    released), and the caller's checks, counts and writes; so one batch's Python runs
    while the next is encoded, and every core stays busy.
    """
    bos_eos = (tokenizer.bos_token, tokenizer.eos_token)
    rendered = ((table, _render(table, template, bos_eos)) for table in _pair_batches(pairs))
    encoded = ahead(
        (table, texts, tokenize_pairs(texts, _pair_ids(table), tokenizer.tokenizer))
        for table, texts in ahead(rendered)
    )
    boundary = stats.boundary
    with closing(encoded), progress(total=rows_in, unit="pair", desc="tokenize") as bar:
        for table, texts, tokenized in encoded:
            need = config.boundary_check_pairs - boundary.checked // 2
            if need > 0:
                head = PairTexts(texts.prompt[:need], texts.chosen[:need], texts.rejected[:need])
                boundary_agreement(head, tokenized.slice(0, need), tokenizer.tokenizer, boundary)
            kept, invalid = tokenized_pair.CONTRACT.split(tokenized)
            stats.pairs_in += table.num_rows
            stats.dropped.update(invalid.column("rule").to_pylist())
            stats.add(kept)
            bar.update(table.num_rows)
            yield kept


def _write_tokenized(
    pairs: Path,
    input_sha256: str,
    tokenizer: LoadedTokenizer,
    template: ChatTemplate,
    markers: TurnMarkers,
    config: TokenizeConfig,
    key: str,
    directory: Path,
) -> dict:
    """Tokenize every pair and write the directory's files, report.json last."""
    rows_in = pq.ParquetFile(pairs).metadata.num_rows
    ending = EndingReport.for_markers(tokenizer.tokenizer, markers)
    stats = _Stats(BoundaryReport(template.name, tokenizer.name), ending)
    _write_pairs(directory, _tokenized_batches(pairs, tokenizer, template, config, stats, rows_in))
    (directory / TOKENIZER).write_bytes(tokenizer.json_bytes)
    config_text = json.dumps(_tokenizer_config(tokenizer, template, markers), indent=2) + "\n"
    (directory / TOKENIZER_CONFIG).write_text(config_text, encoding="utf-8")

    report = {
        "contract": "tokenized_report",
        "version": tokenized_report.VERSION,
        "contracts": _contract_versions(),
        "key": key,
        "config": asdict(config),
        "input": {"name": pairs.name, "sha256": input_sha256, "rows": rows_in},
        "tokenizer": {
            "path": TOKENIZER,
            "config_path": TOKENIZER_CONFIG,
            "name": tokenizer.name,
            "trained": tokenizer.trained,
            "fingerprint": tokenizer.fingerprint,
            "sha256": hashlib.sha256(tokenizer.json_bytes).hexdigest(),
            "bytes": len(tokenizer.json_bytes),
            "vocab_size": tokenizer.tokenizer.get_vocab_size(),
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
        },
        "template": {"name": template.name, "sha256": template.sha256},
        "files": file_entries(directory, DATA_FILES),
        "stats": stats.to_dict(),
    }
    return write_sealed(directory / REPORT, report, tokenized_report.validate)  # written last


def _write_pairs(directory: Path, batches: Iterator[pa.Table]) -> None:
    """`tokenized.parquet`, in row groups of exactly `ROW_GROUP` pairs."""
    with pq.ParquetWriter(
        directory / TOKENIZED, tokenized_pair.SCHEMA, compression="zstd"
    ) as writer:
        for group in rechunk(batches, ROW_GROUP):
            writer.write_table(group, row_group_size=ROW_GROUP)


# ---------------------------------------------------------------------------- reading


def read_tokenized(directory: str | Path, verify: bool = True) -> dict:
    """Read a tokenized directory's report, after checking the directory holds what it says.

    Args:
        directory: a directory written by `build_tokenized`.
        verify: check the size and sha256 of every listed file (reads every byte once);
            the report's own checks (key, checksum, text) run either way.

    Returns:
        The parsed, validated report.json.

    Raises:
        ShardError: naming report.json when it is missing, not JSON, not a
            tokenized_report, edited, named other than its key, or leaves a data file
            unlisted; or naming the data file that is missing, corrupt, or not
            tokenized_pair rows as many as the report says.
    """
    directory = Path(directory)
    path = directory / REPORT

    def validate(document: object, source: str) -> dict:
        report = tokenized_report.validate(document, source)
        if report["key"] != directory.resolve().name:
            raise ShardError(
                f"{path}: key {report['key']!r} is not the directory's name "
                f"{directory.resolve().name!r}"
            )
        listed = {entry["file"] for entry in report["files"]}
        if unlisted := set(DATA_FILES) - listed:
            raise ShardError(f"{path}: files does not list {sorted(unlisted)}")
        return report

    report = read_sealed(path, validate, "tokenized")
    if verify:
        check_files(directory, [(f["file"], f["bytes"], f["sha256"]) for f in report["files"]])
    data = directory / TOKENIZED
    try:
        file = pq.ParquetFile(data)
    except (OSError, pa.ArrowInvalid) as err:
        raise ShardError(f"{data}: not a readable parquet file: {err}") from err
    if not file.schema_arrow.equals(tokenized_pair.SCHEMA, check_metadata=False):
        raise ShardError(f"{data}: schema is not tokenized_pair v{tokenized_pair.VERSION}")
    if file.metadata.num_rows != report["stats"]["pairs_out"]:
        raise ShardError(
            f"{data}: {file.metadata.num_rows} rows, report says {report['stats']['pairs_out']}"
        )
    return report


def tokenized_batches(directory: str | Path) -> Iterator[pa.Table]:
    """The `tokenized_pair` rows of a tokenized directory, in order, `READ_BATCH` at a time."""
    file = pq.ParquetFile(Path(directory) / TOKENIZED, pre_buffer=False)
    for batch in file.iter_batches(batch_size=READ_BATCH):
        yield pa.Table.from_batches([batch]).cast(tokenized_pair.SCHEMA)


# ------------------------------------------------------------------------------ build


def build_tokenized(
    pairs: str | Path,
    tokenizer: str | Path | None,
    config: TokenizeConfig,
    store: str | Path,
) -> TokenizedResult:
    """Tokenize a preference_pair parquet into a verified directory, or reuse one.

    Args:
        pairs: a parquet file in the `preference_pair` schema, or a normalize/curate
            output directory holding `pairs.parquet`.
        tokenizer: a tokenizer.json or a Hugging Face model folder; None trains a
            byte-level BPE of `config.bpe_vocab_size` on the pairs.
        config: the tokenize settings.
        store: the store root; the output goes to `<store>/tokenized/<key>`.

    Returns:
        Where the tokenized pairs are, their key, whether they were reused, the report.

    Raises:
        FileNotFoundError: `pairs` does not exist.
        ContractError: the pairs break the preference_pair contract (names file, rows).
        TemplateError, TokenizerError, ValueError: bad template, tokenizer or config.
        MarkerError: the template's markers are not single tokens of `tokenizer` (and
            `config.allow_multi_token_markers` is off); raised before the pairs are read.
    """
    pairs, store = pairs_path(pairs), Path(store)
    loaded = load_tokenizer(tokenizer) if tokenizer is not None else None
    template = resolve_template(config.template, loaded.chat_template if loaded else None)
    return _build(pairs, loaded, template, config, store)


def tokenize_like(pairs: str | Path, tokenized: str | Path, store: str | Path) -> TokenizedResult:
    """Tokenize pairs exactly as the pairs of a tokenized directory were: with its
    tokenizer (the BPE trained on those pairs, when none was given: these pairs never
    train their own), its chat template and its `TokenizeConfig`.

    Loading the directory as a model folder would not do: its tokenizer_config.json names
    the template's end of turn as eos (for generation), so the tokenizer's bos/eos, and
    with them its fingerprint, the key and the report's `tokenizer` entry, would differ.
    The tokenizer is rebuilt from tokenizer.json with the bos/eos, name and origin the
    report records and must give the fingerprint it records; the template is the stored
    one, its sha256 checked. The result is keyed like any tokenized directory (these
    pairs, that tokenizer, template and config), so a second call reuses it.

    Args:
        pairs: a `preference_pair` parquet file (e.g. a curate output's eval_pairs.parquet).
        tokenized: a directory written by `build_tokenized` (its report is checked; its
            data files are not read).
        store: the store root; the output goes to `<store>/tokenized/<key>`.

    Raises:
        FileNotFoundError: `pairs` does not exist.
        ShardError: the directory's report, tokenizer or template is not what it records.
    """
    pairs, tokenized = pairs_path(pairs), Path(tokenized)
    report = read_tokenized(tokenized, verify=False)
    loaded = stored_tokenizer(tokenized / TOKENIZER, report["tokenizer"])
    if loaded.fingerprint != report["tokenizer"]["fingerprint"]:
        raise ShardError(f"{tokenized / TOKENIZER}: not the tokenizer report.json records")
    template = _stored_template(tokenized, report["template"])
    return _build(pairs, loaded, template, TokenizeConfig(**report["config"]), Path(store))


def _stored_template(directory: Path, entry: dict) -> ChatTemplate:
    """The chat template of a tokenized directory: the source its tokenizer_config.json
    holds, with the built-in's marker facts when it was a built-in.

    Raises:
        ShardError: the source is not the one whose sha256 the report records.
    """
    config = json.loads((directory / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    source, name = config["chat_template"], entry["name"]
    base = builtin_template(name) if name in BUILTIN_TEMPLATES else ChatTemplate(name, source)
    template = replace(base, source=source)
    if template.sha256 != entry["sha256"]:
        raise ShardError(f"{directory / TOKENIZER_CONFIG}: not the template report.json records")
    return template


def _build(
    pairs: Path,
    loaded: LoadedTokenizer | None,
    template: ChatTemplate,
    config: TokenizeConfig,
    store: Path,
) -> TokenizedResult:
    """Tokenize `pairs` with `loaded` (None: train a BPE on them) and `template`, or reuse
    the verified directory of their key."""
    # A trained tokenizer gets the template's markers as special tokens; a given one must
    # already have them.
    bos_eos = (
        (loaded.bos_token, loaded.eos_token) if loaded else (template.bos_token, template.eos_token)
    )
    markers = turn_markers(template, *bos_eos)
    if loaded is not None and not config.allow_multi_token_markers:
        check_markers(loaded, template, markers)
    input_sha256 = sha256_file(pairs)
    key = tokenized_key(input_sha256, loaded, template, config)

    def build(tmp: Path) -> dict:
        tokenizer = loaded
        if tokenizer is None:
            texts = _training_texts(pairs, template)
            tokenizer = train_tokenizer(texts, config.bpe_vocab_size, template)
        return _write_tokenized(pairs, input_sha256, tokenizer, template, markers, config, key, tmp)

    directory = store / "tokenized" / key
    report, reused = keyed_directory(directory, read_tokenized, build, invalid=ShardError)
    return TokenizedResult(directory, key, reused, report)


def select_tokenized(
    directory: str | Path, pair_ids: pa.Array, selection: str, store: str | Path
) -> TokenizedResult:
    """Some pairs of a tokenized directory as a tokenized directory of their own.

    The kept rows are copied as they are (same token ids, in the parent's order) with the
    parent's tokenizer files, template and settings, so packing them
    (`pipeline.pack.build_shards`, same `PackConfig`) packs exactly these pairs as the
    parent's were packed. Stats are over the kept pairs, but `boundary_agreement`, which
    is the parent's: it measures the tokenizer and template on the parent's first pairs.
    The report's `input` names the parent directory and the selection.

    Args:
        directory: a directory written by `build_tokenized` (verified here).
        pair_ids: the ids of the pairs to keep; each must be in the directory.
        selection: a hex digest of what chose the pairs (part of the key, so another
            choice makes another directory).
        store: the store root; the output goes to `<store>/tokenized/<key>`, a key of the
            parent's key, `selection` and this code's version. One that proves itself is
            reused.

    Raises:
        ShardError: the parent directory is incomplete or corrupt (names the file).
        ValueError: a pair id that the directory does not hold (names how many and one).
    """
    directory, store = Path(directory), Path(store)
    parent = read_tokenized(directory, verify=True)
    payload = {"parent": parent["key"], "selection": selection, "code": TOKENIZE_VERSION}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def build(tmp: Path) -> dict:
        table = pq.read_table(directory / TOKENIZED)
        kept = table.filter(pc.is_in(table.column("pair_id"), value_set=pair_ids))
        if kept.num_rows != len(pc.unique(pair_ids)):
            ids = table["pair_id"]
            missing = pc.filter(pair_ids, pc.invert(pc.is_in(pair_ids, value_set=ids)))
            raise ValueError(
                f"{directory}: {len(missing)} of the selected pairs are not tokenized there "
                f"(for example {missing[0].as_py()!r}); were they selected from these pairs?"
            )
        stats = _Stats(_parent_boundary(parent), _ending_report(directory, parent))
        stats.pairs_in = kept.num_rows
        stats.add(kept)
        _write_pairs(tmp, iter([kept]))
        for name in (TOKENIZER, TOKENIZER_CONFIG):
            (tmp / name).write_bytes((directory / name).read_bytes())
        name = f"{directory.name} selection {selection}"
        report = {
            **{k: v for k, v in parent.items() if k not in ("files", "stats", "checksum")},
            "key": key,
            "input": {"name": name, "sha256": selection, "rows": kept.num_rows},
            "files": file_entries(tmp, DATA_FILES),
            "stats": stats.to_dict(),
        }
        return write_sealed(tmp / REPORT, report, tokenized_report.validate)

    out = store / "tokenized" / key
    report, reused = keyed_directory(out, read_tokenized, build, invalid=ShardError)
    return TokenizedResult(out, key, reused, report)


def _parent_boundary(report: dict) -> BoundaryReport:
    """The boundary agreement a directory's report gives (measured on its first pairs)."""
    b = report["stats"]["boundary_agreement"]
    return BoundaryReport(b["template"], b["tokenizer"], b["checked"], b["agreed"], b["examples"])


def _ending_report(directory: Path, report: dict) -> EndingReport:
    """An empty `EndingReport` for the template ending the directory's report names."""
    ending = report["stats"]["responses_ending_with_eos"]
    tokenizer = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER))
    suffix_ids = np.array(token_ids(tokenizer, ending["suffix"]), dtype=np.int32)
    return EndingReport(ending["token"], ending["token_ids"], ending["suffix"], suffix_ids)
