"""Hyperparameters of the OPO loss: one frozen, validated object (SPEC "Public API").

Every backend receives the same ``OPOLossConfig``; it is built (and validated) once per call
or once per ``OPOLoss`` module, never re-checked inside the hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Tuple, Union

import torch

LEVELS = ("sequence", "sequence_mean", "token")
COORDINATES = ("ratio", "log")
WEIGHT_RULES = ("seed", "escort")
BACKENDS = ("auto", "triton", "torch")


def _number(name: str, value):
    """A finite real number. Under torch.compile(dynamic=True) hyperparameters may arrive as
    symbolic floats: they are checked with comparisons only (no float(), which would pin the
    value into the graph and recompile whenever it changes)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, int):
        value = float(value)
    if not (value == value and -math.inf < value < math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


@dataclass(frozen=True)
class OPOLossConfig:
    """All OPO hyperparameters (SPEC "Sampling geometry" and "Optimization geometry").

    ``weights`` is "seed" (default, ω = Q^(2−α)·p̃^(α−1)), "escort" (normalized
    Q^α·p̃^(1−α)) or a ``[B]`` tensor of caller-given weights (detached, any sampling geometry).

    Example::

        cfg = OPOLossConfig(alpha=0.6, mu=1.0, level="token")
    """

    alpha: float = 0.6
    mu: float = 1.0
    tau: float = 0.5
    adaptive_tau: bool = True
    tau_range: Tuple[float, float] = (0.2, 1.5)
    reward_temperature: float = 0.15
    weights: Union[str, torch.Tensor] = field(default="seed", compare=False)
    center_weights: bool = False
    level: str = "sequence_mean"
    coordinates: str = "ratio"
    temperature: float = 1.0
    entropy_coef: float = 0.0
    compute_entropy: bool = False
    backend: str = "auto"
    return_metrics: bool = False
    validate: bool = True
    inplace_backward: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        alpha = _number("alpha", self.alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
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
        for name in ("adaptive_tau", "center_weights", "compute_entropy", "return_metrics",
                     "validate", "inplace_backward"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        set_("alpha", alpha)
        set_("mu", mu)
        set_("tau_range", (tau_min, tau_max))
        set_("entropy_coef", entropy_coef)

    @property
    def with_entropy(self) -> bool:
        """The forward pass computes per-token entropy (in the same pass over the logits) when
        the bonus needs it, or when asked for the ``entropy_mean`` metric (compute_entropy)."""
        return self.entropy_coef > 0 or self.compute_entropy

    @property
    def entropy_in_gradient(self) -> bool:
        """The backward adds the entropy term only when the bonus is on."""
        return self.entropy_coef > 0

    def replace(self, **changes) -> OPOLossConfig:
        """A copy with some fields changed (validated again)."""
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values.update(changes)
        return OPOLossConfig(**values)

