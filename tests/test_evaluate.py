"""Held-out evaluation and calibration: the standard error, the calibrated thresholds, the
rows that calibrate and the rows that are held out from calibration."""
import math

import numpy as np
import pytest
import torch

from conftest import routed_tiny
from evaluate import calibrate, calibration_rows, controls, evaluate, row_stats, static_rule
from router import Rule


class Rows:
    """A stand-in for data.TokenData: fixed random right-padded rows."""

    def __init__(self, n=12, T=16):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randint(0, 97, (n, T), generator=g)
        self.valid = torch.arange(T)[None] < torch.randint(4, T + 1, (n, 1), generator=g)
        self.y = torch.where(self.valid, self.x, -1)

    def val_rows(self, n):
        return np.arange(min(n, len(self.x)))

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
        model(x, valid=valid, rule=Rule("topk", capacity=caps))
        trained = [t.sel for t in model.route_trace]
        model(x, valid=valid)   # the inference rule: the calibrated thresholds
    for t, c, sel in zip(model.route_trace, caps.tolist(), trained):
        ran = int((t.sel & t.routable).sum())
        n = int(t.routable.sum())
        assert ran >= c * n - 1e-9 and ran < c * n + 1     # ceil(c * N) up to ties
        assert bool(t.sel[t.valid & ~t.routable].all())    # the sinks ran
        assert torch.equal(t.sel & t.valid, sel & t.valid)  # the very tokens top-k ran, no other


def test_thresholds_at_calibrates_each_group_to_its_own_capacity():
    """evaluate.thresholds_at (evaluate.py --calibrate, frontier.py) on inserted blocks
    routed whole and other layers' attention routed apart, trained to 0.8: the blocks at
    the capacity asked for, the attention parts at their own 0.8, not at the blocks'. On
    the calibration rows (4..11, after 4 eval rows) the thresholds then run exactly what
    top-k runs at capacities (0.8, 0.3, 0.8, 0.3): ceil(c N) of the N routable tokens,
    and the tokens tied with the last one (tokens that skipped an attention share states)."""
    from types import SimpleNamespace
    from evaluate import thresholds_at
    model = routed_tiny("block", layers=[1, 3], attn_layers=[0, 2], sink_tokens=1)
    config = {"train_rule": "topk", "attn_capacity_end": 0.8, "capacity_split": "labels", "eval_rows": 4,
              "calib_rows": 8}
    ckpt = SimpleNamespace(train_config=config, schedule={"label_frac": None})
    data, calib = Rows(), range(4, 12)
    parts = [part for _, part in model.config.route_slots()]
    assert parts == ["attn", "block", "attn", "block"]
    caps = torch.tensor([0.8, 0.3, 0.8, 0.3], dtype=torch.float64)
    want = evaluate(model, data, calib, Rule("topk", capacity=caps), 8, "cpu", "float32")["routed_frac"]
    model.config.route_threshold = thresholds_at(model, ckpt, data, 0.3, "cpu", "float32")
    got = evaluate(model, data, calib, model.default_rule(), 8, "cpu", "float32")["routed_frac"]
    assert got == want
    assert all(c <= f < c + 0.1 for c, f in zip(caps.tolist(), want))


class Split:
    """Only the row numbering of a held-out split: val rows are 0, 1, 2, ..."""

    def __init__(self, num_rows):
        self.num_rows = num_rows

    def val_rows(self, n):
        return np.arange(min(n, self.num_rows))


def test_calibration_rows_are_the_rows_after_the_eval_rows():
    """train.py evaluates on val rows 0..eval_rows-1 and calibrates on the next calib_rows,
    so the reported loss is never measured on the rows that set the thresholds. Pinned row
    for row: calibrating one row fewer, or shifted by one onto an eval row, fails. A split
    too small for both calibrates on what it has after the eval rows, or on the eval rows
    themselves when nothing is left."""
    config = {"eval_rows": 16, "calib_rows": 32}
    assert calibration_rows(Split(100), config).tolist() == list(range(16, 48))
    assert calibration_rows(Split(20), config).tolist() == [16, 17, 18, 19]
    assert calibration_rows(Split(10), config).tolist() == list(range(10))


def test_frontier_holds_out_the_calibration_rows():
    """frontier.py's losses come from val rows that calibration never saw: the first n of
    them with the calibration rows (16..47 here) left out, and a note when fewer remain."""
    import frontier
    config = {"eval_rows": 16, "calib_rows": 32}
    rows = frontier.held_out_rows(Split(100), config, 20)
    assert rows == list(range(16)) + list(range(48, 52))
    assert not set(rows) & set(calibration_rows(Split(100), config).tolist())
    assert frontier.held_out_rows(Split(50), config, 20) == list(range(16)) + [48, 49]


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
