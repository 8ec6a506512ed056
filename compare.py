"""
Every method on one model, with the same data and the same token budget.

    python compare.py                                  # all methods, CPU-sized budget
    python compare.py --methods base,dense,dlo         # the DLO table
    python compare.py --steps 200 --seq_len 512        # a bigger budget (GPU)

Each method is a set of train.py flags (METHODS below), trained by train.main with the
same data order, steps, batch and sequence length. Per method it reports layers and
parameters, held-out loss before and after training, executed layers per token (at
inference: threshold rule; and in training), estimated FLOPs and KV bytes per token,
and measured greedy decode tokens/s at batch 1. Writes a Markdown table and JSON.
"""
import argparse
import json
import os
import time

import torch

import train
import weights

# train.py flags per method; everything else is shared (see --steps etc.)
METHODS = {
    "base": "--placement none --route none",
    "dense": "--placement interleave --n_new 10 --route none",
    "dlo": "--placement interleave --n_new 10 --route mlp --train_rule topk --labels cos-global",
    "dlo-threshold": "--placement interleave --n_new 10 --route mlp --train_rule threshold --labels cos-global",
    "llama-pro": "--placement interleave --n_new 10 --route none --freeze_original true",
    "solar": "--placement stack --trim 10 --route none",
    "tli": "--placement tli --every_k 3 --route none",
    "lesa": "--placement lesa --n_new 10 --route none",
    "modification": ("--placement none --route block --routed inner --kv_policy drop --train_rule threshold "
                     "--labels cos-global --capacity_end 0.75"),
    "mod": ("--placement none --route block --routed every-other --kv_policy drop --gate mod --train_rule topk "
            "--labels none --predictor true --capacity_start 0.125 --capacity_end 0.125"),
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
    p.add_argument("--eval_rows", type=int, default=32, help="held-out rows")
    p.add_argument("--decode_tokens", type=int, default=32, help="tokens timed for decode tok/s")
    p.add_argument("--out", default="out/compare", help="folder for runs, table and JSON")
    p.add_argument("--extra", default="", help="flags added to every run, e.g. '--dataset shakespeare'")
    return p.parse_args(argv)


def read_log(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "val_loss" in r]
    steps = [r for r in rows if "loss" in r]
    return evals[0], evals[-1], steps[-1] if steps else {}


@torch.no_grad()
def decode_speed(model, n_tokens):
    prompt = list(range(100, 164))
    model.generate([prompt], 4)   # warm up
    t0 = time.perf_counter()
    model.generate([prompt], n_tokens)
    return n_tokens / (time.perf_counter() - t0)


def run_method(name, args):
    out_dir = os.path.join(args.out, name)
    flags = (f"{METHODS[name]} {args.extra} --max_steps {args.steps} --seq_len {args.seq_len} "
             f"--batch_size {args.batch_size} --grad_accum {args.grad_accum} --lr {args.lr} "
             f"--eval_rows {args.eval_rows} --eval_every {args.steps} --ckpt_every {args.steps} "
             f"--capacity_steps {max(1, args.steps // 2)} --out_dir {out_dir}").split()
    if os.path.exists(os.path.join(out_dir, "log.jsonl")):
        os.remove(os.path.join(out_dir, "log.jsonl"))
    t0 = time.time()
    train.main(flags)
    seconds = time.time() - t0
    before, after, last = read_log(os.path.join(out_dir, "log.jsonl"))
    model = weights.model_from_checkpoint(weights.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))).eval()
    cfg = model.config
    executed = after["exec_frac_infer"] * cfg.n_layer
    per_layer = after.get("exec_per_layer")
    return {
        "method": name, "layers": cfg.n_layer, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "loss_before": before["val_loss"], "loss_after": after["val_loss"],
        "exec_layers_infer": executed, "exec_layers_train": last.get("exec_frac_train", 1.0) * cfg.n_layer,
        "gflops_per_token": model.flops_per_token(per_layer, args.seq_len) / 1e9,
        "kv_bytes_per_token": model.kv_bytes_per_token(per_layer),
        "decode_tok_s": decode_speed(model, args.decode_tokens), "train_seconds": seconds,
    }


def main(argv=None):
    args = parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown methods {unknown}; choose from {', '.join(METHODS)}")
    results = [run_method(name, args) for name in names]
    lines = ["| method | layers | params (M) | loss before | loss after | layers run (infer / train) "
             "| GFLOPs/token | KV bytes/token | decode tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['layers']} | {r['params_m']:.1f} | {r['loss_before']:.3f} "
                     f"| {r['loss_after']:.3f} | {r['exec_layers_infer']:.1f} / {r['exec_layers_train']:.1f} "
                     f"| {r['gflops_per_token']:.3f} | {r['kv_bytes_per_token']:,.0f} | {r['decode_tok_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
