"""tools/gpu/precompile.py: a Triton cache compiled here (sm_90, no GPU) is found by a Triton
that computes the image's key, after it travelled as an archive to another folder; the image's
key differs from this Triton's in libtriton's hash alone; a wheel that is not this Triton is
refused; the sweep's launches have the same specialization keys at the recorded and at other
row counts. Compiling runs in a subprocess because this process has the interpreter switched on.
"""

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import triton
from triton.runtime import cache

from tools.gpu import precompile

pytestmark = pytest.mark.cpu_only  # CPU-side code (conftest.py)
if not hasattr(cache, "triton_key"):
    pytest.skip("tools/gpu/precompile.py reads triton.runtime.cache.triton_key, which "
                "this Triton lacks (3.4 does; 3.6, the GPU image's, has it)",
                allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent


def _wheel(tmp_path, version=None, lib=b"libtriton built for another Python", edit=None):
    """A stand-in for the image's wheel: this Triton's Python sources and another libtriton."""
    site = Path(triton.__file__).resolve().parent.parent
    version = version or triton.__version__
    wheel = tmp_path / f"triton-{version}-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        for f in sorted((site / "triton").rglob("*.py")):
            name = f.relative_to(site).as_posix()
            z.writestr(name, f.read_bytes() + (b"\n# edited\n" if name == edit else b""))
        z.writestr("triton/_C/libtriton.so", lib)
    return wheel


def test_image_key_differs_in_libtriton_alone(tmp_path):
    lib = b"libtriton built for another Python"
    image = precompile.image_triton_key(_wheel(tmp_path, lib=lib)).split("-")
    local = cache.triton_key().split("-")
    assert len(image) == len(local)
    differ = [(a, b) for a, b in zip(local, image) if a != b]
    assert len(differ) == 1 and differ[0][1] == hashlib.sha256(lib).hexdigest()


def test_other_wheels_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="0.0.1"):
        precompile.image_triton_key(_wheel(tmp_path, version="0.0.1"))
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit, match="triton/runtime/jit.py"):
        precompile.image_triton_key(_wheel(tmp_path / "b", edit="triton/runtime/jit.py"))


_CARRY = r"""
import json, os, shutil, sys
from pathlib import Path
from triton import knobs
from triton.runtime import cache
from tools.gpu import aot_check, precompile

work = Path(sys.argv[1])
own_key = cache.triton_key
hits = []  # per compile: did Triton find it on disk (its compilation listener says)
knobs.compilation.listener = lambda cache_hit=False, **_: hits.append(cache_hit)

def compile_scale(cache_dir):
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
    with aot_check.recording() as log:
        aot_check.VARIANTS["scale-bf16"]()
    (kernel, args, kwargs), = log
    return aot_check.compile_launch(kernel, args, kwargs)

out = {"parts_own": precompile.key_parts()}
precompile.apply_key("the image's key")
out["parts_image"] = precompile.key_parts()
built = compile_scale(work / "built")
out["built"] = precompile.count(work / "built")
precompile.pack(work / "built", work / "carried.tar.xz")
shutil.rmtree(work / "built")  # a hit below can only come from the archive
out["carried"] = precompile.unpack(work / "carried.tar.xz", work / "there")
hit = compile_scale(work / "there")
out["after_hit"] = precompile.count(work / "there")
out["same_cubin"] = hit.asm["cubin"] == built.asm["cubin"]
cache.triton_key = own_key  # this Triton's own key: not the one the archive was built under
compile_scale(work / "there")
out["after_own_key"] = precompile.count(work / "there")
out["hits"] = hits
keys = lambda rows: [aot_check.specialization_key(*launch)
                     for launch, _ in precompile.sweep_launches(rows)]
recorded = keys(precompile.SWEEP_ROWS)
out["sweep_keys"] = len(set(recorded))
out["sweep_keys_same_at_other_rows"] = recorded == keys(2 * precompile.SWEEP_ROWS)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    work = tmp_path_factory.mktemp("carry")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(precompile.BUILD_ENV, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _CARRY, str(work)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_carried_cache_is_found_under_the_key_it_was_built_with(carried):
    assert carried["built"] == 1 and carried["carried"] == 1
    # built, found in the unpacked archive, compiled again under this Triton's own key
    assert carried["hits"] == [False, True, False]
    assert carried["after_hit"] == 1 and carried["same_cubin"]
    assert carried["after_own_key"] == 2, "another key must not find the carried variant"


def test_key_parts_tell_which_part_differs(carried):
    own, image = carried["parts_own"], carried["parts_image"]
    assert {k for k in own if own[k] != image[k]} == {"triton_key"}
    manifest = {"key_parts": image, "commit": "abc"}
    assert all("same" in line for line in precompile.compare(manifest, image, "abc"))
    lines = precompile.compare(manifest, own, "def")
    assert [line.split(":")[0] for line in lines if "DIFFERS" in line] == ["triton_key",
                                                                          "commit"]


def test_commit_compared_by_prefix():
    """device_run.sh may pass an abbreviated hash; the build records the full one."""
    full = "3a416f963abe96bd3e060423cd85752a123ddcf2"
    manifest = {"key_parts": {}, "commit": full}
    assert precompile.compare(manifest, {}, "3a416f96") == []
    assert precompile.compare(manifest, {}, full) == []
    assert "commit: DIFFERS" in precompile.compare(manifest, {}, "3a416f91")[0]


def test_new_lists_what_was_compiled_after_the_marker(tmp_path):
    """The variants compiled on the GPU despite the carried cache, with their specialization
    (a carried entry, older than the marker, is not listed)."""
    ttir = ("  tt.func public @_opo_fwd_kernel(%logits_ptr: !tt.ptr<bf16> {tt.divisibility = "
            "16 : i32} loc(#a), %l_T: i32 loc(#b), %V: i32 {tt.divisibility = 16 : i32} "
            "loc(#c)) attributes {noinline = false} {\n")
    for name, when in (("carried", 1_000_000), ("compiled", None)):
        entry = tmp_path / "cache" / name
        entry.mkdir(parents=True)
        for f, text in (("_opo_fwd_kernel.json", json.dumps({"name": "_opo_fwd_kernel",
                                                              "num_warps": 2,
                                                              "num_stages": 3})),
                        ("__grp___opo_fwd_kernel.json", "{}"), ("_opo_fwd_kernel.ttir", ttir)):
            (entry / f).write_text(text)
            if when:
                os.utime(entry / f, (when, when))
        if when:
            marker = tmp_path / "marker"
            marker.write_text("")
            os.utime(marker, (when + 10, when + 10))
    (line,) = precompile.new_variants(tmp_path / "cache", marker)
    assert line.startswith("_opo_fwd_kernel warps=2 stages=3 compiled ")
    assert line.endswith("logits_ptr:!tt.ptr<bf16>/16 l_T:i32 V:i32/16")


def test_sweep_keys_do_not_depend_on_the_recorded_shape(carried):
    # kinds x dtypes x configs, plus the default-config forward the backward's statistics use
    assert carried["sweep_keys"] >= 3 * 2 * 14
    assert carried["sweep_keys_same_at_other_rows"]


def test_suite_variants_does_not_import_precompile():
    """precompile.py uses suite_variants.py (its records and compile pool); the key both need
    lives in triton_key.py, so suite_variants.py imports neither precompile.py nor anything that
    imports it (no import circle)."""
    import ast

    tree = ast.parse((REPO / "tools" / "gpu" / "suite_variants.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "tools.gpu.triton_key" in imported
    assert not {m for m in imported if m and "precompile" in m}, imported
