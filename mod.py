"""
Mixture-of-Depths (arXiv 2404.02258) and MoDification (arXiv 2410.14268) on the routed
blocks of skipping.py: MoD's gate (a selected token's block output times p, with
route_gate "mod"), its auxiliary causal predictor for decoding (route_predictor), the
"self" labels (the router's own top-k decisions) and MoDification's load objective.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from router import LABELS as DLO_LABELS, Router, Rule, Trace, bce_sum, router_loss as dlo_router_loss, \
    similarity_labels

LABELS = DLO_LABELS + ("self",)   # train.py adds "none": no router loss


class PredictorRouter(Router):
    """A router with MoD's auxiliary causal predictor (section 3.5): a small MLP on the
    *detached* block input, trained with BCE to guess the non-causal top-k decision, and
    used for decoding."""

    def __init__(self, n_embd):
        super().__init__(n_embd)
        hidden = max(8, n_embd // 8)
        self.predictor = nn.Sequential(nn.Linear(n_embd, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        nn.init.zeros_(self.predictor[2].weight)   # starts at P = 0.5, like the router
        nn.init.zeros_(self.predictor[2].bias)

    def predict(self, x):  # logit of P(token is in the top-k), causal
        with torch.autocast(x.device.type, enabled=False):
            return self.predictor(x.detach().float()).squeeze(-1)


class PredictorRule(Rule):
    """MoD's decoding rule: p >= threshold on the predictor's probability, not the router's."""

    @property
    def per_token(self):
        return False


@dataclass
class PredictorTrace(Trace):
    pred_logit: Optional[torch.Tensor] = None   # the predictor's logit (B, T)


def make_labels(traces, mode, capacity, ties="skip", groups=None):
    """Labels for the router loss, and the per-part label fractions (None for `self`)."""
    if mode == "self":   # MoD's auxiliary loss: the router's own top-k decision
        return [t.sel & t.routable for t in traces], None
    return similarity_labels(traces, mode, capacity, ties, groups)


def router_loss(traces, labels, n_route, lam=1.0, predictor=False):
    """router.router_loss (no labels: none), plus, with MoD's predictor, its BCE against the
    (non-causal) top-k decision, normalised the same way."""
    loss = dlo_router_loss(traces, labels, n_route, lam) if labels is not None else 0.0
    if predictor:
        with torch.autocast(traces[0].logit.device.type, enabled=False):
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
