"""Compiled XLA:CPU kernels (C++ through ``jax.ffi``), the lowest layer of jbn.

``library`` builds, caches and registers a kernel's C++ source (``csrc/``);
``moments`` is BatchNorm's batch statistics in one read of ``x``, which the
core uses on the CPU. Imports only JAX (and pooch for the cache directory);
every kernel has an XLA path that gives the same values where it cannot run.
"""
