"""`python -m app`: start Atelier's web app (what `make app` runs).

    python -m app [--host 127.0.0.1] [--port 7860] [--base-model SPEC] [--data-dir DIR] [--auth user:pass]
                  [--eval-root DIR]

Binds to the loopback address by default; `--share` (a public Gradio link) is off unless asked for.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--base-model",
        default=None,
        help="hub id, diffusers folder or single-file checkpoint (default: toy world)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("atelier-data"), help="jobs, adapters, outputs, database"
    )
    parser.add_argument("--auth", default=None, help="require a login, given as user:pass")
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


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`user:pass` → (user, pass); anything else is an error naming the expected form."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth {text!r} must look like user:pass (both parts non-empty)")
    return user, password


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        auth = parse_auth(args.auth)
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
        device=args.device,
        max_upload_mb=args.max_upload_mb,
        eval_root=args.eval_root.resolve() if args.eval_root else None,
    )
    studio = Studio(settings)
    print(f"Atelier: data in {settings.data_dir}; open http://{args.host}:{args.port}", flush=True)
    try:
        serve(studio, host=args.host, port=args.port, auth=auth, share=args.share)
    finally:
        studio.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
