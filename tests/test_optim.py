"""jbn.train.optim: the one-cycle schedule against torch.optim.lr_scheduler.OneCycleLR."""

import jax
import numpy as np
import pytest

from jbn.train import optim

torch = pytest.importorskip("torch")


def _torch_rates(total_steps, peak, pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
    param = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([param], lr=peak)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        sgd,
        max_lr=peak,
        total_steps=total_steps,
        pct_start=pct_start,
        anneal_strategy="cos",
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        three_phase=False,
        cycle_momentum=False,
    )
    rates = []
    for _ in range(total_steps):
        rates.append(sgd.param_groups[0]["lr"])  # the rate of this step
        sgd.step()
        scheduler.step()
    return np.array(rates)


@pytest.mark.parametrize(
    "total_steps,pct_start,div_factor,final_div_factor",
    [(20, 0.3, 25.0, 1e4), (21, 0.3, 25.0, 1e4), (7, 0.25, 10.0, 100.0), (3900, 0.3, 25.0, 1e4)],
)
def test_onecycle_equals_torch_step_for_step(total_steps, pct_start, div_factor, final_div_factor):
    peak = 0.1
    schedule = optim.onecycle_schedule(
        total_steps, peak, pct_start, div_factor=div_factor, final_div_factor=final_div_factor
    )
    ours = np.asarray(schedule(np.arange(total_steps)), np.float64)
    ref = _torch_rates(total_steps, peak, pct_start, div_factor, final_div_factor)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * peak)
    # The last trained step has the final rate, peak / div_factor / final_div_factor.
    np.testing.assert_allclose(ours[-1], peak / div_factor / final_div_factor, rtol=1e-5)


def test_make_schedule_uses_it_from_the_config():
    class Config:
        schedule, learning_rate, warmup_fraction, div_factor, final_div_factor = (
            "onecycle",
            0.1,
            0.3,
            25.0,
            1e4,
        )

    rates = jax.vmap(optim.make_schedule(Config, 20))(np.arange(20))
    np.testing.assert_allclose(rates, _torch_rates(20, 0.1), rtol=1e-5, atol=1e-7)
