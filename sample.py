"""
Generate text and watch how deep each token went.

    python sample.py                                   # SmolLM2-Instruct answers a chat prompt
    python sample.py --init_from out/dlo/ckpt.pt       # a routed model: coloured depth view
    python sample.py --mode raw --prompt @poem.txt --temperature 0.8 --top_k 50 --num_samples 3

For a routed model every generated token is coloured by the number of layers that
ran in the forward pass that produced it (ANSI colours on a terminal, `[token|n]`
otherwise), a summary gives mean executed layers and layer FLOPs saved, and a
token x layer picture is written as a self-contained HTML file.
"""
import argparse
import html
import os
import sys
import time

import torch

import weights
from router import Rule
from tokenizer import load_tokenizer

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence, then name one famous landmark there."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate text; show per-token depth for routed models.")
    p.add_argument("--init_from", default="smollm2", help="smollm2, a .gguf file, a HF folder or a .pt checkpoint")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text, or @path to read it from a file")
    p.add_argument("--mode", choices=("chat", "raw"), default="chat", help="chat template or raw text")
    p.add_argument("--system", default=None, help="system message in chat mode (default: the model's)")
    p.add_argument("--num_samples", type=int, default=1, help="how many completions")
    p.add_argument("--max_new_tokens", type=int, default=128, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threshold", type=float, default=None, help="routing threshold (default: the model's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--depth_out", default="out/depth.html", help="token x layer picture (routed models)")
    return p.parse_args(argv)


def load(source, dtype):
    """A model and its tokenizer from any source; a checkpoint names its tokenizer source."""
    if source.endswith(".pt"):
        ckpt = weights.load_checkpoint(source)
        return weights.model_from_checkpoint(ckpt, dtype), load_tokenizer(ckpt["train_config"]["init_from"])
    return weights.from_pretrained(source, dtype), load_tokenizer(source)


def colour(text, depth, n_layer, tty):
    """Blue (shallow) to red (full depth) on a terminal; plain brackets elsewhere."""
    if not tty:
        return f"[{text}|{depth}]"
    shade = round(5 * depth / n_layer)
    return f"\x1b[38;5;{16 + 36 * shade + (5 - shade)}m{text}\x1b[0m"


def write_depth_html(path, pieces, ran, n_layer):
    """A self-contained page: the text coloured by depth, then a token x layer grid."""
    cells = []
    for piece, row in zip(pieces, ran):
        tds = "".join(f'<td class="{"r" if r else "s"}"></td>' for r in row)
        cells.append(f"<tr><th>{html.escape(repr(piece)[1:-1])}</th><td>{sum(row)}</td>{tds}</tr>")
    text = "".join(f'<span style="background:hsl({240 - 240 * sum(r) / n_layer:.0f},80%,80%)" '
                   f'title="{sum(r)} layers">{html.escape(p)}</span>' for p, r in zip(pieces, ran))
    head = "".join(f"<th>{i}</th>" for i in range(n_layer))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"""<!doctype html><meta charset="utf-8"><title>per-token depth</title>
<style>body{{font-family:sans-serif}} td.r{{background:#c0392b}} td.s{{background:#eee}}
td,th{{width:12px;height:12px;padding:0;font-size:10px}} th{{text-align:right;padding-right:4px}}
p{{white-space:pre-wrap;max-width:60em;line-height:1.6}}</style>
<h3>Text coloured by executed layers (blue = few, red = all {n_layer})</h3><p>{text}</p>
<h3>Token x layer (red = ran, grey = skipped)</h3>
<table><tr><th>token</th><th>n</th>{head}</tr>{''.join(cells)}</table>""")


def main(argv=None):
    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok = load(args.init_from, getattr(torch, args.dtype))
        prompt = args.prompt
        if prompt.startswith("@"):
            with open(prompt[1:]) as f:
                prompt = f.read()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    model.to(device).eval()
    cfg = model.config
    if args.mode == "chat":
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tok.encode_chat(messages + [{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(prompt)
    rule = Rule("threshold", cfg.route_threshold if args.threshold is None else args.threshold,
                use_predictor=cfg.route_predictor)
    tty = sys.stdout.isatty()
    generator = torch.Generator(device).manual_seed(args.seed)
    all_pieces, all_ran = [], []
    for sample in range(args.num_samples):
        print(f"--- sample {sample + 1}/{args.num_samples}" if args.num_samples > 1 else "---")
        out, t0, t_first = [], time.time(), None
        try:
            stream = model.generate_stream([ids], args.max_new_tokens, temperature=args.temperature,
                                           top_k=args.top_k, stop_ids=[tok.eos_id, tok.im_end_id],
                                           rule=rule, generator=generator)
            for token, done, ran in stream:
                t_first = t_first or time.time()   # the prompt's prefill ends with the first token
                token = int(token[0])
                if token in (tok.eos_id, tok.im_end_id):
                    break
                piece = tok.decode_bytes(out + [token])[len(tok.decode_bytes(out)):].decode("utf-8", "replace")
                out.append(token)
                if ran is None:
                    print(piece, end="", flush=True)
                else:
                    all_pieces.append(piece)
                    all_ran.append(ran[0].tolist())
                    print(colour(piece, int(ran[0].sum()), cfg.n_layer, tty), end="", flush=True)
        except ValueError as e:
            sys.exit(f"\nerror: {e}")
        decode_s = max(1e-9, time.time() - (t_first or t0))
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        steps = max(0, len(out) - 1)   # tokens after the first come from decode steps
        print(f"\n--- prefill {len(ids)} tokens in {(t_first or t0) - t0:.2f}s; decode {steps} tokens at "
              f"{steps / decode_s:.1f} tokens/s, {steps * n_bytes / decode_s / 1e9:.2f} GB/s of weights read")
    if all_ran:
        per_layer = torch.tensor(all_ran, dtype=torch.float64).mean(0).tolist()
        context = len(ids) + len(all_ran) // max(1, args.num_samples)
        attn, mlp, _ = model.layer_flops(context)
        layer_total = cfg.n_layer * (attn + mlp)
        saved = 1 - (model.flops_per_token(per_layer, context) - 2 * cfg.n_embd * cfg.vocab_size) / layer_total
        print(f"depth: {sum(per_layer):.2f} of {cfg.n_layer} layers per token on average "
              f"(routed part: {cfg.route}), {100 * saved:.1f}% of layer FLOPs saved")
        write_depth_html(args.depth_out, all_pieces, all_ran, cfg.n_layer)
        print(f"token x layer picture: {args.depth_out}")


if __name__ == "__main__":
    main()
