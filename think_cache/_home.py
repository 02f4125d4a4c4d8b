"""The one folder where think-cache keeps files between runs: converted models (`think_cache.models`) and the
built CPU loops (`think_cache.cpu_kernels`, in its ``build`` subfolder)."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable naming that folder.
HOME_ENV = "THINK_CACHE_HOME"


def home() -> Path:
    """``$THINK_CACHE_HOME``, else ``think-cache`` in the user's cache folder (``$XDG_CACHE_HOME``, else
    ``~/.cache``); absolute."""
    named = os.environ.get(HOME_ENV)
    if named:
        return Path(named).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return (Path(base) / "think-cache").absolute()
