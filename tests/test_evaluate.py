"""Held-out evaluation and calibration: the standard error, the calibrated thresholds."""
import math

import pytest
import torch

from conftest import routed_tiny
from evaluate import calibrate, controls, evaluate, row_stats, static_rule
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
    rules = controls(mine, ["mlp"] * 4)
    for name, tolerance in (("oracle", 0.1), ("random", 0.15)):   # oracle: ceil(f * N) per batch of 4 rows
        other = evaluate(model, data, range(12), rules[name], 4, "cpu", "float32")
        assert all(abs(a - b) < tolerance for a, b in zip(other["routed_frac"], mine["routed_frac"]))
    x, _, valid = data.batch(range(4))
    rule = rules["oracle"](model, x, valid)
    with torch.no_grad():
        model(x, valid=valid, rule=Rule("all", similarity=True))
    for mask, t in zip(rule.masks, model.route_trace):
        assert not (mask & ~t.routable).any()
        ran, skipped = t.sim[mask], t.sim[t.routable & ~mask]
        assert ran.numel() == 0 or skipped.numel() == 0 or ran.max() <= skipped.min()


def test_static_control_drops_whole_parts_at_the_routers_total():
    """Per kind of part, the most used parts run whole and the rest not at all, and the
    kept count is the routers' total rounded up: never less compute than the routers."""
    fractions = [0.9, 0.1, 0.35, 0.2, 0.6, 0.8]
    parts = ["attn", "attn", "attn", "mlp", "mlp", "mlp"]
    assert static_rule(fractions, parts).capacity.tolist() == [1, 0, 1, 0, 1, 1]   # attn 1.35 -> 2; mlp 1.6 -> 2
    model = routed_tiny("attn+mlp", sink_tokens=1)
    data = Rows()
    mine = evaluate(model, data, range(12), model.default_rule(), 4, "cpu", "float32")
    kinds = [part for _, part in model.config.route_slots()]
    static = evaluate(model, data, range(12), controls(mine, kinds)["static"], 4, "cpu", "float32")
    assert set(static["routed_frac"]) <= {0.0, 1.0}
    for kind in ("attn", "mlp"):
        routers = sum(f for f, k in zip(mine["routed_frac"], kinds) if k == kind)
        kept = sum(f for f, k in zip(static["routed_frac"], kinds) if k == kind)
        assert kept == math.ceil(routers - 1e-6)
