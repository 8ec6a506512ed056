"""
SFT with per-token layer routing: DLO and its relatives, on one CPU, one GPU, or
many with torchrun.

    python train.py                                  # DLO as the paper defines it, on SmolLM2 (config/dlo.json)
    python train.py --config config/dlo_fast.json    # any other method: one preset file under config/
    python train.py --config config/dlo_paper.json   # the paper's recipe shape (GPU)
    torchrun --nproc_per_node=8 train.py --config config/dlo_paper.json --dist ddp

Notable features
- expand (dlo.py), route (router.py), then SFT with loss on assistant tokens only
- LM loss + lambda * BCE router loss, both normalised over the *global* batch, so k
  micro-batches accumulate to exactly one batch k times as large
- routing that leaves a pretrained model intact: sink tokens always run, dense edge
  layers, a router warm-up at capacity 1.0, then annealing, and at the end one
  threshold per routed layer calibrated on held-out rows, so inference executes
  what training did
- bf16 autocast on GPUs and on CPUs with native bf16; routers and their loss in fp32
- atomic checkpoints holding model, optimizer, schedule, data position, RNG and
  routing state: resuming continues the very same run
- DDP or FSDP (fully_shard, one unit per block) under torchrun
"""
import argparse
import dataclasses
import difflib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import dlo
import evaluate
import growth
import lesa
import methods
import weights
from data import DATASETS
from methods import CHOICES as MODEL_CHOICES
from mod import LABELS, load_loss, make_labels, router_loss
from router import Rule, routable_tokens
from schedule import SPLITS, dynamic_lr_scales, part_schedule
from weights import autocast, pick_device, pick_dtype


@dataclass
class TrainConfig:
    # model
    init_from: str = "smollm2"      # "smollm2", a .gguf file, a HF folder, or a .pt checkpoint
    # expansion (dlo.py, and growth.py for the other methods); placement "none" keeps the depth
    placement: str = "interleave"   # none, interleave, tli, stack, index, lesa
    n_new: int = 10                 # interleave: new layers (SmolLM2 30 -> 40)
    every_k: int = 0                # tli: one new layer after every K
    trim: int = 0                   # stack: SOLAR seam trim m
    after: str = ""                 # index: comma-separated original layers to insert after
    init: str = "zeros"             # zeros, copy, random, merge-linear, merge-slerp
    freeze_original: bool = False   # LLaMA Pro: only new layers train
    drop: str = ""                  # comma-separated layers to remove
    shortgpt_drop: int = 0          # ShortGPT: remove this many lowest-Block-Influence layers
    # routing (router.py)
    route: str = "mlp"              # what --routed layers skip: none, mlp (DLO's), attn, attn+mlp, block; kv: K/V kept
    routed: str = "new"             # new (inserted layers only), all, every-other, or "i,j,..."
    attn_routed: str = ""           # other layers whose attention alone is routed: "rest" (all others) or "i,j,..."
    dense_first: int = 0            # keep this many first layers dense (never routed)
    dense_last: int = 0             # keep this many last layers dense
    sink_tokens: int = 1            # the first r positions of every row always run
    kv_policy: str = "compute"      # a skipped attention writes its K/V (compute), none (drop) or for a window
    kv_window: int = 64             # window: the next positions still see a skipped (or not kept) token's K/V
    gate: str = "dlo"               # dlo: g(p) = 1 + gap (p - 0.5); mod: output times p
    train_rule: str = "topk"        # topk (DLO) or threshold (MoDification)
    threshold: float = 0.5          # threshold rule in training; inference before calibration
    labels: str = "cos-global"      # cos, cos-global, self, none
    capacity_split: str = "labels"  # labels: ties skip, capacity taken where labels put it; rescale: DLO's code
    router_lambda: float = 1.0
    load_alpha: float = 0.0         # MoDification's load-reducing objective, alpha sum_j F_j G_j (its reading: 0.01)
    router_lr_scale: float = 50.0   # routers' LR = lr * this
    capacity_start: float = 1.0
    capacity_end: float = 0.59      # the inserted layers' MLPs run 0.59 of the tokens: 0.90 of all 40 MLPs
    attn_capacity_end: float = 0.0  # > 0: routed attention parts anneal to this, labelled apart from the rest
    route_warmup: float = 0.2       # fraction of steps at capacity_start while the routers learn the labels
    route_anneal: float = 0.5       # fraction of steps over which capacity then anneals to capacity_end
    warmup_freeze: bool = False     # during the router warm-up, train the routers alone
    calib_rows: int = 32            # held-out rows (after the eval rows) that calibrate the thresholds
    dynamic_lr: bool = True
    predictor: bool = False         # MoD auxiliary causal predictor
    # data
    dataset: str = "sharegpt"       # sharegpt or shakespeare
    data_dir: str = "data"
    max_convs: int = 0              # ShareGPT: only the first N conversations (0 = all, ~15 s to prepare)
    seq_len: int = 256
    batch_size: int = 4             # micro-batch, per process
    grad_accum: int = 2
    # optimisation
    max_steps: int = 24
    lr: float = 2e-5                # DLO's SFT learning rate
    new_lr_scale: float = 30.0      # inserted layers' LR = lr * this
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1337
    dtype: str = "auto"             # float32, bfloat16 (autocast), or auto: bf16 where the hardware has it
    # bookkeeping
    out_dir: str = "out/dlo"
    eval_every: int = 12
    eval_rows: int = 16
    ckpt_every: int = 12
    resume: bool = False
    compile: bool = False
    dist: str = "ddp"               # under torchrun: ddp or fsdp
    device: str = "auto"


