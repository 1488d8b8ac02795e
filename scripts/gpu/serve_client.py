"""The openai client against a served model (scripts/gpu/users_check.sh):
chat and completions, streaming and not, greedy; prints each answer and
fails if one is empty.

    python scripts/gpu/serve_client.py PORT MODEL
"""

import sys

from openai import OpenAI


def main() -> int:
    port, model = sys.argv[1], sys.argv[2]
    c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
    answers = []
    for q in ["What is 12 times 7? Answer briefly.",
              "Write one sentence about the sea."]:
        r = c.chat.completions.create(
            model=model, temperature=0, max_tokens=64,
            messages=[{"role": "user", "content": q}])
        answers.append(("chat", q, r.choices[0].message.content))
    r = c.completions.create(model=model, prompt="def fibonacci(n):",
                             temperature=0, max_tokens=64)
    answers.append(("completion", "def fibonacci(n):", r.choices[0].text))
    text = "".join(ch.choices[0].delta.content or "" for ch in
                   c.chat.completions.create(
                       model=model, temperature=0, max_tokens=64, stream=True,
                       messages=[{"role": "user",
                                  "content": "Name three colors."}]))
    answers.append(("chat, streamed", "Name three colors.", text))
    for kind, q, a in answers:
        print(f"[{kind}] {q!r} -> {a!r}")
    return 0 if all(a and a.strip() for _, _, a in answers) else 1


if __name__ == "__main__":
    raise SystemExit(main())
