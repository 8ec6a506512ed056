"""
Routing granularities beyond DLO's MLP: skip a layer's attention, its attention and MLP
each on their own, or the whole block, per token, with what a skipped attention leaves
for later queries (the K/V policy). Extends dlo.RoutedBlock; methods.py picks it by name.

- "attn": the attention alone (the MLP runs for every token)
- "attn+mlp": two routers, each part decided on its own (SkipGPT, arXiv 2506.04179)
- "block": attention and MLP together (Mixture-of-Depths, arXiv 2404.02258)
- K/V policies of a skipped attention: "compute" (it still writes its K/V), "drop" (it
  writes none, and costs nothing: no norm, no projection, no cache slot) and "window"
  (its K/V stays visible for kv_window positions, then only if its router kept it)
- MoD's gate (the branch times p) and its causal predictor (mod.py)
"""
from functools import partial

import torch
import torch.nn.functional as F

import mod
from cache import Keys, RoutedKVCache, attend_rows, key_mask, received_attention
from dlo import RoutedBlock, add_selected
from model import Attention, Block, apply_rope, attend
from router import Router, Trace, dlo_gate, select

# what one layer's routers decide: one part, or two each with its own router
PARTS = {"mlp": ("mlp",), "attn": ("attn",), "attn+mlp": ("attn", "mlp"), "block": ("block",), "kv": ("kv",)}
# which of the layer's attention and MLP a skipped part saves ("kv" decides whose K/V stays)
PART_SKIPS = {"mlp": ("mlp",), "attn": ("attn",), "block": ("attn", "mlp"), "kv": ()}
POLICIES = ("compute", "drop", "window")


