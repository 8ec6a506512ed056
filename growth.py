"""
The other ways to grow or shrink a model in depth, on dlo.rebuild: where new layers go,
what they hold, which layers train, and which layers to drop.

- placements: interleave (DLO, LLaMA Pro), one layer after every K (TLI, arXiv
  2410.11654), stack with seam trim (SOLAR's depth up-scaling, arXiv 2312.15166), and
  explicit index lists
- inits: zeros (DLO's exact identity block), copy, random, merge-linear, merge-slerp
- LLaMA Pro (arXiv 2401.02415): the original layers, embeddings and head frozen
- ShortGPT (arXiv 2403.03853): drop the layers of lowest Block Influence
- which layers get a router: all, the new ones, every other one, or a list
"""
import math

import torch

from dlo import ExpansionError, index_plan, interleave_plan, is_router, layer_weights, rebuild, zeros_init
from model import GPT

PLACEMENTS = ("interleave", "tli", "stack", "index")


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


def random_init(model, i):
    """A freshly initialised layer, as the model's own layers start before loading weights."""
    fresh = model.make_block(model.config, i).to(next(model.parameters()).device)
    fresh.apply(GPT._init_weights)
    src = layer_weights(model, i)
    return {k: v.to(src[k].dtype) for k, v in fresh.state_dict().items() if k in src}


def below(model, i):
    """The layer a merge pairs layer i with: the one below it (layer 1 for the bottom layer)."""
    return model.layers[i - 1 if i > 0 else min(1, model.config.n_layer - 1)].state_dict()


INITS = {
    "zeros": zeros_init,
    "copy": layer_weights,
    "random": random_init,
    "merge-linear": lambda model, i: {k: (v + below(model, i)[k]) / 2 for k, v in layer_weights(model, i).items()},
    "merge-slerp": lambda model, i: {k: slerp(below(model, i)[k], v) for k, v in layer_weights(model, i).items()},
}


def tli_plan(n_layer, every_k, init):
    """TLI: one new layer injected after every K original layers."""
    if not 1 <= every_k <= n_layer:
        raise ExpansionError(f"TLI needs 1 <= K <= {n_layer}, got K={every_k}")
    return index_plan(n_layer, [i for i in range(n_layer) if (i + 1) % every_k == 0], init)


def stack_plan(n_layer, trim):
    """SOLAR: copy A without its last `trim` layers, then copy B without its first `trim`
    layers; 2 (L - trim) layers, copy B counted new."""
    if not 0 <= trim < n_layer:
        raise ExpansionError(f"stack needs 0 <= seam trim < {n_layer}, got {trim}")
    return [(i, None) for i in range(n_layer - trim)] + [(i, layer_weights) for i in range(trim, n_layer)]


def expand(model, placement="interleave", n_new=0, init="zeros", every_k=0, trim=0, after=(),
           freeze_original=False):
    """Return a deeper model. placement: interleave (n_new), tli (every_k), stack (trim) or
    index (after). freeze_original: LLaMA Pro, only the new layers get gradients."""
    if init not in INITS:
        raise ExpansionError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
    L, fn = model.config.n_layer, INITS[init]
    plans = {"interleave": lambda: interleave_plan(L, n_new, fn), "tli": lambda: tli_plan(L, every_k, fn),
             "stack": lambda: stack_plan(L, trim), "index": lambda: index_plan(L, list(after), fn)}
    if placement not in plans:
        raise ExpansionError(f"unknown placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
    new = rebuild(model, plans[placement]())
    if freeze_original:
        new = freeze(new, [j for j in range(new.config.n_layer) if j not in new.config.new_layers])
    return new


def apply_freezing(model):
    """LLaMA Pro: frozen layers, and with them the embeddings, final norm and head, get no
    gradient; only the new blocks (and routers) train."""
    frozen = model.config.frozen_layers
    for name, param in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if frozen and (layer is None or layer in frozen):
            param.requires_grad_(layer is not None and is_router(name.split(".", 2)[2]))


def freeze(model, layers):
    """Freeze `layers` (and the embeddings, final norm and head) in place; returns the model."""
    model.config.frozen_layers = tuple(sorted(layers))
    model.config.__post_init__()
    apply_freezing(model)
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


def drop_layers(model, layers):
    """ShortGPT-style static pruning: the model without `layers`."""
    L = model.config.n_layer
    bad = [i for i in layers if not 0 <= i < L]
    if bad or len(set(layers)) >= L:
        raise ExpansionError(f"cannot drop layers {list(layers)} from a {L}-layer model")
    return rebuild(model, [(i, None) for i in range(L) if i not in set(layers)])


@torch.no_grad()
def block_influence(model, batches):
    """ShortGPT (eq. 1): BI_l = 1 - mean over real tokens of cos(layer input, layer
    output), over calibration batches of (x, valid)."""
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
