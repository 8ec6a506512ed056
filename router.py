"""
DLO's router (arXiv 2407.11030, section 3): the router, the rules that turn its
probabilities into decisions, the similarity labels and the router loss. Every function
is a plain tensor function, testable without a model; the routed block that uses them
is dlo.py, the capacity schedule that training anneals is schedule.py.

Notable features
- the router: Linear(d, 1), zero-initialised, reads the block input x; logit and
  p = sigmoid(logit) always in fp32, also under autocast (section 3.2)
- selection rules: top-k with per-layer capacity in training (ties kept), p >= threshold
  at inference (causal, so decode can use it), and "all" (the dense model)
- sink tokens: the first positions of every row always run and are left out of the
  top-k count, the labels and the loss (attention sinks, arXiv 2309.17453)
- labels `cos`, `cos-global` (section 3.3; a tie at the cut, e.g. a branch that returns
  exactly 0, is labelled "skip"); BCE on logits, which autocast allows on every device
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Router(nn.Module):
    """One decision per token: logit = w . x in fp32, w zero-initialised so p = 0.5."""

    def __init__(self, n_embd):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, n_embd))
        self.detach_input = False   # routers trained alone: no gradient reaches the backbone through x

    def reset_parameters(self):
        nn.init.zeros_(self.weight)

    def forward(self, x):  # x (B, T, C) -> logit (B, T) fp32
        x = x.detach() if self.detach_input else x
        # fp32 even under autocast: in bf16, g(p) would take ~9 distinct values near 0.5
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float()).squeeze(-1)


def dlo_gate(p, gap=0.05):
    """g(p) = 1 + gap * (p - 0.5): keeps p in the LM gradient path while g ~= 1 (DLO eq. 3)."""
    return 1.0 + gap * (p - 0.5)


RULES = ("topk", "threshold", "all")


@dataclass
class Rule:
    """How a forward pass turns router logits into 0/1 decisions.

    kind: "topk" keeps ceil(c_l * N) tokens per layer among the N routable tokens of
          the batch (non-causal, training only); "threshold" runs a token iff
          p >= threshold (causal, usable with the KV cache); "all" runs every token.
    capacity: (n_routed,) tensor, for "topk". A tensor, not floats, so a compiled step
          does not recompile when the capacities move.
    threshold: a float, or one per routed part (calibrated: dlo.calibrate).
    similarity: also compute cos(before, after) per token for the labels; this runs the
          routed branch densely, since every token needs it.
    """
    kind: str = "threshold"
    threshold: object = 0.5
    capacity: Optional[torch.Tensor] = None
    similarity: bool = False

    @property
    def per_token(self):
        """Decides each token alone, so batch-1 decode may decide on the host."""
        return self.kind in ("threshold", "all")

    def choose(self, logit, routable, slot):
        """The routable tokens (B, T) that run the routed part numbered `slot`."""
        if self.kind == "all":
            return routable
        if self.kind == "threshold":
            return select_threshold(torch.sigmoid(logit), routable, layer_threshold(self, slot))
        if self.kind == "topk":
            return select_topk(logit, routable, self.capacity[slot])
        raise ValueError(f"unknown routing rule {self.kind!r}: use {', '.join(RULES)}")


@dataclass
class Trace:
    """What one routed part did in the last forward pass; all (B, T)."""
    layer: int
    logit: torch.Tensor                   # router logit, fp32
    sel: torch.Tensor                     # did the routed part run (sinks and dense tokens: True)
    valid: torch.Tensor                   # real token (not padding)
    routable: torch.Tensor                # real and not a sink: what the router decides
    sim: Optional[torch.Tensor] = None    # cos(before, after), for the labels
    part: str = "mlp"                     # what the router decides
    skips: tuple = ("mlp",)               # which of the layer's ("attn", "mlp") a skipped token saves

    @property
    def p(self):
        return torch.sigmoid(self.logit)


# ---- selection rules -----------------------------------------------------------------

def kth_largest(score, routable, k):
    """The k-th largest score among routable entries (k a 0-dim tensor, >= 1). A sort
    and a gather instead of topk(int(k)): no host sync and no recompile per k."""
    flat = score.flatten().float().masked_fill(~routable.flatten(), -math.inf)
    ranked = flat.sort(descending=True).values
    return ranked.gather(0, (k - 1).clamp(min=0).view(1)).squeeze(0)


def count_k(capacity, n):
    """ceil(capacity * n) in float64: in fp32, 0.9 * 1000 rounds to 900.00002 -> 901."""
    return torch.ceil(torch.as_tensor(capacity, dtype=torch.float64, device=n.device) * n - 1e-9).long()


def select_topk(score, routable, capacity):
    """Top ceil(capacity * N) of score over the N routable tokens; ties at the k-th value
    are kept, so at zero init (all p equal) every token runs (DLO section 3.2)."""
    k = count_k(capacity, routable.sum())
    return (score >= kth_largest(score, routable, k)) & routable & (k > 0)


def select_threshold(p, routable, threshold):
    """Run iff p >= threshold. A tie at exactly p = threshold runs, as top-k keeps ties, so
    zero-initialised routers (p = 0.5) run every token: a freshly routed model is still
    the dense one, in training and at inference alike."""
    return (p >= threshold) & routable


def layer_threshold(rule, slot):
    t = rule.threshold
    return t[slot] if isinstance(t, (tuple, list)) else t


def select(logit, routable, valid, rule, slot):
    """Apply `rule` to one layer's logits (B, T). Sinks (valid but not routable) always run."""
    return rule.choose(logit, routable, slot) | (valid & ~routable)


