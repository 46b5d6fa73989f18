"""The results file: the run's environment, the schema of its rows, and its writer."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, Tuple

import torch

from benchmarks import peers
from benchmarks.cases import ALL_IMPLS, DTYPES, LINEAR_IMPLS, ROOT, Case, Settings, interpreter_on
from benchmarks.runners import liger_version


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            sha = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=ROOT, capture_output=True, text=True, timeout=10)
            return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def recorded_commit() -> str:
    """The commit a results file records: OPO_BENCH_COMMIT when set (the GPU machine's copy of
    the tree has no .git), else ``git_commit``."""
    return os.environ.get("OPO_BENCH_COMMIT") or git_commit()


def device_name(device: torch.device, tiny: bool) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-tiny" if tiny else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def environment(device: torch.device, settings: Settings) -> Dict[str, object]:
    import triton
    env: Dict[str, object] = {
        "device": device_name(device, settings.tiny),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": settings.commit or git_commit(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "liger_kernel": liger_version(),
        "peers": peers.versions(),
        "tiny": settings.tiny,
        "triton_interpret": interpreter_on(),
        "compile_backend": settings.compile_backend,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["sm_count"] = int(props.multi_processor_count)
    return env


METHOD_NOTE = (
    "ms: median of CUDA-event timings of forward+backward of one loss call "
    "(torch.autograd.grad(loss, logits)), the same loop for every impl: L2 flushed and the "
    "device synchronized before each call (its host time counts, for every impl alike); "
    "in-place impls restored from a pristine copy before the flush, outside the events. "
    "gbps: effective, bytes = 3*N*V*itemsize "
    "(2 reads + 1 write of the counted logits) + small vectors, the same count for every impl. "
    "pct_copy: gbps / copy_gbps (device-to-device copy, read+write bytes, same run). "
    "peak_mem_bytes: max_memory_allocated during one call minus memory allocated before it "
    "(inputs). Fused-linear rows (H set): forward+backward incl. grads of hidden and weight; "
    "bytes = 2*(rows+V)*H*itemsize + small vectors; floor_ms = floor_matmuls matmuls (4 "
    "general; 3 on-policy or with the logits held / materialized) of 2*N*H*V FLOPs (N counted "
    "tokens) at matmul_tflops (bf16 torch.matmul measured in the same run), "
    "x_floor = ms/floor_ms; floor_ms_rows/x_floor_rows the same with every row of the layout. "
    "See benchmarks/NOTES.md."
)


def write_json(path: Path, data: Dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


ROW_KEYS = ("impl", "N", "V", "dtype", "layout")


def row_key(row: Dict[str, object]) -> Tuple:
    return tuple(row[k] for k in ROW_KEYS) + (row.get("H"),)


def case_key(case: Case) -> Tuple:
    s = case.shape
    return (case.impl, s.N, s.V, s.dtype, s.layout, s.H)


REQUIRED = {"device": str, "torch": str, "triton": str, "commit": str, "copy_gbps": float,
            "rows": list}
ROW_REQUIRED = {"impl": str, "N": int, "V": int, "dtype": str, "layout": str, "ms": float,
                "gbps": float, "peak_mem_bytes": int}
LINEAR_ROW_REQUIRED = {"H": int, "B": int, "T": int, "floor_ms": float, "x_floor": float}


def validate_results(data: Dict[str, object]) -> None:
    """Raises ValueError if `data` does not follow the results schema (NOTES.md)."""
    for key, typ in REQUIRED.items():
        if not isinstance(data.get(key), typ):
            raise ValueError(f"results: {key!r} must be {typ.__name__}, got {data.get(key)!r}")
    for i, row in enumerate(data["rows"]):
        required = dict(ROW_REQUIRED)
        if row.get("impl") in LINEAR_IMPLS:
            required.update(LINEAR_ROW_REQUIRED)
            if not isinstance(data.get("matmul_tflops"), float):
                raise ValueError("results: fused-linear rows need the top-level "
                                 f"'matmul_tflops' (float), got {data.get('matmul_tflops')!r}")
        for key, typ in required.items():
            val = row.get(key)
            if typ is int and isinstance(val, bool) or not isinstance(val, typ):
                raise ValueError(f"results: rows[{i}][{key!r}] must be {typ.__name__}, "
                                 f"got {val!r}")
        if row["impl"] not in ALL_IMPLS:
            raise ValueError(f"results: rows[{i}] has unknown impl {row['impl']!r}")
        if row["dtype"] not in DTYPES or row["layout"] not in ("padded", "packed"):
            raise ValueError(f"results: rows[{i}] has bad dtype/layout")


def load_resumable(path, device: str) -> Dict[str, object]:
    """An earlier results file to resume from: its JSON, every row marked ``run: resumed``
    unless it already says which run it came from. Refused when it was measured on another
    device (rows of two machines never share a table)."""
    old = json.loads(Path(path).read_text(encoding="utf-8"))
    if old.get("device") != device:
        raise ValueError(f"cannot resume {path}: it was measured on {old.get('device')!r}, "
                         f"this is {device!r}")
    for row in old.get("rows", []):
        row.setdefault("run", "resumed")
    return old
