"""``launches.Launch``: Triton's binder skipped for a launch made before, only when that is safe
(the remembered variant is the one Triton would pick; anything that would make Triton behave
differently takes its own path). Triton's kernels and its compiled variants are stood in for,
so that this runs on the CPU; the real launcher, bit for bit against Triton's own path, is
tests/test_launch_cache_gpu.py."""

from types import SimpleNamespace

import pytest
import torch

from opo_kernels import launches


class _Compiled:
    def __init__(self, n_args, log):
        self.src = SimpleNamespace(signature={f"a{i}": "i32" for i in range(n_args)})
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class _Kernel:
    def __init__(self, n_params):
        self.n_params, self.log = n_params, []

    def run(self, *args, **kwargs):  # stands for JITFunction.run (what _direct_ok compares)
        raise AssertionError("not called: __getitem__ is")

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.log.append(("triton", grid, args, options))
            return _Compiled(self.n_params, self.log)
        return launch


@pytest.fixture
def direct_launches(monkeypatch):
    """launches.py as on a GPU with a checked Triton: enabled, device 0, no hooks."""
    monkeypatch.setattr(launches, "ENABLED", True)
    monkeypatch.setattr(launches, "_on_cuda", lambda t: True)  # CPU tensors stand in
    monkeypatch.setattr(launches, "_TRITON_RUN", _Kernel.run, raising=False)
    monkeypatch.setattr(launches, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0)), raising=False)
    knobs = SimpleNamespace(runtime=SimpleNamespace(launch_enter_hook=None,
                                                    launch_exit_hook=None))
    monkeypatch.setattr(launches, "knobs", knobs, raising=False)
    return knobs


def test_a_repeated_launch_skips_the_binder(direct_launches):
    kernel = _Kernel(4)
    launch = launches.Launch(kernel, (5,), 4)
    a, b = torch.zeros(8), torch.zeros(8)
    launch(a, 3, b, True)
    launch(a, 3, b, True)
    assert [e[0] for e in kernel.log] == ["triton", "direct"]
    assert kernel.log[0][3] == {"num_warps": 4} and kernel.log[1][1] == (5, 1, 1)
    assert kernel.log[1][2] == (a, 3, b, True)  # the same arguments, in the same order


def test_another_alignment_is_another_variant(direct_launches):
    kernel = _Kernel(2)
    launch = launches.Launch(kernel, (1,), 4)
    buf = torch.zeros(16)
    launch(buf[0:4], 1)
    launch(buf[1:5], 1)  # 4-byte offset: Triton specializes on 16-byte alignment
    launch(buf[4:8], 1)  # aligned again: the first variant
    assert [e[0] for e in kernel.log] == ["triton", "triton", "direct"]


def test_hooks_and_wrapped_run_take_triton_s_path(direct_launches, monkeypatch):
    kernel = _Kernel(1)
    launch = launches.Launch(kernel, (1,), 4)
    x = torch.zeros(4)
    launch(x)
    direct_launches.runtime.launch_enter_hook = lambda *a: None
    launch(x)
    direct_launches.runtime.launch_enter_hook = None
    monkeypatch.setattr(_Kernel, "run", lambda self, *a, **k: None)  # a profiler's wrapper
    launch(x)
    assert [e[0] for e in kernel.log] == ["triton"] * 3


def test_tensors_off_cuda_and_stand_in_kernels_take_the_plain_path(direct_launches,
                                                                  monkeypatch):
    class Recorder:  # a tool's stand-in for the kernel (no JITFunction.run)
        def __init__(self):
            self.log = []

        def __getitem__(self, grid):
            return lambda *args, **options: self.log.append(args) or _Compiled(1, self.log)
    recorder = Recorder()
    launch = launches.Launch(recorder, (1,), 4)
    launch(torch.zeros(4))
    launch(torch.zeros(4))
    assert len(recorder.log) == 2 and not launch.compiled
    monkeypatch.setattr(launches, "_on_cuda", lambda t: t.is_cuda)
    kernel = _Kernel(1)
    launch = launches.Launch(kernel, (1,), 4)
    launch(torch.zeros(4))
    launch(torch.zeros(4))
    assert [e[0] for e in kernel.log] == ["triton", "triton"]


def test_a_kernel_taking_other_arguments_is_never_remembered(direct_launches):
    kernel = _Kernel(3)  # its compiled signature has 3 parameters, the launch passes 2
    launch = launches.Launch(kernel, (1,), 4)
    for _ in range(2):
        launch(torch.zeros(4), 1)
    assert [e[0] for e in kernel.log] == ["triton", "triton"]


def test_a_direct_launch_the_runner_refuses_falls_back_once_and_for_all(direct_launches):
    """A Triton whose compiled-kernel runner takes other arguments (a calling convention not
    checked here) must not break the loss: that launch and every later one take Triton's own
    path, with a warning."""
    kernel = _Kernel(2)
    launch = launches.Launch(kernel, (1,), 4)
    x = torch.zeros(4)
    launch(x, 1)

    class Refusing(_Compiled):
        def __getitem__(self, grid):
            def runner(*args):
                raise TypeError("function takes exactly 14 arguments")
            return runner
    (key,) = launch.compiled
    launch.compiled[key] = Refusing(2, kernel.log)
    with pytest.warns(RuntimeWarning, match="every launch now takes Triton's own path"):
        launch(x, 1)
    assert not launches.ENABLED
    launch(x, 1)
    assert [e[0] for e in kernel.log] == ["triton", "triton", "triton"]
