"""Heads shipped with the package (DFlash checkpoint format, see
``vllm_jetspec.head``). Each lives in its own directory with a model card
(README.md)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_HEAD = "smollm2-135m-instruct"


def shipped_head_dir(name: str = DEFAULT_HEAD) -> Path:
    """Directory of a shipped head; raises if it is not in this build."""
    path = Path(__file__).parent / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no shipped head {name!r} in {path.parent}; pass --head DIR "
            "(train one with `python -m vllm_jetspec.tools.train`)")
    return path
