"""
Per-token layer routing: the router, the selection rules, running the selected
tokens, the similarity labels and the router losses (the capacity schedule that
training anneals is schedule.py). Every function is a
plain tensor function, testable without a model. In the forward pass only add_selected
syncs with the host (its gather needs the number of selected tokens); the schedule and
the evaluation helpers read their few numbers back once per step or evaluation.

Notable features
- DLO router (arXiv 2407.11030, section 3.2): Linear(d, 1), zero-initialised, reads
  the block input x; logit and p = sigmoid(logit) always in fp32, also under autocast
- selection rules: top-k with per-layer capacity (ties kept), threshold p (causal),
  explicit masks (the label oracle and the random control)
- skipping that saves the work: the selected tokens are gathered, run and scattered
  back (kernels.scale_scatter); the others cost nothing
- sink tokens: the first positions of every row always run and are left out of
  the top-k count, the labels and the loss (attention sinks, arXiv 2309.17453)
- labels `cos`, `cos-global` (a tie at the cut, e.g. a branch that returns exactly 0,
  is labelled "skip"), `self`; BCE on logits, which autocast allows on every device
- threshold calibration: the thresholds that reproduce top-k's decisions
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


class Router(nn.Module):
    """One decision per token: logit = w . x in fp32, w zero-initialised so p = 0.5.

    `predictor` is Mixture-of-Depths' auxiliary causal predictor (arXiv 2404.02258
    section 3.5): a small MLP on the *detached* block input, trained with BCE to
    guess the non-causal top-k decision, and used for decoding.
    """

    def __init__(self, n_embd, predictor=False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, n_embd))
        self.detach_input = False   # routers trained alone: no gradient reaches the backbone through x
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

    def forward(self, x):  # x (B, T, C) -> logit (B, T) fp32
        x = x.detach() if self.detach_input else x
        # fp32 even under autocast: in bf16, g(p) would take ~9 distinct values near 0.5
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float()).squeeze(-1)

    def predict(self, x):  # MoD decode rule: logit of P(token is in the top-k), causal
        with torch.autocast(x.device.type, enabled=False):
            return self.predictor(x.detach().float()).squeeze(-1)


def dlo_gate(p, gap=0.05):
    """g(p) = 1 + gap * (p - 0.5): keeps p in the LM gradient path while g ~= 1 (DLO eq. 3)."""
    return 1.0 + gap * (p - 0.5)


RULES = ("topk", "threshold", "all", "mask", "random", "static")


@dataclass
class Rule:
    """How a forward pass turns router probabilities into 0/1 decisions.

    kind: "topk" keeps ceil(c_l * N) tokens per layer among the N routable tokens of
          the batch (non-causal, training only); "threshold" runs a token iff
          p >= threshold (causal, usable with the KV cache); "all" runs every token;
          "mask" runs exactly `masks[slot]` (the label oracle); "random" runs each
          token with probability capacity[slot] (the random control); "static" runs
          every token of the parts with capacity[slot] = 1 and none of the others
          (static pruning). The last two are causal, so they decode with the cache too.
    capacity: (n_routed,) tensor, for "topk", "random" and "static". A tensor, not
          floats, so a compiled step does not recompile when the capacities move.
    threshold: a float, or one per routed part (calibrated; see thresholds_from_topk).
    similarity: also compute cos(before, after) per token for the label rules; this
          runs the routed branch densely, since every token needs it.
    """
    kind: str = "threshold"
    threshold: object = 0.5
    capacity: Optional[torch.Tensor] = None
    masks: list = field(default_factory=list)
    similarity: bool = False
    use_predictor: bool = False  # MoD decoding: decide with the auxiliary predictor
    generator: Optional[torch.Generator] = None   # "random": its draws, on the CPU


@dataclass
class Trace:
    """What one routed part did in the last forward pass; all (B, T)."""
    layer: int
    logit: torch.Tensor                   # router logit, fp32
    sel: torch.Tensor                     # did the routed part run (sinks and dense tokens: True)
    valid: torch.Tensor                   # real token (not padding)
    routable: torch.Tensor                # real and not a sink: what the router decides
    sim: Optional[torch.Tensor] = None    # cos(before, after), for the labels
    pred_logit: Optional[torch.Tensor] = None   # MoD's causal predictor
    part: str = "mlp"                     # what was skipped: "mlp", "attn" or "block" (both)

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
    if rule.kind == "all":
        sel = routable
    elif rule.kind == "threshold":
        sel = select_threshold(torch.sigmoid(logit), routable, layer_threshold(rule, slot))
    elif rule.kind == "topk":
        sel = select_topk(logit, routable, rule.capacity[slot])
    elif rule.kind == "mask":
        sel = rule.masks[slot] & routable
    elif rule.kind == "random":
        draw = torch.rand(routable.shape, generator=rule.generator).to(routable.device)
        sel = (draw < rule.capacity[slot]) & routable
    elif rule.kind == "static":
        sel = routable & (rule.capacity[slot] >= 1)
    else:
        raise ValueError(f"unknown routing rule {rule.kind!r}: use {', '.join(RULES)}")
    return sel | (valid & ~routable)


def routable_tokens(valid, positions, sink_tokens):
    """Real tokens the routers decide for: not padding, not one of the first `sink_tokens`
    positions of the row. The first token's MLP writes the attention sink's massive
    activation (arXiv 2402.17762, section 3); skipping it costs SmolLM2 1.6 nats."""
    return valid & (positions >= sink_tokens) if sink_tokens else valid


# ---- running the selected tokens -----------------------------------------------------

def add_selected(base, sel, gate, rows_fn, similarity):
    """base + gate * branch on the selected tokens, where rows_fn(idx) runs the routed
    branch on rows idx of the (B * T, C) tokens. Returns (out, cos per token or None).
    Skipped tokens cost nothing: gather, run, scatter (kernels.scale_scatter); positions
    never move, so the residual is added once. The label rules need cos(base, base +
    branch) for every token, so with `similarity` every token runs the branch, once,
    instead of the official code's second no-grad pass (DLO section 3.3)."""
    if similarity:
        y = rows_fn(slice(None)).view_as(base)
        return base + (sel * gate).unsqueeze(-1).to(y.dtype) * y, token_similarity(base, base + y)
    n = int(sel.sum())   # the one host sync here
    if n == 0:   # e.g. a skipped token at batch-1 decode: nothing to run at all
        return base, None
    if n == sel.numel():   # e.g. a token that runs at batch-1 decode: no gather, no scatter
        y = rows_fn(torch.arange(n, device=sel.device)).view_as(base)
        return base + gate.unsqueeze(-1).to(y.dtype) * y, None
    idx = sel.flatten().nonzero().squeeze(1)   # ascending token order
    out = kernels.scale_scatter(base.reshape(-1, base.size(-1)), idx, rows_fn(idx), gate.flatten())
    return out.view_as(base), None


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