# each flag's choices, from the module that owns them
CHOICES = {"placement": ("none",) + growth.PLACEMENTS + ("lesa",), "init": tuple(growth.INITS),
           "route": MODEL_CHOICES["route"], "kv_policy": MODEL_CHOICES["kv_policy"], "gate": MODEL_CHOICES["route_gate"],
           "train_rule": ("topk", "threshold"), "labels": LABELS + ("none",), "capacity_split": SPLITS,
           "dataset": DATASETS, "dist": ("ddp", "fsdp"), "dtype": ("auto", "float32", "bfloat16")}


def parse_args(argv=None):
    """Flags from the dataclass; --config loads a JSON preset first, flags override it.
    An unknown flag is one line naming the closest real flag."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--config", help="JSON preset, e.g. config/dlo_paper.json")
    for name, f in fields.items():
        kind = {bool: lambda s: s.lower() in ("1", "true", "yes")}.get(type(f.default), type(f.default))
        p.add_argument(f"--{name}", type=kind, default=None, help=f"default {f.default!r}")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        close = difflib.get_close_matches(flag.lstrip("-"), list(fields) + ["config"], n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        sys.exit(f"error: unknown flag {flag}{hint}")
    values = {}
    if args.config:
        try:
            with open(args.config) as fh:   # keys starting with "_" are comments
                values = {k: v for k, v in json.load(fh).items() if not k.startswith("_")}
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"error: cannot read config {args.config}: {e}")
        wrong = set(values) - set(fields)
        if wrong:
            sys.exit(f"error: {args.config} sets unknown fields {sorted(wrong)}")
    values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    cfg = TrainConfig(**values)
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            sys.exit(f"error: --{name} must be one of {', '.join(allowed)} (got {getattr(cfg, name)!r})")
    if not (0 < cfg.capacity_start <= 1 and 0 < cfg.capacity_end <= 1 and 0 <= cfg.attn_capacity_end <= 1):
        sys.exit(f"error: capacities must be in (0, 1], got {cfg.capacity_start} -> {cfg.capacity_end} "
                 f"(attention: {cfg.attn_capacity_end})")
    if not (0 <= cfg.route_warmup and 0 <= cfg.route_anneal and cfg.route_warmup + cfg.route_anneal <= 1):
        sys.exit(f"error: route_warmup + route_anneal must be fractions of the run adding up to at most 1, "
                 f"got {cfg.route_warmup} + {cfg.route_anneal}")
    if cfg.attn_routed not in ("", "rest") and not all(s.strip().isdigit() for s in cfg.attn_routed.split(",")):
        sys.exit(f"error: --attn_routed must be rest or a list of layers like 2,3,4 (got {cfg.attn_routed!r})")
    if cfg.warmup_freeze and ((cfg.route == "none" and not cfg.attn_routed) or cfg.labels == "none"):
        sys.exit("error: --warmup_freeze trains the routers alone on their labels: it needs --route and --labels")
    return cfg


def int_list(text):
    return [int(s) for s in text.split(",") if s.strip()]


def build_model(cfg, calibration):
    """Pretrained weights -> optional pruning -> expansion -> routers, as plain function
    calls. `calibration` is a list of (x, valid) batches for ShortGPT's Block Influence."""
    model = weights.from_pretrained(cfg.init_from)
    if cfg.drop:
        model = growth.drop_layers(model, int_list(cfg.drop))
    if cfg.shortgpt_drop:
        model, _ = growth.shortgpt(model, calibration, cfg.shortgpt_drop)
    if cfg.placement == "lesa":
        after = int_list(cfg.after) or lesa.default_positions(model.config.n_layer, cfg.n_new)
        model = lesa.expand_lesa(model, after)
    elif cfg.placement != "none":
        model = growth.expand(model, cfg.placement, n_new=cfg.n_new, init=cfg.init, every_k=cfg.every_k,
                           trim=cfg.trim, after=int_list(cfg.after), freeze_original=cfg.freeze_original)
    if cfg.freeze_original and cfg.placement in ("none", "lesa"):
        raise ValueError(f"freeze_original needs an interleave/tli/stack/index expansion, not {cfg.placement}")
    if cfg.route != "none" or cfg.attn_routed:
        L, layers, attn_layers = model.config.n_layer, (), ()
        if cfg.route != "none":
            which = cfg.routed if cfg.routed in growth.ROUTED else int_list(cfg.routed)
            layers = growth.routed_layers(model.config, which, cfg.dense_first, cfg.dense_last)
        if cfg.attn_routed:
            rest = [i for i in range(L) if i not in layers]
            which = rest if cfg.attn_routed == "rest" else int_list(cfg.attn_routed)
            attn_layers = growth.routed_layers(model.config, which, cfg.dense_first, cfg.dense_last)
        model = methods.activate(model, "none" if not layers else cfg.route, layers=layers, attn_layers=attn_layers,
                             sink_tokens=cfg.sink_tokens, kv_policy=cfg.kv_policy, kv_window=cfg.kv_window,
                             route_gate=cfg.gate, route_threshold=cfg.threshold, route_predictor=cfg.predictor)
    return model


