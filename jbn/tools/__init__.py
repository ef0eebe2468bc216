"""Tools for trained networks: inference, fine-tuning and interop.

``folding`` (fold BatchNorm into the preceding conv/dense layer),
``recalibration`` (exact population statistics, PreciseBN), ``freezing``
(frozen BatchNorm for fine-tuning) and ``interop_torch`` (PyTorch state dicts,
also importable as ``jbn.interop_torch``).
"""
