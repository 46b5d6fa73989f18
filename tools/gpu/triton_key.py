"""The Triton cache key another Python's Triton computes, and compiling under it: a Triton
cache built on a machine without a GPU is found by the GPU machine's Triton only if it was
compiled under that machine's key (tools/gpu/precompile.py explains the parts of the key).

Used by precompile.py (the build) and by suite_variants.py's compile processes, which apply the
key named by $OPO_TRITON_KEY_FILE before compiling.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

KEY_FILE_ENV = "OPO_TRITON_KEY_FILE"  # compile processes read the image's key from this file


def _sha256(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def image_triton_key(wheel: Path) -> str:
    """``triton_key()`` as the Python of ``wheel`` (a Triton wheel for another Python version)
    computes it. Raises SystemExit naming what differs when the wheel is not this Triton."""
    import triton
    from triton.runtime import cache

    version = wheel.name.split("-")[1] if wheel.name.startswith("triton-") else "?"
    if version != triton.__version__:
        raise SystemExit(f"--wheel: {wheel.name} is Triton {version}, this Python has "
                         f"{triton.__version__}: build with the GPU image's version")
    site = Path(triton.__file__).resolve().parent.parent
    differ = []
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if name.startswith("triton/") and name.endswith(".py"):
                local = site / name
                if not local.is_file() or local.read_bytes() != z.read(info):
                    differ.append(name)
        with z.open("triton/_C/libtriton.so") as f:
            image_lib = _sha256(f)
    if differ:
        raise SystemExit(f"--wheel: {len(differ)} Python source(s) differ from this Triton's "
                         f"(e.g. {differ[:3]}): its cache key cannot be computed here")
    with open(site / "triton" / "_C" / "libtriton.so", "rb") as f:
        local_lib = _sha256(f)
    key = cache.triton_key()
    if key.count(local_lib) != 1:
        raise SystemExit("triton_key() does not hold libtriton's hash once: this Triton's key "
                         "is not made as tools/gpu/precompile.py assumes")
    return key.replace(local_lib, image_lib)


def apply_key(key: str) -> None:
    """This process's Triton compiles and looks kernels up under ``key`` as its triton_key()
    (``get_cache_key`` reads the module global at each call)."""
    from triton.runtime import cache

    cache.triton_key = lambda: key


def apply_key_from_env() -> None:
    """Pool initializer: apply the key named by $OPO_TRITON_KEY_FILE, if set."""
    path = os.environ.get(KEY_FILE_ENV)
    if path:
        apply_key(Path(path).read_text())