def load_data(cfg, split):
    return evaluate.held_out(dataclasses.asdict(cfg), split)


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to min_lr_ratio * lr (DLO: 3% warmup, cosine)."""
    warmup = max(1, int(cfg.warmup_frac * cfg.max_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model, router_lr_scale=1.0, new_lr_scale=1.0):
    """One optimizer group per layer, so the dynamic LR can scale each layer on its own;
    inserted layers carry new_lr_scale (a zero-initialised block starts with gradients on
    its two output projections only and needs larger steps to leave the identity); the
    routers form one more group with their own LR multiplier."""
    new = set(model.config.new_layers)
    routers = [p for layer in model.layers for router in layer.routers() for p in router.parameters()]
    ids = {id(p) for p in routers}
    groups = [{"params": [p for p in layer.parameters() if p.requires_grad and id(p) not in ids], "layer": i,
               "scale": new_lr_scale if i in new else 1.0} for i, layer in enumerate(model.layers)]
    in_layers = {id(p) for layer in model.layers for p in layer.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_layers]
    groups += [{"params": rest, "layer": None, "scale": 1.0},
               {"params": routers, "layer": None, "scale": router_lr_scale}]
    return [g for g in groups if g["params"]]


def process_group_backend():
    """gloo for CPU tensors and, with CUDA, NCCL for GPU tensors: NCCL serves only CUDA
    tensors, and a few counters here live on the CPU. The CPU build has no NCCL."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "cpu:gloo"


def set_backbone_trainable(model, trainable):
    """Router warm-up with the backbone frozen (Router-Tuning, FlexiDepth): only routers
    learn. The routers read a detached input too: FSDP computes with unsharded copies of
    the parameters, which do not see requires_grad change, and the router loss would
    otherwise reach the backbone through them. LLaMA Pro's frozen layers stay frozen."""
    frozen = set(model.config.frozen_layers)
    for i, layer in enumerate(model.layers):
        for router in layer.routers():
            router.detach_input = not trainable
        for name, p in layer.named_parameters():
            if not dlo.is_router(name):
                p.requires_grad_(trainable and i not in frozen)
    if not frozen:
        for name, p in model.named_parameters():
            if not name.startswith("layers."):
                p.requires_grad_(trainable)


