"""What the side benchmarks (host_overhead, host_time, sweep, tp_bench,
tools/gpu/epilogue_bench) share: the header of their results (device, versions), the JSON they
write, and the --tiny/--out command line."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional


def environment(cuda: bool, **extra) -> Dict[str, object]:
    """device, torch and triton versions (extra keys after them, in order)."""
    import torch
    import triton

    return {"device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, **extra}


def save(out: Optional[Path], name: str, result: Dict[str, object]) -> None:
    """result as out/name (indented JSON); nothing when out is None."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(result, indent=2))


def tiny_cli(run: Callable[[bool, Optional[Path]], object], doc: str, argv=None) -> None:
    """``--tiny`` (CPU, the Triton interpreter) and ``--out DIR``, then run(tiny, out)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check at a tiny shape")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run(args.tiny, args.out)
