"""
Layer operations: expand a model in depth, activate routing, skip (drop) layers.
Each is a plain function that takes a model and returns a new one.

Notable features
- placements: interleave (DLO / LLaMA Pro), stack with seam trim (SOLAR DUS),
  one layer after every K (TLI), and explicit index lists
- inits: zeros (an exact identity block), copy, random, merge-linear, merge-slerp
- the new model's config records which layers are new, routed and frozen,
  so a checkpoint rebuilds it from the config alone
"""
import copy
import math

import torch

from model import GPT, Block

INITS = ("zeros", "copy", "random", "merge-linear", "merge-slerp")
PLACEMENTS = ("interleave", "tli", "stack", "index")


class ExpansionError(ValueError):
    pass


# ---- placements: where the new layers go -------------------------------------------
# A plan lists the layers of the new model as (source layer, init); init None means the
# original layer itself, moved to its new index.

def interleave_plan(n_layer, n_new, init="zeros"):
    """DLO/LLaMA Pro: split = L // n_new; a new layer after every split-th original layer,
    counting from 1, so with L divisible by n_new the last one lands at the very end."""
    if not 0 < n_new <= n_layer:
        raise ExpansionError(f"interleave needs 1 <= new layers <= {n_layer} (the original depth), got {n_new}")
    split = n_layer // n_new
    after = [i for i in range(n_layer) if (i + 1) % split == 0][:n_new]
    return index_plan(n_layer, after, init)


def tli_plan(n_layer, every_k, init="zeros"):
    """TLI (arXiv 2410.11654): one new layer injected after every K original layers."""
    if not 1 <= every_k <= n_layer:
        raise ExpansionError(f"TLI needs 1 <= K <= {n_layer}, got K={every_k}")
    return index_plan(n_layer, [i for i in range(n_layer) if (i + 1) % every_k == 0], init)


def index_plan(n_layer, after, init="zeros"):
    """A new layer after each listed original layer (-1 = before the first one), built from
    that layer (or from layer 0 when inserted at the bottom)."""
    bad = [i for i in after if not -1 <= i < n_layer]
    if bad:
        raise ExpansionError(f"insert positions {bad} out of range: use -1 .. {n_layer - 1}")
    if init not in INITS:
        raise ExpansionError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
    plan = [(0, init)] * after.count(-1)
    for i in range(n_layer):
        plan.append((i, None))
        plan += [(i, init)] * after.count(i)
    return plan


def stack_plan(n_layer, trim):
    """SOLAR depth up-scaling (arXiv 2312.15166): copy A without its last `trim` layers,
    then copy B without its first `trim` layers; 2 (L - trim) layers, copy B counted new."""
    if not 0 <= trim < n_layer:
        raise ExpansionError(f"stack needs 0 <= seam trim < {n_layer}, got {trim}")
    return [(i, None) for i in range(n_layer - trim)] + [(i, "copy") for i in range(trim, n_layer)]


# ---- inits: what a new layer holds -------------------------------------------------

def slerp(a, b, t=0.5, dot_threshold=0.9995):
    """Spherical interpolation of two tensors seen as flat vectors; lerp when nearly parallel."""
    af, bf = a.flatten().double(), b.flatten().double()
    denom = af.norm() * bf.norm()
    cos = float(af @ bf / denom) if denom > 0 else 1.0
    if abs(cos) > dot_threshold:
        return torch.lerp(a, b, t)
    omega = math.acos(cos)
    wa, wb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return (wa * af + wb * bf).view_as(a).to(a.dtype)


