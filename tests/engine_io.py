"""Engine scripts in a subprocess hand their results back through a file.

Not through stdout: vLLM's engine-core and worker processes log to the same
pipe, and a write longer than PIPE_BUF (4 KiB) may be interleaved with
theirs, which once cut a result line in CI. The script's ``emit(key, obj)``
appends one JSON line to the file ``run_script`` reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

EMIT = textwrap.dedent('''
    def emit(key, obj):
        import json, os
        with open(os.environ["JETSPEC_TEST_OUT"], "a") as f:
            f.write(json.dumps([key, obj]) + "\\n")
''')


def run_script(path: Path, text: str, args: list[str],
               env: dict | None = None, timeout: float = 600,
               tail: int = 5000) -> tuple[dict, str]:
    """Write ``text`` (with ``emit`` defined) to ``path``, run it with
    ``args``; returns ({key: last object emitted under key}, log). Fails
    the test with the end of the log if the script fails."""
    path.write_text(EMIT + text)
    out = path.with_suffix(".out.jsonl")
    out.unlink(missing_ok=True)
    env = dict(os.environ, **(env or {}), JETSPEC_TEST_OUT=str(out))
    proc = subprocess.run([sys.executable, str(path), *map(str, args)],
                          capture_output=True, text=True, env=env,
                          timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-tail:]
    res = {}
    if out.exists():
        for line in out.read_text().splitlines():
            key, obj = json.loads(line)
            res[key] = obj
    return res, log


def result(res: dict, key: str, log: str, tail: int = 5000):
    """``res[key]``, or a failure that shows the end of the log."""
    assert key in res, f"the script emitted no {key!r}:\n" + log[-tail:]
    return res[key]
