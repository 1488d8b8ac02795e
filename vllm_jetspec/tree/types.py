"""Batched draft-tree and acceptance containers (pure torch, no engine import).

Conventions shared by the whole tree core:
- ``R`` requests, ``N`` node slots per request (the budget, root included),
  ``D`` draft depth, ``K`` tree width (top-K per depth), ``V`` vocabulary.
- Node 0 of every request is the root: the anchor token, i.e. the last token
  the target emitted, whose KV is computed by the verify forward together with
  the draft nodes.
- Valid nodes occupy slots ``[0, num_nodes)``; they are in topological order
  (a parent always precedes its children): sorted by depth, or best first
  (``build_tree(layout="best_first")``, whose every prefix is a tree). Slots past
  ``num_nodes`` are padding: token -1, parent -1, depth -1, cum_logp -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = -1


@dataclass
class DraftTree:
    # [R, N] int64: token of each node; node 0 holds the anchor token.
    tokens: torch.Tensor
    # [R, N] int64: index of the parent node; -1 for the root and padding.
    parents: torch.Tensor
    # [R, N] int64: depth (root 0) = position offset from the anchor; -1 pad.
    depth: torch.Tensor
    # [R, N] float32: cumulative draft log-prob of the node's path (root 0).
    cum_logp: torch.Tensor
    # [R] int64: valid nodes per request, root included (1 <= n <= N).
    num_nodes: torch.Tensor
    # Static upper bound on any node's depth (a Python int, so loops over
    # depth need no device->host synchronisation).
    max_depth: int

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_nodes(self) -> int:
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def valid(self) -> torch.Tensor:
        """[R, N] bool: which slots hold real nodes."""
        ar = torch.arange(self.max_nodes, device=self.device)
        return ar[None, :] < self.num_nodes[:, None]

    def to(self, device: torch.device | str) -> "DraftTree":
        return DraftTree(
            tokens=self.tokens.to(device),
            parents=self.parents.to(device),
            depth=self.depth.to(device),
            cum_logp=self.cum_logp.to(device),
            num_nodes=self.num_nodes.to(device),
            max_depth=self.max_depth,
        )

    @classmethod
    def make_dummy(cls, batch_size: int, max_nodes: int,
                   device: torch.device | str = "cpu") -> "DraftTree":
        """A batch of root-only trees with the shapes of real ones."""
        tokens = torch.full((batch_size, max_nodes), PAD, dtype=torch.long,
                            device=device)
        tokens[:, 0] = 0
        parents = torch.full_like(tokens, PAD)
        depth = torch.full_like(tokens, PAD)
        depth[:, 0] = 0
        cum = torch.full((batch_size, max_nodes), float("-inf"), device=device)
        cum[:, 0] = 0.0
        num = torch.ones(batch_size, dtype=torch.long, device=device)
        return cls(tokens, parents, depth, cum, num, max_depth=0)

    def validate(self, layout: str = "depth") -> None:
        """Check every invariant; raises ``ValueError`` naming the first
        violation. ``layout``: ``"depth"`` also checks the nodes are sorted
        by depth, ``"best_first"`` that they are sorted by cumulative
        log-prob. Synchronises with the device: for tests and debugging."""
        R, N = self.tokens.shape
        for name in ("parents", "depth", "cum_logp"):
            if getattr(self, name).shape != (R, N):
                raise ValueError(f"{name} has shape "
                                 f"{tuple(getattr(self, name).shape)}, "
                                 f"expected {(R, N)}")
        if self.num_nodes.shape != (R,):
            raise ValueError("num_nodes must have shape [R]")
        tokens = self.tokens.cpu()
        parents = self.parents.cpu()
        depth = self.depth.cpu()
        cum = self.cum_logp.cpu()
        num = self.num_nodes.cpu()
        for r in range(R):
            n = int(num[r])
            if not 1 <= n <= N:
                raise ValueError(f"request {r}: num_nodes {n} not in [1, {N}]")
            if parents[r, 0] != PAD or depth[r, 0] != 0:
                raise ValueError(f"request {r}: node 0 is not a root")
            if (tokens[r, n:] != PAD).any() or (parents[r, n:] != PAD).any() \
                    or (depth[r, n:] != PAD).any():
                raise ValueError(f"request {r}: padding slots not cleared")
            seen: set[tuple[int, int]] = set()
            for i in range(1, n):
                p = int(parents[r, i])
                if not 0 <= p < i:
                    raise ValueError(f"request {r}: node {i} has parent {p}"
                                     " that does not precede it")
                if depth[r, i] != depth[r, p] + 1:
                    raise ValueError(f"request {r}: node {i} depth "
                                     f"{int(depth[r, i])} != parent depth + 1")
                if int(depth[r, i]) > self.max_depth:
                    raise ValueError(f"request {r}: node {i} deeper than "
                                     f"max_depth {self.max_depth}")
                if layout == "depth" and i > 1 and \
                        depth[r, i] < depth[r, i - 1]:
                    raise ValueError(f"request {r}: nodes not sorted by depth")
                if layout == "best_first" and i > 1 and \
                        cum[r, i] > cum[r, i - 1]:
                    raise ValueError(f"request {r}: nodes not sorted best "
                                     "first")
                if tokens[r, i] < 0:
                    raise ValueError(f"request {r}: node {i} has no token")
                key = (p, int(tokens[r, i]))
                if key in seen:
                    raise ValueError(f"request {r}: duplicate sibling token "
                                     f"{key[1]} under node {p}")
                seen.add(key)
                if cum[r, i] > cum[r, p]:
                    raise ValueError(f"request {r}: node {i} has a higher "
                                     "cumulative log-prob than its parent")


@dataclass
class Acceptance:
    """What one verify step keeps, per request. ``L = max_depth + 1``."""

    # [R] int64: accepted draft nodes (depth of the deepest matching node).
    # Tokens emitted this step = num_accepted + 1 (the bonus token).
    num_accepted: torch.Tensor
    # [R, L] int64: emitted tokens, accepted path first, bonus token at
    # index num_accepted; -1 after it.
    tokens: torch.Tensor
    # [R, L] int64: node indices of the kept path, root first (index d holds
    # the path node at depth d); -1 after num_accepted.
    path_nodes: torch.Tensor
    # [R] int64: the deepest accepted node (0 = root only).
    last_node: torch.Tensor

    @property
    def num_emitted(self) -> torch.Tensor:
        return self.num_accepted + 1


@dataclass
class CompactionPlan:
    """KV moves after acceptance. Node ``i`` of a request was written to KV
    slot ``prefix_len + i``; the kept path must end at ``prefix_len + d`` for
    depth ``d``. Moves in increasing ``dst`` order are safe in place, since
    ``dst <= src`` and a later move's source lies past every earlier
    destination (nodes are in topological order: the path node at depth
    ``d`` sits at index ``>= d``)."""

    # [R, L] int64: node slot to copy from (offset from the anchor's slot);
    # -1 where nothing moves.
    src: torch.Tensor
    # [R, L] int64: slot to copy to (offset from the anchor's slot); -1 where
    # nothing moves.
    dst: torch.Tensor
    # [R] int64: slots kept after the prefix (= num_accepted + 1).
    num_kept: torch.Tensor
