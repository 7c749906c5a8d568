"""Start the real Dagster webserver (`prefpack ui`) in its own process group, talk GraphQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str, variables: dict | None = None) -> dict[str, Any]:
    """POST a GraphQL query; return `data` (raises on GraphQL errors)."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
    if payload.get("errors"):
        raise RuntimeError(json.dumps(payload["errors"])[:2000])
    return payload["data"]


@contextmanager
def running_ui(home: Path, store: Path, log: Path, timeout: float = 180) -> Iterator[int]:
    """`prefpack ui` on a free port, stopped (whole process group, SIGTERM) on exit."""
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PREFPACK_STORE": str(store)}
    with log.open("w") as out:
        # start_new_session: the server and its children (daemon, code server) form one
        # process group that SIGTERM reaches, unlike a plain `&` in a shell script.
        process = subprocess.Popen(
            [sys.executable, "-m", "prefpack", "ui", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_until_serving(port, process, log, timeout)
            yield port
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait_until_serving(port: int, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefpack ui exited early:\n{log.read_text()[-3000:]}")
        try:
            data = graphql(port, "{ assetNodes { assetKey { path } } }")
            if data["assetNodes"]:
                return
        except OSError:
            pass
        except RuntimeError:
            pass  # code location still loading
        time.sleep(1)
    raise TimeoutError(f"webserver not serving after {timeout}s:\n{log.read_text()[-3000:]}")
