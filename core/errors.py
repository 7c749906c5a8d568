"""Errors every layer raises or shows.

`TokenizerError`: a tokenizer file cannot be read, raised by the tokenize stage
(`pipeline.tokenize`) and by the trainer's tokenizer check (`training.tokenizer_match`).

`error_line` and `USER_ERROR`: how a user error ends a command (the `prefpack` dispatcher
and `prefpack run`'s own checks): one line, `prefpack <command>: error: <message>`, and
exit status 2.
"""

from __future__ import annotations

USER_ERROR = 2  # argparse's exit status for bad usage; ours for every user error


class TokenizerError(ValueError):
    """A tokenizer path cannot be loaded; the message names the file."""


def error_line(command: str, err: BaseException) -> str:
    """The one line a user sees for `err`; an OSError names its path first."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return f"prefpack {command}: error: {' '.join(text.split())}"
