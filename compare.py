"""
Every method on one model, with the same data and the same token budget.

    python compare.py                                  # every method, CPU-sized budget
    python compare.py --methods base,dense,dlo         # the DLO table
    python compare.py --steps 200 --seq_len 512        # a bigger budget (GPU)

Each method is a preset file under config/ plus the flags that change it (METHODS below),
trained by train.main with the same rows in the same order, steps, batch and sequence length. Per method: layers,
held-out loss before and after training with its standard error, the difference to
the base model on the same conversations (paired, so its SE is much smaller than the
losses'), executed layers per token at inference (the rule sample.py uses) and in
training, estimated FLOPs and KV bytes per token, and greedy decode tokens/s.

For DLO (--controls) three controls are evaluated on the same trained weights, each at
the routers' own per-layer executed fractions:
- "oracle": skip exactly by the similarity labels of a dense pass, no router: the best
  the routers could do, so a gap between it and DLO is the routers', not the labels';
- "random": random tokens skip: what per-token routing adds beyond per-layer sparsity;
- "p>=0.5": the routers with the paper's threshold instead of calibrated ones.
Writes a Markdown table and JSON (with per-conversation losses).
"""
import argparse
import json
import os
import time

import torch

import evaluate
import train
import weights
from sample import generate
from weights import pick_device, pick_dtype

PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
# per method: its preset file under config/ and the flags that change it; everything else
# is shared (see --steps etc.). "dlo" is DLO's MLP routing at 0.90 of the MLPs, train.py's
# default; each "dlo-..." row switches one of its mechanisms off.
METHODS = {
    "base": ("base", ""),
    "dense": ("dense", ""),
    "dlo": ("dlo", ""),
    "dlo-fast": ("dlo_fast", ""),
    "dlo-no-sinks": ("dlo", "--sink_tokens 0"),
    "dlo-all-layers": ("dlo", "--routed all --capacity_end 0.8975"),       # the same 0.90 of all MLPs
    "dlo-all-layers-no-sinks": ("dlo", "--routed all --capacity_end 0.9 --sink_tokens 0"),
    "dlo-no-warmup": ("dlo", "--route_warmup 0"),
    "dlo-official-labels": ("dlo", "--capacity_split rescale"),
    "dlo-one-lr": ("dlo", "--router_lr_scale 1"),
    "dlo-frozen-warmup": ("dlo", "--warmup_freeze true"),                   # a variant: routers alone at first
    # every mechanism off: the paper's routing as this project first ran it
    "dlo-paper": ("dlo", "--routed all --capacity_end 0.9 --sink_tokens 0 --route_warmup 0 --capacity_split rescale "
                         "--router_lr_scale 1"),
    "dlo-threshold": ("dlo", "--train_rule threshold"),
    "llama-pro": ("llama_pro", ""),
    "solar": ("solar", ""),
    "tli": ("tli", ""),
    "lesa": ("lesa", ""),
    "modification": ("modification", ""),
    "modification-dlo-gate": ("modification_dlo_gate", ""),
    "mod": ("mod", ""),
    "kv-retention": ("kv_retention", ""),
    "shortgpt": ("shortgpt", ""),
}


