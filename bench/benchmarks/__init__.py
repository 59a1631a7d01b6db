"""asv suites of drift (``asv.conf.json``: ``benchmark_dir``).

* ``time_kernels``: speed and peak memory of ``fisher_gram``, ``fisher_project`` and ``topk_iou``, Triton kernel
  (CUDA only) against the torch reference.
* ``time_pipeline``: the hot paths of ``drift run``: CAMs against pytorch-grad-cam, the Jacobian engine, a batch
  of drift metrics, synthetic data generation.
* ``track_science``: the accuracy-stability record of the smoke study (one deterministic run per commit).
* ``track_kernels``: kernel and reference error against float64 and brute-force references.

``_hotpaths`` declares the CAM, Jacobian, iFIM-spectrum and kernel paths these suites time (inputs,
implementations, checks); ``_support`` holds the lazy imports, the device choice and the synchronisation.

Modules import torch and drift inside setup functions only, so discovery is fast and a commit that lacks a
module skips the benchmarks needing it (NotImplementedError) instead of failing them.
"""
