"""The training workbench: config-driven, jitted, mesh-first training on CIFAR-10 and more.

``loop`` (``train_and_evaluate``, the train and eval steps), ``state`` (the
train state), ``datasets`` (CIFAR-10/100 and MNIST from their official files,
safely), ``data`` (batching, augmentation), ``config_schema`` (what each config
field accepts) and ``run_config`` (the workdir's config, resume checks),
``checkpoint`` (orbax), ``epoch_metrics`` (train-metric sums carried through
checkpoints), ``preemption`` (graceful SIGTERM/SIGINT), ``optim`` (optimizer
and schedule), ``distributed`` (mesh, sharding, multi-host), ``run_log`` and
``plot`` (metrics files and curves) and ``cpu_tuning`` (XLA:CPU process
settings, also importable as ``jbn.cpu_tuning``). Kept light: importing this
package does not import JAX.
"""
