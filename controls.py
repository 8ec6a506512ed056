"""
The controls that say what learned routing is worth, on the same weights and at the
routers' own per-part fractions: the label oracle (skip by the similarity labels of a
dense pass: the best routers could do), random routing (what per-token choice adds
beyond per-layer sparsity) and static pruning (whole parts kept or dropped, the
strongest baseline). Each is a routing rule, usable wherever router.Rule is.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from router import Rule, select_topk


@dataclass
class ControlRule(Rule):
    """kind: "mask" runs exactly `masks[slot]`; "random" runs each token with probability
    capacity[slot] (drawn on the CPU from `generator`); "static" runs every token of the
    parts with capacity[slot] = 1 and none of the others. The last two are causal, so they
    decode with the cache too."""
    masks: list = field(default_factory=list)
    generator: Optional[torch.Generator] = None

    @property
    def per_token(self):
        return self.kind in ("random", "static")

    def choose(self, logit, routable, slot):
        if self.kind == "mask":
            return self.masks[slot] & routable
        if self.kind == "random":
            draw = torch.rand(routable.shape, generator=self.generator).to(routable.device)
            return (draw < self.capacity[slot]) & routable
        if self.kind == "static":
            return routable & (self.capacity[slot] >= 1)
        raise ValueError(f"unknown control rule {self.kind!r}: use mask, random or static")


def mask_rule(masks):
    return ControlRule("mask", masks=list(masks))


def oracle_rule(fractions):
    """Per batch: a dense pass gives every routed layer's similarities; then each layer
    runs its least-similar routable tokens, at the given per-layer fraction."""
    def rule(model, x, valid):
        model(x, valid=valid, rule=Rule("all", similarity=True))
        return mask_rule(select_topk(-t.sim, t.routable, f) for t, f in zip(model.route_trace, fractions))
    return rule


def random_rule(fractions, seed=0):
    """Each routable token runs each routed part with that part's probability."""
    return ControlRule("random", capacity=torch.tensor(fractions), generator=torch.Generator().manual_seed(seed))


def static_rule(fractions, parts):
    """Static pruning at the routers' budget: per kind of part ("attn", "mlp", "block"),
    keep the most used parts whole and drop the others whole, keeping ceil(sum of that
    kind's fractions) of them, so the control never runs less than the routers did."""
    keep = torch.zeros(len(fractions))
    for kind in set(parts):
        slots = sorted((i for i, p in enumerate(parts) if p == kind), key=lambda i: -fractions[i])
        n = math.ceil(sum(fractions[i] for i in slots) - 1e-6)
        keep[slots[:n]] = 1.0
    return ControlRule("static", capacity=keep)
