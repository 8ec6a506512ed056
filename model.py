"""
The nanoDLO model: a Llama-style decoder (GPT-2 as a config variant) whose blocks
can each carry a router that skips work per token.

- RMSNorm, rotate-half RoPE, GQA, SwiGLU (arch="gpt2": LayerNorm, GELU, learned positions);
  HF Llama's module names, but q/k/v and gate/up are one matmul each (weights.py converts)
- routed layers (router.py) skip, per token, the MLP ("mlp", DLO's default: attention
  always runs), the attention ("attn"), each on its own ("attn+mlp", SkipGPT) or the whole
  block ("block"), or decide whose K/V stays beyond a window ("kv"); a skipped attention
  still writes K/V ("compute"), writes none ("drop") or stays visible for kv_window
  positions ("window"); the selected tokens run alone (gathered), sinks always run,
  batch-1 decode decides on the host
- a static KV cache (gpt-fast style; cache.py: which keys a query sees under each K/V
  policy, and a cache that stores only what ran); no attention mask where a causal one
  is exact; the LM head only where a target is; FLOP and KV-byte estimators that count
  skipped work
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from cache import Keys, attend, attend_rows, key_mask, received_attention
from router import Router, Rule, Trace, add_selected, dlo_gate, layer_threshold, routable_tokens, select

# positions per lm_head call in the loss: LOSS_CHUNK x vocab fp32 logits alive (805 MB for SmolLM2)
LOSS_CHUNK = 4096
# the config's choices; train.py's flags take theirs from here
CHOICES = {"arch": ("llama", "gpt2"), "route": ("none", "mlp", "attn", "attn+mlp", "block", "kv"),
           "kv_policy": ("compute", "drop", "window"), "route_gate": ("dlo", "mod")}
# rules that decide one token at a time, so batch-1 decode can take Block.route_one
ONE_TOKEN_RULES = ("threshold", "all", "random", "static")
# what one router decides: a routed layer has one part ("mlp", "attn", "block", or "kv": whose
# K/V stays beyond the window) or two ("attn+mlp": each with its own router, as SkipGPT,
# arXiv 2506.04179)
PARTS = {"mlp": ("mlp",), "attn": ("attn",), "attn+mlp": ("attn", "mlp"), "block": ("block",), "kv": ("kv",)}


@dataclass
class GPTConfig:
    arch: str = "llama"               # "llama" or "gpt2"
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    n_embd: int = 576
    intermediate_size: int = 1536
    block_size: int = 8192            # longest context, in tokens
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_embeddings: bool = True
    bias: bool = False
    # depth scaling and routing
    new_layers: tuple = ()            # indices of layers added by expansion (dlo.py)
    route: str = "none"               # what routed_layers' routers decide: "mlp", "attn", "attn+mlp", "block", "kv"
    routed_layers: tuple = ()         # which layers carry route's routers; () = all of them
    attn_routed_layers: tuple = ()    # other layers whose attention alone is routed
    route_gate: str = "dlo"           # "dlo": g(p) = 1 + gap (p - 0.5); "mod": the block output times p
    route_gap: float = 0.05
    route_threshold: object = 0.5     # inference: run iff p >= this; or one (calibrated) per routed part
    route_sink_tokens: int = 0        # the first r positions of every row run every routed part
    route_predictor: bool = False     # MoD's auxiliary causal predictor decides at inference
    kv_policy: str = "compute"        # a skipped attention still writes K/V; "drop": none; "window": seen kv_window on
    kv_window: int = 64               # "window": positions after a token that still see its K/V if it is not kept
    frozen_layers: tuple = ()         # LLaMA Pro: originals get no gradient

    def __post_init__(self):
        for name in ("new_layers", "routed_layers", "attn_routed_layers", "frozen_layers"):
            setattr(self, name, tuple(getattr(self, name)))
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: use {', '.join(allowed)}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must divide by n_head, and n_head by n_kv_head")
        bad = [i for i in self.routed_layers + self.attn_routed_layers + self.new_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"layer indices {bad} out of range for {self.n_layer} layers")
        both = set(self.routed_ids()) & set(self.attn_routed_layers)
        if both:
            raise ValueError(f"layers {sorted(both)} are both in routed_layers and attn_routed_layers")
        if self.route == "kv" and (self.kv_policy != "window" or self.attn_routed_layers):
            raise ValueError('routing K/V retention (route "kv") needs kv_policy "window" and no other routed parts')
        if isinstance(self.route_threshold, (list, tuple)):
            self.route_threshold = tuple(float(t) for t in self.route_threshold)
            if len(self.route_threshold) != len(self.route_slots()):
                raise ValueError(f"{len(self.route_threshold)} thresholds for {len(self.route_slots())} routed parts")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def routed_ids(self):
        """The layers that carry `route`'s routers."""
        return () if self.route == "none" else self.routed_layers or tuple(range(self.n_layer))

    def layer_route(self, i):
        """What layer i's routers skip: route, "attn", or "" (a dense layer)."""
        return self.route if i in self.routed_ids() else "attn" if i in self.attn_routed_layers else ""

    def route_slots(self):
        """Every routed part as (layer, part), in the order a forward pass meets them. One
        threshold, capacity and router.Trace per slot."""
        return tuple((i, part) for i in range(self.n_layer) for part in PARTS.get(self.layer_route(i), ()))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # fp32 statistics, as HF Llama
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg):
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.n_embd, cfg.norm_eps)


