"""
Held-out evaluation of a model, routed or not, and the calibration of its routers.

    python evaluate.py out/dlo/ckpt.pt                   # loss ± SE and executed layers
    python evaluate.py out/dlo/ckpt.pt --controls        # + label oracle, random routing, p >= 0.5
    python evaluate.py out/dlo/ckpt.pt --calibrate 0.5   # new thresholds: skip more at inference

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

import weights
from data import open_split
from router import (CapacitySchedule, Rule, executed_fraction, make_labels, routable_tokens, router_agreement,
                    select_topk, thresholds_from_topk)
from tokenizer import load_tokenizer
from weights import autocast, pick_device, pick_dtype


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
def evaluate(model, data, rows, rule, batch_size, device, dtype, labels=None, label_capacity=None):
    """Held-out loss (mean and SE over rows), the executed fraction of all layers, per-layer
    fractions (over real tokens, and per routed layer over its routable tokens), and with
    `labels` the routers' agreement with them. `rule`: a Rule, or a function
    (model, x, valid) -> Rule for rules that look at the batch first (the controls)."""
    model.eval()
    L, n_routed = model.config.n_layer, len(model.config.routed_ids())
    sums, counts, agree = [], [], []
    ran, n_valid, exec_total = torch.zeros(L, dtype=torch.float64), 0, 0.0
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
            exec_total += float(executed_fraction(traces, L, nv)) * nv
            n_valid += nv
            per_layer = [nv] * L   # unrouted layers run every real token
            for slot, t in enumerate(traces):
                per_layer[t.layer] = int((t.sel & t.valid).sum())
                routed_ran[slot] += int((t.sel & t.routable).sum())
                routable[slot] += int(t.routable.sum())
            ran += torch.tensor(per_layer, dtype=torch.float64)
            if traces and labels in ("cos", "cos-global"):
                agree.append(router_agreement(traces, make_labels(traces, labels, label_capacity)[0]))
    model.train()
    loss, se = row_stats(sums, counts)
    out = {"val_loss": loss, "val_se": se, "exec_frac_infer": exec_total / n_valid,
           "exec_per_layer": (ran / n_valid).tolist(), "routed_frac": (routed_ran / routable.clamp(min=1)).tolist(),
           "row_sums": sums, "row_counts": counts}
    if agree:
        out["router_agree"], out["router_bce"] = (float(np.mean([a[i] for a in agree])) for i in (0, 1))
    return out


@torch.no_grad()
def calibrate(model, data, rows, capacities, device, dtype):
    """One threshold per routed layer such that, on these held-out rows, `p >= t` runs
    exactly the top-k fraction that training ran: one top-k pass at the training
    capacities, all rows in one batch, each layer seeing the layers below it already
    routed (see router.thresholds_from_topk). A layer trained at capacity 1 gets 0: it
    runs every token, also the ones whose p falls below anything seen here."""
    model.eval()
    x, y, valid = (t.to(device) for t in data.batch(rows))
    with autocast(device, dtype):
        model(x, y, valid=valid, rule=Rule("topk", capacity=capacities.to(device)))
    model.train()
    found = thresholds_from_topk(model.route_trace)
    return tuple(0.0 if c >= 1.0 else t for c, t in zip(capacities.tolist(), found))


def oracle_rule(fractions):
    """Per batch: a dense pass gives every routed layer's similarities; then each layer
    runs its least-similar routable tokens, at the given per-layer fraction."""
    def rule(model, x, valid):
        model(x, valid=valid, rule=Rule("all", similarity=True))
        masks = [select_topk(-t.sim, t.routable, f) for t, f in zip(model.route_trace, fractions)]
        return Rule("mask", masks=masks)
    return rule


def random_rule(fractions, seed=0):
    """Per batch and layer, a random subset of the routable tokens, at the given fraction."""
    g = torch.Generator().manual_seed(seed)

    def rule(model, x, valid):
        routable = routable_tokens(valid, torch.arange(x.size(1), device=x.device), model.config.route_sink_tokens)
        masks = [select_topk(torch.rand(x.shape, generator=g).to(x.device), routable, f) for f in fractions]
        return Rule("mask", masks=masks)
    return rule


def controls(result):
    """The control rules of a routed evaluation `result`, at its per-layer fractions."""
    fractions = result["routed_frac"]
    return {"oracle": oracle_rule(fractions), "random": random_rule(fractions), "p>=0.5": Rule("threshold", 0.5)}


def held_out(train_config, split="val"):
    """The held-out data of a checkpoint's training run, prepared if it is not on disk."""
    c = train_config
    tokenizer = lambda: load_tokenizer(weights.tokenizer_source(c["init_from"]))
    return open_split(c["dataset"], c["data_dir"], split, c["seq_len"], c.get("max_convs", 0), tokenizer)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on held-out rows; calibrate its routers.")
    p.add_argument("checkpoint", help="a train.py checkpoint (.pt)")
    p.add_argument("--rows", type=int, default=None, help="held-out rows (default: the run's eval_rows)")
    p.add_argument("--controls", action="store_true", help="also the label oracle, random routing and p >= 0.5")
    p.add_argument("--calibrate", type=float, default=None, metavar="C",
                   help="write thresholds for mean capacity C of the routed layers into the checkpoint")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    return p.parse_args(argv)


def recalibrate(path, model, ckpt, data, capacity, device, dtype):
    """Thresholds at a new capacity, split over the layers the way training split it
    (router.CapacitySchedule), written into the checkpoint."""
    c = ckpt.train_config
    if c["route"] == "none" or c["train_rule"] != "topk" or c.get("predictor"):
        raise ValueError(f"{path}: only models routed with top-k have thresholds to calibrate")
    if not 0 < capacity <= 1:
        raise ValueError(f"--calibrate needs a capacity in (0, 1], got {capacity}")
    schedule = CapacitySchedule(len(model.config.routed_ids()), capacity, capacity, split=c["capacity_split"])
    schedule.load_state_dict(ckpt.schedule)
    rows = data.val_rows(c["eval_rows"] + c["calib_rows"])[c["eval_rows"]:]
    thresholds = calibrate(model, data, rows, schedule.capacities(0), device, dtype)
    weights.set_thresholds(path, thresholds)
    model.config.route_threshold = thresholds
    print(f"{len(thresholds)} thresholds for mean capacity {capacity} on {len(rows)} held-out rows -> {path}")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    try:
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
          f"{result['exec_frac_infer'] * model.config.n_layer:.2f} of {model.config.n_layer} layers run")
    if args.controls and model.config.routed_ids():
        for name, rule in controls(result).items():
            other = evaluate(model, data, rows, rule, c["batch_size"], device, dtype)
            d, se = paired_difference(other, result)
            print(f"{name:>8}: loss {other['val_loss']:.4f}, {d:+.4f} ± {se:.4f} vs the routers, "
                  f"{other['exec_frac_infer'] * model.config.n_layer:.2f} layers run")


if __name__ == "__main__":
    main()
