"""The app's login can come from `--auth-file` or `$ATELIER_AUTH`, so the password stays out of `ps` (#35,
item 4); `--help` says so, and a bad login source is one line that never repeats the secret."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.__main__ import AUTH_ENV, build_parser, main, resolve_auth
from tests.test_app_api import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_login_sources(tmp_path: Path) -> None:
    secret = tmp_path / "login"
    secret.write_text("ada:s3cret-pass\n")
    assert resolve_auth(None, None, {AUTH_ENV: "ada:from-env"}) == ("ada", "from-env")
    assert resolve_auth(None, secret, {}) == ("ada", "s3cret-pass")
    assert resolve_auth("ada:typed", None, {}) == ("ada", "typed")
    assert resolve_auth(None, None, {AUTH_ENV: ""}) is None
    assert resolve_auth(None, None, {}) is None


@pytest.mark.parametrize(
    ("auth", "content", "env", "expected"),
    [
        ("ada:x", "ada:y", None, "give the login one way only, not --auth and --auth-file"),
        (None, "ada:y", "ada:z", f"give the login one way only, not --auth-file and {AUTH_ENV}"),
        (None, "no-colon-secret", None, "--auth-file {file} must hold user:pass (both parts non-empty)"),
        (None, "", None, "--auth-file {file} must hold user:pass (both parts non-empty)"),
        (None, None, ":nouser-secret", f"{AUTH_ENV} must hold user:pass (both parts non-empty)"),
    ],
)
def test_bad_login_sources_give_one_line_without_the_secret(
    auth: str | None,
    content: str | None,
    env: str | None,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    file = tmp_path / "login"
    argv = ["--data-dir", str(tmp_path / "data")]
    if auth is not None:
        argv += ["--auth", auth]
    if content is not None:
        file.write_text(content)
        argv += ["--auth-file", str(file)]
    if env is not None:
        monkeypatch.setenv(AUTH_ENV, env)
    else:
        monkeypatch.delenv(AUTH_ENV, raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: " + expected.format(file=file)
    assert "secret" not in err


def test_help_names_the_private_ways_to_log_in() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "--auth-file AUTH_FILE" in text and AUTH_ENV in text and "`ps`" in text


def test_password_from_a_file_is_not_on_the_command_line(tiny_sd_path: Path, tmp_path: Path) -> None:
    """A real `python -m app` process: its command line (what `ps` shows) has no password, and the login holds."""
    login = tmp_path / "login"
    login.write_text("ada:file-only-password\n")
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop(AUTH_ENV, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--base-model", str(tiny_sd_path), "--auth-file", str(login)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                answer = httpx.get(f"{url}/config", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the app did not start"
                time.sleep(1)
        assert answer.status_code == 401
        command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode()
        assert "file-only-password" not in command_line and str(login) in command_line
        wrong = httpx.post(f"{url}/login", data={"username": "ada", "password": "nope"}, timeout=10)
        right = httpx.post(
            f"{url}/login", data={"username": "ada", "password": "file-only-password"}, timeout=10
        )
        assert wrong.status_code == 400 and right.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=60)