def rope_tables(positions, head_dim, theta):
    """cos, sin of shape (B, 1, T, hs) in fp32 for integer positions (B, T)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq          # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]          # (B, 1, T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate-half layout (HF), x (B, nh, T, hs). The rotation runs in fp32 whatever x's
    dtype: bf16 angles cost a bf16 model a few tenths of a percent of perplexity."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class KVCache(nn.Module):
    """Static K/V buffers plus a `valid` flag per slot. A slot is valid once a real
    token that ran this layer's attention wrote it; padding and, under the `drop`
    policy, skipped tokens never become valid, so nobody attends to them. Under
    "window", each slot also says whether later queries beyond the window see it. Every
    slot is reserved up front; cache.CompactKVCache stores only what is written."""

    def __init__(self, batch_size, max_seq, n_kv_head, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("valid", torch.zeros(shape[0], max_seq, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("slot", torch.arange(max_seq, device=device), persistent=False)
        self.kept = None   # made on the first write that says who is kept

    def update(self, input_pos, k, v, write, kept=None):  # input_pos (T,), k/v (B, nkv, T, hs), write (B, T)
        keep = write[:, None, :, None]
        self.k[:, :, input_pos] = k.masked_fill(~keep, 0).to(self.k.dtype)   # autocast: bf16 into the cache
        self.v[:, :, input_pos] = v.masked_fill(~keep, 0).to(self.v.dtype)
        self.valid[:, input_pos] = write
        if kept is not None:
            self.kept = torch.ones_like(self.valid) if self.kept is None else self.kept
            self.kept[:, input_pos] = kept
        return Keys(self.k, self.v, self.valid, self.slot, self.kept)

    def update_rows(self, b, slot, k, v):  # only the tokens (b, slot) (N,) write: k/v (N, nkv, hs)
        self.k[b, :, slot] = k.to(self.k.dtype)   # a slot starts invalid and is written once
        self.v[b, :, slot] = v.to(self.v.dtype)
        self.valid[b, slot] = True
        return Keys(self.k, self.v, self.valid, self.slot)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.valid, self.slot, self.kept)
                   if t is not None)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window = cfg.kv_window
        self.sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
        # q, k and v in one matmul (gpt-fast's wqkv): rows [q | k | v]; weights.py converts
        self.qkv_proj = nn.Linear(cfg.n_embd, sum(self.sizes), bias=cfg.bias)
        self.o_proj = nn.Linear(self.sizes[0], cfg.n_embd, bias=cfg.bias)
        self.kv_cache = None

    def heads(self, t, n, rope):   # (B, T, n * hs) -> (B, n, T, hs), rotated
        B, T, _ = t.shape
        t = t.view(B, T, n, self.head_dim).transpose(1, 2)
        return t if rope is None else apply_rope(t, *rope)

    def rows(self, t, n, rope):    # (N, n * hs) -> (N, n, hs), rotated by each row's own angles (N, hs)
        t = t.view(t.size(0), n, self.head_dim)
        return t if rope is None else apply_rope(t, rope[0][:, None], rope[1][:, None])

    def store(self, k, v, input_pos, write, kept=None):
        """Caches the chunk's K/V when decoding (input_pos given); returns every key and value
        this chunk may attend to, with their validity."""
        if input_pos is None:
            return Keys(k, v, write, torch.arange(k.size(2), device=k.device), kept)
        return self.kv_cache.update(input_pos, k, v, write, kept)

    def store_rows(self, k, v, b, t, input_pos, shape):
        """store for the rows (b, t) alone, k/v (N, nkv, hs): the other tokens write nothing."""
        if input_pos is not None:
            return self.kv_cache.update_rows(b, input_pos[t], k, v)
        keys, values = (r.new_zeros(shape[0], self.n_kv_head, shape[1], self.head_dim) for r in (k, v))
        keys[b, :, t], values[b, :, t] = k, v
        written = torch.zeros(shape, dtype=torch.bool, device=k.device)
        written[b, t] = True
        return Keys(keys, values, written, torch.arange(shape[1], device=k.device))

    def forward(self, x, rope, input_pos, write, causal_only, kept=None, received=False):
        """write (B, T): which tokens of x store K/V that others may attend to; kept (B, T):
        under "window", which of them queries beyond the window still see.
        causal_only: no cache and every real key precedes the padding, so a causal mask
        alone is exact for every real query (padded queries attend to padding, unread).
        received: also return received_attention's labels."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = self.heads(q, self.n_head, rope)                                        # (B, nh, T, hs)
        keys = self.store(self.heads(k, self.n_kv_head, rope), self.heads(v, self.n_kv_head, None), input_pos,
                          write, kept)
        mask = None
        if not causal_only or kept is not None:
            mask = key_mask((torch.arange(T, device=x.device) if input_pos is None else input_pos)[None], keys,
                            self.window)
        y = self.o_proj(attend(q, keys.k, keys.v, mask).transpose(1, 2).reshape(B, T, -1))
        return (y, received_attention(q, keys, self.window)) if received else y

    def routed(self, x, norm, rope, input_pos, valid, policy, sel):
        """Routed attention, x (B, T, C) the block input, norm its input norm, sel (B, T) the
        tokens whose queries run. Returns rows(idx): the attention output (N, C) of the flat
        token indices idx (those queries). Under "compute" and "window" every real token
        writes K/V first (one matmul, also when no query runs; under "window" the others'
        only for the next kv_window positions); under "drop" only the queries write theirs,
        and the other tokens cost nothing: no norm, no projection, no cache slot at all."""
        B, T, C = x.shape
        flat, q_size = x.reshape(B * T, C), self.sizes[0]
        w, bias = self.qkv_proj.weight, self.qkv_proj.bias
        angles = None if rope is None else [r.reshape(B * T, -1) for r in rope]     # (B * T, hs) each
        drop = policy == "drop"
        if not drop:
            normed = norm(x)
            k, v = F.linear(normed, w[q_size:], None if bias is None else bias[q_size:]).split(self.sizes[1:], -1)
            keys = self.store(self.heads(k, self.n_kv_head, rope), self.heads(v, self.n_kv_head, None),
                              input_pos, valid, sel if policy == "window" else None)

        def rows(idx):
            b, t = idx // T, idx % T
            at = None if angles is None else (angles[0][idx], angles[1][idx])
            if drop:
                q, k, v = F.linear(norm(flat[idx]), w, bias).split(self.sizes, -1)
                written = self.store_rows(self.rows(k, self.n_kv_head, at), self.rows(v, self.n_kv_head, None),
                                          b, t, input_pos, (B, T))
            else:
                q = F.linear(normed.reshape(B * T, C)[idx], w[:q_size], None if bias is None else bias[:q_size])
                written = keys
            slot = t if input_pos is None else input_pos[t]
            return self.o_proj(attend_rows(self.rows(q, self.n_head, at), b, slot, written, self.window))
        return rows


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        if self.swiglu:   # gate and up in one matmul, rows [gate | up]
            self.gate_up_proj = nn.Linear(cfg.n_embd, 2 * cfg.intermediate_size, bias=cfg.bias)
        else:
            self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


