"""Experiments over the workbench: sweeps of config variants and their reports.

``sweep`` trains named variants of a config, ``report`` writes tables and plots
into ``docs/experiments/``; run them as ``python -m jbn.sweep`` and ``python -m
jbn.report``.
"""
