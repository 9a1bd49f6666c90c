"""`python -m app` refuses a port another program holds with one line and exit status 2, before it starts
anything (#35, item 8)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_busy_port_is_one_line(busy_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", str(busy_port), "--data-dir", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: cannot listen on 127.0.0.1:{busy_port} (Address already in use); pass a free --port, or stop "
        "the program that holds it"
    )
    assert not (tmp_path / "data").exists(), "nothing was started"


def test_the_process_exits_2(busy_port: int, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "--port", str(busy_port), "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{busy_port}" in done.stderr
