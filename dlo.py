"""
DLO, Dynamic Layer Operation (arXiv 2407.11030): grow a model in depth, then let each
token skip the MLPs of the layers it does not need.

- expansion (section 3.1): a new layer after every L / n_new original layers, built from
  the layer below it with both residual branches' output projections at zero, so the
  expanded model computes exactly what the original did
- the routed block (section 3.2): attention runs for every token; a router reading the
  block input decides per token whether the MLP runs. The selected tokens are gathered,
  run and scattered back scaled by the gate g(p); the others cost nothing. Batch-1 decode
  decides on the host; on CUDA, kernels.py fuses router, gather and scatter
- calibration: the thresholds that make inference (p >= t) run what training's top-k ran
- the config records which layers are new and routed, so a checkpoint rebuilds the model
  from its config alone

Every other method extends these classes or rebuilds a model with `rebuild`.
"""
import copy
import math
from dataclasses import asdict, dataclass

import torch

import kernels
from model import GPT, Block, Context, GPTConfig
from router import Router, Rule, Trace, dlo_gate, layer_threshold, routable_tokens, select, token_similarity


@dataclass
class DLOConfig(GPTConfig):
    new_layers: tuple = ()            # indices of the layers expansion inserted
    route: str = "none"               # "mlp": the routed layers' MLPs run only for the tokens their router selects
    routed_layers: tuple = ()         # which layers carry a router; () = all of them
    route_gap: float = 0.05           # the gate's slope: g(p) = 1 + gap (p - 0.5) (eq. 3)
    route_threshold: object = 0.5     # inference: run iff p >= this; or one (calibrated) per routed part
    route_sink_tokens: int = 0        # the first r positions of every row run every routed part

    routes = ("none", "mlp")          # what a routed layer's router may decide
    moved_fields = ()                 # more layer lists that follow their layers through `rebuild`

    def __post_init__(self):
        super().__post_init__()
        for name in ("new_layers", "routed_layers") + self.moved_fields:
            setattr(self, name, tuple(getattr(self, name)))
        if self.route not in self.routes:
            raise ValueError(f"unknown route {self.route!r}: use {', '.join(self.routes)}")
        bad = [i for name in ("new_layers", "routed_layers") + self.moved_fields for i in getattr(self, name)
               if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"layer indices {bad} out of range for {self.n_layer} layers")
        if isinstance(self.route_threshold, (list, tuple)):
            self.route_threshold = tuple(float(t) for t in self.route_threshold)
            if len(self.route_threshold) != len(self.route_slots()):
                raise ValueError(f"{len(self.route_threshold)} thresholds for {len(self.route_slots())} routed parts")

    def routed_ids(self):
        """The layers that carry `route`'s routers."""
        return () if self.route == "none" else self.routed_layers or tuple(range(self.n_layer))

    def layer_route(self, i):
        """What layer i's router skips: `route`, or "" (a dense layer)."""
        return self.route if i in self.routed_ids() else ""

    def parts(self, i):
        return ("mlp",) if self.layer_route(i) else ()

    def route_slots(self):
        """Every routed part as (layer, part), in the order a forward pass meets them. One
        threshold, capacity and router.Trace per slot."""
        return tuple((i, part) for i in range(self.n_layer) for part in self.parts(i))


# ---- expansion (section 3.1) ----------------------------------------------------------
# A plan lists the layers of the new model as (source layer, init): init None means the
# original layer itself, moved to its new index; otherwise init(model, source) gives the
# new layer's weights.

class ExpansionError(ValueError):
    pass


def is_router(key):
    return key.startswith(("router.", "attn_router."))


def layer_weights(model, i):
    """A copy of layer i's weights, routers left out: a new layer starts with a fresh router."""
    return {k: v.clone() for k, v in model.layers[i].state_dict().items() if not is_router(k)}


def zeros_init(model, i):
    """Layer i with the output projections of both residual branches at 0: the pre-norm
    block returns its input, so the expanded model computes what the original did."""
    state = layer_weights(model, i)
    for k in state:
        if k.startswith(("self_attn.o_proj.", "mlp.down_proj.")):
            state[k].zero_()
    return state


