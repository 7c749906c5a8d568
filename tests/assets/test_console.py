"""The console logger's one line per error: the event's line, then the innermost
exception of the chain Dagster appends (a Failure by its description alone)."""

from __future__ import annotations

from assets.console import one_line

HEAD = 'source_job - 1234 - raw_source - STEP_FAILURE - Execution of step "raw_source" failed.'
FRAMES = '  File "/x/dagster/_core/execution/plan/compute.py", line 188, in execute\n    yield\n'


def test_a_failure_is_its_description() -> None:
    message = (
        f"{HEAD}\n\ndagster._core.definitions.events.Failure: model.path: '/m' does not exist"
        f"\n\nStack Trace:\n{FRAMES}"
    )
    assert one_line(message) == f"{HEAD} model.path: '/m' does not exist"


def test_a_chained_error_is_its_innermost_exception() -> None:
    """A user's ValueError inside Dagster's step error: the cause, by its class name."""
    message = (
        f"{HEAD}\n\ndagster._core.errors.DagsterExecutionStepExecutionError: Error occurred "
        f'while executing op "raw_source":\n\nStack Trace:\n{FRAMES}\nThe above exception '
        f"was caused by the following exception:\nValueError: bad value\n\nStack Trace:\n"
        f"{FRAMES}"
    )
    assert one_line(message) == f"{HEAD} ValueError: bad value"


def test_a_message_without_a_stack_trace_is_left_as_it_is() -> None:
    text = "step 3/4 loss 0.6931\n\nsecond paragraph: kept"
    assert one_line(text) == text