def micro_loss(model, inner, x, y, valid, rule, cfg, label_capacity, n_lm, n_route, frozen=False, groups=None):
    """LM + router loss of one micro-batch, normalised by the global batch's counts (n_lm
    target tokens, n_route routed part x routable token pairs); groups: each part's
    capacity group, label_capacity one per group. `model` may be a DDP/FSDP
    wrapper; `inner` is the GPT whose route_trace the forward fills. Top-k and the
    cos-global cut are per micro-batch: they depend on the batch they see. With the
    backbone frozen (router warm-up), the routers learn from the BCE alone.
    MoDification's load objective is a product of per-part means: each micro-batch adds
    its own, weighted by its share of the global batch's routed pairs.
    Returns (loss, LM loss, per-part label fractions or None)."""
    _, lm_sum = model(x, y, valid=valid, rule=rule, reduction="sum")
    lm = lm_sum / n_lm
    traces = inner.route_trace
    if not traces:
        return lm, lm, None
    labels, frac = None, None
    if cfg.labels != "none":
        ties = "skip" if cfg.capacity_split == "labels" else "run"
        labels, frac = make_labels(traces, cfg.labels, label_capacity, ties, groups)
    route = router_loss(traces, labels, n_route, cfg.router_lambda, cfg.predictor)
    if cfg.load_alpha:
        share = sum(t.routable.sum() for t in traces) / n_route
        route = route + share * load_loss(traces, cfg.load_alpha)
    return (route if frozen else lm + route), lm, frac


# the flags that decide the model's shape: a resume must not change them
ARCHITECTURE_FLAGS = ("init_from", "drop", "shortgpt_drop", "placement", "n_new", "every_k", "trim", "after",
                      "init", "freeze_original", "route", "routed", "attn_routed", "dense_first", "dense_last",
                      "sink_tokens", "kv_policy", "kv_window", "gate", "predictor")


def check_same_architecture(cfg, saved, path):
    defaults = TrainConfig()   # a flag newer than the checkpoint had its default
    changed = [f"{k}={saved.get(k, getattr(defaults, k))!r} -> {getattr(cfg, k)!r}" for k in ARCHITECTURE_FLAGS
               if saved.get(k, getattr(defaults, k)) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"{path} holds a different architecture than the flags ask for "
                         f"({', '.join(changed)}); use another --out_dir or the checkpoint's flags")


