"""The epilogue of the fused OPO loss as ONE Triton launch: from per-token log-probs to the loss,
the metrics and the per-sequence gradient coefficients (docs/spec.md "Per sequence" to
"The gradient").

Grid: one program per (block of BLOCK_S sequences, chunk of tokens) (kernel.py ``_chunks``:
chunks of 8 loop iterations, at most 64 of them).
  phase 1 (every program): its sequences' sums over the counted tokens of its chunk — n_s,
           Σ Δ, Σ lp, Σ ref, Σ k3, Σ H, Σ v_t, Σ v_t² — into its slice of a [chunks, 8, B]
           workspace (padded: positions of the sequence's own row of [B, T]; packed: a scan of
           the chunk's seq_ids, one-hot against the block), and the value checks of docs/spec.md
           "Bad input and edge cases" as integer counts.
  phase 2 (the last program to finish, found with an integer atomic ticket): the chunks' sums
           added in chunk order, then groups, τ, Q,
           p̃, ω, v, the loss and the metrics, and per sequence s the coefficients
           (a_s, z_s) from which every token's c_t = ∂L/∂lp_t follows (row_kernels.token_coef):
               c_t = (a_s + b·v_t)·f_t + z_s         (level "token": v_t, f_t = dv_t/dΔ_t)
               c_t = a_s                              (sequence levels)
No floating-point atomics and a fixed summation order: the results are bitwise deterministic.
No host sync: the value checks are counts read by the caller only when it validates.

Group statistics (counts, means, softmaxes) are reductions over tiles of "same group" pairs:
within [s − K, s + K] for group_size = K, over all pairs for group_ids (O(B²) work in one
program: ~B²/1024 tiles per pass, small next to the logits passes at the batch sizes of RL
steps; group_size is the faster layout for very large B).

Closed forms of the gradient (ω, τ, p̃, Q constant; docs/spec.md "The gradient"), with
δ̂ = clamp(δ, ±delta_clip), u = clamp(δ̂/τ, ±score_clip), v = v(δ), v̂ = v(δ̂), D = direction_scale:
  ∂L/∂δ_s = −D·ω_s·v'(δ_s)/M + μ·v̂_s·v'(δ̂_s)·1[δ unclipped]/B' + ∂Z/∂δ_s
  ∂Z/∂δ_s = 2λ·Z̄·p̃_s/(M·τ)·1[u unclipped]·1[δ unclipped],   Z̄ = mean over groups of lse_g(u)
  level "sequence": a_s = ∂L/∂δ_s; "sequence_mean": a_s = ∂L/∂δ_s / n_s (z_s = 0)
  level "token": a_s = −D·ω_s/(M·n_s), b = μ/N', z_s = ∂Z/∂δ_s / n_s
with v'(δ) = e^δ ("ratio") or 1 ("log"); clamps pass the gradient at their bounds
(torch.clamp's convention). ∂L/∂H_t = −β/N' for the entropy bonus.
"""


from .kernel import (
    EpilogueOut,
    Mode,
    epilogue_kernel,
    metric_keys,
    params_tensor,
    raise_bad_values,
    unpack_metrics,
)
from .launch import EpilogueLaunch, new_epilogue_out, run_epilogue
from .layout import ERRORS, METRICS, NUM_ERR, PARAMS

__all__ = ["ERRORS", "METRICS", "NUM_ERR", "PARAMS", "EpilogueLaunch", "EpilogueOut", "Mode",
           "epilogue_kernel", "metric_keys", "new_epilogue_out", "params_tensor",
           "raise_bad_values", "run_epilogue", "unpack_metrics"]
