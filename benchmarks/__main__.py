"""`python -m benchmarks [NAME ...] [OPTIONS ...]`: run every benchmark module (or the named ones) in turn.

Each module in this package exposes `main(argv) -> int` and prints its own table of ratios against the
reference it names. The names come first; everything from the first option on (`--quick`, `--steps 4`, ...)
is passed to every module run.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import benchmarks


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first_option = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, flags = argv[:first_option], argv[first_option:]
    found = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_"))
    if not found:
        print("no benchmarks yet")
        return 0
    failed = []
    for name in names or found:
        if name not in found:
            print(f"unknown benchmark {name!r}; available: {', '.join(found)}", file=sys.stderr)
            return 2
        print(f"\n=== benchmarks.{name} ===", flush=True)
        start = time.perf_counter()
        code = importlib.import_module(f"benchmarks.{name}").main(flags)
        print(f"--- benchmarks.{name}: exit {code}, {time.perf_counter() - start:.1f} s", flush=True)
        if code:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
