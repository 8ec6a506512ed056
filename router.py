"""
Per-token layer routing: the router, the selection rules, the similarity
labels and the router loss. Every function here is a plain tensor function,
testable without a model.

Notable features
- DLO router (arXiv 2407.11030, METHODS.md 1): Linear(d, 1), zero-initialised,
  reads the block input x; p = sigmoid(w . x); gate g(p) = 1 + gap * (p - 0.5)
- selection rules: top-k with per-layer capacity (ties kept) and threshold p
  (causal); both usable in training, so the train/inference gap can be measured
- similarity labels: `cos`, `cos-global`, `self`; BCE router loss
- capacity annealing and the per-layer "dynamic LR" multiplier
- padding is never selected and never labelled
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import decide


class Router(nn.Module):
    """One decision per token: p = sigmoid(w . x), w zero-initialised so p = 0.5.

    `predictor` is Mixture-of-Depths' auxiliary causal predictor (arXiv 2404.02258
    section 3.5): a small MLP on the *detached* block input, trained with BCE to
    guess the non-causal top-k decision, and used for decoding.
    """

    def __init__(self, n_embd, predictor=False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, n_embd))
        self.predictor = None
        if predictor:
            hidden = max(8, n_embd // 8)
            self.predictor = nn.Sequential(nn.Linear(n_embd, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        if self.predictor is not None:  # starts at P = 0.5, like the router
            nn.init.zeros_(self.predictor[2].weight)
            nn.init.zeros_(self.predictor[2].bias)

    def forward(self, x):  # x (B, T, C) -> p (B, T) fp32
        return torch.sigmoid(F.linear(x, self.weight).squeeze(-1).float())

    def predict(self, x):  # MoD decode rule: P(token is in the top-k), causal
        return torch.sigmoid(self.predictor(x.detach()).squeeze(-1).float())


def dlo_gate(p, gap=0.05):
    """g(p) = 1 + gap * (p - 0.5): keeps p in the LM gradient path while g ~= 1 (DLO eq. 3)."""
    return 1.0 + gap * (p - 0.5)


@dataclass
class Rule:
    """How a forward pass turns router probabilities into 0/1 decisions.

    kind: "topk" keeps ceil(c_l * N) tokens per layer among the N real tokens of
          the batch (non-causal, training only); "threshold" runs a token iff
          p >= threshold (causal, usable with the KV cache); "all" runs every token.
    capacity: per routed layer, only for "topk".
    threshold: a float, or a tuple with one value per routed layer (bench.py forces
          executed fractions this way).
    similarity: also compute cos(before, after) per token for the label rules; this
          runs the routed branch densely, since every token needs it.
    """
    kind: str = "threshold"
    threshold: float = 0.5          # or one threshold per routed layer (a tuple)
    capacity: tuple = ()
    similarity: bool = False
    use_predictor: bool = False  # MoD decoding: decide with the auxiliary predictor


def select_topk(p, valid, capacity):
    """Top ceil(capacity * N) of p over the N real tokens of the whole batch; ties at the
    k-th value are kept, so at zero init (all p equal) every token runs (METHODS.md 1)."""
    k = math.ceil(capacity * int(valid.sum()) - 1e-9)
    return decide(p.flatten(), valid.flatten(), k=k).view_as(valid)


def select_threshold(p, valid, threshold):
    """Run iff p >= threshold. A tie at exactly p = threshold runs, as top-k keeps ties, so
    zero-initialised routers (p = 0.5) run every token and a freshly routed model is
    still the dense one, in training and at inference alike."""
    return decide(p, valid, threshold=threshold)


def layer_threshold(rule, layer_slot):
    return rule.threshold[layer_slot] if isinstance(rule.threshold, (tuple, list)) else rule.threshold


def select(p, valid, rule, layer_slot):
    """Apply `rule` to one layer's probabilities p (B, T); layer_slot indexes rule.capacity."""
    if rule.kind == "all":
        return valid.clone()
    if rule.kind == "threshold":
        return select_threshold(p, valid, layer_threshold(rule, layer_slot))
    if rule.kind == "topk":
        return select_topk(p, valid, rule.capacity[layer_slot])
    raise ValueError(f"unknown routing rule {rule.kind!r}: use topk, threshold or all")


def token_similarity(a, b):
    """cos(a, b) per token in fp32 with no gradient: how little a branch changed a token."""
    with torch.no_grad():
        return F.cosine_similarity(a.float(), b.float(), dim=-1)


def similarity_labels(sims, valids, mode, capacities=None, global_capacity=None):
    """Labels (1 = should run) for each routed layer from per-token similarities.

    sims, valids: lists over routed layers of (B, T) tensors.
    "cos": per layer, the ceil(c_l * N) least-similar real tokens get 1.
    "cos-global": one threshold over all layers and tokens so that a fraction
        global_capacity of (layer, token) pairs get 1; returns the resulting
        per-layer capacities too (DLO section 3.3), which the next step's top-k uses.
    Returns (labels list, per-layer capacity list or None).
    """
    if mode == "cos":
        labels = [select_topk(-s, v, c) for s, v, c in zip(sims, valids, capacities)]
        return labels, None
    if mode == "cos-global":
        pooled = torch.cat([s[v] for s, v in zip(sims, valids)])
        k = math.ceil(global_capacity * pooled.numel() - 1e-9)
        if k == 0:
            labels = [torch.zeros_like(v) for v in valids]
        else:
            cut = pooled.topk(k, largest=False).values[-1]  # ties at the cut are kept
            labels = [(s <= cut) & v for s, v in zip(sims, valids)]
        caps = [float(l.sum()) / max(1, int(v.sum())) for l, v in zip(labels, valids)]
        return labels, caps
    raise ValueError(f"unknown label mode {mode!r}: use cos, cos-global or self")


def router_bce(probs, labels, valids):
    """BCE(p, label) averaged over routed layers x real tokens (DLO eq. 5).
    Returns (sum, count) so gradient accumulation can normalise like the LM loss."""
    total = probs[0].new_zeros(())
    count = 0
    for p, y, v in zip(probs, labels, valids):
        total = total + F.binary_cross_entropy(p[v], y[v].float(), reduction="sum")
        count += int(v.sum())
    return total, count


def annealed_capacity(step, start=1.0, end=0.9, steps=1000):
    """Global capacity c_bar, linear from start to end over `steps` (DLO: 1.0 -> 0.9 over 1000)."""
    if steps <= 0:
        return end
    return start + (end - start) * min(1.0, step / steps)


def rescale_capacities(caps, global_capacity):
    """Rescale per-layer capacities so their mean is c_bar, each clipped to [0, 1]."""
    mean = sum(caps) / len(caps)
    if mean <= 0:
        return [global_capacity] * len(caps)
    return [min(1.0, max(0.0, c * global_capacity / mean)) for c in caps]


def dynamic_lr_scales(caps):
    """DLO's "dynamic LR" (METHODS.md 1): layer l's LR is multiplied by c_l + (1 - mean c),
    which follows each layer's capacity while keeping the mean multiplier at 1."""
    mean = sum(caps) / len(caps)
    return [c + (1.0 - mean) for c in caps]