def index_plan(n_layer, after, init=zeros_init):
    """A new layer after each listed original layer (-1 = before the first one), built from
    that layer (or from layer 0 when inserted at the bottom)."""
    bad = [i for i in after if not -1 <= i < n_layer]
    if bad:
        raise ExpansionError(f"insert positions {bad} out of range: use -1 .. {n_layer - 1}")
    plan = [(0, init)] * after.count(-1)
    for i in range(n_layer):
        plan.append((i, None))
        plan += [(i, init)] * after.count(i)
    return plan


def interleave_plan(n_layer, n_new, init=zeros_init):
    """split = L // n_new; a new layer after every split-th original layer, counting from 1,
    so with L divisible by n_new the last one lands at the very end."""
    if not 0 < n_new <= n_layer:
        raise ExpansionError(f"interleave needs 1 <= new layers <= {n_layer} (the original depth), got {n_new}")
    split = n_layer // n_new
    return index_plan(n_layer, [i for i in range(n_layer) if (i + 1) % split == 0][:n_new], init)


def new_config(cfg, plan, config_changes):
    """The config of rebuild's model: the layer lists (and calibrated thresholds) follow
    their layers; new layers are routed too when the model routes a subset of its layers."""
    moved = {src: j for j, (src, init) in enumerate(plan) if init is None}
    remap = lambda ids: tuple(moved[i] for i in ids if i in moved)
    changes = dict(n_layer=len(plan), new_layers=tuple(j for j, (src, init) in enumerate(plan)
                                                       if init is not None or src in cfg.new_layers))
    if cfg.routed_layers:
        changes["routed_layers"] = tuple(sorted(set(remap(cfg.routed_layers)) | {
            j for j, (_, init) in enumerate(plan) if init is not None}))
        if not changes["routed_layers"]:   # () would mean "every layer"
            changes["route"] = "none"
    changes.update({name: remap(getattr(cfg, name)) for name in cfg.moved_fields}, **config_changes)
    new = copy.deepcopy(cfg)
    for k, v in changes.items():
        if not hasattr(new, k):
            raise ExpansionError(f"unknown model option {k!r}")
        setattr(new, k, v)
    if isinstance(cfg.route_threshold, tuple) and "route_threshold" not in config_changes:
        # a part keeps its calibrated threshold; a new router (p = 0.5) starts at 0.5
        old = dict(zip(cfg.route_slots(), cfg.route_threshold))
        new.route_threshold = tuple(old.get((plan[j][0], part), 0.5) if plan[j][1] is None else 0.5
                                    for j, part in new.route_slots())
    new.__post_init__()
    return new


def rebuild(model, plan, **config_changes):
    """A new model whose layer j comes from plan[j], of the same class as `model` (DLO for
    a dense GPT); everything outside the layers is copied."""
    cfg = model.config if isinstance(model.config, DLOConfig) else DLOConfig(**asdict(model.config))
    param = next(model.parameters())
    new = (type(model) if isinstance(model, DLO) else DLO)(new_config(cfg, plan, config_changes))
    new = new.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        outside = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
        missing = [k for k in new.load_state_dict(outside, strict=False).missing_keys if not k.startswith("layers.")]
        if missing:
            raise ExpansionError(f"no weights for {missing}")
        for j, (src, init) in enumerate(plan):
            state = model.layers[src].state_dict() if init is None else init(model, src)
            want = new.layers[j].state_dict()
            state = {k: v for k, v in state.items() if k in want}   # routers only where the new layer has them
            new.layers[j].load_state_dict(state, strict=False)
            missing = set(want) - set(state)
            if any(not is_router(k) for k in missing):
                raise ExpansionError(f"layer {j}: no weights for {sorted(missing)}")
    return new


def expand(model, n_new, init=zeros_init):
    """DLO's expansion: n_new layers interleaved, each zero-initialised from the layer below."""
    return rebuild(model, interleave_plan(model.config.n_layer, n_new, init))


