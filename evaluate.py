"""
Held-out evaluation of a model, routed or not, and the calibration of its routers.

    python evaluate.py out/dlo/ckpt.pt                   # loss ± SE and executed layers
    python evaluate.py out/dlo/ckpt.pt --controls        # + label oracle, random routing, p >= 0.5
    python evaluate.py out/dlo/ckpt.pt --calibrate 0.5   # new thresholds: skip more at inference
    python evaluate.py out/kv/ckpt.pt --kv_window 256    # K/V retention: a wider window at inference

Notable features
- loss per target token with a standard error over conversations (tokens of one
  conversation are not independent), and paired differences between two models on
  the same conversations, whose SE is far smaller than either loss's
- executed layers measured with the same denominator training logs: every layer, with
  unrouted layers and sink tokens counted as run
- controls on the same weights at the routers' own per-layer fractions: the label
  oracle (skip by the similarity labels of a dense pass, no router: the best routers
  could do) and random routing (what per-token routing adds beyond per-layer sparsity)
- calibration: one threshold per routed layer so that inference runs what training
  ran (train.py ends with it), or any other capacity on demand; written into the
  checkpoint, which sample.py, bench.py and compare.py then use
"""
import argparse
import dataclasses
import math
import sys

import numpy as np
import torch

import dlo
import weights
from controls import oracle_rule, random_rule, static_rule
from data import open_split
from mod import make_labels
from retention import kept_map
from router import Rule, bce_sum, select_topk
from schedule import part_schedule
from tokenizer import load_tokenizer
from weights import autocast, pick_device, pick_dtype


# ---- what ran ---------------------------------------------------------------------------

@torch.no_grad()
def router_agreement(traces, labels):
    """How well the routers rank tokens by their labels: per layer, run the router's own top
    fraction f_l (f_l = the layer's label fraction) and count decisions equal to the
    label; also the mean BCE. Random routers score f^2 + (1-f)^2 per layer."""
    agree, bce, n = 0.0, 0.0, 0.0
    for t, y in zip(traces, labels):
        frac = (y & t.routable).sum() / t.routable.sum().clamp(min=1)
        mine = select_topk(t.logit, t.routable, frac)
        agree += float(((mine == y) & t.routable).sum())
        bce += float(bce_sum([t.logit], [y], [t]))
        n += float(t.routable.sum())
    return agree / max(n, 1.0), bce / max(n, 1.0)


def executed_fraction(traces, n_layer, n_valid):
    """(attention, MLP): the fraction of all n_layer attentions and of all n_layer MLPs
    that ran, per real token; unrouted parts and sink tokens count as run. A skipped
    block skips both (Trace.skips). Training and evaluation use this same denominator."""
    total = n_layer * max(n_valid, 1)
    skipped = {"attn": 0, "mlp": 0}
    for t in traces:
        for part in t.skips:
            skipped[part] = skipped[part] + (t.valid & ~t.sel).sum()
    return tuple(float(n_layer * n_valid - skipped[part]) / total for part in ("attn", "mlp"))


def executed_map(traces, n_layer):
    """(B, T, n_layer, 2) bool from one forward's traces: did the layer's attention
    ([..., 0]) and its MLP ([..., 1]) run?"""
    ref = traces[0].valid
    ran = torch.ones(*ref.shape, n_layer, 2, dtype=torch.bool, device=ref.device)
    for t in traces:
        for part in t.skips:
            ran[..., t.layer, ("attn", "mlp").index(part)] = t.sel
    return ran


def row_stats(row_sums, row_counts):
    """Mean loss per target token and its standard error, with conversations as clusters:
    the SE of a ratio estimator from per-row sums."""
    s, n = np.asarray(row_sums, dtype=np.float64), np.asarray(row_counts, dtype=np.float64)
    mean, k = s.sum() / n.sum(), len(s)
    return mean, math.sqrt(k / max(1, k - 1) * ((s - mean * n) ** 2).sum()) / n.sum()


def paired_difference(a, b):
    """Mean loss of evaluation a minus b, taken on the same rows, and its SE over rows."""
    d = np.asarray(a["row_sums"]) - np.asarray(b["row_sums"])
    return row_stats(d, a["row_counts"])


