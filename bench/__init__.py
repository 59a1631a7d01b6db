"""Benchmarks of drift: the asv suites (``bench/benchmarks``, see ``asv.conf.json``) and stand-alone scripts.

``bench/benchmarks`` is what asv discovers (``asv run``); ``tests/benchmarks`` covers the same hot paths with
pytest-benchmark; ``drift bench export`` copies either kind of record into HDF5. docs/benchmarks.md explains how
to run them and how to track a regression.
"""
