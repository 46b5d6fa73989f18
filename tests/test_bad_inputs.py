"""docs/spec.md, "Bad input and edge cases": each class raises a ValueError/TypeError naming the
argument, from both backends, and leaves every input exactly as it was."""

import os

import numpy as np
import pytest
import torch
from problems import on_device

import opo_kernels

B, T, V = 4, 5, 9


def _inputs():
    g = torch.Generator().manual_seed(0)
    return on_device({
        "logits": torch.randn(B, T, V, generator=g),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "ref_logprobs": -torch.rand(B, T, generator=g) * 3,
        "rewards": torch.rand(B, generator=g),
        "mask": torch.rand(B, T, generator=g) < 0.8,
        "group_size": 2,
    })


def _set(name, value):
    return lambda d: d.__setitem__(name, value)


def _poke(name, index, value):
    def edit(d):
        d[name] = d[name].clone()
        d[name][index] = value
    return edit


def _packed(d):
    d["logits"] = d["logits"].reshape(B * T, V)
    d["labels"] = d["labels"].reshape(-1)
    d["ref_logprobs"] = d["ref_logprobs"].reshape(-1)
    d["seq_ids"] = torch.arange(B * T) // T
    del d["mask"]


def _chain(*edits):
    def edit(d):
        for e in edits:
            e(d)
    return edit