@torch.no_grad()
def evaluate(model, data, rows, rule, batch_size, device, dtype, labels=None, label_capacity=None, groups=None):
    """Held-out loss (mean and SE over rows), the executed fractions of all attentions and
    all MLPs, per-layer fractions (over real tokens, and per routed part over its routable
    tokens), and with `labels` the routers' agreement with them. `rule`: a Rule, or a
    function (model, x, valid) -> Rule for rules that look at the batch first (the controls)."""
    model.eval()
    L, n_routed = model.config.n_layer, len(model.config.route_slots())
    sums, counts, agree = [], [], []
    ran, n_valid, exec_total = torch.zeros(3, L, dtype=torch.float64), 0, torch.zeros(2, dtype=torch.float64)
    routed_ran, routable = torch.zeros(n_routed, dtype=torch.float64), torch.zeros(n_routed, dtype=torch.float64)
    with autocast(device, dtype):
        for i in range(0, len(rows), batch_size):
            x, y, valid = (t.to(device) for t in data.batch(rows[i:i + batch_size]))
            r = rule(model, x, valid) if callable(rule) else rule
            if labels in ("cos", "cos-global"):   # the routed branch runs densely so labels can be read
                r = dataclasses.replace(r, similarity=True)
            _, tok_loss = model(x, y, valid=valid, rule=r, reduction="none")
            sums += tok_loss.sum(1).tolist()
            counts += (y != -1).sum(1).tolist()
            traces, nv = model.route_trace, int(valid.sum())
            exec_total += torch.tensor(executed_fraction(traces, L, nv), dtype=torch.float64) * nv
            n_valid += nv
            if traces:   # attention and MLP run, K/V kept, per layer
                maps = torch.cat([executed_map(traces, L), kept_map(traces, L, model.config.kv_policy)[..., None]], -1)
                ran += maps[valid].sum(0).double().T
            else:   # nothing routed: every real token runs every layer
                ran += nv
            for slot, t in enumerate(traces):
                routed_ran[slot] += int((t.sel & t.routable).sum())
                routable[slot] += int(t.routable.sum())
            if traces and labels in ("cos", "cos-global"):
                agree.append(router_agreement(traces, make_labels(traces, labels, label_capacity, groups=groups)[0]))
    model.train()
    loss, se = row_stats(sums, counts)
    out = {"val_loss": loss, "val_se": se, "attn_frac_infer": float(exec_total[0]) / n_valid,
           "mlp_frac_infer": float(exec_total[1]) / n_valid, "attn_per_layer": (ran[0] / n_valid).tolist(),
           "mlp_per_layer": (ran[1] / n_valid).tolist(), "kv_per_layer": (ran[2] / n_valid).tolist(),
           "routed_frac": (routed_ran / routable.clamp(min=1)).tolist(),
           "row_sums": sums, "row_counts": counts}
    if agree:
        out["router_agree"], out["router_bce"] = (float(np.mean([a[i] for a in agree])) for i in (0, 1))
    return out


@torch.no_grad()
def calibrate(model, data, rows, capacities, device, dtype):
    """One threshold per routed layer such that, on these held-out rows, `p >= t` runs
    exactly the top-k fraction that training ran: one top-k pass at the training
    capacities, all rows in one batch, each layer seeing the layers below it already
    routed (dlo.calibrate). A layer trained at capacity 1 gets 0: it runs every token,
    also the ones whose p falls below anything seen here."""
    model.eval()
    x, y, valid = (t.to(device) for t in data.batch(rows))
    with autocast(device, dtype):
        thresholds = dlo.calibrate(model, x, y, valid, capacities.to(device))
    model.train()
    return thresholds


def controls(result, parts):
    """The control rules of a routed evaluation `result`, at its per-part fractions;
    parts: each routed part's kind (config.route_slots)."""
    fractions = result["routed_frac"]
    return {"oracle": oracle_rule(fractions), "random": random_rule(fractions), "static": static_rule(fractions, parts),
            "p>=0.5": Rule("threshold", 0.5)}


def held_out(train_config, split="val"):
    """The held-out data of a checkpoint's training run, prepared if it is not on disk."""
    c = train_config
    tokenizer = lambda: load_tokenizer(weights.tokenizer_source(c["init_from"]))
    return open_split(c["dataset"], c["data_dir"], split, c["seq_len"], c.get("max_convs", 0), tokenizer)


