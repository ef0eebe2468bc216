"""Where the norm layers' time goes in a train step: XLA:CPU's own per-operation timings.

Compiles the train step of `bench.bench_norm_in_networks`'s networks with
``xla_cpu_enable_xprof_traceme`` (XLA:CPU then records every operation it runs),
traces a few steps with ``jax.profiler`` and adds up, per compiled operation,
the time it ran. An operation belongs to a norm layer when the op name XLA
gives it (its root instruction's) lies in the layer's scope (``bn0``,
``layer1_0/bn2``, ``downsample_1``); it counts as backward inside
``transpose(...)``, as a reduction when it is one of YNNPACK's fusions (XLA:CPU
runs reductions through YNNPACK) or jbn's statistics kernel (``JbnMoments``,
`jbn.native.moments`), and as element-wise otherwise. What XLA fused
into an operation of another layer (a normalisation fused into the ReLU or the
pooling that follows) counts for that layer: the step times of
``bench_norm_in_networks`` give the whole cost.

Operation times are summed; operations that run at the same time (XLA:CPU runs
independent ones side by side) overlap, so the sum can exceed the step time.

  python -m bench.profile_norm_layers [--steps 10] [--network small|resnet20]
"""

from __future__ import annotations

from jbn import cpu_tuning

if __name__ == "__main__":
    cpu_tuning.reexec_tuned()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

from bench import timing  # noqa: E402
from bench.bench_norm_in_networks import networks  # noqa: E402
from bench.bench_train_step import jax_step  # noqa: E402

NORM_SCOPE = re.compile(r"/(bn\d+|downsample_1)/")
CATEGORIES = (
    "forward reductions",
    "forward element-wise",
    "backward reductions",
    "backward element-wise",
)


def op_names(compiled) -> dict[str, tuple[str, bool]]:
    """Instruction name -> (op name of its metadata, is a YNNPACK fusion), for the entry."""
    text = compiled.as_text()
    names = {}
    for line in text[text.index("\nENTRY") :].splitlines():
        match = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
        op_name = re.search(r'op_name="([^"]+)"', line)
        if match and op_name:
            reduction = "__ynn_fusion" in line or 'custom_call_target="JbnMoments"' in line
            names[match.group(1)] = (op_name.group(1), reduction)
    return names


def operation_times(run, steps: int) -> dict[str, float]:
    """Milliseconds per step of each traced XLA:CPU operation (summed over calls)."""
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        for _ in range(steps):
            run()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{directory}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event.get("dur", 0) / 1e3 / steps
    return totals


def profile(model, steps: int) -> tuple[float, dict[str, float], list[tuple[float, str]]]:
    """(ms per step, norm-layer time per category, the norm layers' largest operations)."""
    options = cpu_tuning.train_step_compiler_options(jax.default_backend())
    run, compiled = jax_step(model, {**options, "xla_cpu_enable_xprof_traceme": True})
    step_ms = timing.time_once(run, 1.0)
    names = op_names(compiled)
    by_category: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    largest = []
    for name, ms in operation_times(run, steps).items():
        if name not in names or not NORM_SCOPE.search(names[name][0]):
            continue
        op_name, reduction = names[name]
        direction = "backward" if "transpose(" in op_name else "forward"
        by_category[f"{direction} {'reductions' if reduction else 'element-wise'}"] += ms
        largest.append((ms, f"{name} ({op_name.split('/')[-1]})"))
    return step_ms, by_category, sorted(largest, reverse=True)[:4]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--network", choices=("small", "resnet20"), default="resnet20")
    parser.add_argument("--markdown", default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    name = "ResNet-20" if args.network == "resnet20" else "SmallBNConvNet"
    lines = [
        f"## Norm layers in the {name} train step: XLA:CPU operation time per step (ms)",
        "",
        "| norm layer | step | " + " | ".join(CATEGORIES) + " | norm layers, total | largest |",
        "|---|---|" + "---|" * (len(CATEGORIES) + 2),
    ]
    for norm, model in networks()[name].items():
        if norm == "none":
            continue
        step_ms, by_category, largest = profile(model, args.steps)
        cells = " | ".join(f"{by_category[c]:.1f}" for c in CATEGORIES)
        top = "; ".join(f"{label} {ms:.1f}" for ms, label in largest)
        lines.append(
            f"| {norm} | {step_ms:.1f} | {cells} | {sum(by_category.values()):.1f} | {top} |"
        )
    timing.emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
