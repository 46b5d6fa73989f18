"""opo_kernels/cache_keys.py: importing the package hashes every JIT function its kernels call,
each callee before its callers, so that no kernel's Triton cache key depends on which kernel a
process launches first (Triton <= 3.6 merged a callee's globals into the caller's key before
hashing the callee). Runs in a subprocess: this process has the interpreter on, and there are
no cache keys under the interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu_only  # CPU-side code (conftest.py)

REPO = Path(__file__).resolve().parent.parent

_SCRIPT = r"""
import ast, json
from triton.runtime.jit import JITFunction

order = []  # the JIT functions in the order their keys are computed
key = JITFunction.cache_key
def recording(self):
    if self.hash is None:
        order.append(self.__name__)
    return key.fget(self)
JITFunction.cache_key = property(recording)

import opo_kernels
from opo_kernels import from_logprobs, row_kernels, tp_combine
from opo_kernels.epilogue import kernel as epilogue

def callees(fn):
    names = {n.id for n in ast.walk(ast.parse(fn.src)) if isinstance(n, ast.Name)}
    return [fn.fn.__globals__[n] for n in sorted(names)
            if isinstance(fn.fn.__globals__.get(n), JITFunction)]

graph, todo = {}, [row_kernels._opo_fwd_kernel, row_kernels._opo_bwd_kernel,
                   row_kernels._scale_kernel, from_logprobs._logprob_grad_kernel,
                   tp_combine._combine_kernel, epilogue.epilogue_kernel]
while todo:
    fn = todo.pop()
    if fn.__name__ not in graph:
        graph[fn.__name__] = [c.__name__ for c in callees(fn)]
        todo += callees(fn)
print(json.dumps({"order": order, "graph": graph}))
"""


@pytest.fixture(scope="module")
def hashed():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_hashes_every_function_the_kernels_call(hashed):
    assert len(hashed["graph"]) >= 20  # 6 kernels and their helpers
    assert set(hashed["graph"]) <= set(hashed["order"]), "not hashed at import"


def test_callees_are_hashed_before_their_callers(hashed):
    position = {name: i for i, name in enumerate(hashed["order"])}
    late = [(caller, callee) for caller, callees in hashed["graph"].items()
            for callee in callees if position[callee] > position[caller]]
    assert not late, f"hashed after a caller: {late}"