class LongConversations:
    """Held-out conversations of at least `min_tokens` tokens, each whole up to `max_tokens`,
    none of them among the rows the run evaluated or calibrated on: where a K/V window
    hides keys, which 256-token rows never do. batch() trims the padding past the longest
    row, so a batch of one runs its own length."""

    def __init__(self, train_config, n, min_tokens=2048, max_tokens=8192):
        c = train_config
        short = held_out(c)
        used = set(short.starts[short.val_rows(c["eval_rows"] + c["calib_rows"])].tolist())
        self.data = held_out({**c, "seq_len": max_tokens})
        lengths = self.data.ends - self.data.starts - 1
        self.rows = [r for r in range(self.data.num_rows)
                     if lengths[r] >= min_tokens and int(self.data.starts[r]) not in used][:n]
        if not self.rows:
            raise ValueError(f"no held-out conversation has {min_tokens} tokens or more")
        self.tokens = int(lengths[self.rows].sum())

    def batch(self, rows):
        x, y, valid = self.data.batch(rows)
        T = int(valid.sum(1).max())
        return x[:, :T], y[:, :T], valid[:, :T]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on held-out rows; calibrate its routers.")
    p.add_argument("checkpoint", help="a train.py checkpoint (.pt) or its export folder (export.py)")
    p.add_argument("--rows", type=int, default=None, help="held-out rows (default: the run's eval_rows)")
    p.add_argument("--controls", action="store_true",
                   help="also the label oracle, random routing, static pruning and p >= 0.5")
    p.add_argument("--calibrate", type=float, default=None, metavar="C",
                   help="write thresholds for mean capacity C of the routed layers into the checkpoint")
    p.add_argument("--kv_window", type=int, default=None, metavar="W",
                   help='K/V policy "window": write a new window W into the checkpoint first')
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    return p.parse_args(argv)


def thresholds_at(model, ckpt, data, capacity, device, dtype, attn_capacity=None):
    """Thresholds that run mean capacity `capacity` of the routed parts (and, when training
    gave attention a capacity of its own, `attn_capacity` of the attention parts: default
    its trained one), split over the parts the way training split it (schedule.part_schedule),
    calibrated on the run's calibration rows."""
    c = ckpt.train_config
    if not model.config.route_slots() or c["train_rule"] != "topk" or c.get("predictor"):
        raise ValueError("only models routed with top-k have thresholds to calibrate")
    attn_capacity = c.get("attn_capacity_end", 0.0) if attn_capacity is None else attn_capacity
    for name, value in (("capacity", capacity), ("attention capacity", attn_capacity or 1.0)):
        if not 0 < value <= 1:
            raise ValueError(f"the {name} must be in (0, 1], got {value}")
    # anneal=0: every group at its own end from step 0 (the attention group would start at `capacity`)
    schedule = part_schedule(model.config.route_slots(), capacity, capacity, attn_capacity, anneal=0,
                             split=c["capacity_split"])
    schedule.load_state_dict(ckpt.schedule)
    return calibrate(model, data, calibration_rows(data, c), schedule.capacities(0), device, dtype)


def calibration_rows(data, train_config):
    """The held-out rows a run calibrates on: the calib_rows after its eval_rows, or the eval
    rows themselves when the split is too small to hold both."""
    rows = data.val_rows(train_config["eval_rows"] + train_config["calib_rows"])
    return rows[train_config["eval_rows"]:] if len(rows) > train_config["eval_rows"] else rows


def recalibrate(path, model, ckpt, data, capacity, device, dtype):
    """thresholds_at `capacity`, written into the checkpoint."""
    if not 0 < capacity <= 1:
        raise ValueError(f"--calibrate must be in (0, 1], got {capacity}")
    thresholds = thresholds_at(model, ckpt, data, capacity, device, dtype)
    weights.set_thresholds(path, thresholds)
    model.config.route_threshold = thresholds
    print(f"{len(thresholds)} thresholds for mean capacity {capacity} -> {path}")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    try:
        if args.kv_window is not None:
            weights.set_kv_window(args.checkpoint, args.kv_window)
        ckpt = weights.load_checkpoint(args.checkpoint)
        if not ckpt.train_config:
            raise ValueError(f"{args.checkpoint}: not a train.py checkpoint")
        model = weights.model_from_checkpoint(ckpt)
        c = ckpt.train_config
        data, dtype = held_out(c), pick_dtype(c.get("dtype", "float32"), device)
        weights.place(model, device)
        if args.calibrate is not None:
            recalibrate(args.checkpoint, model, ckpt, data, args.calibrate, device, dtype)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    rows = data.val_rows(args.rows or c["eval_rows"])
    result = evaluate(model, data, rows, model.default_rule(), c["batch_size"], device, dtype)
    print(f"{'routers':>8}: loss {result['val_loss']:.4f} ± {result['val_se']:.4f} on {len(rows)} rows, "
          f"{ran(result, model)}")
    slots = model.config.route_slots()
    if args.controls and slots:
        for name, rule in controls(result, [part for _, part in slots]).items():
            other = evaluate(model, data, rows, rule, c["batch_size"], device, dtype)
            d, se = paired_difference(other, result)
            print(f"{name:>8}: loss {other['val_loss']:.4f}, {d:+.4f} ± {se:.4f} vs the routers, {ran(other, model)}")


def ran(result, model):
    """What an evaluation ran per token, as text: attentions and MLPs of n_layer."""
    L = model.config.n_layer
    return f"{result['attn_frac_infer'] * L:.2f} attentions and {result['mlp_frac_infer'] * L:.2f} MLPs of {L} run"


if __name__ == "__main__":
    main()
