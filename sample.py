"""
Generate text and watch how deep each token went.

    python sample.py                                   # SmolLM2-Instruct answers a chat prompt
    python sample.py --init_from out/dlo/ckpt.pt       # a routed model: coloured depth view
    python sample.py --mode raw --prompt @poem.txt --temperature 0.8 --top_p 0.9 --num_samples 3

Generation, gpt-fast style, in three steps a reader can follow one by one:
`prefill` runs the prompt through the model and fills the static KV cache,
`decode_one_token` runs one new token per row at its cache slot, and
`generate_stream` loops them and samples. For a routed model every token, the
prompt's and the answer's, is coloured by the number of layers that ran for it
(ANSI colours on a terminal, `[token|n]` otherwise); a summary gives mean executed
layers and layer FLOPs saved, and a token x layer picture is written as HTML.
"""
import argparse
import dataclasses
import html
import math
import os
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import weights
from cache import CompactKVCache
from decode import compiled_step
from evaluate import executed_map
from tuning import decode_choice, onednn
from weights import pick_device

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence, then name one famous landmark there."


# ---- generation -------------------------------------------------------------------

def sample_next(logits, temperature=0.0, top_k=None, top_p=1.0, generator=None):
    """Greedy when temperature == 0; else softmax(logits / T) restricted to the k likeliest
    tokens (top_k None or 0: no limit) and to the smallest set whose probability reaches
    top_p (nucleus sampling, arXiv 1904.09751)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        probs, order = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        outside = probs.cumsum(-1) - probs >= top_p   # the mass before a token already reaches p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), -math.inf)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


@dataclass
class Prompts:
    """A batch of prompts, left-padded so every row's last token sits in the same slot;
    each row keeps its own positions, so it decodes exactly as it would alone."""
    idx: torch.Tensor        # (B, P) token ids
    valid: torch.Tensor      # (B, P) False on padding
    positions: torch.Tensor  # (B, P) each row counts from 0 at its first real token


def pad_left(prompts, device):
    B, P = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(B, P, dtype=torch.long, device=device)
    valid = torch.zeros(B, P, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, P - len(p):] = True
    return Prompts(idx, valid, (valid.cumsum(1) - 1).clamp(min=0))


KEPT_CACHES = weakref.WeakKeyDictionary()   # model -> {(batch size, slots): its layers' static caches}


def kept_caches(model, batch_size, max_seq):
    """The same static caches, emptied, for every call with these sizes: the compiled decode
    step on CPU (decode.py) freezes the model and guards on its buffers' identity, so
    new caches would compile it anew for every prompt."""
    kept = KEPT_CACHES.setdefault(model, {})
    if (batch_size, max_seq) not in kept:
        kept[batch_size, max_seq] = [model.new_cache(batch_size, max_seq) for _ in model.layers]
    for cache in kept[batch_size, max_seq]:
        cache.k.zero_(), cache.v.zero_(), cache.valid.zero_()
    return kept[batch_size, max_seq]


@contextmanager
def kv_caches(model, batch_size, max_seq, page=0, keep=False):
    """A KV cache in every attention while the block runs. The static one (model.KVCache),
    gpt-fast style: its shapes never change, so a compiled decode step is traced once;
    keep: the same buffers every time (kept_caches). page > 0: cache.CompactKVCache, which
    stores only the tokens that ran each attention (under "window", evicts those not
    kept) and grows `page` entries at a time."""
    w, cfg = model.embed_tokens.weight, model.config
    kept = kept_caches(model, batch_size, max_seq) if keep else None
    for i, layer in enumerate(model.layers):
        layer.self_attn.kv_cache = (CompactKVCache(batch_size, cfg.n_kv_head, cfg.head_dim, w.dtype, w.device, page,
                                                   cfg.kv_window)
                                    if page else
                                    kept[i] if keep else model.new_cache(batch_size, max_seq))
    try:
        yield model
    finally:
        for layer in model.layers:   # unregistered, so the next block may install either kind
            del layer.self_attn.kv_cache
            layer.self_attn.kv_cache = None


def prefill(model, batch, rule, chunk=0):
    """The prompt in forwards of `chunk` tokens (0: all in one), writing cache slots
    0..P-1; each chunk's queries attend to what the chunks before wrote, so the logits are
    the same, while only chunk x context attention scores and chunk tokens' activations
    are alive at once. Returns the last position's logits (B, V) and, for a routed model,
    the attentions and MLPs each prompt token ran (B, P, n_layer, 2)."""
    P = batch.idx.size(1)
    chunk = chunk or P
    ran = []
    for start in range(0, P, chunk):
        part = slice(start, min(P, start + chunk))
        logits, _ = model(batch.idx[:, part], input_pos=torch.arange(P, device=batch.idx.device)[part],
                          positions=batch.positions[:, part], valid=batch.valid[:, part], rule=rule, last_only=True)
        if model.route_trace:
            ran.append(executed_map(model.route_trace, model.config.n_layer))
    return logits[:, -1], (torch.cat(ran, 1) if ran else None)


def decode_one_token(model, token, slot, position, alive, rule):
    """One token per row (B,) at cache slot `slot` (1,), RoPE `position` (B, 1); rows that
    already stopped are padding. Returns the next logits (B, V) and the attentions and
    MLPs run (B, n_layer, 2). Every argument is a tensor of fixed shape, so the compiled
    step is traced once and replayed for every token."""
    logits, _ = model(token[:, None], input_pos=slot, positions=position, valid=alive[:, None], rule=rule)
    ran = executed_map(model.route_trace, model.config.n_layer)[:, -1] if model.route_trace else None
    return logits[:, -1], ran


@dataclass
class Step:
    token: torch.Tensor                          # (B,) the sampled token
    done: torch.Tensor                           # (B,) rows that had stopped before this step
    ran: Optional[torch.Tensor]                  # (B, n_layer, 2) attentions and MLPs run by its forward
    prompt_ran: Optional[torch.Tensor] = None    # (B, P, n_layer, 2) the prompt's, on the first step only
    prompt_valid: Optional[torch.Tensor] = None  # (B, P) which prompt positions are real


COMPILED_PAGE = 256   # slots; the compiled step is traced once per batch size and cache length


@torch.no_grad()
def generate_stream(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=1.0, stop_ids=(),
                    rule=None, generator=None, compiled=False, page=0, prefill_chunk=0):
    """Yields one Step per new token. Prompts of different lengths are left-padded; the
    context check happens here, once, not in every forward. compiled: decode with
    decode.compiled_step (the first call compiles). page > 0: the KV cache that stores
    only what ran (cache.py), grown `page` entries at a time. prefill_chunk > 0: the prompt
    goes through in chunks of that many tokens (prefill)."""
    device = model.embed_tokens.weight.device
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    batch = pad_left(prompts, device)
    P = batch.idx.size(1)
    if P + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt of {P} tokens + {max_new_tokens} new tokens exceeds the "
                         f"model's context of {model.config.block_size} tokens")
    if compiled and page:
        raise ValueError("a compiled decode step needs the static cache (page=0): the compact one changes shape")
    rule = rule or model.default_rule()
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    slots = P + max_new_tokens
    if compiled:   # the static cache in whole pages of slots: one compiled step serves many prompt lengths
        slots = min(model.config.block_size, math.ceil(slots / COMPILED_PAGE) * COMPILED_PAGE)
    with kv_caches(model, len(prompts), slots, page, keep=compiled):
        logits, prompt_ran = prefill(model, batch, rule, prefill_chunk)
        ran, position = (prompt_ran[:, -1] if prompt_ran is not None else None), batch.positions[:, -1:] + 1
        slot = torch.full((1,), P, dtype=torch.long, device=device)
        decode = compiled_step(model, decode_one_token) if compiled else decode_one_token
        use_onednn = device.type != "cpu" or decode_choice(model).onednn   # measured, once per process
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            first = step == 0
            yield Step(token, done.clone(), ran, prompt_ran if first else None, batch.valid if first else None)
            done |= torch.isin(token, stop)
            if step == max_new_tokens - 1 or done.all():
                break
            with onednn(use_onednn):
                logits, ran = decode(model, token, slot, position, ~done, rule)
            slot, position = slot + 1, position + 1


@torch.no_grad()
def generate(model, prompts, max_new_tokens, **kwargs):
    """Token lists, one per prompt, without the prompt, cut after the first stop token."""
    out = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, **kwargs):
        for b in range(len(prompts)):
            if not step.done[b]:
                out[b].append(int(step.token[b]))
    return out


# ---- the depth view ---------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate text; show per-token depth for routed models.")
    p.add_argument("--init_from", default="smollm2",
                   help="smollm2, a .gguf file, a HF or export.py folder, or a .pt checkpoint")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text, or @path to read it from a file")
    p.add_argument("--mode", choices=("chat", "raw"), default="chat", help="chat template or raw text")
    p.add_argument("--system", default=None, help="system message in chat mode (default: the model's)")
    p.add_argument("--num_samples", type=int, default=1, help="how many completions")
    p.add_argument("--max_new_tokens", type=int, default=128, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest tokens (0 = no limit)")
    p.add_argument("--top_p", type=float, default=1.0, help="sample within this much probability mass (1 = all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threshold", type=float, default=None,
                   help="one routing threshold for every layer (default: the checkpoint's calibrated ones)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--depth_out", default="out/depth.html", help="token x layer picture (routed models)")
    p.add_argument("--depth_png", default="out/depth.png", help="the same picture as a PNG, if matplotlib is "
                   "installed ('' = none)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (the first call compiles: 1.5-3 minutes on a 2-core CPU)")
    p.add_argument("--prefill_chunk", type=int, default=512,
                   help="prefill the prompt this many tokens at a time: less memory, same tokens (0 = all at once)")
    p.add_argument("--verbose", action="store_true", help="also print the decode kernel choice measured here (CPU)")
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1 or (args.top_k is not None and args.top_k < 0):
        p.error("--top_p must be in (0, 1] and --top_k >= 0")
    if not args.temperature >= 0 or not math.isfinite(args.temperature):
        p.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        p.error("--num_samples and --max_new_tokens must be >= 1")
    if args.prefill_chunk < 0:
        p.error(f"--prefill_chunk must be >= 0 (0 = the whole prompt at once), got {args.prefill_chunk}")
    return args


def depth_of(row):
    """(attentions run, MLPs run) of one token's (n_layer, 2) map."""
    return int(row[:, 0].sum()), int(row[:, 1].sum())


