"""The floor every layer stands on: what `pipeline`, `training`, `assets` and the CLI share.

| module        | what it holds                                                              |
| ------------- | -------------------------------------------------------------------------- |
| `settings.py` | `setting(...)` fields of the config dataclasses, their flags and range check |
| `progress.py` | progress of long work: a bar on a terminal, log lines elsewhere            |
| `inputs.py`   | what names a source: a local file of a known format, or a hub id           |
| `errors.py`   | errors every layer raises or shows: a bad tokenizer file, the one-line user error |

It imports nothing from the project's other packages, nor dagster or torch
(docs/design.md, "Layers"; checked by tests/test_layers.py).
"""
