"""Why so few parameters suffice: low-rank approximation, the rank of fine-tuning updates,
subspace similarity, intrinsic dimension and adapter combination (``lowrank analyze``).

    svd          truncated SVD W ≈ B·C, storage and Eckart–Young error, choose_rank
    spectrum     stable / effective rank of ΔW, captured fraction at rank r
    similarity   the LoRA paper's φ(i, j) grid between two adapters
    intrinsic    θ = θ₀ + P z training (SubspaceModel), d90
    fastfood     the O(D log D) random projection for large D
    combine      add_weighted_adapter with "cat" (exact) and "svd"

The ``lowrank analyze`` command that reports all of these is ``lowrank/app/analyze.py``.
"""
from .combine import add_weighted_adapter
from .fastfood import Fastfood, fwht
from .intrinsic import DenseProjection, SubspaceModel, d90, intrinsic_sweep, make_projection
from .similarity import similarity_grid, subspace_similarity, top_directions
from .spectrum import captured_fraction, effective_rank, full_deltas, lora_deltas, spectrum_rows, stable_rank
from .svd import LowRankApprox, choose_rank, singular_values, truncated_svd

__all__ = ["add_weighted_adapter", "Fastfood", "fwht", "DenseProjection", "SubspaceModel", "d90",
           "intrinsic_sweep", "make_projection", "similarity_grid", "subspace_similarity", "top_directions",
           "captured_fraction", "effective_rank", "full_deltas", "lora_deltas", "spectrum_rows", "stable_rank",
           "LowRankApprox", "choose_rank", "singular_values", "truncated_svd"]
