"""
SFT with per-token layer routing: DLO and its relatives, on one CPU, one GPU, or
many with torchrun.

    python train.py                                  # DLO on SmolLM2, a ~10 minute CPU run
    python train.py --config config/dlo_paper.json   # the paper's recipe shape (GPU)
    torchrun --nproc_per_node=8 train.py --config config/dlo_paper.json --dist ddp

Notable features
- expand (dlo.py), route (router.py), then SFT with loss on assistant tokens only
- LM loss + lambda * BCE router loss, both normalised over the *global* batch, so k
  micro-batches accumulate to exactly one batch k times as large
- capacity annealing, cos / cos-global / self labels, dynamic per-layer LR
- atomic checkpoints holding model, optimizer, schedule, data position, RNG and
  routing state: resuming continues the very same run
- DDP or FSDP (fully_shard, one unit per block) under torchrun; gloo on CPU
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
import weights
from data import TokenData, prepare_shakespeare, prepare_sharegpt
from router import (Rule, annealed_capacity, dynamic_lr_scales, rescale_capacities, router_bce,
                    similarity_labels)


@dataclass
class TrainConfig:
    # model
    init_from: str = "smollm2"      # "smollm2", a .gguf file, a HF folder, or a .pt checkpoint
    # expansion (dlo.py); placement "none" keeps the depth
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
    route: str = "mlp"              # none, mlp (DLO default), block
    routed: str = "all"             # all, inner (not first/last), every-other, or "i,j,..."
    kv_policy: str = "compute"      # block routing: compute or drop
    gate: str = "dlo"               # dlo: g(p) = 1 + gap (p - 0.5); mod: output times p
    train_rule: str = "topk"        # topk (DLO) or threshold (MoDification)
    threshold: float = 0.5          # threshold rule, and inference
    labels: str = "cos-global"      # cos, cos-global, self, none
    router_lambda: float = 1.0
    router_lr_scale: float = 1.0    # routers' LR = lr * this (DLO uses one LR for all)
    capacity_start: float = 1.0
    capacity_end: float = 0.9
    capacity_steps: int = 12        # anneal over this many steps (paper: 1000)
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
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1337
    # bookkeeping
    out_dir: str = "out/dlo"
    eval_every: int = 12
    eval_rows: int = 16
    ckpt_every: int = 12
    resume: bool = False
    compile: bool = False
    dist: str = "ddp"               # under torchrun: ddp or fsdp
    device: str = "auto"


CHOICES = {"placement": ("none", "interleave", "tli", "stack", "index", "lesa"),
           "init": ("zeros", "copy", "random", "merge-linear", "merge-slerp"), "route": ("none", "mlp", "block"),
           "kv_policy": ("compute", "drop"), "gate": ("dlo", "mod"), "train_rule": ("topk", "threshold"),
           "labels": ("cos", "cos-global", "self", "none"), "dataset": ("sharegpt", "shakespeare"),
           "dist": ("ddp", "fsdp")}


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
    if not (0 < cfg.capacity_start <= 1 and 0 < cfg.capacity_end <= 1):
        sys.exit(f"error: capacities must be in (0, 1], got {cfg.capacity_start} -> {cfg.capacity_end}")
    return cfg


def int_list(text):
    return [int(s) for s in text.split(",") if s.strip()]


def build_model(cfg, calibration):
    """Pretrained weights -> optional pruning -> expansion -> routers, as plain function
    calls. `calibration` is a list of (x, valid) batches for ShortGPT's Block Influence."""
    model = weights.from_pretrained(cfg.init_from)
    if cfg.drop:
        model = dlo.drop_layers(model, int_list(cfg.drop))
    if cfg.shortgpt_drop:
        model, _ = dlo.shortgpt(model, calibration, cfg.shortgpt_drop)
    if cfg.placement == "lesa":
        import lesa   # only LESA needs its SVD and predictor training
        after = int_list(cfg.after) or lesa.default_positions(model.config.n_layer, cfg.n_new)
        model = lesa.expand_lesa(model, after)
    elif cfg.placement != "none":
        model = dlo.expand(model, cfg.placement, n_new=cfg.n_new, init=cfg.init, every_k=cfg.every_k,
                           trim=cfg.trim, after=int_list(cfg.after), freeze_original=cfg.freeze_original)
    if cfg.freeze_original and cfg.placement in ("none", "lesa"):
        raise ValueError(f"freeze_original needs an interleave/tli/stack/index expansion, not {cfg.placement}")
    if cfg.route != "none":
        L = model.config.n_layer
        layers = {"all": (), "inner": range(1, L - 1), "every-other": range(1, L, 2)}.get(cfg.routed)
        layers = int_list(cfg.routed) if layers is None else layers
        model = dlo.activate(model, cfg.route, layers=layers, kv_policy=cfg.kv_policy, route_gate=cfg.gate,
                             route_threshold=cfg.threshold, route_predictor=cfg.predictor)
    return model


