"""Cost of BatchNorm statistics modes per data-parallel train step on 8 fake CPU devices.

global (statistics over the whole global batch: cross-device collectives in
every BatchNorm layer) vs local (per-device statistics, no collective for
them) vs ghost (virtual batches of 16), the jbn train step of the workbench
(``jbn.loop.make_train_step``), batch 128, measured side by side in one
process in interleaved rounds. The fake devices share this machine's cores,
so the figure measures the extra work and synchronisation of the collectives,
not a real interconnect.

  python -m bench.bench_bn_modes [--rounds 5] [--markdown out.md]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import runpy  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import timing  # noqa: E402
from jbn.train import (
    distributed,
    loop,  # noqa: E402
)

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH = 128


def make_step(mode, virtual_batch_size, mesh):
    config = runpy.run_path(str(REPO / "configs" / "default.py"))["get_config"]()
    config.model.bn_stats = mode
    config.model.virtual_batch_size = virtual_batch_size
    state = loop.create_train_state(config, jax.random.key(0), mesh, steps_per_epoch=390)
    step = loop.make_train_step(config, mesh)
    rng = np.random.default_rng(0)
    batch = distributed.put_batch(
        {
            "image": rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, BATCH).astype(np.int32),
        },
        mesh,
    )
    key = jax.random.key(1)
    hlo = step.lower(state, batch, key).compile().as_text()
    collectives = len(re.findall(r"\s(all-reduce|all-gather|reduce-scatter)(-start)?\(", hlo))
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch, key)
        metrics["loss"].block_until_ready()

    run()
    return run, collectives


def _devices(mesh) -> str:
    """How many devices of which kind ``mesh`` spans, e.g. "8 fake CPU devices"."""
    device = mesh.devices.flat[0]
    kind = "fake CPU" if device.platform == "cpu" else device.device_kind
    return f"{mesh.size} {kind} device{'s' if mesh.size > 1 else ''}"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    mesh = distributed.create_mesh({"data": -1})
    modes = {"global": (None,), "local": (None,), "ghost": (16,)}
    funcs, collectives = {}, {}
    for mode, (vbs,) in modes.items():
        funcs[mode], collectives[mode] = make_step(mode, vbs, mesh)
    medians = timing.interleaved_medians(funcs, rounds=args.rounds, min_seconds=1.0)
    lines = [
        f"## BatchNorm statistics modes: data-parallel train step on {_devices(mesh)} "
        f"(batch {BATCH}, median of {args.rounds} interleaved rounds)",
        "",
        "| mode | ms/step | images/s | time / local | collectives in the compiled step |",
        "|---|---|---|---|---|",
    ]
    for mode, ms in medians.items():
        lines.append(
            f"| {mode} | {ms:.1f} | {BATCH / ms * 1e3:.0f} | {ms / medians['local']:.2f} | {collectives[mode]} |"
        )
    timing.emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
