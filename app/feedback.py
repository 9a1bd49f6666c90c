"""How the tabs report a request they cannot honour: one warning toast, and every output left as it was.

Raising ``gr.Error`` from an event marks each of its output components with a red "Error" badge that stays
until the page is reloaded; ``refuse`` shows the message as a toast (``gr.Warning``) and returns
``gr.skip()`` for every output instead, so tables, dropdowns and galleries stay intact.
"""

from __future__ import annotations

import re
from typing import Any

import gradio as gr

_TEMP_PATH = re.compile(r"(?:/[^\s/'\"():,]+)+/([^\s/'\"():,]+)")


def without_paths(message: str) -> str:
    """``message`` with absolute file paths (e.g. Gradio's temporary upload folders) shortened to file names."""
    return _TEMP_PATH.sub(r"\1", message)


def refuse(message: str, outputs: int) -> Any:
    """Toast ``message`` (paths shortened) and leave all ``outputs`` unchanged; return it from the handler."""
    gr.Warning(without_paths(message))
    skips = tuple(gr.skip() for _ in range(outputs))
    return skips[0] if outputs == 1 else skips