def activate(model, layers=(), sink_tokens=0, **route_options):
    """A copy of the model with routers on `layers` (() = every layer; DLO's own choice is
    the new ones) skipping the MLP per token. Routers start at zero (p = 0.5, every token
    runs). sink_tokens: the first positions of every row always run."""
    if sink_tokens < 0:
        raise ExpansionError(f"sink_tokens must be >= 0, got {sink_tokens}")
    route_options.setdefault("route", "mlp")
    return rebuild(model, [(i, None) for i in range(model.config.n_layer)], routed_layers=tuple(layers),
                   route_sink_tokens=sink_tokens, **route_options)


# ---- the routed block (section 3.2) ----------------------------------------------------

def add_selected(base, sel, gate, rows_fn, similarity):
    """base + gate * branch on the selected tokens, where rows_fn(idx) runs the routed
    branch on rows idx of the (B * T, C) tokens. Returns (out, cos per token or None).
    Skipped tokens cost nothing: gather, run, scatter (kernels.scale_scatter); positions
    never move, so the residual is added once. The labels need cos(base, base + branch)
    for every token, so with `similarity` every token runs the branch, once, instead of
    the official code's second no-grad pass (section 3.3)."""
    if similarity:
        y = rows_fn(slice(None)).view_as(base)
        return base + (sel * gate).unsqueeze(-1).to(y.dtype) * y, token_similarity(base, base + y)
    n = int(sel.sum())   # the one host sync here
    if n == 0:   # nothing to run at all
        return base, None
    if n == sel.numel():   # every token runs: no gather, no scatter
        y = rows_fn(torch.arange(n, device=sel.device)).view_as(base)
        return base + gate.unsqueeze(-1).to(y.dtype) * y, None
    idx = sel.flatten().nonzero().squeeze(1)   # ascending token order
    out = kernels.scale_scatter(base.reshape(-1, base.size(-1)), idx, rows_fn(idx), gate.flatten())
    return out.view_as(base), None


@dataclass
class RoutedContext(Context):
    routable: torch.Tensor = None   # (B, T) real tokens the routers decide for (not sinks)
    rule: Rule = None
    single: bool = False            # one token in all (batch-1 decode): decide on the host


