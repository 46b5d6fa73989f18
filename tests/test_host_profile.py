"""benchmarks/host_profile.py (the per-part host time of a call, for the GPU machine) in its
tiny CPU mode: every part is measured for both modes, the profiler tables and traces are
written, and the wrapped functions are restored afterwards."""

import json

import pytest

from benchmarks import host_profile
from opo_kernels import call_plan, fused_opo, launches

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)


def test_tiny_mode_measures_every_part(tmp_path):
    originals = (fused_opo.opo_loss_with_config, call_plan.CallPlan.scratch,
                 launches.Launch.__call__, fused_opo.FusedOPOFunction.__dict__["forward"])
    result = host_profile.run(tiny=True, out=tmp_path)
    assert (fused_opo.opo_loss_with_config, call_plan.CallPlan.scratch,
            launches.Launch.__call__, fused_opo.FusedOPOFunction.__dict__["forward"]) == originals
    rows = {(row["layout"], row["mode"]): row["parts_us"] for row in result["rows"]}
    modes = ("general", "on_policy")
    assert set(rows) == {(layout, m) for layout in ("padded", "packed") for m in modes}
    kernels = {"general": {"_opo_fwd_kernel", "epilogue_kernel", "_opo_bwd_kernel"},
               "on_policy": {"_opo_fwd_kernel", "epilogue_kernel", "_scale_kernel"}}
    for (_, mode), parts in rows.items():
        assert {k.split(":")[1] for k in parts if k.startswith("launch:")} == kernels[mode]
        assert {"step", "api_and_apply", "scratch", "forward_rest", "backward_rest",
                "autograd"} <= set(parts)
        assert parts["step"] > 0 and parts["scratch"] > 0
    saved = json.loads((tmp_path / "host_profile.json").read_text())
    assert saved["rows"] == result["rows"] and set(saved["profile_tables"]) == set(modes)
    assert all((tmp_path / f"host_profile.{m}.trace.json").exists() for m in modes)