def load_data(cfg, split, tok_source):
    name = f"{cfg.dataset}-{cfg.max_convs}" if cfg.dataset == "sharegpt" and cfg.max_convs else cfg.dataset
    path = os.path.join(cfg.data_dir, name)
    if not os.path.exists(os.path.join(path, "meta.json")):
        from tokenizer import load_tokenizer
        tok = load_tokenizer(tok_source)
        if cfg.dataset == "sharegpt":
            prepare_sharegpt(path, tok, max_convs=cfg.max_convs or None)
        else:
            prepare_shakespeare(path, tok)
    return TokenData(path, split, cfg.seq_len)


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to min_lr_ratio * lr (DLO: 3% warmup, cosine)."""
    warmup = max(1, int(cfg.warmup_frac * cfg.max_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model, router_lr_scale=1.0):
    """One optimizer group per layer, so the dynamic LR can scale each layer on its own;
    the routers form one more group with their own LR multiplier."""
    routers = [p for layer in model.layers if layer.router is not None for p in layer.router.parameters()]
    ids = {id(p) for p in routers}
    groups = [{"params": [p for p in layer.parameters() if p.requires_grad and id(p) not in ids], "layer": i}
              for i, layer in enumerate(model.layers)]
    in_layers = {id(p) for layer in model.layers for p in layer.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_layers]
    groups += [{"params": rest, "layer": None}, {"params": routers, "layer": None, "scale": router_lr_scale}]
    return [g for g in groups if g["params"]]


def micro_losses(model, inner, x, y, valid, rule, cfg, c_bar, n_lm, n_route):
    """LM + router loss of one micro-batch, normalised by the global batch's counts
    (n_lm target tokens, n_route routed layer-token pairs). `model` may be a DDP/FSDP
    wrapper; `inner` is the GPT whose route_trace the forward fills. Top-k and the
    cos-global threshold are computed per micro-batch: they depend on the batch they see."""
    _, lm_mean = model(x, y, valid=valid, rule=rule)
    lm = lm_mean * int((y != -1).sum()) / n_lm
    trace = inner.route_trace
    if not trace:
        return lm, lm, None
    valids = [t["valid"] for t in trace]
    caps, labels = None, None
    if cfg.labels in ("cos", "cos-global"):
        labels, caps = similarity_labels([t["sim"] for t in trace], valids, cfg.labels, rule.capacity, c_bar)
    elif cfg.labels == "self":
        labels = [t["sel"] for t in trace]
    loss = lm
    if labels is not None:
        loss = loss + cfg.router_lambda * router_bce([t["p"] for t in trace], labels, valids)[0] / n_route
    if cfg.predictor:  # MoD: the causal predictor learns the (non-causal) top-k decision
        loss = loss + router_bce([t["q"] for t in trace], [t["sel"] for t in trace], valids)[0] / n_route
    return loss, lm, caps


# the flags that decide the model's shape: a resume must not change them
ARCHITECTURE_FLAGS = ("init_from", "drop", "shortgpt_drop", "placement", "n_new", "every_k", "trim", "after",
                      "init", "freeze_original", "route", "routed", "kv_policy", "gate", "predictor")


def check_same_architecture(cfg, saved, path):
    changed = [f"{k}={saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in ARCHITECTURE_FLAGS
               if saved.get(k) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"{path} holds a different architecture than the flags ask for "
                         f"({', '.join(changed)}); use another --out_dir or the checkpoint's flags")


def save_checkpoint(path, model, optimizer, cfg, state, master):
    """Everything a resume needs, written atomically by rank 0. Under FSDP every rank
    takes part in gathering the full (unsharded) state first."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    local = [getattr(p, "to_local", lambda: p)() for p in model.parameters()]   # FSDP: this rank's shards
    finite = torch.tensor([float(all(bool(torch.isfinite(p.detach()).all()) for p in local))])
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():   # an update blew up: never let it replace the last good checkpoint
        sys.exit(f"error: weights became non-finite by step {state['step']}; the last good checkpoint "
                 f"({path}) is kept" if master else 1)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=full)
    if not master:
        return
    weights.save_checkpoint(path, {
        "model": model_state, "model_config": dataclasses.asdict(model.config),
        "optimizer": optim_state, "train_config": dataclasses.asdict(cfg), **state,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    })


