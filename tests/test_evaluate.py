"""Held-out evaluation and calibration: the standard error, the calibrated thresholds."""
import pytest
import torch

from conftest import routed_tiny
from evaluate import calibrate, controls, evaluate, row_stats
from router import Rule


class Rows:
    """A stand-in for data.TokenData: fixed random right-padded rows."""

    def __init__(self, n=12, T=16):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randint(0, 97, (n, T), generator=g)
        self.valid = torch.arange(T)[None] < torch.randint(4, T + 1, (n, 1), generator=g)
        self.y = torch.where(self.valid, self.x, -1)

    def batch(self, rows):
        rows = list(rows)
        return self.x[rows], self.y[rows], self.valid[rows]


@pytest.mark.parametrize("sinks", [0, 2])
def test_calibrated_thresholds_reproduce_the_target_fractions(sinks):
    model = routed_tiny(sink_tokens=sinks)
    data = Rows()
    caps = torch.tensor([1.0, 0.7, 0.5, 0.25], dtype=torch.float64)
    thresholds = calibrate(model, data, range(12), caps, "cpu", "float32")
    model.config.route_threshold = thresholds
    x, y, valid = data.batch(range(12))
    with torch.no_grad():
        model(x, valid=valid)   # the inference rule: the calibrated thresholds
    for t, c in zip(model.route_trace, caps.tolist()):
        ran = int((t.sel & t.routable).sum())
        n = int(t.routable.sum())
        assert ran >= c * n - 1e-9 and ran < c * n + 1     # ceil(c * N) up to ties
        assert bool(t.sel[t.valid & ~t.routable].all())    # the sinks ran


def test_row_stats_standard_error():
    mean, se = row_stats([2.0, 4.0], [1, 1])
    assert mean == 3.0 and abs(se - 1.0) < 1e-12            # the SE of the mean of two rows
    mean, se = row_stats([3.0, 3.0, 6.0], [1, 1, 2])
    assert mean == 3.0 and se == 0.0                          # per-token means all equal


def test_controls_run_the_same_fractions_as_the_routers():
    """The oracle and random controls run each routed layer at the routers' own fraction of
    routable tokens, never a sink or padding; the oracle picks the least-similar tokens."""
    model = routed_tiny(sink_tokens=1)
    data = Rows()
    mine = evaluate(model, data, range(12), model.default_rule(), 4, "cpu", "float32")
    assert 0.2 < sum(mine["routed_frac"]) / 4 < 0.8
    for name, rule in controls(mine).items():
        other = evaluate(model, data, range(12), rule, 4, "cpu", "float32")
        if name != "p>=0.5":   # per batch of 4 rows, ceil(f * N): within a token per batch and layer
            assert all(abs(a - b) < 0.1 for a, b in zip(other["routed_frac"], mine["routed_frac"]))
    x, _, valid = data.batch(range(4))
    rule = controls(mine)["oracle"](model, x, valid)
    with torch.no_grad():
        model(x, valid=valid, rule=Rule("all", similarity=True))
    for mask, t in zip(rule.masks, model.route_trace):
        assert not (mask & ~t.routable).any()
        ran, skipped = t.sim[mask], t.sim[t.routable & ~mask]
        assert ran.numel() == 0 or skipped.numel() == 0 or ran.max() <= skipped.min()
