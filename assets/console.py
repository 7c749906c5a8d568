"""The console logger of prefpack's jobs: Dagster's own colored console lines, with each
error cut to one line.

Dagster's console logger follows every failure event (the step's, then the run's) with
the error's chain of stack traces, Dagster's frames first: a `dagster.Failure` of a
resource check (`assets.resources`) becomes some 50 lines in `prefpack run` and in
`dg launch`. Here the event's line ends with the innermost exception alone (a Failure by
its description), so the terminal shows what is wrong in one line. Nothing is lost: the
run's event log, which the UI shows, keeps every stack, and `prefpack --debug` re-raises
the error with its traceback.
"""

from __future__ import annotations

import logging
import re

import dagster as dg

# Dagster appends an event's error after a blank line: "<module.Class>: <message>" lines
# (the error, then each cause), each followed by "Stack Trace:" and indented frames.
STACK_TRACE = "\nStack Trace:\n"
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*): (.+)$")


def one_line(message: str) -> str:
    """`message` without the stack traces Dagster appended: its first paragraph, then the
    innermost exception of the error as `Class: text` (a Failure as its text). A message
    with no stack trace is left as it is."""
    if STACK_TRACE not in message:
        return message
    head, _, error = message.partition("\n\n")
    found = [match for match in map(EXCEPTION_LINE.match, error.splitlines()) if match]
    if not found:
        return head
    name, text = found[-1].groups()
    return f"{head} {text if name == 'Failure' else f'{name}: {text}'}"


class OneLineFormatter(logging.Formatter):
    """Formats a copy of each record, its message cut by `one_line`, with the formatter
    Dagster's console logger installed (the record itself is shared with other loggers)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        short = logging.makeLogRecord(vars(record))
        short.msg, short.args = one_line(record.getMessage()), None
        return self.inner.format(short)


@dg.logger(
    dg.colored_console_logger.config_schema,
    description="Dagster's colored console logger, each error cut to its innermost "
    "exception's line (the event log keeps the stack traces).",
)
def console(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = dg.colored_console_logger.logger_fn(init_context)
    for handler in logger.handlers:
        handler.setFormatter(OneLineFormatter(handler.formatter))
    return logger
