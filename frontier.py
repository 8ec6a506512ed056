"""
The speed-quality frontier of one trained routed model: held-out loss against measured
decode time, with its controls and the unexpanded base, in one run.

    python frontier.py out/dlo/ckpt.pt --capacities 0.6,0.4,0.2,0.1
    python frontier.py out/compare/dlo-fast/ckpt.pt --base out/compare/base/ckpt.pt \
        --dense out/compare/dense/ckpt.pt --others out/compare/dlo/ckpt.pt

For each capacity (the mean capacity of the routed parts; with --attn_capacities, the
attention parts' too):
- the routers are calibrated on the run's calibration rows (evaluate.thresholds_at), the
  split over parts as in training;
- loss on held-out conversations that calibration never saw, with paired differences
  against the same weights run dense, static pruning at the same budget and random
  routing at the routers' per-part fractions (evaluate.controls), and the base;
- batch-1 decode (tokens/s) and prefill time of that model, its static and random
  controls, the dense pass and the base, all timed in the same run, alternating order,
  best of --repeats, on held-out conversations as prompts.
Writes a Markdown table, JSON and a PNG (loss against decode ms/token; needs matplotlib).
"""
import argparse
import json
import os
import sys

import torch

import evaluate
import weights
from bench import best_of, decode_rate
from router import Rule
from weights import pick_device, pick_dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Loss against decode time of one routed checkpoint, with controls.")
    p.add_argument("checkpoint", help="a routed train.py checkpoint (.pt) or its export folder (export.py)")
    p.add_argument("--capacities", default="0.6,0.4,0.2,0.1", help="mean capacities of the routed parts")
    p.add_argument("--attn_capacities", default="", help="the attention parts' capacities, one per capacity "
                                                         "(default: as trained)")
    p.add_argument("--base", default=None, help="the base model after the same SFT (.pt); default: the "
                                                 "checkpoint's pretrained weights")
    p.add_argument("--dense", default=None, help="a densely expanded model after the same SFT (.pt), for its loss")
    p.add_argument("--others", default="", help="more routed checkpoints, at their own thresholds")
    p.add_argument("--rows", type=int, default=256, help="held-out conversations")
    p.add_argument("--prompt_len", type=int, default=128, help="prompt tokens, cut from held-out conversations")
    p.add_argument("--new_tokens", type=int, default=64, help="decoded tokens per prompt")
    p.add_argument("--prompts", type=int, default=2, help="prompts per timing")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="out/frontier", help="folder for the table, JSON and PNG")
    return p.parse_args(argv)


def floats(text):
    return [float(s) for s in text.split(",") if s.strip()]


def held_out_rows(data, train_config, n):
    """n held-out rows, none of them the run's calibration rows."""
    calib = set(evaluate.calibration_rows(data, train_config).tolist())
    rows = [r for r in data.val_rows(data.num_rows).tolist() if r not in calib][:n]
    if len(rows) < n:
        print(f"note: only {len(rows)} held-out rows besides the calibration rows", file=sys.stderr)
    return rows


def prompts_from(data, rows, n, length):
    """The first `length` tokens of held-out conversations at least that long."""
    out = []
    for r in rows:
        x, _, valid = data.batch([r])
        if int(valid.sum()) >= length:
            out.append(x[0, :length].tolist())
        if len(out) == n:
            return out
    raise ValueError(f"no {n} held-out conversations have {length} tokens")