def save_checkpoint(path, model, optimizer, cfg, step, schedule, master):
    """Everything a resume needs, written atomically by rank 0. Under FSDP every rank
    takes part in gathering the full (unsharded) state first."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    local = [getattr(p, "to_local", lambda: p)() for p in model.parameters()]   # FSDP: this rank's shards
    finite = torch.tensor([float(all(bool(torch.isfinite(p.detach()).all()) for p in local))])
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():   # an update blew up: never let it replace the last good checkpoint
        sys.exit(f"error: weights became non-finite by step {step}; the last good checkpoint "
                 f"({path}) is kept" if master else 1)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=full)
    if not master:
        return
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    weights.save_checkpoint(path, weights.Checkpoint(
        model=model_state, model_config=dataclasses.asdict(model.config), train_config=dataclasses.asdict(cfg),
        step=step, optimizer=optim_state, schedule=schedule, rng=rng))


class Trainer:
    """One run: the model and its DDP/FSDP wrapper, the optimizer, the capacity schedule,
    the data and the log. `run` is the loop; `step` is one optimizer step."""

    def __init__(self, cfg, model, train_data, val_data, resume, rank, world, device):
        self.cfg, self.model, self.train_data, self.val_data = cfg, model, train_data, val_data
        self.rank, self.world, self.device, self.master = rank, world, device, rank == 0
        self.dtype = pick_dtype(cfg.dtype, device)
        self.routed = model.config.route_slots()
        self.sched = part_schedule(self.routed, cfg.capacity_start, cfg.capacity_end, cfg.attn_capacity_end,
                                   warmup=round(cfg.route_warmup * cfg.max_steps),
                                   anneal=round(cfg.route_anneal * cfg.max_steps), split=cfg.capacity_split)
        # calibrated thresholds replace top-k at inference; the threshold rule needs none
        self.calibrating = bool(self.routed) and cfg.train_rule == "topk" and not cfg.predictor
        self.frozen = False
        self.train_model = self.wrap(model)
        # made after sharding, so under FSDP the optimizer holds the shards; fused: one pass
        # over each parameter's state instead of one per op (1.8x faster on a 2-core CPU)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.router_lr_scale, cfg.new_lr_scale), lr=cfg.lr,
                                           betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=True)
        self.start_step = 0
        if resume:
            self.restore(resume)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.eval_rows = val_data.val_rows(cfg.eval_rows)
        self.calib_rows = evaluate.calibration_rows(val_data, dataclasses.asdict(cfg))
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if self.master else None
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    def wrap(self, model):
        if self.world > 1 and self.cfg.dist == "fsdp":
            from torch.distributed.fsdp import fully_shard
            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)   # shards in place: `model` is now the FSDP module
            return model
        if self.world > 1:
            return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=bool(self.routed))
        return model

    def restore(self, resume):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        self.freeze_for(resume.step)   # a frozen backbone has no optimizer state yet
        set_optimizer_state_dict(self.model, self.optimizer, resume.optimizer,
                                 options=StateDictOptions(full_state_dict=True))
        rng = resume.rng
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.sched.load_state_dict(resume.schedule)
        self.start_step = resume.step

    def write(self, record):
        if self.master:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def reduce(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def rule_at(self, step):
        """Training's rule: nothing is skipped during the router warm-up; then top-k at
        the schedule's per-layer capacities, or MoDification's threshold."""
        sim = self.cfg.labels in ("cos", "cos-global")
        if self.cfg.train_rule == "threshold":
            return Rule("all" if step < self.sched.warmup else "threshold", self.cfg.threshold, similarity=sim)
        return Rule("topk", capacity=self.sched.capacities(step).to(self.device), similarity=sim)

    def set_lr(self, step):
        lr = lr_at(step, self.cfg)
        caps = self.sched.capacities(step).tolist()
        scales = {}   # a layer with two routed parts takes their mean
        if self.cfg.dynamic_lr and self.routed:
            for (layer, _), scale in zip(self.routed, dynamic_lr_scales(caps)):
                scales.setdefault(layer, []).append(scale)
        scales = {layer: sum(s) / len(s) for layer, s in scales.items()}
        for group in self.optimizer.param_groups:
            group["lr"] = lr * scales.get(group["layer"], 1.0) * group["scale"]
        return lr, caps

    def freeze_for(self, step):
        """With --warmup_freeze, the backbone trains only once the router warm-up is over."""
        frozen = self.cfg.warmup_freeze and step < self.sched.warmup
        if frozen != self.frozen:
            set_backbone_trainable(self.model, not frozen)
            self.frozen = frozen

    def step(self, step):
        cfg, model = self.cfg, self.model
        self.freeze_for(step)
        lr, caps = self.set_lr(step)
        rule, label_capacity = self.rule_at(step), self.sched.label_capacity(step)
        rows = self.train_data.rows_at(step, cfg.batch_size * cfg.grad_accum * self.world, cfg.seed)
        batches = [self.train_data.batch(rows[(self.rank * cfg.grad_accum + m) * cfg.batch_size:][:cfg.batch_size])
                   for m in range(cfg.grad_accum)]
        r = model.config.route_sink_tokens
        routable = [int(routable_tokens(v, torch.arange(v.size(1)), r).sum()) for _, _, v in batches]
        n_lm, n_route = self.reduce([sum(int((y != -1).sum()) for _, y, _ in batches),
                                     sum(routable) * len(self.routed)]).tolist()
        totals, frac_sum = torch.zeros(5, dtype=torch.float64), torch.zeros(len(self.routed), dtype=torch.float64)
        for m, (x, y, valid) in enumerate(batches):
            x, y, valid = x.to(self.device), y.to(self.device), valid.to(self.device)
            last = m == cfg.grad_accum - 1
            sync = self.train_model.no_sync() if self.world > 1 and cfg.dist == "ddp" and not last else nullcontext()
            with sync, autocast(self.device, self.dtype):
                loss, lm, frac = micro_loss(self.train_model, model, x, y, valid, rule, cfg, label_capacity,
                                            n_lm, max(1.0, n_route), self.frozen, self.sched.groups)
                # DDP/FSDP average gradients over ranks; the loss is already a global mean
                (loss * self.world).backward()
            traces = model.route_trace
            n = int(valid.sum())
            attn_ran, mlp_ran = (f * n for f in evaluate.executed_fraction(traces, model.config.n_layer, n))
            totals += torch.tensor([float(loss.detach()), float(lm.detach()), attn_ran, mlp_ran, n],
                                   dtype=torch.float64)
            if frac is not None:   # weighted by the micro-batch's routable tokens
                frac_sum += frac.detach().double().cpu() * routable[m]
        step_loss, step_lm, attn_ran, mlp_ran, n_valid = self.reduce(totals.tolist()).tolist()
        if not math.isfinite(step_loss):
            if self.master:
                print(f"error: loss is {step_loss} at step {step}; stopping. The last good checkpoint "
                      f"({self.ckpt_path}) is kept.", file=sys.stderr)
            sys.exit(1)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.labels in ("cos", "cos-global") and self.routed:
            self.sched.update(self.reduce(frac_sum.tolist()) / max(1.0, n_route / len(self.routed)))
        record = {"step": step + 1, "loss": step_lm, "lr": lr, "attn_frac_train": attn_ran / n_valid,
                  "mlp_frac_train": mlp_ran / n_valid}
        if self.routed:
            route = step_loss if self.frozen else step_loss - step_lm   # frozen: the loss is the router's alone
            c_bar = [self.sched.global_capacity(step, g) for g in range(len(self.sched.ends))]
            record.update(router_loss=route, c_bar=c_bar[0] if len(c_bar) == 1 else c_bar, caps=caps)
        return record

    def calibrate(self, step):
        caps = self.sched.capacities(step)
        return evaluate.calibrate(self.model, self.val_data, self.calib_rows, caps, self.device, self.dtype)

    def log_eval(self, step):
        """Held-out loss with the inference rule sample.py uses: calibrated thresholds first."""
        cfg = self.cfg
        if self.calibrating:   # on every rank: FSDP's forward is collective
            self.model.config.route_threshold = self.calibrate(step)
        result = evaluate.evaluate(self.model, self.val_data, self.eval_rows, self.model.default_rule(),
                                   cfg.batch_size, self.device, self.dtype, labels=cfg.labels if self.routed else None,
                                   label_capacity=self.sched.label_capacity(step), groups=self.sched.groups)
        record = {"step": step, **{k: v for k, v in result.items() if not k.startswith("row_")}}
        if self.calibrating:
            record["thresholds"] = list(self.model.config.route_threshold)
        self.write(record)
        return {**result, **record}   # with the per-conversation sums that compare.py pairs

    def save(self, step):
        save_checkpoint(self.ckpt_path, self.model, self.optimizer, self.cfg, step, self.sched.state_dict(),
                        self.master)

    def run(self):
        cfg = self.cfg
        bar = tqdm(range(self.start_step, cfg.max_steps), initial=self.start_step, total=cfg.max_steps,
                   disable=not self.master, dynamic_ncols=True)
        t0, tokens, record = time.time(), 0, {}
        for step in bar:
            if step % cfg.eval_every == 0:
                self.log_eval(step)
            record = self.step(step)
            tokens += cfg.batch_size * cfg.grad_accum * self.world * cfg.seq_len
            record["tok_s"] = tokens / (time.time() - t0)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_s']:.0f}",
                            attn=f"{record['attn_frac_train']:.3f}", mlp=f"{record['mlp_frac_train']:.3f}")
            self.write(record)
            if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.max_steps:
                self.save(step + 1)
        if self.calibrating:   # the thresholds ship in the checkpoint: sample.py and bench.py use them
            self.model.config.route_threshold = self.calibrate(cfg.max_steps)
        self.save(cfg.max_steps)
        result = self.log_eval(cfg.max_steps)
        if self.master:
            self.log.close()
            summary = {k: result[k] for k in ("val_loss", "val_se", "attn_frac_infer", "mlp_frac_infer")}
            summary.update({k: record.get(k) for k in ("attn_frac_train", "mlp_frac_train")})
            print(json.dumps(summary))
        return result


def init_distributed(cfg):
    """(rank, world, device); under torchrun, one process per GPU (or per CPU process)."""
    rank, world = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group(process_group_backend())
        rank, world = dist.get_rank(), dist.get_world_size()
    device = pick_device(cfg.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return rank, world, device


def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = init_distributed(cfg)
    torch.manual_seed(cfg.seed)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    try:
        resume = weights.load_checkpoint(ckpt_path) if cfg.resume and os.path.exists(ckpt_path) else None
        if resume:
            check_same_architecture(cfg, resume.train_config, ckpt_path)
        train_data, val_data = load_data(cfg, "train"), load_data(cfg, "val")
        calibration = [(x, valid) for x, _, valid in
                       [train_data.batch(train_data.rows_at(0, cfg.batch_size, cfg.seed + 1))]]
        model = weights.model_from_checkpoint(resume) if resume else build_model(cfg, calibration)
        if cfg.seq_len > model.config.block_size:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context of {model.config.block_size}")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    # the standard (out, in) layout, not weights.place's: its transposed CPU weights speed up
    # decoding but cost a training step gradient and AdamW copies (README, "Speed")
    model = model.to(device)
    result = Trainer(cfg, model, train_data, val_data, resume, rank, world, device).run()
    if world > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