# (id, edit of the inputs, options, exception, text the message must contain)
CASES = [
    ("alpha-high", None, {"alpha": 1.5}, ValueError, "alpha"),
    ("alpha-neg", None, {"alpha": -0.1}, ValueError, "alpha"),
    ("alpha-str", None, {"alpha": "0.5"}, TypeError, "alpha"),
    ("mu-neg", None, {"mu": -1.0}, ValueError, "mu"),
    ("tau-zero", None, {"tau": 0.0}, ValueError, "tau"),
    ("reward-temperature-neg", None, {"reward_temperature": -1}, ValueError,
     "reward_temperature"),
    ("temperature-zero", None, {"temperature": 0}, ValueError, "temperature"),
    ("tau-min-zero", None, {"tau_range": (0.0, 1.0)}, ValueError, "tau_range"),
    ("tau-min-gt-max", None, {"tau_range": (2.0, 1.0)}, ValueError, "tau_range"),
    ("entropy-coef-neg", None, {"entropy_coef": -0.1}, ValueError, "entropy_coef"),
    ("level", None, {"level": "tokens"}, ValueError, "level"),
    ("coordinates", None, {"coordinates": "linear"}, ValueError, "coordinates"),
    ("weights-name", None, {"weights": "uniform"}, ValueError, "weights"),
    ("backend", None, {"backend": "cuda"}, ValueError, "backend"),
    ("weights-shape", None, {"weights": torch.ones(B + 1)}, ValueError, "weights"),
    ("weights-2d", None, {"weights": torch.ones(B, 1)}, ValueError, "weights"),
    ("groups-both", _set("group_ids", torch.zeros(B, dtype=torch.long)), {}, ValueError,
     "group_size"),
    ("groups-neither", _set("group_size", None), {}, ValueError, "group_ids"),
    ("group-size-divides", _set("group_size", 3), {}, ValueError, "group_size"),
    ("labels-shape", _set("labels", torch.zeros(B, T + 1, dtype=torch.long)), {},
     ValueError, "labels has shape [4, 6]"),
    ("ref-shape", _set("ref_logprobs", torch.zeros(B, T - 1)), {}, ValueError,
     "ref_logprobs has shape"),
    ("rewards-shape", _set("rewards", torch.zeros(B + 1)), {}, ValueError, "rewards"),
    ("mask-shape", _set("mask", torch.ones(B, T - 1, dtype=torch.bool)), {}, ValueError,
     "mask"),
    # an integer tensor of the wrong length reaches the shape check (a float one stops at the
    # dtype check first)
    ("group-ids-shape", _chain(_set("group_size", None),
                               _set("group_ids", torch.zeros(B + 2, dtype=torch.long))),
     {}, ValueError, r"group_ids must have shape [B]=[4]"),
    ("group-ids-float", _chain(_set("group_size", None), _set("group_ids", torch.zeros(B))),
     {}, TypeError, "group_ids"),
    ("group-size-bool", _set("group_size", True), {}, ValueError, "group_size"),
    ("group-size-float", _set("group_size", 2.0), {}, ValueError, "group_size"),
    ("group-size-float-tensor", _set("group_size", torch.tensor(2.0)), {}, ValueError,
     "group_size"),
    ("group-size-1d-tensor", _set("group_size", torch.tensor([2])), {}, ValueError,
     "group_size"),
    ("group-size-zero", _set("group_size", 0), {}, ValueError, "group_size"),
    ("device", _set("labels", torch.zeros(B, T, dtype=torch.long, device="meta")), {},
     ValueError, "labels is on meta"),
    ("logits-int", _set("logits", torch.zeros(B, T, V, dtype=torch.long)), {}, TypeError,
     "logits"),
    ("logits-1d", _set("logits", torch.zeros(V)), {}, ValueError, "logits"),
    ("labels-float", _set("labels", torch.zeros(B, T)), {}, TypeError, "labels"),
    ("label-out-of-vocab", _poke("labels", (0, 0), V), {}, ValueError, "labels"),
    ("label-negative-counted", _poke("labels", (0, 0), -100), {}, ValueError, "labels"),
    ("seq-ids-ge-B", _chain(_packed, _poke("seq_ids", 3, B)), {}, ValueError, "seq_ids"),
    ("seq-ids-missing", _chain(_packed, lambda d: d.pop("seq_ids")), {}, ValueError,
     "seq_ids"),
    ("rewards-nan", _poke("rewards", 1, float("nan")), {}, ValueError, "rewards"),
    ("rewards-inf", _poke("rewards", 1, float("inf")), {}, ValueError, "rewards"),
    ("ref-nan-counted", _poke("ref_logprobs", (0, 0), float("nan")), {}, ValueError,
     "ref_logprobs"),
    ("logits-nan-counted", _poke("logits", (0, 0, 3), float("nan")), {}, ValueError,
     "logits"),
    ("logits-inf-counted", _poke("logits", (2, 0, 1), float("inf")), {}, ValueError,
     "logits"),
    ("mask-values", _set("mask", torch.full((B, T), 2)), {}, ValueError, "mask"),
    # finite inputs whose loss overflows: Δ ≈ +38 on each counted token of sequence 0, exp(ΣΔ)
    # at level="sequence" is beyond float32
    ("loss-overflow", _poke("ref_logprobs", 0, -40.0), {"level": "sequence"}, ValueError,
     "the loss or its gradient is not finite although the inputs are"),
    ("mask-complex", _set("mask", torch.ones(B, T, dtype=torch.complex64)), {}, TypeError,
     "mask must be a bool, integer or float tensor"),
    ("mu-beyond-float", None, {"mu": 10**400}, ValueError, "mu must be finite"),
    ("option-unknown", None, {"alhpa": 0.5}, TypeError, "alhpa': the options are"),
    ("option-internal", None, {"followed": ()}, TypeError,  # a field, not an option
     "followed': the options are"),
    ("preset-delta-clip-token", None, {"preset": "author_verl", "level": "token"}, ValueError,
     "preset 'author_verl' sets delta_clip=5.0"),
    ("process-group-str", _set("process_group", "tp"), {}, TypeError,
     "process_group must be a torch.distributed ProcessGroup"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, backend):
    _, edit, options, exc, text = case
    d = _inputs()
    if edit is not None:
        edit(d)
    d, options = on_device(d), on_device(options)  # the CASES' own tensors are built on the CPU
    before = {k: v.clone() for k, v in d.items() if isinstance(v, torch.Tensor)}
    weights = options.get("weights")
    weights_before = weights.clone() if isinstance(weights, torch.Tensor) else None
    args = [d.pop(k) for k in ("logits", "labels", "ref_logprobs", "rewards")]
    with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]")):
        opo_kernels.opo_loss(*args, **d, **{"backend": backend, **options})
    after = dict(zip(("logits", "labels", "ref_logprobs", "rewards"), args), **d)
    for k, v in before.items():
        if v.device.type != "meta":
            assert torch.equal(after[k].nan_to_num(), v.nan_to_num()), f"{k} was modified"
    if weights_before is not None:
        assert torch.equal(weights, weights_before)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_values_ok_when_not_counted(backend):
    """Anything goes on tokens that are not counted: label −100, NaN ref_logprobs and logits."""
    d = _inputs()
    d["mask"][0, 0] = False
    d["labels"][0, 0] = -100
    d["ref_logprobs"][0, 0] = float("nan")
    d["logits"][0, 0] = float("nan")
    loss = opo_kernels.opo_loss(d.pop("logits"), d.pop("labels"), d.pop("ref_logprobs"),
                                d.pop("rewards"), backend=backend, **d)
    assert torch.isfinite(loss)


def test_validate_false_skips_value_checks():
    d = _inputs()
    d["rewards"][0] = float("nan")
    loss = opo_kernels.opo_loss(d.pop("logits"), d.pop("labels"), d.pop("ref_logprobs"),
                                d.pop("rewards"), backend="triton", validate=False, **d)
    assert not torch.isfinite(loss)  # the caller opted out of the check


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="alpha"):
        opo_kernels.OPOLoss(alpha=2.0)
    with pytest.raises(TypeError, match="unknown option.*'alhpa'"):
        opo_kernels.OPOLoss(alhpa=0.5)


