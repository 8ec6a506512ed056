"""
K/V retention: every token runs every layer, and a router per layer decides whose K/V
the queries beyond a window of kv_window positions still see. A cache that evicts the
others (cache.CompactKVCache) then holds only the window and the kept tokens, so long
contexts take less memory and decode reads fewer keys. The labels rank tokens by the
attention that far queries give them (the heavy hitters of H2O, arXiv 2306.14048); the
router learns from them alone, with no gate. Chosen with route "kv" (methods.py).
"""
import torch

from router import Trace, select
from skipping import PART_SKIPS, SkipBlock


class RetentionBlock(SkipBlock):
    """A dense layer whose attn_router decides which tokens' K/V stay beyond the window."""

    def forward(self, x, ctx):
        logit = self.attn_router(x)
        sel = select(logit, ctx.routable, ctx.valid, ctx.rule, len(ctx.traces))
        a = self.self_attn(self.input_layernorm(x), ctx.rope, ctx.input_pos, ctx.valid, ctx.causal_only, kept=sel,
                           received=ctx.rule.similarity)
        sim, labelled = None, ctx.routable
        if ctx.rule.similarity:   # low = worth keeping; only keys that some far query sees get a label
            a, (mass, far) = a
            sim, labelled = -mass, ctx.routable & far
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), [Trace(self.index, logit, sel, ctx.valid, labelled, sim,
                                                                      "kv", PART_SKIPS["kv"])]


def kept_map(traces, n_layer, kv_policy):
    """(B, T, n_layer) bool: does the layer keep the token's K/V for every later query? Not
    when its attention skipped under "drop" or "window", nor when K/V retention ("kv")
    left it out (the last kv_window positions still see it)."""
    ref = traces[0].valid
    kept = torch.ones(*ref.shape, n_layer, dtype=torch.bool, device=ref.device)
    for t in traces:
        if t.part == "kv" or (t.part in ("attn", "block") and kv_policy != "compute"):
            kept[..., t.layer] = t.sel
    return kept
