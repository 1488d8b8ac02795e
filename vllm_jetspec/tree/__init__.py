"""Engine-agnostic JetSpec tree core: construction, verification masks,
acceptance and KV compaction plans. Pure torch; never imports an engine."""

from .accept import accept, accept_greedy, compaction_plan
from .build import (LAYOUTS, MAX_BUDGET, TREE_ALGOS, build_tree, top2gap_fanout,
                    truncate_tree)
from .masks import (ancestor_mask, pack_mask, packed_ancestor_mask,
                    positions, unpack_mask)
from .sampling import apply_top_k_top_p, sample_nodes, sample_target_tokens
from .types import PAD, Acceptance, CompactionPlan, DraftTree

__all__ = [
    "PAD", "LAYOUTS", "MAX_BUDGET", "TREE_ALGOS", "Acceptance", "CompactionPlan",
    "DraftTree", "accept", "accept_greedy", "ancestor_mask",
    "apply_top_k_top_p", "build_tree", "compaction_plan", "pack_mask",
    "packed_ancestor_mask", "positions", "sample_nodes",
    "sample_target_tokens",
    "top2gap_fanout", "truncate_tree", "unpack_mask",
]