def main(argv=None):
    cfg = parse_args(argv)
    distributed = "RANK" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and distributed:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    master = rank == 0
    torch.manual_seed(cfg.seed)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    try:
        resume = weights.load_checkpoint(ckpt_path) if cfg.resume and os.path.exists(ckpt_path) else None
        if resume:
            check_same_architecture(cfg, resume["train_config"], ckpt_path)
        train_data = load_data(cfg, "train", cfg.init_from)
        val_data = load_data(cfg, "val", cfg.init_from)
        calibration = [(x, valid) for x, _, valid in
                       [train_data.batch(train_data.rows_at(0, cfg.batch_size, cfg.seed + 1))]]
        model = weights.model_from_checkpoint(resume) if resume else build_model(cfg, calibration)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    model.to(device)
    n_routed = len(model.config.routed_ids())
    caps = resume["caps"] if resume else [cfg.capacity_start] * n_routed
    start_step = resume["step"] if resume else 0

    train_model = model
    if distributed and cfg.dist == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)   # shards in place: `model` is now the FSDP module
    elif distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=n_routed > 0)
    # the optimizer is made after sharding, so under FSDP it holds the shards
    optimizer = torch.optim.AdamW(param_groups(model, cfg.router_lr_scale), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay, fused=device.startswith("cuda"))
    if resume:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, resume["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(resume["rng"]["torch"])
        np.random.set_state(resume["rng"]["numpy"])
        random.setstate(resume["rng"]["python"])
    if cfg.compile:
        train_model = torch.compile(train_model)
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    os.makedirs(cfg.out_dir, exist_ok=True)
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None
    global_batch = cfg.batch_size * cfg.grad_accum * world
    routed_layers = model.config.routed_ids()

    def evaluate(rule):
        """Held-out loss and, per layer, the fraction of tokens that ran its routed part."""
        model.eval()
        rows = val_data.val_rows(cfg.eval_rows)
        loss_sum, count, tokens = 0.0, 0, 0
        ran = [0.0] * model.config.n_layer
        with torch.no_grad(), autocast:
            for i in range(0, len(rows), cfg.batch_size):
                x, y, valid = (t.to(device) for t in val_data.batch(rows[i:i + cfg.batch_size]))
                _, loss = model(x, y, valid=valid, rule=rule)
                n = int((y != -1).sum())
                loss_sum, count, tokens = loss_sum + float(loss) * n, count + n, tokens + int(valid.sum())
                routed = {t["layer"]: int(t["sel"].sum()) for t in model.route_trace}
                for layer in range(model.config.n_layer):
                    ran[layer] += routed.get(layer, int(valid.sum()))
        model.train()
        return loss_sum / count, [r / tokens for r in ran]

    def log_eval(step):
        val_loss, per_layer = evaluate(infer_rule)   # on every rank: FSDP's forward is collective
        record = {"step": step, "val_loss": val_loss, "exec_frac_infer": sum(per_layer) / len(per_layer),
                  "exec_per_layer": per_layer}
        if master:
            log.write(json.dumps(record) + "\n")
            log.flush()
        return record

    def train_rule(c):
        if cfg.train_rule == "threshold":
            return Rule("threshold", cfg.threshold, similarity=cfg.labels.startswith("cos"))
        return Rule("topk", capacity=tuple(c), similarity=cfg.labels.startswith("cos"))

    infer_rule = Rule("threshold", cfg.threshold, use_predictor=cfg.predictor)
    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
               disable=not master, dynamic_ncols=True)
    t0, tokens_seen = time.time(), 0
    for step in bar:
        if step % cfg.eval_every == 0:
            log_eval(step)
        c_bar = annealed_capacity(step, cfg.capacity_start, cfg.capacity_end, cfg.capacity_steps)
        lr = lr_at(step, cfg)
        scales = dict(zip(routed_layers, dynamic_lr_scales(caps) if cfg.dynamic_lr and caps else []))
        for group in optimizer.param_groups:
            group["lr"] = lr * scales.get(group["layer"], 1.0) * group.get("scale", 1.0)
        rows = train_data.rows_at(step, global_batch, cfg.seed)
        batches = [train_data.batch(rows[(rank * cfg.grad_accum + m) * cfg.batch_size:][:cfg.batch_size])
                   for m in range(cfg.grad_accum)]
        counts = torch.tensor([sum(int((b[1] != -1).sum()) for b in batches),
                               sum(int(b[2].sum()) for b in batches) * n_routed], dtype=torch.float64)
        if distributed:
            dist.all_reduce(counts)
        n_lm, n_route = float(counts[0]), max(1.0, float(counts[1]))
        rule = train_rule(caps)
        step_loss, step_lm, new_caps, ran = 0.0, 0.0, [], 0.0
        for m, (x, y, valid) in enumerate(batches):
            x, y, valid = x.to(device), y.to(device), valid.to(device)
            last = m == cfg.grad_accum - 1
            sync = train_model.no_sync() if distributed and cfg.dist == "ddp" and not last else nullcontext()
            with sync, autocast:
                loss, lm, micro_caps = micro_losses(train_model, model, x, y, valid, rule, cfg, c_bar,
                                                    n_lm, n_route)
                # DDP/FSDP average gradients over ranks; the loss is already a global mean
                (loss * world).backward()
            step_loss, step_lm = step_loss + float(loss.detach()), step_lm + float(lm.detach())
            ran += sum(int(t["sel"].sum()) for t in model.route_trace)
            if micro_caps is not None:   # weighted by the micro-batch's real tokens
                new_caps.append(torch.tensor(micro_caps, dtype=torch.float64) * int(valid.sum()))
            tokens_seen += int(valid.sum()) * world
        stepped = torch.tensor([step_loss, step_lm, ran], dtype=torch.float64)
        if distributed:
            dist.all_reduce(stepped)
        step_loss, step_lm, ran = (float(v) for v in stepped)
        if not math.isfinite(step_loss):
            if master:
                print(f"error: loss is {step_loss} at step {step}; stopping. The last good checkpoint "
                      f"({ckpt_path}) is kept.", file=sys.stderr)
            sys.exit(1)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        next_bar = annealed_capacity(step + 1, cfg.capacity_start, cfg.capacity_end, cfg.capacity_steps)
        if new_caps:   # cos-global: the labels' per-layer capacities drive the next top-k
            summed = torch.stack(new_caps).sum(0)
            if distributed:
                dist.all_reduce(summed)
            caps = (summed / (n_route / n_routed)).tolist()
        caps = rescale_capacities(caps, next_bar) if n_routed else caps
        frac = (model.config.n_layer - n_routed + n_routed * ran / n_route) / model.config.n_layer
        tok_s = tokens_seen / (time.time() - t0)
        if master:
            bar.set_postfix(loss=f"{step_lm:.3f}", tok_s=f"{tok_s:.0f}", exec=f"{frac:.3f}")
            log.write(json.dumps({"step": step + 1, "loss": step_lm, "router_loss": step_loss - step_lm,
                                  "lr": lr, "c_bar": c_bar, "exec_frac_train": frac, "tok_s": tok_s,
                                  "caps": caps}) + "\n")
            log.flush()
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(ckpt_path, model, optimizer, cfg, {"step": step + 1, "caps": caps}, master)
    result = log_eval(cfg.max_steps)
    if master:
        log.close()
        print(json.dumps({k: v for k, v in result.items() if k != "exec_per_layer"}))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
