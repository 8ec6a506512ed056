"""
Every method on one model, with the same data and the same token budget.

    python compare.py                                  # every method, CPU-sized budget
    python compare.py --methods base,dense,dlo         # the DLO table
    python compare.py --steps 200 --seq_len 512        # a bigger budget (GPU)

Each method is a set of train.py flags (METHODS below), trained by train.main with the
same rows in the same order, steps, batch and sequence length. Per method: layers,
held-out loss before and after training with its standard error, the difference to
the base model on the same conversations (paired, so its SE is much smaller than the
losses'), executed layers per token at inference (the rule sample.py uses) and in
training, estimated FLOPs and KV bytes per token, and greedy decode tokens/s.

For routed top-k methods (DLO) three controls are evaluated on the same trained
weights, each at exactly the routers' per-layer executed fractions:
- "oracle": skip exactly by the similarity labels of a dense pass, no router: the best
  the routers could do, so a gap between it and DLO is the routers', not the labels';
- "random": random tokens skip: what per-token routing adds beyond per-layer sparsity;
- "p>=0.5": the routers with the paper's threshold instead of calibrated ones.
Writes a Markdown table and JSON (with per-conversation losses).
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch

import train
import weights
from router import Rule, routable_tokens, select_topk
from sample import generate

DLO = "--placement interleave --n_new 10 --route mlp"
# train.py flags per method; everything else is shared (see --steps etc.). "dlo" is
# train.py's defaults; each "dlo-..." row switches one of its mechanisms off.
METHODS = {
    "base": "--placement none --route none",
    "dense": "--placement interleave --n_new 10 --route none",
    "dlo": DLO,
    "dlo-no-sinks": f"{DLO} --sink_tokens 0",
    "dlo-all-layers": f"{DLO} --routed all --capacity_end 0.8975",
    "dlo-no-warmup": f"{DLO} --route_warmup 0",
    "dlo-official-labels": f"{DLO} --capacity_split rescale",
    "dlo-threshold": f"{DLO} --train_rule threshold",
    "llama-pro": "--placement interleave --n_new 10 --route none --freeze_original true",
    "solar": "--placement stack --trim 10 --route none",
    "tli": "--placement tli --every_k 3 --route none",
    "lesa": "--placement lesa --n_new 10 --route none",
    "modification": ("--placement none --route block --routed all --dense_first 1 --dense_last 1 "
                     "--kv_policy drop --train_rule threshold --labels cos-global --capacity_end 0.75"),
    "mod": ("--placement none --route block --routed every-other --kv_policy drop --gate mod --train_rule topk "
            "--labels none --predictor true --capacity_start 0.125 --capacity_end 0.125 --route_warmup 0"),
    "shortgpt": "--placement none --route none --shortgpt_drop 6",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run every method with one data and token budget.")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per method")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per row")
    p.add_argument("--batch_size", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--grad_accum", type=int, default=2, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=2e-5, help="DLO's SFT learning rate")
    p.add_argument("--eval_rows", type=int, default=128, help="held-out conversations")
    p.add_argument("--decode_tokens", type=int, default=32, help="tokens timed for decode tok/s (0: skip)")
    p.add_argument("--out", default="out/compare", help="folder for runs, table and JSON")
    p.add_argument("--extra", default="", help="flags added to every run, e.g. '--dataset shakespeare'")
    p.add_argument("--reuse", action="store_true", help="evaluate existing checkpoints instead of training")
    return p.parse_args(argv)


@torch.no_grad()
def decode_speed(model, n_tokens):
    prompt = list(range(100, 164))
    generate(model, [prompt], 4)   # warm up
    t0 = time.perf_counter()
    generate(model, [prompt], n_tokens)
    return n_tokens / (time.perf_counter() - t0)


def paired_difference(a, b):
    """Mean loss of a minus b on the same conversations, and its SE over conversations."""
    d, n = np.asarray(a["row_sums"]) - np.asarray(b["row_sums"]), np.asarray(a["row_counts"], dtype=np.float64)
    mean, k = d.sum() / n.sum(), len(d)
    return mean, math.sqrt(k / max(1, k - 1) * ((d - mean * n) ** 2).sum()) / n.sum()


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


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_checkpoint(path, cfg, rule=None):
    """The held-out evaluation train.py ends with, on the saved model, with any rule."""
    model = weights.model_from_checkpoint(weights.load_checkpoint(path)).to(DEVICE).eval()
    data = train.load_data(cfg, "val", cfg.init_from)
    result = train.evaluate(model, data, data.val_rows(cfg.eval_rows), rule or model.default_rule(),
                            cfg.batch_size, DEVICE, train.train_dtype(cfg.dtype, DEVICE))
    return model, result


def run_method(name, args):
    out_dir = os.path.join(args.out, name)
    flags = (f"{METHODS[name]} {args.extra} --max_steps {args.steps} --seq_len {args.seq_len} "
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
        model = weights.model_from_checkpoint(weights.load_checkpoint(ckpt)).to(DEVICE).eval()
    with open(log) as f:
        records = [json.loads(line) for line in f]
    before = next(r for r in records if "val_loss" in r)
    last_step = [r for r in records if "loss" in r][-1]
    row = {"method": name, "layers": model.config.n_layer, "loss_before": before["val_loss"],
           "eval": after, "exec_infer": after["exec_frac_infer"] * model.config.n_layer,
           "exec_train": last_step.get("exec_frac_train", 1.0) * model.config.n_layer,
           "gflops_per_token": model.flops_per_token(after["exec_per_layer"], args.seq_len) / 1e9,
           "kv_bytes_per_token": model.kv_bytes_per_token(after["exec_per_layer"]),
           "train_seconds": time.time() - t0}
    row["decode_tok_s"] = decode_speed(model, args.decode_tokens) if args.decode_tokens else None
    rows = [row]
    if model.config.route == "mlp" and cfg.train_rule == "topk":
        controls = {"oracle": oracle_rule(after["routed_frac"]), "random": random_rule(after["routed_frac"]),
                    "p>=0.5": Rule("threshold", 0.5)}
        for control, rule in controls.items():
            _, result = evaluate_checkpoint(ckpt, cfg, rule)
            rows.append({**row, "method": f"{name}, {control}", "eval": result, "decode_tok_s": None,
                         "exec_infer": result["exec_frac_infer"] * model.config.n_layer,
                         "gflops_per_token": model.flops_per_token(result["exec_per_layer"], args.seq_len) / 1e9})
    return rows


def table(results):
    base = next((r for r in results if r["method"] == "base"), None)
    lines = ["| method | layers | loss before | loss after ± SE | vs base ± SE | layers run (infer / train) "
             "| GFLOPs/token | KV bytes/token | decode tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ev = r["eval"]
        diff = "-"
        if base is not None and r is not base:
            d, se = paired_difference(ev, base["eval"])
            diff = f"{d:+.3f} ± {se:.3f}"
        speed = f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "-"
        lines.append(f"| {r['method']} | {r['layers']} | {r['loss_before']:.3f} | {ev['val_loss']:.3f} ± "
                     f"{ev['val_se']:.3f} | {diff} | {r['exec_infer']:.2f} / {r['exec_train']:.2f} "
                     f"| {r['gflops_per_token']:.3f} | {r['kv_bytes_per_token']:,.0f} | {speed} |")
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
