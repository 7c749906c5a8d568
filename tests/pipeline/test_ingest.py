"""Reading files and hub ids, and casting them to a raw contract."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.inputs import is_hub_id
from data_contracts import ContractError
from data_contracts.contract import Contract
from data_contracts.raw_sources import HELPSTEER3, MESSAGES, SHAPES
from pipeline import ingest

ROWS = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
AB = Contract("ab", "1", pa.schema([pa.field("a", pa.float64()), pa.field("b", pa.string())]))


def _convert(field: str, array: pa.Array) -> pa.Array:
    raise AssertionError(f"no conversion expected for {field}")


def _ab(path) -> ingest.Conformed:
    return ingest.conform(ingest.read(path)[0], AB, {}, _convert)


def test_json_lines_keep_bad_lines_apart(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": \n"\xff"\n[1, 2]\n{"a": 2}\n')
    raw = ingest.read(path)[0]
    assert raw.rows == 5  # the blank line is no row
    conformed = ingest.conform(raw, AB, {}, _convert)
    assert conformed.row_index.to_pylist() == [0, 5]
    assert conformed.table["a"].to_pylist() == [1.0, 2.0]
    assert [(i, reason) for i, reason, _ in conformed.problems] == [
        (2, "invalid_json"),
        (3, "invalid_utf8"),
        (4, "not_an_object"),
    ]
    assert raw.raw([3]) == ['"\\xff"']  # undecodable bytes stay visible


def test_big_clean_file_takes_the_block_path_and_keeps_order(tmp_path, monkeypatch) -> None:
    """Several blocks, one bad line in the middle: bisection keeps every other row."""
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 4096)
    lines = [json.dumps({"a": i, "b": f"row {i}"}) for i in range(2000)]
    lines[777] = '{"a": "seven", "b": "x"}'  # a type change pyarrow refuses in a block
    lines[1500] = '{"a": 1, "a": 2}'
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    python_lines = []
    parse = ingest.parse_line
    monkeypatch.setattr(ingest, "parse_line", lambda line: python_lines.append(line) or parse(line))
    conformed = _ab(tmp_path / "big.jsonl")
    assert [(i, r) for i, r, _ in conformed.problems] == [
        (777, "wrong_type"),
        (1500, "duplicate_key"),
    ]
    # The unparsable row is left out; the wrongly typed one stays, as nulls, to be set aside.
    assert conformed.row_index.to_pylist() == [i for i in range(2000) if i != 1500]
    assert conformed.table["a"].to_pylist()[776:779] == [776.0, None, 778.0]
    assert len(python_lines) <= 2 * ingest.PYTHON_LINES  # only around the two bad lines


@pytest.mark.parametrize("name", ["rows.json", "rows.json.gz", "rows.jsonl.gz", "rows.ndjson"])
def test_json_variants_read_the_same_records(tmp_path, name) -> None:
    if ".jsonl" in name or name.endswith(".ndjson"):
        data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    else:
        data = json.dumps(ROWS).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert _ab(path).table.to_pylist() == [{"a": 1.0, "b": "x"}, {"a": 2.0, "b": "y"}]


def test_parquet_and_arrow_file_and_stream(tmp_path) -> None:
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "a.parquet")
    with (
        pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    with (
        pa.OSFile(str(tmp_path / "c.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    (tmp_path / "README.md").write_text("ignored")
    files = ingest.read(tmp_path)
    assert [f.label.rsplit("/", 1)[1] for f in files] == ["a.parquet", "b.arrow", "c.arrow"]
    assert all(f.table.to_pylist() == ROWS for f in files)


def test_bad_paths_are_named(tmp_path) -> None:
    with pytest.raises(ingest.IngestError, match=r"missing.jsonl: no such file"):
        ingest.read(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ingest.IngestError, match=r"data\.csv: unknown format"):
        ingest.read(tmp_path / "data.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ingest.IngestError, match=r"empty: no .*files inside"):
        ingest.read(empty)
    (tmp_path / "broken.json").write_text('[{"a": 1},')
    with pytest.raises(ingest.IngestError, match=r"broken.json: not a valid JSON array"):
        ingest.read(tmp_path / "broken.json")
    (tmp_path / "empty.jsonl").write_bytes(b"\n \n")
    with pytest.raises(ingest.IngestError, match=r"empty.jsonl: no rows"):
        ingest.read(tmp_path / "empty.jsonl")


def test_split_from_file_name() -> None:
    assert ingest.split_from_name("train_prefs-00000-of-00001.parquet") == "train_prefs"
    assert ingest.split_from_name("validation.jsonl.gz") == "validation"
    assert ingest.split_from_name("evol_instruct.jsonl") is None


def test_hub_ids_are_told_from_paths(tmp_path) -> None:
    assert is_hub_id("nvidia/HelpSteer3")
    assert not is_hub_id("data/train.jsonl")  # a missing file, not a hub id
    assert not is_hub_id(tmp_path)


def test_offline_hub_load_names_the_id() -> None:
    """Run in a fresh interpreter so the offline switch is read when datasets imports."""
    code = (
        "from pipeline.normalize import normalize\n"
        "try:\n"
        "    normalize('helpsteer3', 'nvidia/HelpSteer3')\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.stdout.startswith("IngestError nvidia/HelpSteer3: cannot load from the Hugging")
    assert "config='preference'" in out.stdout


def test_conforms_rules() -> None:
    assert ingest.conforms(pa.int64(), pa.float64())
    assert not ingest.conforms(pa.string(), pa.float64())  # "3" is no number
    assert not ingest.conforms(pa.float64(), pa.int64())
    assert ingest.conforms(pa.null(), MESSAGES)
    sharegpt = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    assert not ingest.conforms(sharegpt, MESSAGES)  # no field in common
    extra = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("x", pa.int8())]))
    assert ingest.conforms(extra, MESSAGES)


def _json_file(tmp_path, rows) -> ingest.RawFile:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ingest.read(path)[0]


HS3_ROW = {
    "context": [{"role": "user", "content": "q"}],
    "response1": "a",
    "response2": "b",
    "overall_preference": -1,
}


def _user_turns(field: str, array: pa.Array) -> pa.Array:
    return pa.array([[{"role": "user", "content": s}] for s in array.to_pylist()], MESSAGES)


def test_missing_required_columns_are_named(tmp_path) -> None:
    raw = _json_file(tmp_path, [{"context": "q", "response1": "a", "meta": {"x": 1}}])
    with pytest.raises(ContractError) as err:
        ingest.conform(raw, HELPSTEER3, SHAPES[HELPSTEER3.name], _user_turns)
    message = str(err.value)
    assert "rows.jsonl: missing column(s) for raw_helpsteer3 v1: 'response2'; " in message
    assert "the file has: context, meta, meta.x, response1" in message
    assert "\n" not in message


def test_a_chosen_column_must_exist_and_may_be_dotted(tmp_path) -> None:
    rows = [HS3_ROW | {"meta": {"lang": "en"}}, HS3_ROW | {"meta": None}]
    raw = _json_file(tmp_path, rows)
    columns = {"language": "meta.lang"}
    conformed = ingest.conform(raw, HELPSTEER3, SHAPES[HELPSTEER3.name], _user_turns, columns)
    assert conformed.table["language"].to_pylist() == ["en", None]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    typed = ingest.read(tmp_path / "t.parquet")[0]
    from_parquet = ingest.conform(typed, HELPSTEER3, SHAPES[HELPSTEER3.name], _user_turns, columns)
    assert from_parquet.table["language"].to_pylist() == ["en", None]
    options = {"language": "language_column"}
    for file in (raw, typed):
        with pytest.raises(ContractError, match=r"'meta\.langs' \(option language_column=meta"):
            ingest.conform(
                file,
                HELPSTEER3,
                SHAPES[HELPSTEER3.name],
                _user_turns,
                {"language": "meta.langs"},
                options,
            )


def test_typed_column_of_wrong_type_is_named(tmp_path) -> None:
    table = pa.Table.from_pylist([HS3_ROW | {"overall_preference": "x"}])
    pq.write_table(table, tmp_path / "t.parquet")
    raw = ingest.read(tmp_path / "t.parquet")[0]
    with pytest.raises(ContractError, match="column 'overall_preference' has type string"):
        ingest.conform(raw, HELPSTEER3, SHAPES[HELPSTEER3.name], _convert)


def test_json_values_of_wrong_type_become_row_problems(tmp_path) -> None:
    rows = [HS3_ROW, HS3_ROW | {"overall_preference": "2"}, HS3_ROW | {"response1": 5}]
    raw = _json_file(tmp_path, rows)
    conformed = ingest.conform(raw, HELPSTEER3, SHAPES[HELPSTEER3.name], _convert)
    assert sorted((i, r) for i, r, _ in conformed.problems) == [
        (1, "wrong_type"),
        (2, "wrong_type"),
    ]
    assert conformed.table["overall_preference"].to_pylist() == [-1.0, None, -1.0]
    assert conformed.table.schema.field("domain").type == pa.string()  # absent: all null


def test_mixed_shapes_in_one_json_column(tmp_path) -> None:
    """A string context converts; a list context is kept; order is preserved."""
    converted = []

    def convert(field: str, array: pa.Array) -> pa.Array:
        converted.append(array.to_pylist())
        return pa.array([[{"role": "user", "content": s}] for s in array.to_pylist()], MESSAGES)

    rows = [HS3_ROW | {"context": "as string"}, HS3_ROW, HS3_ROW | {"context": 7}]
    conformed = ingest.conform(
        _json_file(tmp_path, rows), HELPSTEER3, SHAPES[HELPSTEER3.name], convert
    )
    assert converted == [["as string"]]
    assert conformed.table["context"].to_pylist() == [
        [{"role": "user", "content": "as string"}],
        [{"role": "user", "content": "q"}],
        None,
    ]
    assert [r for _, r, _ in conformed.problems] == ["wrong_type"]
