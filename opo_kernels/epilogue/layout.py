"""The epilogue's fixed layout: workspace rows, value-check counters, parameters, metrics.

Shared by the kernel files of this package and by the launcher; the row kernels read
1/temperature from the same parameter tensor (``row_kernels.INV_TEMPERATURE``)."""

import triton.language as tl

# per-sequence rows of the [NUM_WS, B] workspace: phase-1 sums over the tokens ...
W_COUNT = tl.constexpr(0)         # n_s, counted tokens
W_DELTA = tl.constexpr(1)         # Σ Δ_t
W_LP = tl.constexpr(2)            # Σ lp_t
W_REF = tl.constexpr(3)           # Σ ref_t
W_KL = tl.constexpr(4)            # Σ k3_t
W_ENT = tl.constexpr(5)           # Σ H_t
W_V = tl.constexpr(6)             # Σ v_t (token-level coordinates)
W_V2 = tl.constexpr(7)            # Σ v_t²
# ... then phase-2 values per sequence
W_GROUP_SIZE = tl.constexpr(8)    # non-empty sequences in its group
W_GROUP_MEAN_R = tl.constexpr(9)  # its group's mean reward (non-empty members)
W_FIRST = tl.constexpr(10)        # 1 for the first non-empty member of a group (counts M)
W_Q_LOGIT = tl.constexpr(11)      # r/reward_temperature (or the scaled advantage)
W_SCORE = tl.constexpr(12)        # u = clamp(clamp(δ)/τ): p̃'s logit
W_LOG_Q = tl.constexpr(13)        # log Q; also scratch before (variance) and after (ω)
W_LOG_P = tl.constexpr(14)        # log p̃
W_LSE_U = tl.constexpr(15)        # logsumexp of u over the group (the Z-loss)
W_OMEGA = tl.constexpr(16)        # ω
NUM_WS = 17

# value-check counters (docs/spec.md "Bad input and edge cases"), in this order
ERRORS = ("labels", "seq_ids", "rewards", "ref_logprobs", "logits", "weights", "mask",
          "logprobs", "entropy", "loss")  # loss: finite inputs, non-finite loss or coefficients
# the message of the last one, shared by both backends
NONFINITE_LOSS = (
    "the loss or its gradient is not finite although the inputs are: most often large "
    "log-ratios overflow the weights or the ratio coordinates (docs/spec.md, \"Large "
    "log-ratios: overflow\": bound them with delta_clip / score_clip, coordinates='log' or "
    "level='sequence_mean'); else rewards / reward_temperature or 1 / tau beyond float range")
NUM_ERR = 16  # padded to a power of two
# params: the float hyperparameters, read from a device tensor (no recompile when they change),
# followed by 1/temperature at index 11
PARAMS = ("alpha", "mu", "tau", "tau_min", "tau_max", "reward_temperature", "entropy_coef",
          "delta_clip", "score_clip", "direction_scale", "logit_reg_coef")
# outputs: metrics in this order (entropy_mean last, when known)
METRICS = ("log_ratio_mean", "kl_k3", "v_mean", "omega_mean", "omega_max", "tau", "penalty",
           "entropy_mean")
# level / weights codes
LEVEL = {"sequence": 0, "sequence_mean": 1, "token": 2}
WEIGHTS = {"seed": 0, "escort": 1, "tensor": 2}