class RoutedBlock(Block):
    """DLO's routed layer ("ExAttn"): the attention runs for every token, and a token whose
    router selects it adds g(p) * MLP(norm(h)); the others skip the MLP."""

    def __init__(self, cfg, index):
        super().__init__(cfg)
        self.index, self.gap = index, cfg.route_gap
        self.router = Router(cfg.n_embd)

    def routers(self):
        return [self.router]

    def gate(self, p):
        """What scales a selected token's MLP output: the one place the gate is computed, for
        training, batch-1 decode and the kernels alike. p a tensor or a float."""
        return dlo_gate(p, self.gap)

    def forward(self, x, ctx):
        h = x + self.attention(x, ctx)
        if self.fusable(x, ctx.rule):
            return self.forward_fused(x, h, ctx)
        if ctx.single and ctx.rule.per_token and not ctx.rule.similarity:
            return self.forward_one(x, h, ctx)
        logit = self.router(x)   # the router reads the block input, not h (section 3.2)
        sel = select(logit, ctx.routable, ctx.valid, ctx.rule, len(ctx.traces))
        flat = h.reshape(-1, h.size(-1))
        mlp_rows = lambda idx: self.mlp(self.post_attention_layernorm(flat[idx]))
        out, sim = add_selected(h, sel, self.gate(torch.sigmoid(logit)), mlp_rows, ctx.rule.similarity)
        return out, [Trace(self.index, logit, sel, ctx.valid, ctx.routable, sim)]

    def decide_one(self, router, reads, ctx, slot):
        """Batch-1 decode's decision, made on the host: (does the token run, the router's logit
        or None). A rule that decides without the router runs it only for a token that runs."""
        rule, sink = ctx.rule, not bool(ctx.routable)
        logit = router(reads) if rule.kind == "threshold" and not sink else None
        if logit is not None:
            return float(torch.sigmoid(logit)) >= layer_threshold(rule, slot), logit
        return sink or bool(select(reads.new_zeros(1, 1), ctx.routable, ctx.valid, rule, slot)), None

    def forward_one(self, x, h, ctx):
        """forward for a single token, as in batch-1 decode: one host sync decides, then the
        MLP runs densely or not at all, with no gather, scatter or mask, and the gate is a
        Python number."""
        run, logit = self.decide_one(self.router, x, ctx, len(ctx.traces))
        if not run:
            logit = x.new_zeros(1, 1, dtype=torch.float32) if logit is None else logit
            return h, [Trace(self.index, logit, ~ctx.valid, ctx.valid, ctx.routable)]
        logit = self.router(x) if logit is None else logit
        out = h + self.gate(float(torch.sigmoid(logit))) * self.mlp(self.post_attention_layernorm(h))
        return out, [Trace(self.index, logit, ctx.valid, ctx.valid, ctx.routable)]

    def fusable(self, x, rule):
        """The Triton path (kernels.py): threshold routing at inference, no autograd, CUDA."""
        return (rule.kind == "threshold" and not rule.similarity
                and kernels.use_triton(x, self.router.weight, self.mlp.gate_up_proj.weight, self.mlp.down_proj.weight))

    def forward_fused(self, x, h, ctx):
        """forward through kernels.routed_mlp: gather-and-scatter at prefill, a decision read
        on the device at decode, so no routed layer waits on the host there."""
        B, T, C = h.shape
        out, p, sel = kernels.routed_mlp(x.reshape(-1, C), h.reshape(-1, C), self.router.weight,
                                         self.post_attention_layernorm, self.mlp,
                                         layer_threshold(ctx.rule, len(ctx.traces)), ctx.routable.flatten(),
                                         (ctx.valid & ~ctx.routable).flatten(), self.gate, decode=T == 1)
        return out.view_as(h), [Trace(self.index, torch.logit(p).view(B, T), sel.view(B, T), ctx.valid, ctx.routable)]


class DLO(GPT):
    """The GPT whose routed layers (config.routed_ids()) are RoutedBlocks. forward takes
    `rule` (router.Rule, default: the config's thresholds) and fills route_trace."""

    def make_block(self, cfg, i):
        return RoutedBlock(cfg, i) if cfg.layer_route(i) else Block(cfg)

    @staticmethod
    def _init_weights(module):
        GPT._init_weights(module)
        if isinstance(module, Router):   # apply() reaches a router after any Linear inside it
            module.reset_parameters()

    def default_rule(self):
        """The inference rule: p >= route_threshold (per routed part once calibrated)."""
        return Rule("threshold", self.config.route_threshold)

    def context(self, rope, valid, positions, input_pos, rule=None):
        routable = routable_tokens(valid, positions, self.config.route_sink_tokens)
        return RoutedContext(rope, valid, input_pos, input_pos is None, routable=routable,
                             rule=rule or self.default_rule(), single=valid.numel() == 1)


# ---- calibration -------------------------------------------------------------------------

def thresholds_from_topk(traces):
    """Per routed part, the smallest p that top-k selected among routable tokens: the
    threshold rule `p >= t` then reproduces the top-k decisions exactly on these rows.
    A part that selected nothing gets +inf (never runs)."""
    out = []
    for t in traces:
        chosen = t.p.masked_fill(~(t.sel & t.routable), math.inf)
        out.append(float(chosen.min()) if bool((t.sel & t.routable).any()) else math.inf)
    return tuple(out)


@torch.no_grad()
def calibrate(model, x, targets, valid, capacities):
    """One threshold per routed part such that, on these rows, `p >= t` runs exactly the
    top-k fraction that training ran: one top-k pass at the training capacities, each
    layer seeing the layers below it already routed. A part trained at capacity 1 gets 0:
    it runs every token, also the ones whose p falls below anything seen here."""
    model(x, targets, valid=valid, rule=Rule("topk", capacity=capacities))
    found = thresholds_from_topk(model.route_trace)
    return tuple(0.0 if c >= 1.0 else t for c, t in zip(capacities.tolist(), found))
