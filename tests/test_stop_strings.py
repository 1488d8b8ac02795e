"""Stop strings over steps of several tokens (``vllm_patches/stop_strings.py``):
a step's tokens give the text, stop string and token ids that plain decoding
(one token a step, vLLM's own ``update``) gives. The engine-level check
(served answers equal to no-spec, no token ids past a stop string) is the
soak's (``tests/test_soak.py``)."""

from __future__ import annotations

import random
from types import SimpleNamespace

from vllm import SamplingParams
from vllm.v1.engine.detokenizer import BaseIncrementalDetokenizer

from vllm_jetspec.vllm_patches import apply

apply()
# Token id -> text. Several stop strings inside one token, stop strings that
# span tokens, and tokens of several characters.
PIECES = ["Hi", " there", ".", "\n", "\n\n", "The", "e", " a", "b",
          "ab", "x", ":", " and", "e\n", "Th"]


class TableDetokenizer(BaseIncrementalDetokenizer):
    """vLLM's detokenizer logic over a fixed id -> text table (no
    tokenizer needed)."""

    def decode_next(self, next_token_id: int) -> str:
        return PIECES[next_token_id]


def make(stop, include=False, min_tokens=0):
    params = SamplingParams(stop=stop, include_stop_str_in_output=include,
                            min_tokens=min_tokens, max_tokens=64)
    return TableDetokenizer(SimpleNamespace(sampling_params=params,
                                            request_id="r",
                                            prompt_token_ids=[0]))


def run(d, steps, eos_last=False):
    """Feed ``steps`` (lists of ids) as the output processor does; returns
    (stop string, text, output token ids, ids each step handed on)."""
    handed = []
    for k, step in enumerate(steps):
        ids = list(step)
        found = d.update(ids, eos_last and k == len(steps) - 1)
        handed.append(ids)
        if found is not None:
            return found, d.get_next_output_text(True, False), \
                list(d.output_token_ids), handed
    return None, d.get_next_output_text(True, False), \
        list(d.output_token_ids), handed


def test_first_stop_string_in_the_text_wins_over_list_order():
    # stop ["e", "\n"], a step adding ".\n\nThe": plain decoding stops at
    # the "\n" (soak request 755 on the H200, 2026-12-03).
    ids = [0, 2, 3, 3, 5]
    one = run(make(["e", "\n"]), [[i] for i in ids])
    chunk = run(make(["e", "\n"]), [ids[:1], ids[1:]])
    assert one[0] == chunk[0] == "\n"
    assert one[1] == chunk[1] == "Hi."
    assert one[2] == chunk[2] == [0, 2, 3]
    # The step's list itself lost the tokens past the stop string.
    assert chunk[3][-1] == [2, 3]


def test_steps_equal_one_token_at_a_time():
    rng = random.Random(0)
    stops_pool = ["e", "\n", ".", " and", "ab", "Th", ":", "e\n\n", "x"]
    for case in range(400):
        n = rng.randint(1, 24)
        ids = [rng.randrange(len(PIECES)) for _ in range(n)]
        stop = rng.sample(stops_pool, rng.randint(1, 3))
        include = rng.random() < 0.3
        min_tokens = rng.choice([0, 0, 2, 5])
        eos = rng.random() < 0.2
        cuts, i = [], 0
        while i < n:
            k = rng.randint(1, 6)
            cuts.append(ids[i:i + k])
            i += k
        one = run(make(stop, include, min_tokens), [[t] for t in ids], eos)
        chunk = run(make(stop, include, min_tokens), cuts, eos)
        assert one[:3] == chunk[:3], (case, ids, stop, include, min_tokens,
                                      cuts)
        # Token ids handed on per step add up to the output's.
        assert sum(chunk[3], []) == chunk[2]


def test_steps_of_one_token_and_no_stop_strings_are_vllms_own():
    # No stop strings: vLLM's update takes the whole step.
    d = make(None)
    ids = [0, 2, 3, 5]
    assert d.update(ids, False) is None and ids == [0, 2, 3, 5]
    assert d.get_next_output_text(True, False) == "Hi.\nThe"
