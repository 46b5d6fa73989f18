"""Benchmark suite of opo_kernels: ``python -m benchmarks.run`` (see benchmarks/NOTES.md)."""
