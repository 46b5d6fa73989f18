"""The Triton kernel cache of a GPU run, compiled on a machine without a GPU and carried to
an offline GPU machine, so that a time-limited run there goes to measuring, not compiling.

    # here, in a Python with the GPU image's Triton (3.6.0; benchmarks/NOTES.md says how):
    python -m tools.gpu.precompile build [--wheel W] [--skip-suite] [--workers 2]
    # there (tools/gpu/device_run.sh does it when .whl/triton_cache.tar.xz exists):
    python -m tools.gpu.precompile unpack .whl/triton_cache.tar.xz DIR   # + key comparison
    python -m tools.gpu.precompile count DIR                            # compiled variants
    python -m tools.gpu.precompile new DIR MARKER      # the variants compiled there anyway

Why: the CUDA suite launches 361 kernel variants (tools/gpu/suite_variants.py), 914 s of
compile summed on a 2-core CPU machine, and the launch-config sweep ~80 more; on the GPU
machine that is minutes of a 15-minute run.

How a carried entry can be found there. Triton looks a compiled kernel up on disk under
sha256 of ``get_cache_key`` (triton/runtime/cache.py): ``triton_key()`` (its version and the
hashes of its Python sources and of ``_C/libtriton.so``), the kernel's source and
specialization (``ASTSource.hash``), the backend (ptxas version and arch), the options (their
defaults read from the environment: ``TRITON_DEFAULT_FP_FUSION`` ...) and the set
cache-invalidating environment variables. With the same Triton version and environment all of
these are the same here as there except ``libtriton.so``, which is built once per Python
version (the image runs 3.12). ``build`` therefore reads the image's wheel (``pip download``
for cp312, not installed), checks that its Python sources are byte-identical to this Triton's,
and compiles under the key the image computes (this Triton's key with libtriton's hash swapped).
The compiler is the same source built for another Python ABI: an assumption that ``unpack``'s
comparison and ``count``'s figure (variants compiled there anyway) check on the device. A miss
costs nothing but the archive's transfer: the kernel compiles there as it would have.

Kept per variant: the cubin and the metadata JSONs (``unpack`` points the group file at where it
lands); the IRs and the PTX stay here. The archive goes to .whl/ (carried with the wheels).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from tools.gpu import suite_variants
from tools.gpu.triton_key import KEY_FILE_ENV, apply_key, image_triton_key

REPO = Path(__file__).resolve().parents[2]  # tools/gpu/ -> the repository
ARCHIVE = "triton_cache.tar.xz"
MANIFEST = "triton_cache.json"
BUILD_ENV = {"TRITON_DEFAULT_FP_FUSION": "1"}  # what device_run.sh exports there
SWEEP_ROWS = 256  # a multiple of 16 as 16384 is, with 32 sequences of 8 rows: the same keys


# --------------------------------------------------------------------------------------------
# The cache key's parts (here and there)
# --------------------------------------------------------------------------------------------


def key_parts(arch: int = 90) -> Dict[str, object]:
    """Each part of Triton's cache key for one reference launch (aot_check's ``fwd-bf16``) on
    sm_<arch>, shortened: equal parts here and on the GPU machine mean its lookups can hit."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime import cache

    from tools.gpu import aot_check

    with aot_check.recording() as log:
        aot_check.VARIANTS["fwd-bf16"]()
    (launch,) = log
    backend, src, options = aot_check.launch_source(*launch, arch)
    short = lambda s: hashlib.sha256(s.encode()).hexdigest()[:16]  # noqa: E731
    return {"triton": triton.__version__, "triton_key": short(cache.triton_key()),
            "source": src.hash()[:16],
            "backend": " ".join(backend.hash().split()),  # the ptxas version and the arch
            "options": backend.parse_options(options.__dict__).hash()[:16],
            "env": dict(sorted(get_cache_invalidating_env_vars().items()))}


# --------------------------------------------------------------------------------------------
# Building (here)
# --------------------------------------------------------------------------------------------


