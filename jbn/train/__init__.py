"""The training workbench: config-driven, jitted, mesh-first training on CIFAR-10.

``loop`` (``train_and_evaluate``, the train and eval steps), ``data``
(loading, batching, augmentation), ``checkpoint`` (orbax), ``optim``
(optimizer and schedule), ``distributed`` (mesh, sharding, multi-host),
``run_log`` and ``plot`` (metrics files and curves) and ``cpu_tuning`` (XLA:CPU
process settings, also importable as ``jbn.cpu_tuning``). Kept light: importing
this package does not import JAX.
"""
