"""Hyperparameters of the OPO loss: one frozen, validated object (docs/spec.md "Options").

Every backend receives the same ``OPOLossConfig``; it is built (and validated) once per option
set (``config_from_options``: eager calls with the same options share one) or once per
``OPOLoss`` module, never re-checked inside the hot path.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

import torch

LEVELS = ("sequence", "sequence_mean", "token")
SCALE_REWARDS = ("none", "group")
COORDINATES = ("ratio", "log")
WEIGHT_RULES = ("seed", "escort")
BACKENDS = ("auto", "triton", "torch")


def _number(name: str, value):
    """A finite real number. Under torch.compile(dynamic=True) hyperparameters may arrive as
    symbolic floats: they are checked with comparisons only (no float(), which would pin the
    value into the graph and recompile whenever it changes)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if type(value) is not float and not isinstance(value, torch.SymFloat):
        try:  # an int, a NumPy scalar (np.float32 is no float subclass), a Fraction
            value = float(value)
        except OverflowError:
            raise ValueError(f"{name} must be finite, got an integer beyond float's "
                             f"range") from None
    if not (value == value and -math.inf < value < math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


class _PresetDefault(enum.Enum):
    """The default of an option that a preset sets: "the preset's value" (see PRESETS).

    An enum member, not a plain object(): torch.compile traces ``OPOLossConfig(**options)``
    inside the user's graph and can only wrap a sourceless default of a type it knows."""

    DEFAULT = "<preset>"

    def __repr__(self) -> str:
        return "<preset>"


PRESET_DEFAULT = _PresetDefault.DEFAULT

# docs/spec.md "Presets": named sets of defaults; arguments given explicitly override them.
# "paper" is eq. 6 (the package's defaults); "author_verl" the author's verl configuration of the
# paper's run. direction_scale=None under author_verl means 1/α of the α in force.
PRESETS = {
    "paper": dict(alpha=0.6, mu=1.0, tau=0.5, adaptive_tau=True, tau_range=(0.2, 1.5),
                  reward_temperature=0.15, weights="seed", center_weights=False,
                  level="sequence_mean", coordinates="ratio", delta_clip=None, score_clip=None,
                  scale_rewards="none", direction_scale=1.0, logit_reg_coef=0.0),
    "author_verl": dict(alpha=0.6, mu=1.0, tau=0.5, adaptive_tau=True, tau_range=(0.2, 1.5),
                        reward_temperature=0.15, weights="escort", center_weights=True,
                        level="sequence_mean", coordinates="log", delta_clip=5.0,
                        score_clip=10.0, scale_rewards="none", direction_scale=None,
                        logit_reg_coef=0.01),
}
PRESET_OPTIONS = tuple(PRESETS["paper"])


@dataclass(frozen=True)
class OPOLossConfig:
    """All OPO hyperparameters (docs/spec.md "Options"; the math: "Weights", "The loss" and
    "Presets").

    ``preset`` ("paper", the default, = eq. 6; or "author_verl", the author's verl code) sets
    the defaults of the options in ``PRESETS``; an option given explicitly overrides its
    preset value (under "author_verl", direction_scale defaults to 1/α of the α in force).
    ``weights`` is "seed" (ω = Q^(2−α)·p̃^(α−1)), "escort" (normalized Q^α·p̃^(1−α)) or a
    ``[B]`` tensor of caller-given weights (detached, any sampling geometry).

    Example::

        cfg = OPOLossConfig(alpha=0.6, mu=1.0, level="token")
        cfg = OPOLossConfig(preset="author_verl", alpha=0.5)   # direction_scale = 2.0
    """

    alpha: float = PRESET_DEFAULT
    mu: float = PRESET_DEFAULT
    tau: float = PRESET_DEFAULT
    adaptive_tau: bool = PRESET_DEFAULT
    tau_range: Tuple[float, float] = PRESET_DEFAULT
    reward_temperature: float = PRESET_DEFAULT
    weights: Union[str, torch.Tensor] = field(default=PRESET_DEFAULT, compare=False)
    center_weights: bool = PRESET_DEFAULT
    level: str = PRESET_DEFAULT
    coordinates: str = PRESET_DEFAULT
    delta_clip: Optional[float] = PRESET_DEFAULT
    score_clip: Optional[float] = PRESET_DEFAULT
    scale_rewards: str = PRESET_DEFAULT
    direction_scale: float = PRESET_DEFAULT
    logit_reg_coef: float = PRESET_DEFAULT
    preset: str = "paper"
    temperature: float = 1.0
    entropy_coef: float = 0.0
    compute_entropy: bool = False
    backend: str = "auto"
    return_metrics: bool = False
    # True: the value checks are read at the end of the call (one host sync); "deferred": read
    # later without a stall (at the call's backward or the next call; validation.py); False: none
    validate: Union[bool, str] = True
    inplace_backward: bool = False
    # logits a slice of whole positions of a tensor that requires grad (``logits[:, :-1]``):
    # the gradient goes to that tensor directly, zeros at the positions outside the slice, and
    # autograd's slice backward (a zero fill of the whole tensor plus a copy) never runs. The
    # slice itself is then not in the graph (no torch.autograd.grad w.r.t. it; row_slice.py)
    grad_to_base: bool = False
    # vocabulary-parallel on-policy logits: stream the slice in L2-sized chunks of rows, one
    # all-gather each, and write the gradient during forward (vocab_parallel.py)
    vocab_parallel_one_pass: bool = False
    # (name, value) of each preset option that follows the preset, the value the preset gave
    # it; set by __post_init__ (``explicit``, an attribute, names the others). An __init__
    # field (not init=False, not in OPTIONS: callers never pass it) because a config is also
    # rebuilt through __init__ with every field: by dataclasses.replace, and by torch.compile
    # (Dynamo, torch 2.8 for one, cannot rebuild it otherwise). A rebuilt option still holding
    # the very object the preset gave it keeps following the preset (a new preset refills it,
    # a new α re-derives author_verl's direction_scale); one given a new value is explicit.
    followed: Optional[Tuple[Tuple[str, object], ...]] = field(default=None, repr=False,
                                                                compare=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        preset = _choice("preset", self.preset, tuple(PRESETS))
        if self.followed is None:  # made by a caller: the options left out follow the preset
            follow = [k for k in PRESET_OPTIONS if getattr(self, k) is PRESET_DEFAULT]
        else:  # rebuilt with every field (see ``followed``)
            follow = [k for k, v in self.followed if getattr(self, k) is v]
        # (tuples from lists: torch 2.8's Dynamo failed to build a frozenset from a generator)
        given = tuple([k for k in PRESET_OPTIONS if k not in follow])
        set_("explicit", given)  # the preset options given explicitly (not a field)
        for name in follow:
            set_(name, PRESETS[preset][name])
        alpha = _number("alpha", self.alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if "direction_scale" in given and self.direction_scale is None:
            raise TypeError("direction_scale must be a real number > 0, got None (1/alpha is "
                            "the preset 'author_verl' default: leave direction_scale out)")
        if self.direction_scale is None:  # author_verl: 1/α of the α in force
            if alpha == 0:
                raise ValueError("direction_scale = 1/alpha (preset 'author_verl') is undefined "
                                 "for alpha=0: pass direction_scale explicitly")
            set_("direction_scale", 1.0 / alpha)
        mu = _number("mu", self.mu)
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        for name in ("tau", "reward_temperature", "temperature"):
            value = _number(name, getattr(self, name))
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            set_(name, value)
        if not isinstance(self.tau_range, (tuple, list)) or len(self.tau_range) != 2:
            raise TypeError(f"tau_range must be a pair (tau_min, tau_max), got {self.tau_range!r}")
        tau_min = _number("tau_range[0]", self.tau_range[0])
        tau_max = _number("tau_range[1]", self.tau_range[1])
        if tau_min <= 0 or tau_min > tau_max:
            raise ValueError(
                f"tau_range must satisfy 0 < tau_min <= tau_max, got ({tau_min}, {tau_max})"
            )
        entropy_coef = _number("entropy_coef", self.entropy_coef)
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
        _choice("level", self.level, LEVELS)
        _choice("coordinates", self.coordinates, COORDINATES)
        _choice("backend", self.backend, BACKENDS)
        if isinstance(self.weights, torch.Tensor):
            if self.weights.dim() != 1 or not self.weights.is_floating_point():
                raise ValueError(
                    "weights tensor must be a 1-D float tensor of shape [B], got "
                    f"shape {tuple(self.weights.shape)} and dtype {self.weights.dtype}"
                )
        elif isinstance(self.weights, str):
            _choice("weights", self.weights, WEIGHT_RULES)
        else:
            raise TypeError(
                "weights must be 'seed', 'escort' or a [B] tensor, got "
                f"{type(self.weights).__name__}"
            )
        self._check_recipe()
        if not isinstance(self.validate, bool) and self.validate != "deferred":
            raise TypeError(f"validate must be True, False or 'deferred', got {self.validate!r}")
        for name in ("adaptive_tau", "center_weights", "compute_entropy", "return_metrics",
                     "inplace_backward", "grad_to_base", "vocab_parallel_one_pass"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        set_("alpha", alpha)
        set_("mu", mu)
        set_("tau_range", (tau_min, tau_max))
        set_("entropy_coef", entropy_coef)
        set_("followed", tuple([(k, getattr(self, k)) for k in follow]))  # the final values

    @property
    def with_entropy(self) -> bool:
        """The forward pass computes per-token entropy (in the same pass over the logits) when
        the bonus needs it, or when asked for the ``entropy_mean`` metric (compute_entropy)."""
        return self.entropy_coef > 0 or self.compute_entropy

    @property
    def entropy_in_gradient(self) -> bool:
        """The backward adds the entropy term only when the bonus is on."""
        return self.entropy_coef > 0

    @property
    def one_pass_exact(self) -> bool:
        """Whether the on-policy coefficients are known before the pass over the logits. They
        are (Δ ≡ 0, p̃ uniform whatever τ is), except the Z-loss's gradient, which scales with
        1/τ: with logit_reg_coef > 0 and the adaptive τ (which reads the log-probs), the
        on-policy mode runs the general two passes instead."""
        return not (self.logit_reg_coef > 0 and self.adaptive_tau)

    def _check_recipe(self) -> None:
        """The options of the author's recipe (docs/spec.md "Presets" and "Options")."""
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name in ("delta_clip", "score_clip"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and value == math.inf:  # np.float32 too
                value = None  # inf: no clamp, as None (lets a config file turn a preset's off)
            if value is not None:
                value = _number(name, value)
                if value <= 0:
                    raise ValueError(f"{name} must be > 0 (or None / inf: no clamp), got {value}")
            set_(name, value)
        if self.delta_clip is not None and self.level == "token":
            source = ("" if "delta_clip" in self.explicit else
                      f" (preset {self.preset!r} sets delta_clip={self.delta_clip})")
            raise ValueError(f"delta_clip applies to the sequence levels (it clamps δ_s){source}"
                             f"; with level='token' pass delta_clip=float('inf') (no clamp)")
        _choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        direction = _number("direction_scale", self.direction_scale)
        if direction <= 0:
            raise ValueError(f"direction_scale must be > 0, got {direction}")
        reg = _number("logit_reg_coef", self.logit_reg_coef)
        if reg < 0:
            raise ValueError(f"logit_reg_coef must be >= 0, got {reg}")
        set_("direction_scale", direction)
        set_("logit_reg_coef", reg)

    def __getstate__(self):
        """The fields only: ``_plan_id`` (``call_plan.config_id``) numbers this config in this
        process; pickled into another process (torch.save, a spawned worker) or deep-copied,
        it would name another config's call plan there."""
        return {k: v for k, v in self.__dict__.items() if k != "_plan_id"}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def replace(self, **changes) -> OPOLossConfig:
        """A copy with some fields changed (validated again). Preset options that were not given
        explicitly keep following the preset (e.g. direction_scale = 1/α under author_verl)."""
        values = {k: getattr(self, k) for k in self.__dataclass_fields__
                  if k != "followed" and (k not in PRESET_OPTIONS or k in self.explicit)}
        values.update(changes)
        return OPOLossConfig(**values)


_FROM_OPTIONS: Dict[tuple, OPOLossConfig] = {}


# the option names a caller may pass (every field of OPOLossConfig but the internal ones)
OPTIONS = frozenset(f.name for f in dataclasses.fields(OPOLossConfig)
                    if f.init and f.name != "followed")


def make_config(options: Dict[str, object]) -> OPOLossConfig:
    """OPOLossConfig(**options), an unknown option named as such (not as a constructor's)."""
    # a loop, not ``options.keys() - OPTIONS``: torch 2.11's Dynamo cannot trace that set
    # difference on dict keys (InternalTorchDynamoError inside torch.compile)
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(map(repr, sorted(unknown)))}: the "
                        f"options are {', '.join(sorted(OPTIONS))} (docs/spec.md)")
    return OPOLossConfig(**options)


def _types(value):
    """value's type, with its elements' for a tuple (``(True, 2)`` and ``(1, 2)`` are equal
    and hash alike, but only one of them is a valid ``tau_range``)."""
    if type(value) is tuple:
        return tuple, tuple(map(_types, value))
    return type(value)


def config_from_options(options: Dict[str, object]) -> OPOLossConfig:
    """``OPOLossConfig(**options)`` for the functional API. Building and validating it takes
    ~13 µs, about 7 % of a call's host time (benchmarks/host_time.py), and a training loop
    passes the same options every step: eager calls remember the (immutable) config per option
    set, keyed by each value's type as well (``True`` and ``1`` are different options). Bad
    options raise every time (nothing is stored before the config validates); unhashable
    values (a list), tensors (e.g. ``weights``: hashed by identity, a new one every step, so a
    stored entry would never be found again and would keep the tensor alive) and traced calls
    (torch.compile, whose values may be symbolic) build it afresh."""
    if torch.compiler.is_compiling():
        return make_config(options)
    values = tuple(options.values())
    if any(isinstance(v, torch.Tensor) for v in values):
        return make_config(options)
    try:
        # names in the caller's order (another order is another entry), values with their types
        key = (tuple(options), values, tuple(map(_types, values)))
        config = _FROM_OPTIONS.get(key)
    except TypeError:  # an unhashable value
        return make_config(options)
    if config is None:
        config = make_config(options)
        if len(_FROM_OPTIONS) >= 256:  # bounded: options that change every call
            _FROM_OPTIONS.clear()
        _FROM_OPTIONS[key] = config
    return config