def depth_text(row, what):
    """A token's depth as the depth view writes it: the count of what is routed ("attn",
    "mlp" or both); a skipped block counts in both, so it shows as one number."""
    attn, mlp = depth_of(row)
    return f"a{attn} m{mlp}" if what == "both" else str(attn if what == "attn" else mlp)


def routed_parts(cfg):
    """What the depth view counts: "attn" or "mlp" when only that part is ever skipped,
    "both" when attention and MLPs are routed apart, "mlp" for whole blocks (equal counts)."""
    kinds = {cfg.layer_route(i) for i in range(cfg.n_layer)} - {""}
    if kinds <= {"mlp", "block"}:
        return "mlp"
    return "attn" if kinds == {"attn"} else "both"


def colour(text, row, what, tty):
    """Blue (shallow) to red (full depth) on a terminal; plain brackets elsewhere."""
    if not tty:
        return f"[{text}|{depth_text(row, what)}]"
    shade = round(5 * float(row.float().mean()))
    return f"\x1b[38;5;{16 + 36 * shade + (5 - shade)}m{text}\x1b[0m"


CELL = {(True, True): "b", (True, False): "a", (False, True): "m", (False, False): "s"}


def write_depth_html(path, pieces, ran, cfg):
    """A self-contained page: the text coloured by depth, then a token x layer grid in
    which each cell tells whether the layer's attention and MLP ran; inserted layers are
    marked in the header."""
    what, rows = routed_parts(cfg), []
    for piece, row in zip(pieces, ran):
        tds = "".join(f'<td class="{CELL[bool(a), bool(m)]}"></td>' for a, m in row.tolist())
        rows.append(f"<tr><th>{html.escape(repr(piece)[1:-1])}</th><td>{depth_text(row, what)}</td>{tds}</tr>")
    text = "".join(f'<span style="background:hsl({240 - 240 * float(r.float().mean()):.0f},80%,80%)" '
                   f'title="{depth_text(r, what)}">{html.escape(p)}</span>' for p, r in zip(pieces, ran))
    head = "".join(f'<th class="{"new" if i in cfg.new_layers else ""}">{i}</th>' for i in range(cfg.n_layer))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"""<!doctype html><meta charset="utf-8"><title>per-token depth</title>
<style>body{{font-family:sans-serif}} td.b{{background:#c0392b}} td.a{{background:#f39c12}}
td.m{{background:#2980b9}} td.s{{background:#eee}} th.new{{background:#ddd;color:#c0392b}}
td,th{{width:12px;height:12px;padding:0;font-size:10px}} th{{text-align:right;padding-right:4px}}
p{{white-space:pre-wrap;max-width:60em;line-height:1.6}}</style>
<h3>Text coloured by the share of attentions and MLPs run (blue = few, red = all {cfg.n_layer} of each)</h3>
<p>{text}</p>
<h3>Token x layer: red = attention and MLP ran, orange = attention only, blue = MLP only, grey = neither;
highlighted numbers: inserted layers</h3>
<table><tr><th>token</th><th>{what}</th>{head}</tr>{''.join(rows)}</table>""")


