"""Replay mode's pure parts: the file, the window after an anchor, and the
top-K rewrite that puts the recorded token first (vllm_jetspec.replay)."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_jetspec.replay import force_top1, load_replay, save_replay
from vllm_jetspec.tree import build_tree


def test_file_round_trip_and_bad_files(tmp_path):
    p = tmp_path / "r.json"
    save_replay(str(p), [[1, 2], [3]], [[4, 5, 6], [7]])
    assert load_replay(str(p)) == {(1, 2): [1, 2, 4, 5, 6], (3,): [3, 7]}
    with pytest.raises(ValueError, match="does not exist"):
        load_replay(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_replay(str(tmp_path / "bad.json"))
    (tmp_path / "fmt.json").write_text(json.dumps({"sequences": []}))
    with pytest.raises(ValueError, match="format"):
        load_replay(str(tmp_path / "fmt.json"))
    (tmp_path / "neg.json").write_text(json.dumps(
        {"format": "jetspec-replay-v1",
         "sequences": [{"prompt": [1], "output": [-3]}]}))
    with pytest.raises(ValueError, match="token ids"):
        load_replay(str(tmp_path / "neg.json"))


def test_force_top1():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 6, generator=g).log_softmax(-1).sort(-1,
                                                               True).values
    ids = torch.stack([torch.randperm(50, generator=g)[:6]
                       for _ in range(4)])
    rep = torch.tensor([int(ids[0, 3]), 99, -1, int(ids[3, 0])])
    v, i = force_top1(logp, ids, rep)
    # Row 0: the token moves to the front, the others keep their order.
    assert i[0].tolist() == [int(ids[0, 3])] + [
        int(x) for j, x in enumerate(ids[0]) if j != 3]
    assert v[0, 0] == 0 and torch.equal(v[0, 1:], logp[0, [0, 1, 2, 4, 5]])
    # Row 1: a new token in front, the last candidate dropped.
    assert i[1].tolist() == [99] + ids[1, :5].tolist()
    assert torch.equal(v[1, 1:], logp[1, :5])
    # Row 2 untouched; row 3 already first: same ids, log-prob 0.
    assert torch.equal(i[2], ids[2]) and torch.equal(v[2], logp[2])
    assert torch.equal(i[3], ids[3]) and v[3, 0] == 0


@pytest.mark.parametrize("algo", ["accum_logp", "chain"])
def test_replayed_branch_is_in_every_tree(algo):
    """With the recorded tokens at log-prob 0 the recorded branch is in the
    tree as deep as the budget allows (min(budget - 1, depth) nodes)."""
    g = torch.Generator().manual_seed(1)
    D, K = 6, 5
    logp = torch.randn(D, K, generator=g).log_softmax(-1).sort(-1,
                                                               True).values
    ids = torch.randint(0, 40, (D, K), generator=g)
    rec = torch.randint(40, 60, (D,), generator=g)
    v, i = force_top1(logp, ids, rec)
    for budget in (3, D + 1, 24):
        t = build_tree(v[None], i[None], torch.tensor([7]), budget,
                       algo=algo, width=K)
        node, found = 0, []
        for d in range(min(budget - 1, D)):
            kids = [j for j in range(int(t.num_nodes[0]))
                    if int(t.parents[0, j]) == node
                    and int(t.tokens[0, j]) == int(rec[d])]
            assert len(kids) == 1, (budget, d)
            node = kids[0]
            found.append(node)
        assert len(found) == min(budget - 1, D)