def run_name(path):
    """A checkpoint's name in the table: its run's folder (out/compare/dlo/ckpt.pt -> dlo)."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or path


def load(path, device):
    ckpt = weights.load_checkpoint(path)
    return weights.place(weights.model_from_checkpoint(ckpt), device).eval(), ckpt


class Timed:
    """One contender: a model, its rule, and what its timing found."""

    def __init__(self, name, model, rule, prompts, new_tokens):
        self.name, self.model, self.rule, self.prompts, self.new_tokens = name, model, rule, prompts, new_tokens
        self.prefill_s, self.decode_tok_s, self.ran = None, None, None

    def __call__(self):
        """Decode tokens/s over the prompts; keeps the fastest prefill and decode seen."""
        prefill, rate, ran = zip(*(decode_rate(self.model, [p], self.new_tokens, self.rule) for p in self.prompts))
        prefill_s = sum(len(p) / r for p, r in zip(self.prompts, prefill)) / len(self.prompts)
        self.prefill_s = min(self.prefill_s or prefill_s, prefill_s)
        if ran[0] is not None:   # attentions and MLPs run per decoded token
            self.ran = (sum(r.sum(0) for r in ran) / len(ran)).tolist()
        decode = len(rate) / sum(1 / r for r in rate)   # tokens over total time
        return decode


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    try:
        model, ckpt = load(args.checkpoint, device)
        c = ckpt.train_config
        slots = model.config.route_slots()
        if not slots:
            raise ValueError(f"{args.checkpoint} routes nothing")
        data, dtype = evaluate.held_out(c), pick_dtype(c.get("dtype", "float32"), device)
        base = load(args.base, device)[0] if args.base else weights.place(weights.from_pretrained(c["init_from"]),
                                                                          device).eval()
        dense40 = load(args.dense, device)[0] if args.dense else None
        others = [(run_name(p), load(p, device)[0]) for p in args.others.split(",") if p.strip()]
        capacities, attn_capacities = floats(args.capacities), floats(args.attn_capacities)
        if attn_capacities and len(attn_capacities) != len(capacities):
            raise ValueError("--attn_capacities needs one value per capacity")
        rows = held_out_rows(data, c, args.rows)
        prompts = prompts_from(data, rows, args.prompts, args.prompt_len)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    # each result keeps its model's depth: the base has 30 layers, the others 40
    run = lambda m, rule: dict(evaluate.evaluate(m, data, rows, rule or m.default_rule(), c["batch_size"], device,
                                                 dtype), n_layer=m.config.n_layer)
    kinds = [part for _, part in slots]

    # losses: the references, then the routers and their controls at every capacity
    points = {"base": run(base, None), "dense (same weights)": run(model, Rule("all"))}
    if dense40 is not None:
        points["dense-40 (trained)"] = run(dense40, None)
    rules = {}
    for i, cap in enumerate(capacities):
        attn = attn_capacities[i] if attn_capacities else None
        thresholds = evaluate.thresholds_at(model, ckpt, data, cap, device, dtype, attn)
        at = f"{cap}" + (f"/{attn}" if attn is not None else "")
        rules[f"routers @ {at}"] = Rule("threshold", thresholds)
        points[f"routers @ {at}"] = run(model, rules[f"routers @ {at}"])
        control = evaluate.controls(points[f"routers @ {at}"], kinds)
        for kind in ("static", "random"):
            rules[f"{kind} @ {at}"] = control[kind]
            points[f"{kind} @ {at}"] = run(model, control[kind])
    for path, other in others:
        points[f"{path} (its thresholds)"] = run(other, None)
        print(f"{path}: {evaluate.ran(points[f'{path} (its thresholds)'], other)}")

    # times: every contender in one loop, alternating order
    contenders = [Timed("base", base, None, prompts, args.new_tokens),
                  Timed("dense (same weights)", model, Rule("all"), prompts, args.new_tokens)]
    contenders += [Timed(name, model, rule, prompts, args.new_tokens) for name, rule in rules.items()]
    contenders += [Timed(f"{path} (its thresholds)", other, None, prompts, args.new_tokens) for path, other in others]
    rates = best_of(args.repeats, *contenders)
    for t, rate in zip(contenders, rates):
        t.decode_tok_s = rate
    times = {t.name: t for t in contenders}
    report(points, times, args, c)


def report(points, times, args, train_config):
    base, dense = points["base"], points["dense (same weights)"]
    base_t = times["base"]
    lines = [f"Held-out loss on {len(base['row_sums'])} conversations; decode at batch 1, {args.prompt_len}-token "
             f"prompts, {args.new_tokens} new tokens, fp32 weights, {torch.get_num_threads()} threads.", "",
             "| model | loss ± SE | vs base | vs dense (same weights) | vs routers | attentions / MLPs run "
             "(held-out) | decode tok/s | x base | prefill s | x base |", "|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for name, result in points.items():
        routers = points.get("routers @ " + name.split(" @ ")[1]) if name.startswith(("static", "random")) else None
        t, L = times.get(name), result["n_layer"]
        diff = lambda other: "-" if other is None or other is result else "{:+.4f} ± {:.4f}".format(
            *evaluate.paired_difference(result, other))
        speed = "- | - | - | -" if t is None else (f"{t.decode_tok_s:.2f} | {t.decode_tok_s / base_t.decode_tok_s:.3f} "
                                                   f"| {t.prefill_s:.3f} | {t.prefill_s / base_t.prefill_s:.3f}")
        lines.append(f"| {name} | {result['val_loss']:.4f} ± {result['val_se']:.3f} | {diff(base)} | {diff(dense)} "
                     f"| {diff(routers)} | {result['attn_frac_infer'] * L:.2f} / {result['mlp_frac_infer'] * L:.2f} "
                     f"| {speed} |")
        out.append({"name": name, "val_loss": result["val_loss"], "val_se": result["val_se"],
                    "attn_run": result["attn_frac_infer"] * L, "mlp_run": result["mlp_frac_infer"] * L,
                    "routed_frac": result["routed_frac"], "decode_tok_s": t and t.decode_tok_s,
                    "prefill_s": t and t.prefill_s, "decode_ran": t and t.ran,
                    "vs_base": evaluate.paired_difference(result, base),
                    "vs_dense": evaluate.paired_difference(result, dense),
                    "vs_routers": routers and evaluate.paired_difference(result, routers)})
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "frontier.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "frontier.json"), "w") as f:
        json.dump({"settings": vars(args), "train_config": train_config, "points": out}, f, indent=1)
    plot(out, os.path.join(args.out, "frontier.png"))


def plot(points, path):
    """Loss against decode ms/token; the references as lines, each family as a curve."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, style in (("routers", "o-"), ("static", "s--"), ("random", "^:")):
        fam = [p for p in points if p["name"].startswith(family)]
        if fam:
            ax.plot([1000 / p["decode_tok_s"] for p in fam], [p["val_loss"] for p in fam], style, label=family)
    for p in points:
        if not p["name"].startswith(("routers", "static", "random")) and p["decode_tok_s"]:
            ax.plot(1000 / p["decode_tok_s"], p["val_loss"], "*", markersize=12, label=p["name"])
        elif not p["decode_tok_s"]:
            ax.axhline(p["val_loss"], color="grey", linewidth=0.8, linestyle="-.", label=p["name"])
    ax.set_xlabel("decode time per token, ms (batch 1, fp32)")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
