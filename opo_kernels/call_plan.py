"""What a call of the fused loss derives from its inputs' metadata, computed once per call
signature: the flags, the launches (geometry, launch config, grid) and the layout of the one
workspace that holds the small outputs and the scratch.

A training loop calls the loss with the same shapes, strides, dtypes, devices and options
step after step (or with a handful of them); each such signature gets one ``CallPlan``
(eager calls: fused_opo.py keeps them by ``call_key``). The key holds everything that changes
what the call computes or launches, so a call with a different dtype, shape, stride, device
or option misses and builds (and validates) its own. Nothing about the tensors' values is
kept: the tensors themselves come with each call. Under torch.compile the custom ops launch
through the per-call launchers instead (``forward_rows``, ``run_epilogue``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, NamedTuple, Optional

import torch

from .config import OPOLossConfig
from .epilogue import METRICS, NUM_ERR, EpilogueLaunch, Mode, params_tensor
from .inputs import Batch, compute_dtype
from .row_launch import (
    BackwardLaunch,
    ForwardLaunch,
    Rows,
    ScaleLaunch,
    _logits_geometry,
    small_geometry,
)
from .utils import new_output, one_pass_mode, wants_grad

_ALIGN = 4  # workspace pieces start at multiples of 4 elements (16 bytes or more)
_MAX_PLANS = 64  # signatures remembered (a loop has a few; a bound keeps memory flat)


class Flags(NamedTuple("FlagFields", [(name, int) for name in (
        *Mode._fields, "with_entropy", "validate", "group_size", "num_seqs")])):
    """Everything the passes branch on, as ints (the custom ops take them as an int list): the
    epilogue's Mode fields (taken from Mode, so that a field added there cannot shift these),
    then with_entropy, validate (1 when the value checks run, deferred or not), group_size
    (0 = group_ids) and B."""

    __slots__ = ()

    @classmethod
    def of(cls, cfg: OPOLossConfig, batch: Batch) -> List[int]:
        # the list itself, not cls(...): torch 2.4's Dynamo cannot build this class in a trace
        return [*Mode.of(cfg, batch.weights is not None), int(cfg.with_entropy),
                int(bool(cfg.validate)), batch.group_size or 0, batch.num_seqs]

    @property
    def mode(self) -> Mode:
        return Mode(*self[:len(Mode._fields)])


def batch_of(logits, labels, ref, mask, seq_ids, rewards, group_ids, weights,
             group_size: int) -> Batch:
    """The Batch of already checked tensors (inside the ops)."""
    return Batch(logits=logits, labels=labels, ref_logprobs=ref, mask=mask, seq_ids=seq_ids,
                 rewards=rewards, group_size=group_size or None, group_ids=group_ids,
                 weights=weights, vocab=logits.shape[-1],
                 seq_len=labels.shape[1] if labels.dim() == 2 else None,
                 num_rows=labels.numel(), compute_dtype=compute_dtype(logits.dtype))


def _like(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A tensor on the meta device with t's shape, strides and dtype (no data, no memory)."""
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _meta(t: Optional[torch.Tensor]):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


_CONFIG_IDS: Dict[tuple, int] = {}
_NEW_ID = itertools.count()


def config_id(cfg: OPOLossConfig) -> int:
    """One int per distinct config value, remembered on the config: every field but a weights
    tensor (its shape, strides, dtype and device are keyed beside it, its values read by each
    call), so that equal configs made afresh (one per step holding that step's weights
    tensor, or ``cfg.replace(...)`` in a loop) share their plan. A config with a value that
    cannot be hashed gets an id of its own."""
    cid = cfg.__dict__.get("_plan_id")
    if cid is None:
        weights = cfg.weights if type(cfg.weights) is str else None
        values = (*[getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.compare],
                  weights)
        try:
            cid = _CONFIG_IDS.get(values)
            if cid is None:
                if len(_CONFIG_IDS) >= 4 * _MAX_PLANS:  # bounded; ids are never reused
                    _CONFIG_IDS.clear()
                cid = _CONFIG_IDS[values] = next(_NEW_ID)
        except TypeError:  # an unhashable value
            cid = next(_NEW_ID)
        object.__setattr__(cfg, "_plan_id", cid)  # (a frozen dataclass)
    return cid


def call_key(logits, labels, ref, rewards, mask, seq_ids, group_size, group_ids,
             cfg: OPOLossConfig) -> Optional[tuple]:
    """The signature of an ``opo_loss`` call: the config's value (``config_id``), the group
    size (a plain int or None; any other type, e.g. a 0-dim tensor, gets no plan: None), and
    the shape, strides, dtype and device of every tensor, a weights tensor's included (the
    ones every call has read inline: this runs on every call). Raises AttributeError when an
    argument is not a tensor (the caller then runs the full checks, which name it)."""
    if group_size is not None and type(group_size) is not int:
        return None
    weights = cfg.weights if type(cfg.weights) is not str else None
    # on-policy, whether a gradient is wanted decides the mode (``one_pass_mode``)
    return (config_id(cfg), group_size, ref is None and wants_grad(logits),
            logits.shape, logits.stride(), logits.dtype, logits.device,
            labels.shape, labels.stride(), labels.dtype, labels.device,
            rewards.shape, rewards.stride(), rewards.dtype, rewards.device,
            _meta(ref), _meta(mask), _meta(seq_ids), _meta(group_ids), _meta(weights))