def new_layer_state(model, i, init):
    """State dict for a layer built from original layer i. Routers are left out, so a new
    layer always starts with a fresh, zero-initialised router."""
    src = {k: v.clone() for k, v in model.layers[i].state_dict().items() if not is_router(k)}
    if init == "copy":
        return src
    if init == "zeros":
        # output projections of both residual branches at 0: the pre-norm block is the identity
        for k in src:
            if k.startswith(("self_attn.o_proj.", "mlp.down_proj.")):
                src[k].zero_()
        return src
    if init == "random":
        fresh = Block(model.config).to(next(model.parameters()).device)
        fresh.apply(GPT._init_weights)
        return {k: v.to(src[k].dtype) for k, v in fresh.state_dict().items() if k in src}
    # merges pair layer i with the one below it (layer 1 for the bottom layer)
    j = i - 1 if i > 0 else min(1, model.config.n_layer - 1)
    other = model.layers[j].state_dict()
    if init == "merge-linear":
        return {k: (v + other[k]) / 2 for k, v in src.items()}
    if init == "merge-slerp":
        return {k: slerp(other[k], v) for k, v in src.items()}
    raise ExpansionError(f"unknown init {init!r}: use one of {', '.join(INITS)}")


def is_router(key):
    return key.startswith(("router.", "attn_router."))