@dataclass
class Context:
    """What every block of one forward pass needs."""
    rope: object                  # (cos, sin), each (B, 1, T, hs); None for GPT-2
    valid: torch.Tensor           # (B, T) real tokens
    routable: torch.Tensor        # (B, T) real tokens the routers decide for (not sinks)
    input_pos: object             # (T,) cache slots this chunk writes; None = no cache
    rule: Rule
    causal_only: bool             # no cache, right padding: attention needs no mask
    single: bool = False          # one token in all (batch-1 decode): Block.route_one decides on the host


class Block(nn.Module):
    """A pre-norm Llama block. Its kind (GPTConfig.layer_route) says what its routers skip:
    "" nothing, "mlp" (DLO's "ExAttn": attention runs for every token), "attn", "attn+mlp"
    (two routers, each part decided on its own) or "block" (attention and MLP together).
    `router` decides the MLP or the whole block, `attn_router` the attention or, for "kv",
    whose K/V stays in the cache beyond the window."""

    def __init__(self, cfg, index=0):
        super().__init__()
        self.cfg, self.index, self.kind = cfg, index, cfg.layer_route(index)
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        parts = PARTS.get(self.kind, ())
        self.router = Router(cfg.n_embd, cfg.route_predictor) if {"mlp", "block"} & set(parts) else None
        self.attn_router = Router(cfg.n_embd, cfg.route_predictor) if {"attn", "kv"} & set(parts) else None

    def routers(self):
        return [r for r in (self.attn_router, self.router) if r is not None]

    def attention(self, x, ctx):
        return self.self_attn(self.input_layernorm(x), ctx.rope, ctx.input_pos, ctx.valid, ctx.causal_only)

    def forward(self, x, ctx, slot):
        """Returns the block output and the router.Trace of each routed part, in slot order."""
        if self.kind == "kv":
            h, trace = self.retain(x, ctx, slot)
            return h + self.mlp(self.post_attention_layernorm(h)), [trace]
        if self.kind == "block":
            out, trace = self.route(self.router, "block", x, x, ctx, slot, self.block_rows)
            return out, [trace]
        if self.kind == "mlp" and self.fusable(x, ctx.rule):
            return self.mlp_routed_fused(x, ctx, layer_threshold(ctx.rule, slot))
        traces = []
        if self.attn_router is not None:
            h, trace = self.route(self.attn_router, "attn", x, x, ctx, slot, self.attn_rows)
            traces.append(trace)
        else:
            h = x + self.attention(x, ctx)
        if self.router is None:
            return h + self.mlp(self.post_attention_layernorm(h)), traces
        # DLO's router reads the block input (arXiv 2407.11030, section 3.2); when the
        # attention is routed too, the MLP's router reads the MLP's own input, as SkipGPT's
        reads = x if self.kind == "mlp" else h
        out, trace = self.route(self.router, "mlp", reads, h, ctx, slot + len(traces), self.mlp_rows)
        return out, traces + [trace]

    def gate(self, p):
        """What scales a selected token's branch: DLO's g(p) (router.dlo_gate, the one place its
        formula is written), or p itself under MoD's gate. p a tensor or, at batch-1 decode, a float."""
        return p if self.cfg.route_gate == "mod" else dlo_gate(p, self.cfg.route_gap)

    def route(self, router, part, reads, base, ctx, slot, rows_for):
        """One routed part: decide from `reads`, then base + gate * branch on the selected
        tokens; rows_for(base, ctx, sel) gives the branch for rows of the flat tokens."""
        rule = ctx.rule
        if ctx.single and rule.kind in ONE_TOKEN_RULES and not (rule.similarity or rule.use_predictor):
            return self.route_one(router, part, reads, base, ctx, slot)
        logit = router(reads)
        pred = router.predict(reads) if router.predictor is not None else None
        sel = select(pred if ctx.rule.use_predictor else logit, ctx.routable, ctx.valid, ctx.rule, slot)
        p = torch.sigmoid(logit)
        out, sim = add_selected(base, sel, self.gate(p), rows_for(base, ctx, sel), ctx.rule.similarity)
        return out, Trace(self.index, logit, sel, ctx.valid, ctx.routable, sim, pred, part)

    def route_one(self, router, part, reads, base, ctx, slot):
        """route() for a single token, as in batch-1 decode: one host sync decides, then the
        part runs densely or not at all, with no gather, scatter or mask, and the gate is a
        Python number. Static and random rules decide without the router; it then runs
        only for the gate of a token that runs."""
        rule, sink = ctx.rule, not bool(ctx.routable)
        logit = router(reads) if rule.kind == "threshold" and not sink else None
        if logit is not None:
            run = float(torch.sigmoid(logit)) >= layer_threshold(rule, slot)
        else:
            run = sink or bool(select(reads.new_zeros(1, 1), ctx.routable, ctx.valid, rule, slot))
        if not run:
            if part != "mlp" and self.cfg.kv_policy != "drop":   # its K/V still written
                self.self_attn.routed(base, self.input_layernorm, ctx.rope, ctx.input_pos, ctx.valid,
                                      self.cfg.kv_policy, ~ctx.valid)
            logit = reads.new_zeros(1, 1, dtype=torch.float32) if logit is None else logit
            return base, Trace(self.index, logit, ~ctx.valid, ctx.valid, ctx.routable, part=part)
        logit = router(reads) if logit is None else logit
        p = float(torch.sigmoid(logit))
        gate = self.gate(p)
        if part == "mlp":
            y = self.mlp(self.post_attention_layernorm(base))
        else:
            y = self.attention(base, ctx)
            if part == "block":
                y = y + self.mlp(self.post_attention_layernorm(base + y))
        return base + gate * y, Trace(self.index, logit, ctx.valid, ctx.valid, ctx.routable, part=part)

    def mlp_rows(self, h, ctx, sel):
        flat = h.reshape(-1, h.size(-1))
        return lambda idx: self.mlp(self.post_attention_layernorm(flat[idx]))

    def attn_rows(self, x, ctx, sel):
        """The attention branch. The selected tokens' rows run alone (Attention.routed); the
        labels' dense pass runs every token as a query, each attending to the tokens that
        wrote K/V (under "drop", the selected ones; under "window", the selected ones and
        the last kv_window positions) and to itself."""
        policy = self.cfg.kv_policy
        if ctx.rule.similarity:
            a = self.self_attn(self.input_layernorm(x), ctx.rope, ctx.input_pos, sel if policy == "drop" else ctx.valid,
                               ctx.causal_only and policy == "compute", kept=sel if policy == "window" else None)
            return lambda idx: a.reshape(-1, a.size(-1))[idx]
        return self.self_attn.routed(x, self.input_layernorm, ctx.rope, ctx.input_pos, ctx.valid, policy, sel)

    def retain(self, x, ctx, slot):
        """K/V retention ("kv"): every token's attention runs, and the router decides whose
        K/V the queries beyond the kv_window still see, so a cache that evicts the others
        holds only the kept ones (cache.CompactKVCache). The labels rank tokens by the
        attention far queries would give them; the router learns from them alone (no gate)."""
        logit = self.attn_router(x)
        sel = select(logit, ctx.routable, ctx.valid, ctx.rule, slot)
        a = self.self_attn(self.input_layernorm(x), ctx.rope, ctx.input_pos, ctx.valid, ctx.causal_only, kept=sel,
                           received=ctx.rule.similarity)
        sim, labelled = None, ctx.routable
        if ctx.rule.similarity:   # low = worth keeping; only keys that some far query sees get a label
            a, (mass, far) = a
            sim, labelled = -mass, ctx.routable & far
        return x + a, Trace(self.index, logit, sel, ctx.valid, labelled, sim, None, "kv")

    def block_rows(self, x, ctx, sel):
        attn, flat = self.attn_rows(x, ctx, sel), x.reshape(-1, x.size(-1))

        def rows(idx):
            a = attn(idx)
            return a + self.mlp(self.post_attention_layernorm(flat[idx] + a))
        return rows

    def fusable(self, x, rule):
        """The Triton path (kernels.py): DLO's MLP routing at inference, no autograd."""
        return (rule.kind == "threshold" and not rule.similarity and not rule.use_predictor
                and self.cfg.route_gate == "dlo" and self.cfg.arch == "llama"
                and kernels.use_triton(x, self.router.weight, self.mlp.gate_up_proj.weight, self.mlp.down_proj.weight))

    def mlp_routed_fused(self, x, ctx, threshold):
        """The routed MLP through kernels.routed_mlp: gather-and-scatter at prefill, a decision
        read on the device at decode, so no routed layer waits on the host there."""
        h = x + self.attention(x, ctx)
        B, T, C = h.shape
        sinks = ctx.valid & ~ctx.routable
        out, p, sel = kernels.routed_mlp(x.reshape(-1, C), h.reshape(-1, C), self.router.weight,
                                         self.post_attention_layernorm, self.mlp, threshold,
                                         ctx.routable.flatten(), sinks.flatten(), self.gate, decode=T == 1)
        trace = Trace(self.index, torch.logit(p).view(B, T), sel.view(B, T), ctx.valid, ctx.routable, part="mlp")
        return out.view_as(h), [trace]


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "gpt2":
            self.pos_embed = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        self.apply_freezing()
        self.route_trace = []   # router.Trace per routed part of the last forward

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, Router):   # apply() reaches it after its predictor's Linears
            module.reset_parameters()

    def apply_freezing(self):
        """LLaMA Pro (arXiv 2401.02415): frozen layers, and with them the embeddings,
        final norm and head, get no gradient; only new blocks (and routers) train."""
        frozen = self.config.frozen_layers
        for name, param in self.named_parameters():
            layer = int(name.split(".")[1]) if name.startswith("layers.") else None
            if frozen and (layer is None or layer in frozen):
                param.requires_grad_(layer is not None and name.split(".")[2] in ("router", "attn_router"))

    def default_rule(self):
        """The inference rule: p >= route_threshold (per layer once calibrated), or MoD's predictor."""
        cfg = self.config
        return Rule(kind="threshold", threshold=cfg.route_threshold, use_predictor=cfg.route_predictor)

    def forward(self, idx, targets=None, *, input_pos=None, positions=None, valid=None, rule=None,
                last_only=False, reduction="mean"):
        """idx (B, T) token ids; targets (B, T), -1 = no loss; input_pos (T,): the cache slots
        written (None: no cache, rows right-padded); positions (B, T): RoPE/learned positions
        (default: the slots); valid (B, T): False on padding. Returns (logits, loss): logits
        (B, T, V) or (B, 1, V) with last_only, None with targets (every logit is never made);
        loss: mean over targets, their sum, or per token (B, T) with reduction "none"."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"a chunk of {T} tokens exceeds the model's context of {self.config.block_size} tokens")
        if valid is None:
            valid = torch.ones_like(idx, dtype=torch.bool)
        elif input_pos is None and not torch.compiler.is_compiling() and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError("without a KV cache, rows must be right-padded (real tokens first)")
        if positions is None:
            base = torch.arange(T, device=idx.device) if input_pos is None else input_pos
            positions = base.expand(B, T)
        gpt2 = self.config.arch == "gpt2"   # learned positions, or RoPE in every attention
        x = (self.embed_tokens(idx) + self.pos_embed(positions)) if gpt2 else self.embed_tokens(idx)
        rope = None if gpt2 else rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        routable = routable_tokens(valid, positions, self.config.route_sink_tokens)
        ctx = Context(rope, valid, routable, input_pos, rule or self.default_rule(), causal_only=input_pos is None,
                      single=B * T == 1)
        self.route_trace = []
        for layer in self.layers:
            x, traces = layer(x, ctx, len(self.route_trace))
            self.route_trace += traces
        x = self.norm(x)
        if targets is not None:
            return None, self.lm_loss(x, targets, reduction)
        return self.lm_head(x[:, -1:] if last_only else x), None

    def lm_loss(self, x, targets, reduction):
        """Cross-entropy over LOSS_CHUNK rows of fp32 logits at a time; with several chunks, each
        is recomputed in the backward pass. Eager: only positions with a target go through the
        head (in SFT, the assistant's tokens). Compiled: every position, since selecting them
        has a data-dependent shape that would break the graph."""
        keep = targets != -1
        static = torch.compiler.is_compiling()
        h, t = (x.flatten(0, 1), targets.flatten()) if static else (x[keep], targets[keep])
        ce = lambda hc, tc: F.cross_entropy(self.lm_head(hc).float(), tc, ignore_index=-1, reduction="none")
        chunks = [(h[i:i + LOSS_CHUNK], t[i:i + LOSS_CHUNK]) for i in range(0, h.size(0), LOSS_CHUNK)]
        recompute = len(chunks) > 1 and torch.is_grad_enabled()
        pieces = [checkpoint(ce, hc, tc, use_reentrant=False) if recompute else ce(hc, tc) for hc, tc in chunks]
        losses = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
        if reduction == "none":
            if static:
                return losses.view(targets.shape)
            return losses.new_zeros(targets.shape).masked_scatter(keep, losses)
        return losses.sum() if reduction == "sum" else losses.sum() / keep.sum()

    # ---- cost estimators -------------------------------------------------------------

    def layer_flops(self, context):
        """Forward FLOPs per token of one layer: (attention, mlp, kv projection)."""
        cfg, hs = self.config, self.config.head_dim
        kv_proj = 2 * cfg.n_embd * 2 * cfg.n_kv_head * hs
        attn = kv_proj + 2 * cfg.n_embd * 2 * cfg.n_head * hs + 2 * 2 * cfg.n_head * hs * context
        mlp = 2 * cfg.n_embd * cfg.intermediate_size * (3 if cfg.arch == "llama" else 2)
        return attn, mlp, kv_proj

    def flops_per_token(self, attn=None, mlp=None, context=1024):
        """Estimated forward FLOPs per token. attn, mlp: per layer, the fraction of tokens
        that ran its attention and its MLP (None = all). A skipped attention still projects
        K/V under "compute" and "window". Embedding lookups are free; the LM head is not."""
        cfg = self.config
        a, m, kv_proj = self.layer_flops(context)
        skipped = 0 if cfg.kv_policy == "drop" else kv_proj
        attn, mlp = attn or [1.0] * cfg.n_layer, mlp or [1.0] * cfg.n_layer
        return 2 * cfg.n_embd * cfg.vocab_size + sum(fa * a + (1 - fa) * skipped + fm * m for fa, fm in zip(attn, mlp))

    def kv_bytes_per_token(self, kept=None):
        """K/V bytes stored per token at long context: kept, per layer, the fraction of tokens
        whose K/V the layer keeps (evaluate's kv_per_layer; None = all)."""
        cfg = self.config
        per_layer = 2 * cfg.n_kv_head * cfg.head_dim * self.embed_tokens.weight.element_size()
        return per_layer * (cfg.n_layer if kept is None else sum(kept))
