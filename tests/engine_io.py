"""Engine scripts in a subprocess hand their results back through a file.

Not through stdout: vLLM's engine-core and worker processes log to the same
pipe, and a write longer than PIPE_BUF (4 KiB) may be interleaved with
theirs, which once cut a result line in CI. The script's ``emit(key, obj)``
appends one JSON line to the file ``run_script`` reads.

A failure shows the lines of the log that name an error (``causes``: an
engine's worker logs its exception long before the end of the log, where
the engine core's own traceback fills the tail) and then the log's end.
"""

from __future__ import annotations

import json
import os
import re
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


# A line that names an error: Python's exception lines (prefixed or not by
# vLLM's "(Worker pid=...)"), vLLM's ERROR records, a dead process.
CAUSE = re.compile(r"(^|[\s)])([\w.]*(Error|Exception)|ERROR|Traceback|"
                   r"failed to start|[Ss]egmentation fault|Killed|"
                   r"core dumped|EADDRINUSE|signal \d+)")


def causes(log: str, limit: int = 40) -> str:
    """The log's lines that name an error, in order, each once (at most
    ``limit``)."""
    seen: dict[str, None] = {}
    for line in log.splitlines():
        if CAUSE.search(line):
            seen.setdefault(line.rstrip()[-500:], None)
            if len(seen) >= limit:
                break
    return "\n".join(seen)


def failure(log: str, tail: int = 5000) -> str:
    """What a failed script or engine shows: ``causes`` and the log's end."""
    return ("lines that name an error:\n" + causes(log)
            + "\n--- end of the log ---\n" + log[-tail:])


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
    assert proc.returncode == 0, failure(log, tail)
    res = {}
    if out.exists():
        for line in out.read_text().splitlines():
            key, obj = json.loads(line)
            res[key] = obj
    return res, log


def result(res: dict, key: str, log: str, tail: int = 5000):
    """``res[key]``, or a failure that shows the end of the log."""
    assert key in res, f"the script emitted no {key!r}:\n" + failure(log,
                                                                      tail)
    return res[key]


# Several engines one after another in one script process: the front end's
# start-up (Python, vLLM's imports: about ten seconds of CPU here) is paid
# once. Each engine still has engine-core and worker processes of its own.
EACH_ENGINE = textwrap.dedent('''
    def each_engine(runs, body):
        """body(run) for each run (a dict with "key", "env", "log") in
        turn, with run["env"] in os.environ and fds 1 and 2 -- so the
        engine's processes, which inherit them -- writing to run["log"];
        an exception is emitted under run["key"] as {"error": ...}."""
        import gc, os, sys, traceback
        for run in runs:
            old = {k: os.environ.get(k) for k in run["env"]}
            os.environ.update(run["env"])
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            fd = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                         0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            try:
                body(run)
            except Exception:
                traceback.print_exc()
                emit(run["key"], {"error": traceback.format_exc()})
            finally:
                gc.collect()
                sys.stdout.flush()
                sys.stderr.flush()
                for i, s in enumerate(saved, 1):
                    os.dup2(s, i)
                    os.close(s)
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def shutdown(llm):
        llm.llm_engine.engine_core.shutdown()
''')


def run_engines(path: Path, text: str, args: list[str], runs: list[dict],
                timeout_each: float = 600, tail: int = 5000
                ) -> dict[str, dict]:
    """``run_script`` for a script (``text``, with ``each_engine``
    defined) that runs one engine per run: ``runs`` (dicts with "key" and
    optionally "env") is its last argument, each given a "log" file.
    Returns {key: what the script emitted under key, plus "log": that
    engine's log}; see ``engine_result``."""
    runs = [dict(r, env=r.get("env") or {},
                 log=str(path.with_name(f"{path.stem}.{r['key']}.log")))
            for r in runs]
    res, log = run_script(path, EACH_ENGINE + text,
                          [*args, json.dumps(runs)],
                          timeout=timeout_each * len(runs), tail=tail)
    out = {}
    for r in runs:
        p = Path(r["log"])
        got = res.get(r["key"]) or {
            "error": f"the script emitted no {r['key']!r}:\n"
                     + failure(log, tail)}
        out[r["key"]] = dict(got, log=p.read_text() if p.exists() else "")
    return out


def engine_result(out: dict[str, dict], key: str, tail: int = 5000) -> dict:
    """``out[key]`` of ``run_engines``, or a failure that shows the error
    and the end of that engine's log."""
    r = out[key]
    assert "error" not in r, r["error"] + "\n" + failure(r["log"], tail)
    return r