# the depth view's colours as RGB: attention and MLP ran, attention only, MLP only, neither
RGB = {(True, True): (0.75, 0.22, 0.17), (True, False): (0.95, 0.61, 0.07), (False, True): (0.16, 0.50, 0.73),
       (False, False): (0.93, 0.93, 0.93)}


def write_depth_png(path, pieces, ran, cfg):
    """The token x layer grid of write_depth_html as a PNG (needs matplotlib): a column per
    token, labelled with its text, a row per layer; inserted layers are marked "+" in red."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return False
    grid = [[RGB[bool(a), bool(m)] for a, m in row.tolist()] for row in ran]     # (tokens, layers, 3)
    grid = [list(layer) for layer in zip(*grid)]                                 # (layers, tokens, 3)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(pieces) + 1.5), 0.16 * cfg.n_layer + 1.6))
    ax.imshow(grid, aspect="auto", interpolation="nearest")
    labels = [p.replace("\n", "\\n").replace("$", r"\$") for p in pieces]   # "$" would start mathtext
    ax.set_xticks(range(len(pieces)), labels, rotation=90, fontsize=6, family="monospace")
    ax.set_yticks(range(cfg.n_layer), [f"+{i}" if i in cfg.new_layers else str(i) for i in range(cfg.n_layer)],
                  fontsize=6)
    for label, i in zip(ax.get_yticklabels(), range(cfg.n_layer)):
        label.set_color("#c0392b" if i in cfg.new_layers else "black")
    ax.set_ylabel("layer (+ = inserted)")
    ax.set_title("red: attention and MLP ran; orange: attention only; blue: MLP only; grey: neither", fontsize=8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return True


def pieces_of(tok, ids):
    """The text each token adds, decoded as bytes so split UTF-8 characters stay whole."""
    out, seen = [], b""
    for i in range(len(ids)):
        now = tok.decode_bytes(ids[:i + 1])
        out.append(now[len(seen):].decode("utf-8", "replace"))
        seen = now
    return out


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    try:
        model, tok, _ = weights.load(args.init_from, getattr(torch, args.dtype))
        prompt = args.prompt
        if prompt.startswith("@"):
            with open(prompt[1:]) as f:
                prompt = f.read()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    weights.place(model, device).eval()
    cfg = model.config
    if args.mode == "chat":
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tok.encode_chat(messages + [{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(prompt)
    rule = model.default_rule()
    rule = rule if args.threshold is None else dataclasses.replace(rule, threshold=args.threshold)
    tty, what = sys.stdout.isatty(), routed_parts(cfg)
    generator = torch.Generator(device).manual_seed(args.seed)
    all_pieces, all_ran = [], []
    if args.compile:
        print("--- the decode step compiles on its first call: the second token waits for it", file=sys.stderr)
    for sample in range(args.num_samples):
        print(f"--- sample {sample + 1}/{args.num_samples}" if args.num_samples > 1 else "---")
        out, t0, t_first = [], time.time(), None
        try:
            for step in generate_stream(model, [ids], args.max_new_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, stop_ids=[tok.eos_id, tok.im_end_id],
                                        rule=rule, generator=generator, compiled=args.compile,
                                        prefill_chunk=args.prefill_chunk):
                t_first = t_first or time.time()   # the prompt's prefill ends with the first token
                if step.prompt_ran is not None:     # the prompt's own depth, token by token
                    for piece, row in zip(pieces_of(tok, ids), step.prompt_ran[0][step.prompt_valid[0]]):
                        all_pieces.append(piece)
                        all_ran.append(row)
                        print(colour(piece, row, what, tty), end="")
                    print("\n--- answer:")
                token = int(step.token[0])
                if token in (tok.eos_id, tok.im_end_id):
                    break
                piece = tok.decode_bytes(out + [token])[len(tok.decode_bytes(out)):].decode("utf-8", "replace")
                out.append(token)
                if step.ran is None:
                    print(piece, end="", flush=True)
                else:
                    all_pieces.append(piece)
                    all_ran.append(step.ran[0])
                    print(colour(piece, step.ran[0], what, tty), end="", flush=True)
        except ValueError as e:
            sys.exit(f"\nerror: {e}")
        decode_s = max(1e-9, time.time() - (t_first or t0))
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        steps = max(0, len(out) - 1)   # tokens after the first come from decode steps
        print(f"\n--- prefill {len(ids)} tokens in {(t_first or t0) - t0:.2f}s; decode {steps} tokens at "
              f"{steps / decode_s:.1f} tokens/s, {steps * n_bytes / decode_s / 1e9:.2f} GB/s of weights read")
    if args.verbose and device == "cpu":
        print(f"--- decode: {decode_choice(model)}, measured on this machine")
    if all_ran:   # FLOPs at the mean context of the last answer
        report_depth(model, all_pieces, all_ran, len(ids) + len(out) // 2, args.depth_out, args.depth_png)


def report_depth(model, pieces, ran, context, path, png=""):
    """Mean attentions and MLPs run over every token shown, layer FLOPs saved, the picture."""
    cfg = model.config
    per_layer = torch.stack(ran).double().mean(0)          # (n_layer, 2)
    attn, mlp = per_layer[:, 0].tolist(), per_layer[:, 1].tolist()
    a, m, _ = model.layer_flops(context)
    saved = 1 - (model.flops_per_token(attn, mlp, context) - 2 * cfg.n_embd * cfg.vocab_size) / (cfg.n_layer * (a + m))
    new = cfg.new_layers
    inserted = (f"; inserted layers {sum(attn[i] for i in new):.2f} attentions and {sum(mlp[i] for i in new):.2f} "
                f"MLPs of {len(new)}" if new else "")
    print(f"depth per token, prompt and answer: {sum(attn):.2f} attentions and {sum(mlp):.2f} MLPs of "
          f"{cfg.n_layer}{inserted}; {100 * saved:.1f}% of layer FLOPs saved")
    write_depth_html(path, pieces, ran, cfg)
    print(f"token x layer picture: {path}")
    if png and write_depth_png(png, pieces, ran, cfg):
        print(f"the same as a PNG: {png}")


if __name__ == "__main__":
    main()
