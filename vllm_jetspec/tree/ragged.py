"""Trees in an engine's ragged token layout (pure torch, no engine import).

An engine verifies a step's trees as one flat list of ``M`` sampled rows:
request ``r`` owns rows ``cu[r]:cu[r + 1]`` (its ``n_r`` scheduled nodes,
root first, in the tree's node order), and row ``j`` is the step token
``token_index[j]``, where a request's rows are consecutive step tokens.
These helpers move between that layout and the tree core's padded
``[R, N]`` one, and build the per-step index tensors of a device-resident
round; none synchronises with the device (every size is a Python int the
caller knows on the host).
"""

from __future__ import annotations

import torch

from .types import PAD


def ragged_rows(counts: torch.Tensor, total: int) -> torch.Tensor:
    """[M] int64 request of every flat row from the per-request row counts
    ``counts`` [R] (device); ``total`` = their sum, known on the host."""
    R = counts.shape[0]
    return torch.repeat_interleave(
        torch.arange(R, device=counts.device), counts.long(),
        output_size=total)


def to_padded(flat: torch.Tensor, rows: torch.Tensor, local: torch.Tensor,
              R: int, N: int, fill: int = PAD) -> torch.Tensor:
    """[R, N] from per-row values ``flat`` [M]: ``out[rows[j], local[j]] =
    flat[j]``, ``fill`` elsewhere."""
    out = torch.full((R, N), fill, dtype=flat.dtype, device=flat.device)
    out[rows, local] = flat
    return out


def position_offsets(depth: torch.Tensor, local: torch.Tensor
                     ) -> torch.Tensor:
    """[M] what to add to the engine's positions of the verified rows: an
    engine gives a request's scheduled tokens consecutive positions
    (``prefix + local``); a tree node sits at ``prefix + depth``.
    ``depth`` [M]: the depth of each row's node (0 for padding nodes,
    which then share the root's position)."""
    return depth.long() - local.long()


def path_first_gather(token_index: torch.Tensor, local: torch.Tensor,
                      rows: torch.Tensor, perm: torch.Tensor,
                      num_tokens: int) -> torch.Tensor:
    """[num_tokens] int64 gather index over a step's tokens that puts each
    request's accepted path first: its row ``k`` takes node ``perm[r, k]``
    (``perm`` [R, N] from acceptance: the kept path by depth, then the
    other nodes; a permutation of each request's rows). Tokens outside the
    verified rows map to themselves. After it, a drafter reads a request's
    first ``num_accepted + 1`` tokens as its kept sequence, as after a
    chain."""
    idx = torch.arange(num_tokens, device=token_index.device)
    src = token_index - local.long() + perm[rows, local.long()]
    idx[token_index] = src
    return idx
