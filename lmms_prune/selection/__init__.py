"""Selection algorithms: pure tensor functions (scores, features, grids, budget -> sorted kept indices).

Every selector returns ``n`` unique int64 indices, ascending, on the input's device (methods.md section 5).
Nothing here knows about models, hooks or lmms-eval.
"""

from lmms_prune.selection.baselines import block_quotas, random_select, strided_grid, uniform_select
from lmms_prune.selection.budget import (
    average_kept_fraction,
    budget,
    depth_scaled_layers,
    present_stage_budget,
    stage_budgets,
    stage_ratio_for_average,
)
from lmms_prune.selection.dart import dart
from lmms_prune.selection.divprune import divprune
from lmms_prune.selection.dpp import cdpruner, dpp_greedy, instruction_relevance
from lmms_prune.selection.dycoke import decode_keep as dycoke_decode_keep
from lmms_prune.selection.dycoke import ttm_count, ttm_references, ttm_select
from lmms_prune.selection.evs import evs_dissimilarity, evs_retained_count, evs_retention_mask, evs_select
from lmms_prune.selection.fastvid import (
    anchor_counts,
    density_scores,
    dynamic_segments,
    fastvid,
    frame_query_attention,
    segment_counts,
    unit_means,
)
from lmms_prune.selection.holitom import holitom_merge, static_windows
from lmms_prune.selection.holitom import inner_merge as holitom_inner_merge
from lmms_prune.selection.merge import Merge, group_weights, merge_into_slots, merged_embeddings, visionzip
from lmms_prune.selection.mustdrop import (
    dual_attention_filter,
    mustdrop_merge,
    window_members,
    window_similarity,
)
from lmms_prune.selection.pivot_mis import (
    fused_graph,
    grid_adjacency,
    grid_neighbour_pairs,
    normalized_similarity,
    pivot_mis,
)
from lmms_prune.selection.positions import gap_positions, kept_index, restore_runs
from lmms_prune.selection.prumerge import iqr_outlier_ratio, prumerge_centres, prumerge_plus
from lmms_prune.selection.sparsevlm import adaptive_keep_count, dpc_knn, recycle, sparsevlm
from lmms_prune.selection.temporal import (
    frame_layout,
    previous_frame_similarity,
    temporal_neighbour_pairs,
    temporal_redundant,
    temporal_select,
)
from lmms_prune.selection.topk import topk, topk_union
from lmms_prune.selection.vidcom2 import frame_budgets, vidcom2_scores, vidcom2_select
from lmms_prune.selection.vispruner import remove_duplicates, vispruner
from lmms_prune.selection.vscan import global_scan, local_scan, nearest_merge, vscan_select, window_ids

__all__ = [
    "holitom_inner_merge",
    "dycoke_decode_keep",
    "ttm_select",
    "ttm_references",
    "ttm_count",
    "static_windows",
    "holitom_merge",
    "Merge",
    "adaptive_keep_count",
    "average_kept_fraction",
    "block_quotas",
    "budget",
    "cdpruner",
    "dart",
    "depth_scaled_layers",
    "divprune",
    "dpc_knn",
    "dpp_greedy",
    "evs_dissimilarity",
    "evs_retained_count",
    "evs_retention_mask",
    "evs_select",
    "anchor_counts",
    "density_scores",
    "dynamic_segments",
    "fastvid",
    "frame_query_attention",
    "segment_counts",
    "unit_means",
    "frame_layout",
    "fused_graph",
    "global_scan",
    "gap_positions",
    "restore_runs",
    "grid_adjacency",
    "grid_neighbour_pairs",
    "instruction_relevance",
    "iqr_outlier_ratio",
    "kept_index",
    "local_scan",
    "group_weights",
    "merge_into_slots",
    "merged_embeddings",
    "mustdrop_merge",
    "dual_attention_filter",
    "nearest_merge",
    "normalized_similarity",
    "pivot_mis",
    "previous_frame_similarity",
    "present_stage_budget",
    "prumerge_centres",
    "prumerge_plus",
    "random_select",
    "recycle",
    "remove_duplicates",
    "sparsevlm",
    "stage_budgets",
    "strided_grid",
    "stage_ratio_for_average",
    "temporal_neighbour_pairs",
    "temporal_redundant",
    "temporal_select",
    "topk",
    "topk_union",
    "uniform_select",
    "frame_budgets",
    "vidcom2_scores",
    "vidcom2_select",
    "window_members",
    "window_similarity",
    "vispruner",
    "visionzip",
    "vscan_select",
    "window_ids",
]
