"""What `jbn.cpu_tuning`'s settings give a train step, and what jbn carries in-process.

Process settings (the allocator's thresholds, XLA flags) act when a process
starts, so each configuration runs the same train step in fresh processes, in
interleaved rounds (every round starts one process per configuration, in
rotating order, so slow drifts of a shared machine hit all alike):

- ``untuned``: no settings at all (``JBN_NO_CPU_TUNING=1``, no allocator
  variables, no XLA flags): a user's own script that imports jbn and jits a step.
- ``carried``: the same bare process, but the script calls
  ``cpu_tuning.tune_allocator()`` and compiles its step with
  ``cpu_tuning.train_step_compiler_options("cpu")``: no variables, no
  re-execution.
- ``train.py``: the process settings of ``train.py`` (`cpu_tuning.environment`,
  as after `cpu_tuning.reexec_tuned`) and the same compile options.

The step is SmallBNConvNet's (as ``train.py`` runs it on one CPU device) or
ResNet-20's (``--network resnet20``), batch 128, SGD with momentum. The table
gives the median ms/step over the rounds and, per round, each configuration's
time as a fraction of the untuned one's: median (lowest-highest).

  python -m bench.bench_cpu_settings [--rounds 5] [--network small|resnet20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from jbn import cpu_tuning

CONFIGS = ("untuned", "carried", "train.py")


def environment(config: str) -> dict[str, str]:
    """The process environment of ``config`` (see the module docstring)."""
    bare = {k: v for k, v in os.environ.items() if k not in cpu_tuning.MALLOC_ENV}
    bare.pop("XLA_FLAGS", None)
    bare.pop(cpu_tuning.OPT_OUT_ENV, None)
    if config == "untuned":
        return {**bare, cpu_tuning.OPT_OUT_ENV: "1"}
    if config == "carried":
        return bare
    return cpu_tuning.environment(bare)


def worker(config: str, network: str, timings: int) -> None:
    """Runs in the fresh process: prints the step's ms per call as JSON."""
    if config == "carried":
        cpu_tuning.tune_allocator()  # before JAX allocates anything
    import jax

    from bench import timing
    from bench.bench_train_step import jax_step
    from jbn.models import SmallBNConvNet, resnet20

    if network == "resnet20":
        model, seconds = resnet20(), 2.0
    else:
        model, seconds = SmallBNConvNet(native_input_conv=jax.default_backend() == "cpu"), 1.0
    options = cpu_tuning.train_step_compiler_options(jax.default_backend())
    run = jax_step(model, compiler_options=options)[0]
    samples = [timing.time_once(run, seconds) for _ in range(timings)]
    print(json.dumps({"ms": statistics.median(samples), "options": sorted(options)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timings", type=int, default=3, help="timings per process")
    parser.add_argument("--network", choices=("small", "resnet20"), default="small")
    parser.add_argument("--worker", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--markdown", default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.network, args.timings)
        return
    samples: dict[str, list[float]] = {config: [] for config in CONFIGS}
    for round_index in range(args.rounds):
        shift = round_index % len(CONFIGS)
        for config in CONFIGS[shift:] + CONFIGS[:shift]:
            cmd = [sys.executable, "-m", "bench.bench_cpu_settings", "--worker", config]
            cmd += ["--network", args.network, "--timings", str(args.timings)]
            out = subprocess.run(
                cmd, env=environment(config), capture_output=True, text=True, check=True
            )
            samples[config].append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
    from bench import timing

    name = "ResNet-20" if args.network == "resnet20" else "SmallBNConvNet"
    lines = [
        f"## Process settings: {name} train step in fresh processes (batch 128; "
        f"{args.rounds} interleaved rounds; time / untuned per round: median (lowest-highest))",
        "",
        "| configuration | ms/step | time / untuned |",
        "|---|---|---|",
    ]
    for config in CONFIGS:
        spread = timing.ratio_spread(samples[config], samples["untuned"])
        lines.append(
            f"| {config} | {statistics.median(samples[config]):.2f} | "
            f"{timing.format_spread(spread)} |"
        )
    timing.emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
