"""Benchmarks: ratios against a baseline measured in the same run, never absolute timings.

Each ``bench/bench_<name>.py`` exposes ``run() -> dict`` whose ``"markdown"`` value is
its section of ``docs/benchmarks.md``; ``python -m bench [NAME ...]`` runs them and
rewrites only their sections (between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``),
so benches written by different people share the file without clobbering each other.
Benches contact loopback only (they start their own emulators and stop them).
"""
