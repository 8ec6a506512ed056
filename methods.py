"""
Every method, chosen by name: the full model config, and the builder that makes the
model a config names. DLO itself is dlo.py; each other method extends it from its own
file, and this file only maps names to them:

- route "mlp" (DLO), "attn", "attn+mlp", "block" and the K/V policies: skipping.py
- route "kv" (K/V retention) and the compact cache: retention.py, cache.py
- route_gate "mod", route_predictor (MoD, MoDification): mod.py
- arch "gpt2": gpt2.py; frozen_layers (LLaMA Pro) and the other expansions: growth.py
- the random, static and oracle controls: controls.py; LESA: lesa.py

Checkpoints store this config, so every checkpoint rebuilds its model with build().
"""
from dataclasses import dataclass

import skipping
from dlo import DLO, DLOConfig, RoutedBlock, rebuild
from gpt2 import GPT2
from growth import ExpansionError, apply_freezing
from model import Block
from mod import PredictorRule
from retention import RetentionBlock


@dataclass
class Config(DLOConfig):
    arch: str = "llama"               # "llama" or "gpt2"
    attn_routed_layers: tuple = ()    # other layers whose attention alone is routed
    route_gate: str = "dlo"           # "dlo": g(p) = 1 + gap (p - 0.5); "mod": the block output times p
    route_predictor: bool = False     # MoD's auxiliary causal predictor decides at inference
    kv_policy: str = "compute"        # a skipped attention still writes K/V; "drop": none; "window": seen kv_window on
    kv_window: int = 64               # "window": positions after a token that still see its K/V if it is not kept
    frozen_layers: tuple = ()         # LLaMA Pro: originals get no gradient

    routes = ("none",) + tuple(skipping.PARTS)
    moved_fields = ("attn_routed_layers", "frozen_layers")

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: use {', '.join(allowed)}")
        both = set(self.routed_ids()) & set(self.attn_routed_layers)
        if both:
            raise ValueError(f"layers {sorted(both)} are both in routed_layers and attn_routed_layers")
        if self.route == "kv" and (self.kv_policy != "window" or self.attn_routed_layers):
            raise ValueError('routing K/V retention (route "kv") needs kv_policy "window" and no other routed parts')

    def layer_route(self, i):
        """What layer i's routers skip: route, "attn", or "" (a dense layer)."""
        return self.route if i in self.routed_ids() else "attn" if i in self.attn_routed_layers else ""

    def parts(self, i):
        return skipping.PARTS.get(self.layer_route(i), ())


# the config's choices; train.py's flags take theirs from here
CHOICES = {"arch": ("llama", "gpt2"), "route": Config.routes, "kv_policy": skipping.POLICIES,
           "route_gate": ("dlo", "mod")}


class Model(DLO):
    """A Llama whose layers are the blocks their config names (BLOCKS)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        apply_freezing(self)

    def make_block(self, cfg, i):
        kind = cfg.layer_route(i)
        if not kind:
            return Block(cfg)
        if kind == "mlp" and cfg.route_gate == "dlo" and not cfg.route_predictor:
            return RoutedBlock(cfg, i)   # DLO itself
        return BLOCKS[kind](cfg, i)

    def default_rule(self):
        rule = super().default_rule()
        return PredictorRule(rule.kind, rule.threshold) if self.config.route_predictor else rule

    def new_cache(self, batch_size, max_seq):
        routed_attention = any(isinstance(layer, skipping.SkipBlock) for layer in self.layers)
        return skipping.new_cache(self, batch_size, max_seq) if routed_attention else \
            super().new_cache(batch_size, max_seq)

    def flops_per_token(self, attn=None, mlp=None, context=1024):
        """A skipped attention still projects K/V under "compute" and "window"."""
        skipped = 0 if self.config.kv_policy == "drop" else self.layer_flops(context)[2]
        return super().flops_per_token(attn, mlp, context, skipped_attn=skipped)


BLOCKS = {"mlp": skipping.SkipBlock, "attn": skipping.SkipBlock, "attn+mlp": skipping.SkipBlock,
          "block": skipping.SkipBlock, "kv": RetentionBlock}
ARCHS = {"llama": Model, "gpt2": GPT2}


def build(cfg):
    """The model a Config (or its dict, as checkpoints store it) describes, freshly initialised."""
    cfg = Config(**cfg) if isinstance(cfg, dict) else cfg
    return ARCHS[cfg.arch](cfg)


def activate(model, route="mlp", layers=(), sink_tokens=0, attn_layers=(), **route_options):
    """dlo.activate for every method: routers on `layers` (() = every layer) skipping
    `route` ("mlp", "attn", "attn+mlp", "block" or "kv"), and attention routers on
    `attn_layers`: e.g. activate(m, "block", layers=new, attn_layers=originals) routes the
    inserted blocks whole and the original layers' attention. Routers start at zero."""
    if sink_tokens < 0:
        raise ExpansionError(f"sink_tokens must be >= 0, got {sink_tokens}")
    if not isinstance(model.config, Config):
        raise ExpansionError("activate needs a model built by methods.build")
    return rebuild(model, [(i, None) for i in range(model.config.n_layer)], route=route, routed_layers=tuple(layers),
                   attn_routed_layers=tuple(attn_layers), route_sink_tokens=sink_tokens, **route_options)
