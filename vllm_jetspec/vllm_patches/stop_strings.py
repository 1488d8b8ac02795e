"""Stop strings over a step of several tokens, as plain decoding sees them.

vLLM's front end checks stop strings once per engine step, over the text of
all the tokens the step added, trying the stop strings in the order the
request lists them (``vllm.v1.engine.detokenizer.check_stop_strings``). In
plain decoding a step adds one token, so the first stop string to appear in
the text is the one found. A speculative step adds several: with
``stop=["e", "\\n"]`` and a step adding ``".\\n\\nThe"``, vLLM stops at the
"e" (listed first) although the "\\n" came earlier, and returns the
newlines and "Th" that plain decoding never produces (H200 soak,
2026-12-03, request 755; docs/soak.md). It also keeps the step's token ids
past the stop string in the output.

The wrapper below feeds a step's tokens to vLLM's own ``update`` one at a
time and stops at the first token that completes a stop string, so the
text, the stop string, the finish reason and the token ids are those of
plain decoding; the tokens past it are dropped from the step's list (the
output processor hands that same list to the request's output). Steps of
one token, and requests without stop strings, go straight to vLLM's
``update`` unchanged.
"""

from __future__ import annotations

from typing import Callable


def patched_update(orig: Callable) -> Callable:
    def update(self, new_token_ids: list[int],
               stop_terminated: bool) -> str | None:
        if len(new_token_ids) <= 1 or not getattr(self, "stop", None):
            return orig(self, new_token_ids, stop_terminated)
        n = len(new_token_ids)
        for i in range(n):
            last = i == n - 1
            # stop_terminated (an EOS or stop token id ends the step) is
            # about the step's last token only.
            found = orig(self, new_token_ids[i:i + 1],
                         stop_terminated and last)
            if found is not None:
                if not last:
                    # The caller's list: the request's output takes its
                    # token ids from it.
                    del new_token_ids[i + 1:]
                return found
        return None

    update._jetspec_wrapped = True
    return update


def apply() -> None:
    from vllm.v1.engine.detokenizer import BaseIncrementalDetokenizer
    orig = BaseIncrementalDetokenizer.update
    if not getattr(orig, "_jetspec_wrapped", False):
        BaseIncrementalDetokenizer.update = patched_update(orig)