def test_numpy_scalars_are_numbers():
    """np.float32 is no float subclass (np.float64 is): both are real numbers."""
    for value in (np.float32(0.5), np.float64(0.5), 0.5):
        assert opo_kernels.OPOLossConfig(alpha=value).alpha == 0.5


def test_remembered_options_are_validated_by_their_element_types():
    """(True, 2) == (1, 2) and they hash alike: the options remembered for the one must not
    let the other (a bool, refused) through."""
    d = _inputs()
    args = [d.pop(k) for k in ("logits", "labels", "ref_logprobs", "rewards")]
    opo_kernels.opo_loss(*args, **d, tau_range=(1, 2))
    with pytest.raises(TypeError, match=r"tau_range\[0\] must be a real number"):
        opo_kernels.opo_loss(*args, **d, tau_range=(True, 2))


def test_from_logprobs_compute_entropy_needs_the_entropy():
    """opo_loss_from_logprobs has no logits to take an entropy from: the flag without entropy=
    is refused (it returned no entropy_mean, silently)."""
    d = _inputs()
    lp = torch.log_softmax(d["logits"], -1).amax(-1)
    with pytest.raises(ValueError, match="compute_entropy=True reports the mean of the entropy"):
        opo_kernels.opo_loss_from_logprobs(lp, d["ref_logprobs"], d["rewards"], mask=d["mask"],
                                           group_size=2, vocab_size=V, compute_entropy=True)



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_integer_mask_dtype_is_a_mask(backend):
    d = _inputs()
    args = [d.pop(k) for k in ("logits", "labels", "ref_logprobs", "rewards")]
    mask = d.pop("mask")
    expected = opo_kernels.opo_loss(*args, mask=mask, backend=backend, **d)
    for dtype in (torch.uint8, torch.int32, torch.uint16, torch.uint32, torch.uint64,
                  torch.bfloat16):
        loss = opo_kernels.opo_loss(*args, mask=mask.to(dtype), backend=backend, **d)
        assert torch.equal(loss, expected), dtype


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_scaled_rewards_of_any_finite_size(backend):
    """scale_rewards="group": one group's rewards of 1e20 must not reach another group's
    variance (the reference multiplied its overflowing squared deviation by 0: NaN, reported
    as a non-finite loss)."""
    d = _inputs()
    d["rewards"] = torch.tensor([1e20, 0.0, 0.0, 1.0], device=d["rewards"].device)
    args = [d.pop(k) for k in ("logits", "labels", "ref_logprobs", "rewards")]
    loss = opo_kernels.opo_loss(*args, scale_rewards="group", backend=backend, **d)
    assert torch.isfinite(loss)


def test_backends_agree_near_the_float_range():
    """A mean log-ratio of 43.85 with mu = 4: the penalty's gradient coefficient
    mu·v̂·e^δ̂/B' is ~1e38 — finite only when B' divides first, as autograd's chain does on the
    torch backend. Both backends give the same finite loss and gradient (the fused one raised
    the non-finite error there)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 5, generator=g)
    labels = torch.randint(0, 5, (4, 3), generator=g)
    ref = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    ref[0] -= 43.85
    d = on_device({"logits": logits, "labels": labels, "ref": ref,
                   "rewards": torch.tensor([1.0, 0.0, 0.5, 0.2])})
    out = {}
    for backend in ("torch", "triton"):
        x = d["logits"].clone().requires_grad_()
        loss = opo_kernels.opo_loss(x, d["labels"], d["ref"], d["rewards"], group_size=2,
                                    mu=4.0, backend=backend)
        out[backend] = (loss.detach(), *torch.autograd.grad(loss, x))
    assert torch.isfinite(out["triton"][1]).all()
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-5, atol=1e-3)


_LATE_INTERPRETER = """
import os
import torch
import opo_kernels
os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels were defined for a GPU
x = torch.randn(2, 3, 16, requires_grad=True)
labels, rewards = torch.randint(0, 16, (2, 3)), torch.randn(2)
auto = opo_kernels.opo_loss(x, labels, None, rewards, group_size=2)
ref = opo_kernels.opo_loss(x, labels, None, rewards, group_size=2, backend="torch")
assert torch.equal(auto, ref), (auto, ref)
try:
    opo_kernels.opo_loss(x, labels, None, rewards, group_size=2, backend="triton")
except ValueError as err:
    print(err)
"""


def test_interpreter_set_after_import():
    """TRITON_INTERPRET=1 set after the import (a notebook) does not make the kernels
    interpreted: backend="auto" on CPU tensors takes the reference, and backend="triton"
    says when the variable must be set (not Triton's "0 active drivers")."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _LATE_INTERPRETER], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "set before opo_kernels (and triton) is imported" in out.stdout
