"""The client under gevent (gRPC's gevent support on, as the README says to
enable it): the watcher runs, reads are served from RAM by greenlets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if not os.environ.get("CI"):
    # Locally without gevent: skip. Under CI it is in the test extras, and a
    # missing gevent fails the run.
    pytest.importorskip("gevent")

HERE = Path(__file__).resolve().parents[1]


@pytest.fixture
def node() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_node"],
        cwd=HERE,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    yield f"127.0.0.1:{proc.stdout.readline().strip()}"
    proc.stdin.close()
    proc.wait(10)


def test_greenlets_read_from_the_near_cache(node: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tests.gevent_reader", node],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["l1", "near"], out.stdout
