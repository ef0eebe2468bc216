"""Side-by-side timing helpers for the bench scripts: interleaved rounds, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def jax_callable(fn: Callable, *args) -> Callable[[], None]:
    """Returns a no-argument callable running ``fn(*args)`` to completion (compiled first)."""
    jax.block_until_ready(fn(*args))

    def run():
        jax.block_until_ready(fn(*args))

    return run


def torch_device() -> str:
    """``"cuda"`` when JAX runs on a GPU and PyTorch sees one, else ``"cpu"``.

    Puts PyTorch on the same kind of device as JAX, so each comparison is like for like.
    """
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_callable(fn: Callable[[], None], device: str) -> Callable[[], None]:
    """Wraps ``fn`` so that it returns only once its PyTorch kernels on ``device`` are done."""
    if device == "cpu":
        return fn
    import torch

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def torch_train_step(
    net: object, device: str, batch: int, channels_last: bool
) -> Callable[[], None]:
    """One SGD(lr=0.1, momentum=0.9) step of a PyTorch classifier on random 32x32 RGB images.

    Args:
      net: A ``torch.nn.Module`` taking ``(batch, 3, 32, 32)`` and giving 10 logits.
      device: Where to run (`torch_device`).
      batch: Images per step.
      channels_last: Puts the network and images in PyTorch's NHWC memory format.

    Returns:
      A no-argument callable that runs one step to completion (`torch_callable`).
    """
    import torch

    net = net.to(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(images), labels)
        loss.backward()
        opt.step()

    return torch_callable(run, device)


def time_once(fn: Callable[[], None], min_seconds: float = 0.2) -> float:
    """Milliseconds per call, averaged over enough calls to fill ``min_seconds``."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 1e3 * elapsed / calls


def interleaved_samples(
    funcs: dict[str, Callable[[], None]],
    rounds: int = 7,
    min_seconds: float = 0.2,
    pause_seconds: float = 0.0,
) -> dict[str, list[float]]:
    """Milliseconds per call of each function, one sample per interleaved round.

    Each round times every function once, so slow drifts of a shared machine hit
    all competitors alike. ``pause_seconds`` of sleep before each timing lets the
    previous competitor's worker threads go idle (PyTorch's OpenMP workers spin
    for a while after each call and slow whatever runs right after them).
    """
    samples: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(rounds):
        for name, fn in funcs.items():
            time.sleep(pause_seconds)
            samples[name].append(time_once(fn, min_seconds))
    return samples


def interleaved_medians(
    funcs: dict[str, Callable[[], None]],
    rounds: int = 7,
    min_seconds: float = 0.2,
    pause_seconds: float = 0.0,
) -> dict[str, float]:
    """Median milliseconds per call of each function (see `interleaved_samples`)."""
    samples = interleaved_samples(funcs, rounds, min_seconds, pause_seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def ratio_spread(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of the per-round ratios ``numerator / denominator``.

    Rounds are paired (same round, same machine state), so the spread shows how
    much a ratio moves between rounds, which the ratio of two medians hides.
    """
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    return statistics.median(ratios), ratios[0], ratios[-1]


def format_spread(spread: tuple[float, float, float]) -> str:
    """``"0.78x (0.74-0.81)"``: the median ratio and its per-round range."""
    median, low, high = spread
    return f"{median:.2f}x ({low:.2f}-{high:.2f})"


def emit(text: str, markdown: str | None = None) -> None:
    """Prints ``text`` and appends it to the ``markdown`` file when one is given."""
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write(text + "\n\n")