LABELS = ("cos", "cos-global", "self")   # train.py adds "none": no router loss


def make_labels(traces, mode, capacity, ties="skip", groups=None):
    """Labels for the router loss, and the per-part label fractions (None for `self`)."""
    if mode == "self":   # MoD's auxiliary loss: the router's own top-k decision
        return [t.sel & t.routable for t in traces], None
    return similarity_labels(traces, mode, capacity, ties, groups)


# ---- the router loss -----------------------------------------------------------------

def bce_sum(logits, labels, traces):
    """Summed BCE over routable tokens, from logits: CUDA autocast refuses plain
    binary_cross_entropy, and the logit form is the numerically stable one."""
    total = 0.0
    for logit, y, t in zip(logits, labels, traces):
        loss = F.binary_cross_entropy_with_logits(logit.float(), y.float(), reduction="none")
        total = total + (loss * t.routable).sum()
    return total


def router_loss(traces, labels, n_route, lam=1.0, predictor=False):
    """DLO eq. 5: lam * BCE(p, label) summed over routed parts x routable tokens and
    divided by n_route, the count over the *global* batch, so accumulated micro-batches
    add up to one big batch exactly as the LM loss does. With MoD's predictor, its BCE
    against the (non-causal) top-k decision is added the same way."""
    with torch.autocast(traces[0].logit.device.type, enabled=False):
        loss = lam * bce_sum([t.logit for t in traces], labels, traces) / n_route if labels is not None else 0.0
        if predictor:
            loss = loss + bce_sum([t.pred_logit for t in traces], [t.sel for t in traces], traces) / n_route
    return loss


