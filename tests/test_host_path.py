"""What a loss call computes on the host once per option set or shape instead of on every call
(benchmarks/host_time.py measures the saving): the validated config, the launch config and the
integer helpers that replace Triton's constexpr functions on the host. Each must give exactly
what computing it afresh gives."""

import pytest
import torch
import triton

from opo_kernels import config, row_launch, utils
from opo_kernels.config import OPOLossConfig, config_from_options


def test_equal_options_share_one_config():
    options = dict(alpha=0.5, level="token", entropy_coef=0.01)
    first = config_from_options(dict(options))
    assert config_from_options(dict(reversed(list(options.items())))) is first
    assert first == OPOLossConfig(**options)
    assert config_from_options(dict(options, alpha=0.4)) is not first


def test_bad_options_raise_every_time_even_next_to_a_remembered_good_one():
    assert config_from_options(dict(compute_entropy=True)).compute_entropy is True
    for _ in range(2):  # True is remembered; 1 is a different key and still refused
        with pytest.raises(TypeError, match="compute_entropy must be a bool"):
            config_from_options(dict(compute_entropy=1))
        with pytest.raises(ValueError, match="alpha must be in"):
            config_from_options(dict(alpha=2.0))


def test_unhashable_option_values_are_validated_afresh():
    cfg = config_from_options(dict(tau_range=[0.3, 1.2]))
    assert cfg.tau_range == (0.3, 1.2)
    assert not any(isinstance(v, list) for key in config._FROM_OPTIONS for _, _, v in key)


def test_remembered_launch_config_is_the_table_and_override_still_wins(monkeypatch):
    for vocab in (7, 1000, 32003, 151936):
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for kind in ("fwd", "onepass", "bwd", "scale"):
                first = row_launch.launch_config(vocab, dtype, kind)
                assert first == row_launch._from_table(vocab, dtype, kind)
                assert row_launch.launch_config(vocab, dtype, kind) is first
    monkeypatch.setattr(row_launch, "LAUNCH_OVERRIDE", lambda kind, vocab, dtype: (64, 2))
    assert row_launch.launch_config(151936, torch.bfloat16, "fwd") == (64, 2, 1, 0, False)


def test_host_integer_helpers_match_triton():
    for a in range(0, 300):
        for b in (1, 2, 3, 16, 64, 128):
            assert utils.cdiv(a, b) == triton.cdiv(a, b)
    for n in list(range(1, 600)) + [32000, 32003, 128256, 151936, 2**20]:
        assert utils.next_power_of_2(n) == triton.next_power_of_2(n)