def download_image_wheel(version: str, dest: Path) -> Path:
    """The cp312 manylinux wheel of Triton ``version`` (the image's Python), not installed."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_28_x86_64",
                    "-d", str(dest), f"triton=={version}"], check=True)
    wheel, = dest.glob(f"triton-{version}-cp312-*.whl")
    return wheel


def sweep_launches(rows: int = SWEEP_ROWS) -> List[tuple]:
    """((kernel, args, kwargs), origin) of every launch benchmarks/sweep.py makes (each V,
    kind, dtype and config, and the --focus list), recorded at `rows` rows."""
    import torch

    from benchmarks import sweep
    from opo_kernels import row_launch
    from tools.gpu import aot_check

    def record(kind, config, problem, origin):
        row_launch.LAUNCH_OVERRIDE = lambda k, v, d: config if k == kind else None
        try:
            with aot_check.recording() as log:
                fn, _ = sweep._kernel_call(kind, problem, "cpu")
                fn()
        finally:
            row_launch.LAUNCH_OVERRIDE = None
        return [(launch, origin) for launch in log]

    launches = []
    for vocab, dtype in ((v, d) for v in sweep.SIZES for d in sweep.DTYPES):
        problem = sweep._problem(rows, vocab, getattr(torch, dtype), "cpu")
        for kind in sweep.KINDS:
            for config in sweep.CONFIGS:
                launches += record(kind, config, problem,
                                   f"sweep V={vocab} {kind} {dtype} {config}")
    dtype = getattr(torch, sweep.FOCUS_DTYPE)
    for kind, config, uncounted in sweep.FOCUS:
        problem = sweep._problem(rows, sweep.FOCUS_V, dtype, "cpu", uncounted)
        launches += record(kind, config, problem, f"sweep --focus {kind} {config} {uncounted}")
    return launches


def production_records() -> List[tuple]:
    """suite_variants records (module, name, key, args, kwargs, origin), one per distinct key,
    of the launches the GPU session makes outside the test suite: aot_check's
    production-shaped variants and the sweep's (at SWEEP_ROWS rows: the keys of 16384)."""
    from tools.gpu import aot_check

    launches = []
    for name, run in aot_check.VARIANTS.items():
        with aot_check.recording() as log:
            run()
        launches += [(launch, f"aot_check {name}") for launch in log]
    records, seen = [], set()
    for (kernel, args, kwargs), origin in launches + sweep_launches():
        key = aot_check.specialization_key(kernel, args, kwargs)
        if key not in seen:
            seen.add(key)
            records.append(suite_variants.make_record(kernel.fn, key, args, kwargs, origin))
    return records


def pack(cache_dir: Path, archive: Path) -> Dict[str, int]:
    """Every compiled variant under cache_dir (its cubin and JSONs) into archive (tar.xz);
    returns the count of variants per kernel."""
    counts: Dict[str, int] = {}
    with tarfile.open(archive, "w:xz") as tar:
        for entry in sorted(cache_dir.iterdir()):
            cubins = sorted(entry.glob("*.cubin"))
            if not cubins:
                continue
            for f in sorted(entry.iterdir()):
                if f.suffix in (".cubin", ".json"):
                    tar.add(f, arcname=f"{entry.name}/{f.name}")
            counts[cubins[0].stem] = counts.get(cubins[0].stem, 0) + 1
    return dict(sorted(counts.items()))


def _commit() -> Dict[str, object]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout
    return {"commit": git("rev-parse", "HEAD").strip(),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip())}


def build(wheel: Path | None, out: Path, suite: bool, workers: int) -> int:
    import triton

    wheel = wheel or download_image_wheel(triton.__version__, Path(tempfile.gettempdir()) /
                                          "opo_image_wheel")
    key = image_triton_key(wheel)
    work = Path(tempfile.mkdtemp(prefix="opo_precompile_"))
    (work / "triton_key").write_text(key)
    cache_dir = work / "cache"
    os.environ.update(BUILD_ENV, TRITON_CACHE_DIR=str(cache_dir),
                      **{KEY_FILE_ENV: str(work / "triton_key")})
    os.environ.pop("TRITON_INTERPRET", None)
    apply_key(key)
    start = time.perf_counter()
    rc = int(bool(suite_variants.compile_records(production_records(), workers,
                                                 "production launches")))
    if suite:
        rc |= suite_variants.main(["--workers", str(workers), "--dir", str(work / "launches")])
    out.mkdir(parents=True, exist_ok=True)
    counts = pack(cache_dir, out / ARCHIVE)
    manifest = {"built": time.strftime("%Y-%m-%d %H:%M:%S"), **_commit(), "wheel": wheel.name,
                "key_parts": key_parts(), "variants": sum(counts.values()), "per_kernel": counts,
                "archive_bytes": (out / ARCHIVE).stat().st_size}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"[precompile] {manifest['variants']} variants in {out / ARCHIVE} "
          f"({manifest['archive_bytes'] / 2**20:.1f} MiB), {time.perf_counter() - start:.0f} s; "
          f"per kernel: {counts}")
    return rc