def load_loss(traces, alpha):
    """MoDification's load-reducing objective, as a third-party reading of arXiv 2410.14268
    describes it (the paper's code is not public): alpha * sum_j F_j * G_j over routed
    parts j, with F_j the hard fraction of routable tokens that ran part j (a constant)
    and G_j their mean router probability, which carries the gradient, as in MoE load
    balancing. It pushes p down where many tokens run, so fewer run."""
    with torch.autocast(traces[0].logit.device.type, enabled=False):
        total = 0.0
        for t in traces:
            n = t.routable.sum().clamp(min=1)
            ran = ((t.sel & t.routable).sum() / n).detach()
            total = total + ran * (t.p * t.routable).sum() / n
    return alpha * total


@torch.no_grad()
def router_agreement(traces, labels):
    """How well the routers rank tokens by their labels: per layer, run the router's own top
    fraction f_l (f_l = the layer's label fraction) and count decisions equal to the
    label; also the mean BCE. Random routers score f^2 + (1-f)^2 per layer."""
    agree, bce, n = 0.0, 0.0, 0.0
    for t, y in zip(traces, labels):
        frac = (y & t.routable).sum() / t.routable.sum().clamp(min=1)
        mine = select_topk(t.logit, t.routable, frac)
        agree += float(((mine == y) & t.routable).sum())
        bce += float(bce_sum([t.logit], [y], [t]))
        n += float(t.routable.sum())
    return agree / max(n, 1.0), bce / max(n, 1.0)


def executed_fraction(traces, n_layer, n_valid):
    """(attention, MLP): the fraction of all n_layer attentions and of all n_layer MLPs
    that ran, per real token; unrouted parts and sink tokens count as run. A skipped
    block skips both. Training and evaluation use this same denominator."""
    total = n_layer * max(n_valid, 1)
    skipped = {"attn": 0, "mlp": 0}
    for t in traces:
        for part in PART_SKIPS[t.part]:
            skipped[part] = skipped[part] + (t.valid & ~t.sel).sum()
    return tuple(float(n_layer * n_valid - skipped[part]) / total for part in ("attn", "mlp"))


PART_SKIPS = {"mlp": ("mlp",), "attn": ("attn",), "block": ("attn", "mlp"), "kv": ()}   # "kv" skips no compute


def executed_map(traces, n_layer):
    """(B, T, n_layer, 2) bool from one forward's traces: did the layer's attention
    ([..., 0]) and its MLP ([..., 1]) run?"""
    ref = traces[0].valid
    ran = torch.ones(*ref.shape, n_layer, 2, dtype=torch.bool, device=ref.device)
    for t in traces:
        for part in PART_SKIPS[t.part]:
            ran[..., t.layer, ("attn", "mlp").index(part)] = t.sel
    return ran


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


def thresholds_from_topk(traces):
    """Per routed part, the smallest p that top-k selected among routable tokens: the
    threshold rule `p >= t` then reproduces the top-k decisions exactly on these rows.
    A part that selected nothing gets +inf (never runs)."""
    out = []
    for t in traces:
        chosen = t.p.masked_fill(~(t.sel & t.routable), math.inf)
        out.append(float(chosen.min()) if bool((t.sel & t.routable).any()) else math.inf)
    return tuple(out)