def rebuild(model, plan, **config_changes):
    """A new model whose layer j comes from plan[j]; embeddings, final norm and head are
    copied. Routed and frozen layer lists, and calibrated thresholds, follow their layers
    to the new indices."""
    cfg = model.config
    moved = {src: j for j, (src, init) in enumerate(plan) if init is None}
    remap = lambda ids: tuple(moved[i] for i in ids if i in moved)
    changes = dict(n_layer=len(plan), new_layers=tuple(j for j, (src, init) in enumerate(plan)
                                                       if init is not None or src in cfg.new_layers))
    if cfg.routed_layers:  # new layers are routed too when the model routes its layers
        changes["routed_layers"] = tuple(sorted(set(remap(cfg.routed_layers)) | {
            j for j, (_, init) in enumerate(plan) if init is not None}))
        if not changes["routed_layers"]:   # () would mean "every layer"
            changes["route"] = "none"
    changes["attn_routed_layers"] = remap(cfg.attn_routed_layers)
    changes["frozen_layers"] = remap(cfg.frozen_layers)
    changes.update(config_changes)
    new_cfg = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(new_cfg, k, v)
    if isinstance(cfg.route_threshold, tuple) and "route_threshold" not in config_changes:
        # a part keeps its calibrated threshold; a new router (p = 0.5) starts at 0.5
        old = dict(zip(cfg.route_slots(), cfg.route_threshold))
        new_cfg.route_threshold = tuple(old.get((plan[j][0], part), 0.5) if plan[j][1] is None else 0.5
                                        for j, part in new_cfg.route_slots())
    new_cfg.__post_init__()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    new = GPT(new_cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name in ("embed_tokens", "norm", "lm_head", "pos_embed"):
            if hasattr(model, name):
                getattr(new, name).load_state_dict(getattr(model, name).state_dict())
        for j, (src, init) in enumerate(plan):
            state = model.layers[src].state_dict() if init is None else new_layer_state(model, src, init)
            want = new.layers[j].state_dict()
            state = {k: v for k, v in state.items() if k in want}   # routers only where the new layer has them
            new.layers[j].load_state_dict(state, strict=False)
            missing = set(want) - set(state)
            if any(not is_router(k) for k in missing):
                raise ExpansionError(f"layer {j}: no weights for {sorted(missing)}")
    return new


# ---- the operations ----------------------------------------------------------------

def expand(model, placement="interleave", n_new=0, init="zeros", every_k=0, trim=0, after=(),
           freeze_original=False):
    """Return a deeper model. placement: interleave (n_new), tli (every_k), stack (trim) or
    index (after). freeze_original: LLaMA Pro, only the new layers get gradients."""
    L = model.config.n_layer
    if placement == "interleave":
        plan = interleave_plan(L, n_new, init)
    elif placement == "tli":
        plan = tli_plan(L, every_k, init)
    elif placement == "stack":
        plan = stack_plan(L, trim)
    elif placement == "index":
        plan = index_plan(L, list(after), init)
    else:
        raise ExpansionError(f"unknown placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
    new = rebuild(model, plan)
    if freeze_original:
        new = freeze(new, [j for j in range(new.config.n_layer) if j not in new.config.new_layers])
    return new


def freeze(model, layers):
    """Freeze `layers` (and the embeddings, final norm and head) in place; returns the model."""
    model.config.frozen_layers = tuple(sorted(layers))
    model.config.__post_init__()
    model.apply_freezing()
    return model


ROUTED = ("all", "new", "every-other")


def routed_layers(config, which="all", dense_first=0, dense_last=0):
    """Indices of the layers that get a router. which: "all"; "new", only the layers the
    expansion inserted (DLO's official code with original_dlo_frequency=0); "every-other"
    (Mixture-of-Depths); or a list of indices. dense_first / dense_last keep that many
    layers at each end dense, as DLO's official `original_dlo_shrink_num` and D-LLM's
    `dynamic_start_layer` do: the early layers write the attention sink (arXiv 2402.17762)."""
    L = config.n_layer
    if isinstance(which, str):
        if which not in ROUTED:
            raise ExpansionError(f"unknown routed set {which!r}: use {', '.join(ROUTED)} or a list of layers")
        which = {"all": range(L), "new": config.new_layers, "every-other": range(1, L, 2)}[which]
    bad = [i for i in which if not 0 <= i < L]
    if bad:
        raise ExpansionError(f"routed layers {bad} out of range for {L} layers")
    layers = tuple(i for i in sorted(set(which)) if dense_first <= i < L - dense_last)
    if not layers:
        raise ExpansionError(f"no layer left to route ({L} layers, first {dense_first} and last {dense_last} dense)")
    return layers


def activate(model, route="mlp", layers=(), sink_tokens=0, attn_layers=(), **route_options):
    """Return a copy of the model with routers on `layers` (() = every layer) skipping
    `route` ("mlp", "attn", "attn+mlp" or "block"), and attention routers on `attn_layers`:
    activate(m, "mlp") for DLO, activate(m, "block", layers=new, attn_layers=originals)
    to route inserted blocks whole and the original layers' attention. Existing weights
    are kept; routers start at zero (p = 0.5). sink_tokens: the first positions of every
    row always run (router.routable_tokens)."""
    if sink_tokens < 0:
        raise ExpansionError(f"sink_tokens must be >= 0, got {sink_tokens}")
    plan = [(i, None) for i in range(model.config.n_layer)]
    return rebuild(model, plan, route=route, routed_layers=tuple(layers), attn_routed_layers=tuple(attn_layers),
                   route_sink_tokens=sink_tokens, **route_options)


def drop_layers(model, layers):
    """ShortGPT-style static pruning: the model without `layers`."""
    L = model.config.n_layer
    bad = [i for i in layers if not 0 <= i < L]
    if bad or len(set(layers)) >= L:
        raise ExpansionError(f"cannot drop layers {list(layers)} from a {L}-layer model")
    plan = [(i, None) for i in range(L) if i not in set(layers)]
    return rebuild(model, plan)


@torch.no_grad()
def block_influence(model, batches):
    """ShortGPT (arXiv 2403.03853, eq. 1): BI_l = 1 - mean over real tokens of
    cos(layer input, layer output), over calibration batches of (x, valid)."""
    sums = torch.zeros(model.config.n_layer, dtype=torch.float64)
    count = 0
    current = {}

    def hook(layer, args, output, i):
        x, valid = args[0], current["valid"]
        cos = torch.nn.functional.cosine_similarity(x.float(), output[0].float(), dim=-1)
        sums[i] += float(cos[valid].sum())

    handles = [layer.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
               for i, layer in enumerate(model.layers)]
    try:
        for x, valid in batches:
            current["valid"] = valid
            model(x, valid=valid)
            count += int(valid.sum())
    finally:
        for h in handles:
            h.remove()
    return (1 - sums / count).tolist()


def shortgpt(model, batches, n_drop):
    """Drop the n_drop layers with the lowest Block Influence. Returns (model, BI list)."""
    bi = block_influence(model, batches)
    lowest = sorted(range(len(bi)), key=lambda i: bi[i])[:n_drop]
    return drop_layers(model, lowest), bi