# --------------------------------------------------------------------------------------------
# On the GPU machine
# --------------------------------------------------------------------------------------------


def unpack(archive: Path, cache_dir: Path) -> int:
    """Extracts the archive into cache_dir and points each group file at where its files now
    are; returns the number of variants."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(cache_dir, **extra)
    for group in cache_dir.glob("*/__grp__*.json"):
        data = json.loads(group.read_text())
        # where the files are now; the ones left behind (IRs, PTX) are dropped from the group
        # (Triton 3.9 takes a group with a missing file for a miss; 3.6 skips the file)
        here = {c: group.parent / Path(p).name for c, p in data["child_paths"].items()}
        data["child_paths"] = {c: str(p) for c, p in here.items() if p.exists()}
        group.write_text(json.dumps(data))
    return count(cache_dir)


def count(cache_dir: Path) -> int:
    """Compiled variants (folders holding a cubin) under cache_dir."""
    return len(list(cache_dir.glob("*/*.cubin"))) if cache_dir.is_dir() else 0


_ARG = re.compile(r"%(\w+): ([^ ]+)( \{tt\.divisibility = 16)?")


def new_variants(cache_dir: Path, marker: Path) -> List[str]:
    """One line per variant compiled under cache_dir after marker was written (the carried
    ones were unpacked before it): kernel, warps, stages, and its specialization as the TTIR
    signature shows it (argument types; "/16" = pointer or int taken as divisible by 16).
    Compared with the build's records, these say why a carried variant was not found."""
    since = marker.stat().st_mtime
    lines = []
    for meta in sorted(cache_dir.glob("*/*.json")):
        if meta.name.startswith("__grp__") or meta.stat().st_mtime <= since:
            continue
        data = json.loads(meta.read_text())
        ttir = meta.with_suffix(".ttir")
        head = next((ln for ln in ttir.read_text().splitlines() if "tt.func public" in ln), "") \
            if ttir.exists() else ""
        args = " ".join(f"{n}:{t.rstrip(',')}{'/16' if d else ''}"
                        for n, t, d in _ARG.findall(head))
        lines.append(f"{data.get('name')} warps={data.get('num_warps')} "
                     f"stages={data.get('num_stages')} {meta.parent.name[:12]} {args}")
    return lines


def _same_commit(a: str, b: str) -> bool:
    """Full or abbreviated hashes of one commit."""
    return bool(a) and bool(b) and (a.startswith(b) or b.startswith(a))


def compare(manifest: dict, here: Dict[str, object], commit: str = "") -> List[str]:
    """Lines saying, per key part, whether this machine computes what the build did."""
    lines = [f"{name}: {'same' if here.get(name) == built else 'DIFFERS'} (built {built!r}"
             + ("" if here.get(name) == built else f", here {here.get(name)!r}") + ")"
             for name, built in manifest["key_parts"].items()]
    if commit and not _same_commit(commit, manifest.get("commit", "")):
        lines.append(f"commit: DIFFERS (built {manifest.get('commit')}, here {commit}): "
                     "kernels changed since are compiled here")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the GPU session's variants for sm_90, here")
    b.add_argument("--wheel", type=Path, help="the image's Triton wheel (default: pip download)")
    b.add_argument("--out", type=Path, default=REPO / ".whl")
    b.add_argument("--skip-suite", action="store_true", help="only the production launches")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    u = sub.add_parser("unpack", help="extract into DIR and compare the cache key's parts")
    u.add_argument("archive", type=Path)
    u.add_argument("dir", type=Path)
    c = sub.add_parser("count", help="compiled variants under DIR")
    c.add_argument("dir", type=Path)
    n = sub.add_parser("new", help="variants compiled under DIR after the file MARKER")
    n.add_argument("dir", type=Path)
    n.add_argument("marker", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        return build(args.wheel, args.out, not args.skip_suite, args.workers)
    if args.cmd == "count":
        print(count(args.dir))
        return 0
    if args.cmd == "new":
        for line in new_variants(args.dir, args.marker):
            print(f"[precompile] compiled here: {line}")
        return 0
    n = unpack(args.archive, args.dir)
    manifest = json.loads((args.archive.parent / MANIFEST).read_text())
    import torch

    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    print(f"[precompile] {n} carried variants in {args.dir} (built {manifest['built']} at "
          f"{manifest['commit'][:12]}{' + changes' if manifest['dirty'] else ''})")
    for line in compare(manifest, key_parts(10 * major + minor),
                        os.environ.get("OPO_BENCH_COMMIT", "")):
        print(f"[precompile]   {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
