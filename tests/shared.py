"""Build something once per test session, shared by all xdist workers.

A module-scoped fixture is built once per worker *and group* (see the root
conftest.py); what several groups need -- a trained head, a no-spec
engine's output -- goes through ``once`` instead: the first caller builds it
under a file lock, the others wait for it and reuse it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable


def session_dir(tmp_path_factory) -> Path:
    """The session's temporary directory all workers share."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's basetemp is <session dir>/popen-gwN.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(dir)`` fills ``dir`` the first time ``name`` is asked for
    in this session; every call returns ``dir``."""
    root = session_dir(tmp_path_factory)
    d = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / ".done").exists():
            shutil.rmtree(d, ignore_errors=True)    # a failed build's
            d.mkdir()
            build(d)
            (d / ".done").touch()
    return d