def method_flags(name):
    """train.py's flags for a method: its preset file, then the flags that change it."""
    preset, extra = METHODS[name]
    return ["--config", os.path.join(PRESETS, f"{preset}.json")] + extra.split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run every method with one data and token budget.")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per method")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per row")
    p.add_argument("--batch_size", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--grad_accum", type=int, default=2, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=2e-5, help="DLO's SFT learning rate")
    p.add_argument("--eval_rows", type=int, default=256, help="held-out conversations")
    p.add_argument("--decode_tokens", type=int, default=32, help="tokens timed for decode tok/s (0: skip)")
    p.add_argument("--out", default="out/compare", help="folder for runs, table and JSON")
    p.add_argument("--extra", default="", help="flags added to every run, e.g. '--dataset shakespeare'")
    p.add_argument("--reuse", action="store_true", help="evaluate existing checkpoints instead of training")
    p.add_argument("--controls", default="dlo", help="routed methods to evaluate the controls for")
    return p.parse_args(argv)


@torch.no_grad()
def decode_speed(model, n_tokens):
    prompt = list(range(100, 164))
    generate(model, [prompt], 4)   # warm up
    t0 = time.perf_counter()
    generate(model, [prompt], n_tokens)
    return n_tokens / (time.perf_counter() - t0)


DEVICE = pick_device()


def evaluate_checkpoint(path, cfg, rule=None):
    """The held-out evaluation train.py ends with, on the saved model, with any rule."""
    model = weights.place(weights.model_from_checkpoint(weights.load_checkpoint(path)), DEVICE).eval()
    data = train.load_data(cfg, "val")
    result = evaluate.evaluate(model, data, data.val_rows(cfg.eval_rows), rule or model.default_rule(),
                               cfg.batch_size, DEVICE, pick_dtype(cfg.dtype, DEVICE))
    return model, result


def run_method(name, args):
    out_dir = os.path.join(args.out, name)
    flags = method_flags(name) + (f"{args.extra} --max_steps {args.steps} --seq_len {args.seq_len} "
             f"--batch_size {args.batch_size} --grad_accum {args.grad_accum} --lr {args.lr} "
             f"--eval_rows {args.eval_rows} --eval_every {args.steps} --ckpt_every {args.steps} "
             f"--out_dir {out_dir}").split()
    cfg = train.parse_args(flags)
    log = os.path.join(out_dir, "log.jsonl")
    ckpt = os.path.join(out_dir, "ckpt.pt")
    t0 = time.time()
    if args.reuse:
        model, after = evaluate_checkpoint(ckpt, cfg)
    else:
        if os.path.exists(log):
            os.remove(log)
        after = train.main(flags)
        model = weights.place(weights.model_from_checkpoint(weights.load_checkpoint(ckpt)), DEVICE).eval()
    with open(log) as f:
        records = [json.loads(line) for line in f]
    before = next(r for r in records if "val_loss" in r)
    last_step = [r for r in records if "loss" in r][-1]
    L = model.config.n_layer
    row = {"method": name, "layers": L, "loss_before": before["val_loss"], "eval": after,
           "train": [last_step.get(f"{part}_frac_train", 1.0) * L for part in ("attn", "mlp")],
           "kv_bytes_per_token": model.kv_bytes_per_token(after["kv_per_layer"]),
           "train_seconds": time.time() - t0, **ran(model, after, args.seq_len)}
    row["decode_tok_s"] = decode_speed(model, args.decode_tokens) if args.decode_tokens else None
    rows = [row]
    slots = model.config.route_slots()
    if name in args.controls.split(",") and slots and cfg.train_rule == "topk":
        for control, rule in evaluate.controls(after, [part for _, part in slots]).items():
            _, result = evaluate_checkpoint(ckpt, cfg, rule)
            rows.append({**row, "method": f"{name}, {control}", "eval": result, "decode_tok_s": None,
                         **ran(model, result, args.seq_len)})
    return rows


def ran(model, result, context):
    """Attentions and MLPs run per token at inference, and the FLOPs they cost."""
    L, attn, mlp = model.config.n_layer, result["attn_per_layer"], result["mlp_per_layer"]
    return {"infer": [result["attn_frac_infer"] * L, result["mlp_frac_infer"] * L],
            "gflops_per_token": model.flops_per_token(attn, mlp, context) / 1e9}


def difference(row, other):
    """`row` minus `other` on the same conversations, as text with its SE."""
    if other is None or row is other:
        return "-"
    d, se = evaluate.paired_difference(row["eval"], other["eval"])
    return f"{d:+.4f} ± {se:.4f}"


def table(results):
    """The Markdown table, then each routed method against its controls."""
    by_name = {r["method"]: r for r in results}
    base, dense = by_name.get("base"), by_name.get("dense")
    lines = ["| method | layers | loss before | loss after ± SE | vs base | vs dense | attentions run (infer / train) "
             "| MLPs run (infer / train) | GFLOPs/token | KV bytes/token | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        speed = f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "-"
        lines.append(f"| {r['method']} | {r['layers']} | {r['loss_before']:.3f} | {r['eval']['val_loss']:.4f} ± "
                     f"{r['eval']['val_se']:.3f} | {difference(r, base)} | {difference(r, dense)} "
                     f"| {r['infer'][0]:.2f} / {r['train'][0]:.2f} | {r['infer'][1]:.2f} / {r['train'][1]:.2f} "
                     f"| {r['gflops_per_token']:.3f} | {r['kv_bytes_per_token']:,.0f} | {speed} |")
    for name, r in by_name.items():
        against = [f"{name} - {c}: {difference(r, by_name[f'{name}, {c}'])}" for c in ("static", "random", "oracle")
                   if f"{name}, {c}" in by_name]
        if against:
            lines.append(f"\n{'; '.join(against)} (paired over the same conversations)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown methods {unknown}; choose from {', '.join(METHODS)}")
    results = [row for name in names for row in run_method(name, args)]
    text = table(results)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
