"""The one place that imports clip-anytorch (OpenAI CLIP, Radford et al. 2021).

clip-anytorch does `from pkg_resources import packaging`; setuptools >= 81 no longer ships `pkg_resources`.
The project pins `setuptools<81`, and where that pin is not honoured (a user's own environment) this module
installs a minimal stand-in exposing only `packaging`, which is all clip uses. Import clip as
`from models.clip_compat import clip`.
"""

from __future__ import annotations

import sys
import types
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import pkg_resources  # noqa: F401  (only to learn whether it is importable)
    except ImportError:  # setuptools >= 81 (or pkg_resources blocked)
        import packaging.version

        _shim = types.ModuleType("pkg_resources")
        _shim.packaging = packaging  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = _shim
    import clip

__all__ = ["clip"]
