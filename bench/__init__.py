"""Benchmark tooling of drift: the asv suites (``bench/benchmarks``, see ``asv.conf.json``), the hot paths they and
every other benchmark time (``bench/benchmarks/_hotpaths.py``), stand-alone scripts, and ``benchio`` (records into
HDF5, ``drift bench export``).

``bench/benchmarks`` is what asv discovers (``asv run``); ``tests/benchmarks`` times the same hot paths with
pytest-benchmark. docs/benchmarks.md explains how to run them and how to track a regression.
"""
