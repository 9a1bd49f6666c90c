"""`python -m app`: start Atelier's web app (what `make app` runs).

    python -m app [--host 127.0.0.1] [--port 7860] [--base-model SPEC] [--models-dir DIR] [--data-dir DIR]
                  [--auth-file FILE | --auth user:pass]     (or ATELIER_AUTH=user:pass in the environment)
                  [--eval-root DIR]

Binds to the loopback address by default; `--share` (a public Gradio link) is off unless asked for.
Serves only what the page shows (see docs/security.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from models.cli_options import OneLineArgumentParser

AUTH_ENV = "ATELIER_AUTH"
"""Environment variable holding the login as user:pass (kept out of `ps`, unlike `--auth`)."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--base-model",
        default=None,
        help="hub id, diffusers folder or single-file checkpoint (default: toy world)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="a folder of base models (diffusers folders, .safetensors/.ckpt files) the Train tab offers by "
        "name besides --base-model; web users cannot type other paths",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("atelier-data"), help="jobs, adapters, outputs, database"
    )
    parser.add_argument(
        "--auth",
        default=None,
        help=f"require a login, given as user:pass (visible to other local users in `ps`; prefer --auth-file "
        f"or the {AUTH_ENV} environment variable, which take the same user:pass)",
    )
    parser.add_argument(
        "--auth-file",
        type=Path,
        default=None,
        help="require a login read from this file's first line, user:pass (keep the file private)",
    )
    parser.add_argument("--clip-model", default=None, help="CLIP for scores (default: the toy world's CLIP)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or mps for generation (default: best available)"
    )
    parser.add_argument("--max-upload-mb", type=int, default=20, help="largest accepted upload per file")
    parser.add_argument(
        "--eval-root",
        type=Path,
        default=None,
        help="let the Evaluate tab score image folders under this directory (default: off)",
    )
    parser.add_argument(
        "--share", action="store_true", help="also open a public Gradio share link (off by default)"
    )
    return parser


def parse_auth(text: str | None, source: str = "--auth") -> tuple[str, str] | None:
    """`user:pass` → (user, pass); anything else is an error naming where it came from, not the secret."""
    if text is None:
        return None
    user, sep, password = text.strip("\r\n").partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{source} must hold user:pass (both parts non-empty)")
    return user, password


def resolve_auth(
    auth: str | None, auth_file: Path | None, environ: Mapping[str, str]
) -> tuple[str, str] | None:
    """The login from `--auth`, `--auth-file` or `$ATELIER_AUTH` (at most one of them), or None."""
    given = [name for name, value in (("--auth", auth), ("--auth-file", auth_file)) if value is not None]
    if environ.get(AUTH_ENV):
        given.append(AUTH_ENV)
    if len(given) > 1:
        raise ValueError(f"give the login one way only, not {' and '.join(given)}")
    if auth_file is not None:
        try:
            lines = auth_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--auth-file {auth_file}: cannot read it ({type(err).__name__})") from None
        return parse_auth(lines[0] if lines else "", f"--auth-file {auth_file}")
    if auth is not None:
        return parse_auth(auth)
    return parse_auth(environ.get(AUTH_ENV) or None, AUTH_ENV)


def check_models(base_model: str | None, clip_model: str | None) -> None:
    """Refuse at start a base model or CLIP that could never load safely (headers and keys only; the weights
    load on first use). Raises ``ValueError`` with one line."""
    from evaluation import check_clip_spec
    from models.pipelines import ModelLoadError, check_base_model

    try:
        check_base_model(base_model)
    except ModelLoadError as err:
        raise ValueError(f"--base-model: {err}") from None
    check_clip_spec(clip_model)


def check_port(host: str, port: int) -> None:
    """Refuse a port another program holds, before anything starts (Gradio would raise a traceback later);
    binds the way Gradio's server does (``SO_REUSEADDR``), so a port in TIME_WAIT is not mistaken for busy."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        raise ValueError(_port_message(host, port, err.strerror or str(err))) from None


def _port_message(host: str, port: int, why: str) -> str:
    return f"cannot listen on {host}:{port} ({why}); pass a free --port, or stop the program that holds it"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        auth = resolve_auth(args.auth, args.auth_file, os.environ)
        check_models(args.base_model, args.clip_model)
        if args.models_dir is not None and not args.models_dir.is_dir():
            raise ValueError(f"--models-dir {args.models_dir} is not a folder")
        if args.eval_root is not None and not args.eval_root.is_dir():
            raise ValueError(f"--eval-root {args.eval_root} is not a folder")
        check_port(args.host, args.port)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.studio import Settings, Studio
    from app.ui import serve

    settings = Settings(
        data_dir=args.data_dir.resolve(),
        base_model=args.base_model,
        clip_model=args.clip_model,
        models_dir=args.models_dir.resolve() if args.models_dir is not None else None,
        device=args.device,
        max_upload_mb=args.max_upload_mb,
        eval_root=args.eval_root.resolve() if args.eval_root else None,
    )
    studio = Studio(settings)
    print(f"Atelier: data in {settings.data_dir}; open http://{args.host}:{args.port}", flush=True)
    try:
        serve(studio, host=args.host, port=args.port, auth=auth, share=args.share)
    except OSError as err:
        if "Cannot find empty port" not in str(err):
            raise
        print(f"error: {_port_message(args.host, args.port, 'taken while starting')}", file=sys.stderr)
        return 2
    finally:
        studio.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