def routable_tokens(valid, positions, sink_tokens):
    """Real tokens the routers decide for: not padding, not one of the first `sink_tokens`
    positions of the row. The first token's MLP writes the attention sink's massive
    activation (arXiv 2402.17762, section 3); skipping it costs SmolLM2 1.6 nats."""
    return valid & (positions >= sink_tokens) if sink_tokens else valid


# ---- labels --------------------------------------------------------------------------

def token_similarity(a, b):
    """cos(a, b) per token in fp32 with no gradient: how little a branch changed a token."""
    with torch.no_grad():
        return F.cosine_similarity(a.float(), b.float(), dim=-1)


def lowest_first(sim, routable, k):
    """1 for the k least-similar routable entries, taking whole tie groups only: a tie at
    the cut is labelled 0 (skip). A branch that returns exactly zero has s = 1.0, the most
    skippable there is; DLO's official code keeps such ties as 1, which at zero init
    labels every token "run" (arXiv 2407.11030, section 3.3, and the README)."""
    cut = -kth_largest(-sim, routable, k)                   # the k-th smallest similarity
    at_or_below = (sim <= cut) & routable
    whole_group_fits = at_or_below.sum() <= k
    return torch.where(whole_group_fits, at_or_below, (sim < cut) & routable) & (k > 0)


def similarity_labels(traces, mode, capacity, ties="skip", groups=None):
    """Labels (1 = should run) per routed part at `capacity`, and each part's label
    fraction (n_routed,) over its routable tokens.
    "cos": per part, the ceil(c * N) least-similar tokens get 1.
    "cos-global": one cut over all parts and tokens, so a fraction c of all pairs gets
        1; the parts get different fractions (DLO section 3.3).
    groups: each part's capacity group, capacity then one per group: the cut is made
    within each group. ties="run" keeps ties at the cut as 1 (DLO's official code)."""
    cut = lowest_first if ties == "skip" else keep_ties
    groups = groups or [0] * len(traces)
    caps = capacity if isinstance(capacity, (list, tuple)) else [capacity] * (max(groups) + 1)
    labels = [None] * len(traces)
    if mode == "cos":
        for i, t in enumerate(traces):
            labels[i] = cut(t.sim, t.routable, count_k(caps[groups[i]], t.routable.sum()))
    elif mode == "cos-global":
        for g in sorted(set(groups)):
            members = [i for i, group in enumerate(groups) if group == g]
            sims = torch.stack([traces[i].sim for i in members])
            routable = torch.stack([traces[i].routable for i in members])
            for i, label in zip(members, cut(sims, routable, count_k(caps[g], routable.sum()))):
                labels[i] = label
    else:
        raise ValueError(f"unknown label mode {mode!r}: use cos, cos-global or self")
    return labels, label_fractions(labels, traces)


def keep_ties(sim, routable, k):
    """DLO's official cut: every entry at or below the k-th smallest similarity is 1."""
    return (sim <= -kth_largest(-sim, routable, k)) & routable & (k > 0)


def label_fractions(labels, traces):
    return torch.stack([(l & t.routable).sum() / t.routable.sum().clamp(min=1) for l, t in zip(labels, traces)])


LABELS = ("cos", "cos-global")


# ---- the router loss -----------------------------------------------------------------

def bce_sum(logits, labels, traces):
    """Summed BCE over routable tokens, from logits: CUDA autocast refuses plain
    binary_cross_entropy, and the logit form is the numerically stable one."""
    total = 0.0
    for logit, y, t in zip(logits, labels, traces):
        loss = F.binary_cross_entropy_with_logits(logit.float(), y.float(), reduction="none")
        total = total + (loss * t.routable).sum()
    return total


def router_loss(traces, labels, n_route, lam=1.0):
    """DLO eq. 5: lam * BCE(p, label) summed over routed parts x routable tokens and
    divided by n_route, the count over the *global* batch, so accumulated micro-batches
    add up to one big batch exactly as the LM loss does."""
    with torch.autocast(traces[0].logit.device.type, enabled=False):
        return lam * bce_sum([t.logit for t in traces], labels, traces) / n_route
