"""The argument checks of ``fused_linear_opo_loss`` (``fused_linear_opo.py``): the LM-head
tensors, the chunk sizes, the options, the batch (``inputs.prepare`` on a stand-in for the
logits), and with a process group the same checks agreed by every rank
(``tensor_parallel.prepare_together``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .config import OPOLossConfig, config_from_options
from .inputs import Batch, check_tensor, prepare
from .linear_rows import counted_rows
from .tensor_parallel import prepare_together
from .utils import host_int, wants_grad
from .validation import read_pending
from .vocab_parallel import require_fused_kernels


def check_linear(hidden, weight, bias) -> None:
    """The LM-head arguments (docs/spec.md "Bad input": name the argument and the shapes)."""
    check_tensor("hidden", hidden, kind="stream")
    check_tensor("weight", weight, kind="stream")
    if bias is not None:
        check_tensor("bias", bias, kind="stream")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] (padded) or [N, H] (packed), got shape "
                         f"{list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V, H] with V >= 1, got shape {list(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {list(weight.shape)} but hidden "
                         f"{list(hidden.shape)} has hidden size H={hidden.shape[-1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V]=[{weight.shape[0]}] like weight "
                         f"{list(weight.shape)}, got {list(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype} "
                            "(the logits are computed in the input dtype)")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def check_chunk_size(chunk_size) -> Optional[int]:
    """chunk_size as an int (a NumPy integer too, as group_size), or None."""
    if chunk_size is None:
        return None
    rows = host_int(chunk_size, 1)
    if rows is None:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return rows


def linear_config(options) -> OPOLossConfig:
    cfg = config_from_options(options)
    if cfg.inplace_backward:
        raise ValueError("inplace_backward does not apply: the fused-linear backward "
                         "always writes into its own chunk buffer")
    if cfg.grad_to_base:
        raise ValueError("grad_to_base does not apply: the fused-linear loss takes hidden "
                         "states, not logits")
    if cfg.vocab_parallel_one_pass:
        raise ValueError("vocab_parallel_one_pass applies to vocabulary-parallel logits; the "
                         "fused-linear loss forms the on-policy gradient in one pass already")
    return cfg


def prepare_linear(hidden, weight, bias, labels, ref_logprobs, rewards, cfg: OPOLossConfig,
                   **layout) -> Batch:
    """``inputs.prepare`` for hidden states: checks hidden/weight/bias, then the usual checks
    on a zero-stride stand-in for the logits [..., V] (never read, no memory). An earlier
    deferred call's error is raised first, as it is (not as one about these logits)."""
    if cfg.validate:
        read_pending()
    check_linear(hidden, weight, bias)
    stand_in = hidden.new_empty(()).expand(*hidden.shape[:-1], weight.shape[0])
    try:
        return prepare(stand_in, labels, ref_logprobs, rewards, config=cfg, **layout)
    except (TypeError, ValueError) as err:  # messages speak of logits: say which ones
        raise type(err)(f"{err} (logits = hidden @ weight.T: hidden {list(hidden.shape)}, "
                        f"weight {list(weight.shape)})") from None


def prepare_parallel(hidden, weight, bias, labels, ref_logprobs, rewards, cfg, group,
                     vocab_start, reduce_hidden_grad, chunk_size, logits_budget, layout,
                     one_phase: bool):
    """Checks of a vocabulary-parallel call, agreed by every rank (see tensor_parallel).
    Returns (rows, hidden_c, tp, widest): the counted rows are found on each rank before the
    agreement, which compares the rows' count, mask / seq_ids and the counted rows of hidden
    (with validate=True), so that every rank multiplies the same rows. one_phase (the
    on-policy one-phase mode) is agreed too: it runs collectives per chunk, the two phases
    one per call, and a rank under no_grad would take the two phases."""
    found = {}

    def checked():
        if not isinstance(reduce_hidden_grad, bool):
            raise TypeError(f"reduce_hidden_grad must be a bool, got {reduce_hidden_grad!r}")
        batch = prepare_linear(hidden, weight, bias, labels, ref_logprobs, rewards, cfg,
                               **layout)
        require_fused_kernels(cfg, batch)
        found["rows"] = rows = counted_rows(batch, cfg.validate)
        found["hidden_c"] = rows.gather(hidden.detach())
        # the caller's mask / seq_ids decide the rows: compared as passed
        found["agree"] = {"hidden": found["hidden_c"], "mask": batch.mask,
                          "seq_ids": batch.seq_ids}
        return rows.batch

    vocab_local = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() else 0
    batch, start, widest = prepare_together(
        group, checked, vocab_local, vocab_start, cfg,
        # hidden's gradient is all-reduced in backward: a rank without it would skip that
        agree={"chunk_size": chunk_size, "logits_budget": logits_budget,
               "reduce_hidden_grad": reduce_hidden_grad, "one-phase mode": one_phase,
               "hidden's gradient wanted": isinstance(hidden, torch.Tensor)
               and wants_grad(hidden)},
        # every rank's slice of the logits is hidden @ its weight
        agree_tensors=lambda: found["agree"])
    rows = dataclasses.replace(found["rows"], batch=batch)  # (the global vocabulary)
    return rows, found["hidden_c"], (group, start, reduce_hidden_grad), widest