class Scratch(NamedTuple):
    """One forward call's small tensors: three allocations (``CallPlan.scratch``).

    floats: the per-row log-probs, statistics and entropy, the epilogues' scratch and their
    metrics, coef and scal, at the offsets the plan gives its launches (``CallPlan._set_offsets``);
    ints: the zeroed int32 workspace (the value check counts first, then the epilogues'
    tickets and per-program counts); loss: the 0-dim loss, a tensor of its own (the caller may
    modify it in place)."""

    floats: torch.Tensor
    ints: torch.Tensor
    loss: torch.Tensor


class _Layout:
    """Pieces of one flat allocation, each starting at a multiple of _ALIGN elements (16
    bytes or more). sizes: one per named piece, None for a piece the call does not have;
    ``at[k]``: where piece k starts, in units of _ALIGN elements (what the kernels take:
    row_kernels._AT_ARGS), 0 for an absent piece; ``start[k]``: the same in elements (None
    for an absent piece); ``total``: the allocation's size. No piece is a tensor of its own:
    the kernels get the allocation and these offsets (a view costs ~1 µs of host time to
    make and free, on every call)."""

    def __init__(self, sizes: List[Optional[int]]):
        self.start, position = [], 0
        for size in sizes:
            self.start.append(None if size is None else position)
            if size is not None:
                position += -(-size // _ALIGN) * _ALIGN
        self.at = [0 if start is None else start // _ALIGN for start in self.start]
        self.total = max(position, 1)


class CallPlan:
    """The launches and the workspace layout of one call signature (see the module docstring).

    batch: the call's checked ``Batch`` (only its layout is kept, not its tensors); cfg: the
    call's config (not kept: the plan serves every config of the same value, ``config_id``,
    and a config may hold a weights tensor). The plan derives from them
    ``flags`` (``Flags.of``), ``params`` (``params_tensor``) and ``one_pass``: the on-policy
    one-pass mode (a counts-only epilogue, then the forward kernel writes the gradient).
    """

    def __init__(self, batch: Batch, cfg: OPOLossConfig):
        self.flags = Flags.of(cfg, batch)  # (the config itself is not kept: it may hold a tensor)
        self.params = params_tensor(cfg, batch.logits.device, batch.compute_dtype)
        self.one_pass = one_pass = one_pass_mode(batch.ref_logprobs, cfg, batch.logits.dtype,
                                                 wants_grad(batch.logits))
        f = Flags(*self.flags)
        self.mode, self.with_entropy, self.validate = f.mode, bool(f.with_entropy), bool(
            f.validate)
        self.layout = (batch.vocab, batch.seq_len, batch.num_rows, batch.compute_dtype)
        self.cdtype, self.device = batch.compute_dtype, batch.device
        self.num_rows = batch.num_rows
        # whether the row kernels launch at all (a launch has one program per logits row)
        self.has_rows = batch.logits.numel() > 0
        # metadata-only stand-ins (a plan keeps no tensor of the call it was built from)
        rows = Rows(*[_like(t) for t in (batch.labels, batch.mask, batch.seq_ids,
                                         batch.ref_logprobs)],
                    batch.num_rows, batch.seq_len, batch.num_seqs)
        self.level, self.coordinates = cfg.level, cfg.coordinates
        self.entropy_in_gradient = self.with_entropy and bool(self.mode.bonus)
        # prototypes of the launches whose gradient tensor's geometry varies (by that geometry)
        self._logits = _like(batch.logits)
        self._rows = rows
        self._onepass: Dict[tuple, ForwardLaunch] = {}
        self._backward: Dict[tuple, BackwardLaunch] = {}
        self._scale: Dict[tuple, ScaleLaunch] = {}
        lp_geo = small_geometry(torch.empty(batch.labels.shape, device="meta"))
        self.epilogue = EpilogueLaunch(batch, self.mode, has_lp=True, lp_geo=lp_geo,
                                       has_ent=self.with_entropy, ent_geo=lp_geo,
                                       validate=self.validate)
        self.pre = EpilogueLaunch(batch, self.mode, has_lp=False) if one_pass else None
        # one float and one int allocation per call; every launch gets where its pieces are
        self._floats, self._ints = self._workspace_layout()
        self._set_offsets()
        self.forward = None if one_pass else ForwardLaunch(
            self._logits, rows, self.with_entropy, device=self.device, at=self.rows_at)

    def batch(self, logits, labels, ref, rewards, mask, seq_ids, group_size, group_ids,
              cfg: OPOLossConfig) -> Batch:
        """The Batch of a call with this signature, as ``inputs.prepare`` makes it (the checks
        passed when the plan was built; detached where autograd tracks a tensor)."""
        vocab, seq_len, num_rows, cdtype = self.layout
        if ref is not None and ref.requires_grad:
            ref = ref.detach()
        weights = cfg.weights.detach() if type(cfg.weights) is not str else None
        return Batch(logits, labels, ref, mask, seq_ids,
                     rewards.detach() if rewards.requires_grad else rewards, group_size,
                     group_ids, weights, vocab, seq_len, num_rows, cdtype)

    # ---- launches whose gradient geometry comes with the call ----

    # keyed by the gradient's strides: with the logits' row count fixed by the signature, they
    # are its whole geometry (``_logits_geometry``), and cheaper to read

    def onepass_launch(self, grad: torch.Tensor) -> ForwardLaunch:
        strides = grad.stride()
        launch = self._onepass.get(strides)
        if launch is None:
            ggeo = _logits_geometry(grad)[1:]
            launch = self._onepass[strides] = ForwardLaunch(
                self._logits, self._rows, self.with_entropy, one_pass=True, ggeo=ggeo,
                device=self.device, at=self.rows_at)
        return launch

    def backward_launch(self, grad: torch.Tensor) -> BackwardLaunch:
        strides = grad.stride()
        launch = self._backward.get(strides)
        if launch is None:
            ggeo = _logits_geometry(grad)[1:]
            launch = self._backward[strides] = BackwardLaunch(
                self._logits, self._rows, ggeo, self.entropy_in_gradient, self.level,
                self.coordinates, at=self.rows_at)
        return launch

    def scale_launch(self, grad: torch.Tensor) -> ScaleLaunch:
        """grad: the slice's rows themselves (the scale kernel takes its geometry from them)."""
        strides = grad.stride()
        launch = self._scale.get(strides)
        if launch is None:
            launch = self._scale[strides] = ScaleLaunch(grad, self._rows)
        return launch

    # ---- the workspace ----

    def _workspace_layout(self):
        """The layouts of the float workspace (log-probs, statistics, entropy, the epilogue's
        scratch and partial sums, metrics, coef, scal) and of the zeroed int32 one (the check
        counts when validating, the main epilogue's ticket, its per-program counts when
        validating, the pre-pass's ticket)."""
        n, b = self.num_rows, self.epilogue.num_seqs
        # the pre-pass shares the main epilogue's pieces: it runs first, on the same stream,
        # and the one-pass kernel between the two reads its coefficients before the main
        # epilogue overwrites them (the one-pass backward uses none of them); only its ticket,
        # which must be zero when the main epilogue starts, is its own
        epilogues = [self.epilogue] + ([self.pre] if self.pre is not None else [])
        sums = max(e.sums_size for e in epilogues)
        floats = _Layout([n, 2 * n, n if self.with_entropy else None,
                          max(e.ws_size for e in epilogues), sums or None, len(METRICS), 2 * b,
                          2])
        ints = _Layout([NUM_ERR if self.validate else None, 1,
                        self.epilogue.part_errs_size if self.validate else None,
                        1 if self.pre is not None else None])
        return floats, ints

    def _set_offsets(self):
        """Where each small tensor starts in the workspaces, for every launch: the epilogues'
        ``at`` (set on them), the row kernels' (``rows_at``: their launches are made when a
        gradient geometry first comes) and the metrics' start. An epilogue that does not
        validate never writes its counts: its ticket stands in."""
        lp, stats, ent, ws, sums, metrics, coef, scal = self._floats.at
        errs, ticket, part_errs, pre_ticket = self._ints.at
        if not self.validate:  # the ticket stands in for the counts it never writes
            errs = part_errs = ticket
        if self._floats.start[4] is None:  # one chunk: phase 1 sums into the workspace itself
            sums = ws
        self.metrics_start = self._floats.start[5]
        self.rows_at = (lp, stats, ent, coef, scal)  # the row kernels' (forward, backward)
        self.epilogue.at = (lp, ent, stats, ws, sums, metrics, coef, scal, part_errs, ticket,
                            errs)
        if self.pre is not None:  # the main epilogue's pieces, its own ticket
            self.pre.at = (lp, ent, stats, ws, sums, metrics, coef, scal, pre_ticket, pre_ticket,
                           pre_ticket)

    def scratch(self) -> Scratch:
        """The call's small tensors: three allocations, no views (``Scratch``)."""
        return Scratch(new_output((self._floats.total,), self.cdtype, self.device),
                       torch.zeros(self._ints.total, dtype=torch.int32, device=self.device),
                       new_output((), self.cdtype, self.device))

    def metrics(self, floats: torch.Tensor) -> torch.Tensor:
        """The metrics vector [8] of a call's float workspace (a view)."""
        return floats.narrow(0, self.metrics_start, len(METRICS))


class PlanCache:
    """A bounded dict of plans (cleared when full: a loop uses a few signatures)."""

    def __init__(self):
        self.plans: Dict[tuple, CallPlan] = {}

    def get(self, key) -> Optional[CallPlan]:
        return self.plans.get(key)

    def put(self, key, plan: CallPlan) -> CallPlan:
        if len(self.plans) >= _MAX_PLANS:
            self.plans.clear()
        self.plans[key] = plan
        return plan