class RoutedAttention(Attention):
    """Attention whose queries may run for some tokens only, under a K/V policy."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.window = cfg.kv_window

    def rows(self, t, n, rope):    # (N, n * hs) -> (N, n, hs), rotated by each row's own angles (N, hs)
        t = t.view(t.size(0), n, self.head_dim)
        return t if rope is None else apply_rope(t, rope[0][:, None], rope[1][:, None])

    def store(self, k, v, input_pos, write, kept=None):
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
        """model.Attention's forward, plus kept (B, T): under "window", which tokens queries
        beyond the window still see; received: also return received_attention's labels."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = self.heads(q, self.n_head, rope)                                        # (B, nh, T, hs)
        keys = self.store(self.heads(k, self.n_kv_head, rope), self.heads(v, self.n_kv_head), input_pos,
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
        only for the next kv_window positions); under "drop" only the queries write theirs."""
        B, T, C = x.shape
        flat, q_size = x.reshape(B * T, C), self.sizes[0]
        w, bias = self.qkv_proj.weight, self.qkv_proj.bias
        angles = None if rope is None else [r.reshape(B * T, -1) for r in rope]     # (B * T, hs) each
        drop = policy == "drop"
        if not drop:
            normed = norm(x)
            k, v = F.linear(normed, w[q_size:], None if bias is None else bias[q_size:]).split(self.sizes[1:], -1)
            keys = self.store(self.heads(k, self.n_kv_head, rope), self.heads(v, self.n_kv_head),
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


class SkipBlock(RoutedBlock):
    """A layer whose routers skip, per token, the parts its kind names (PARTS): `router`
    decides the MLP or the whole block, `attn_router` the attention. Also DLO's MLP routing
    under MoD's gate or predictor."""

    def __init__(self, cfg, index):
        Block.__init__(self, cfg)   # not RoutedBlock's: which routers a layer has depends on its kind
        self.self_attn = RoutedAttention(cfg)
        self.cfg, self.index, self.kind, self.gap = cfg, index, cfg.layer_route(index), cfg.route_gap
        parts = PARTS[self.kind]
        make_router = partial(mod.PredictorRouter if cfg.route_predictor else Router, cfg.n_embd)
        self.router = make_router() if {"mlp", "block"} & set(parts) else None
        self.attn_router = make_router() if {"attn", "kv"} & set(parts) else None

    def routers(self):
        return [r for r in (self.attn_router, self.router) if r is not None]

    def gate(self, p):   # MoD's gate: the branch times p (arXiv 2404.02258, section 3.4)
        return p if self.cfg.route_gate == "mod" else dlo_gate(p, self.gap)

    def fusable(self, x, rule):   # the kernels fuse DLO's router with the MLP only
        return False

    def forward(self, x, ctx):
        slot = len(ctx.traces)
        if self.kind == "block":
            out, trace = self.route(self.router, "block", x, x, ctx, slot, self.block_rows)
            return out, [trace]
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

    def route(self, router, part, reads, base, ctx, slot, rows_for):
        """One routed part: decide from `reads`, then base + gate * branch on the selected
        tokens; rows_for(base, ctx, sel) gives the branch for rows of the flat tokens.
        Returns the output and the part's router.Trace."""
        rule = ctx.rule
        predicting = isinstance(rule, mod.PredictorRule)
        if ctx.single and rule.per_token and not rule.similarity:
            return self.route_one(router, part, reads, base, ctx, slot)
        logit = router(reads)
        pred = router.predict(reads) if isinstance(router, mod.PredictorRouter) else None
        sel = select(pred if predicting else logit, ctx.routable, ctx.valid, rule, slot)
        out, sim = add_selected(base, sel, self.gate(torch.sigmoid(logit)), rows_for(base, ctx, sel), rule.similarity)
        trace = Trace(self.index, logit, sel, ctx.valid, ctx.routable, sim, part, PART_SKIPS[part])
        return out, trace if pred is None else mod.PredictorTrace(**vars(trace), pred_logit=pred)

    def route_one(self, router, part, reads, base, ctx, slot):
        """route() for a single token (dlo.RoutedBlock.forward_one): a skipped attention
        still writes its K/V under "compute" and "window"."""
        run, logit = self.decide_one(router, reads, ctx, slot)
        trace = partial(Trace, self.index, valid=ctx.valid, routable=ctx.routable, part=part, skips=PART_SKIPS[part])
        if not run:
            if part != "mlp" and self.cfg.kv_policy != "drop":   # its K/V still written
                self.self_attn.routed(base, self.input_layernorm, ctx.rope, ctx.input_pos, ctx.valid,
                                      self.cfg.kv_policy, ~ctx.valid)
            logit = reads.new_zeros(1, 1, dtype=torch.float32) if logit is None else logit
            return base, trace(logit=logit, sel=~ctx.valid)
        logit = router(reads) if logit is None else logit
        gate = self.gate(float(torch.sigmoid(logit)))
        if part == "mlp":
            y = self.mlp(self.post_attention_layernorm(base))
        else:
            y = self.attention(base, ctx)
            if part == "block":
                y = y + self.mlp(self.post_attention_layernorm(base + y))
        return base + gate * y, trace(logit=logit, sel=ctx.valid)

    def mlp_rows(self, h, ctx, sel):
        flat = h.reshape(-1, h.size(-1))
        return lambda idx: self.mlp(self.post_attention_layernorm(flat[idx]))

    def attn_rows(self, x, ctx, sel):
        """The attention branch. The selected tokens' rows run alone (RoutedAttention.routed);
        the labels' dense pass runs every token as a query, each attending to the tokens that
        wrote K/V (under "drop", the selected ones; under "window", the selected ones and
        the last kv_window positions) and to itself."""
        policy = self.cfg.kv_policy
        if ctx.rule.similarity:
            a = self.self_attn(self.input_layernorm(x), ctx.rope, ctx.input_pos, sel if policy == "drop" else ctx.valid,
                               ctx.causal_only and policy == "compute", kept=sel if policy == "window" else None)
            return lambda idx: a.reshape(-1, a.size(-1))[idx]
        return self.self_attn.routed(x, self.input_layernorm, ctx.rope, ctx.input_pos, ctx.valid, policy, sel)

    def block_rows(self, x, ctx, sel):
        attn, flat = self.attn_rows(x, ctx, sel), x.reshape(-1, x.size(-1))

        def rows(idx):
            a = attn(idx)
            return a + self.mlp(self.post_attention_layernorm(flat[idx] + a))
        return rows


def new_cache(model, batch_size, max_seq):
    """The static cache for a model with routed attention (RoutedKVCache)."""
    w, cfg = model.embed_tokens.weight, model.config
    return RoutedKVCache(batch_size, max_seq, cfg.n_kv_head, cfg.head_dim, w.dtype, w.device)
