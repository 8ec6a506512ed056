"""Training maths: gradient accumulation is exact, one step's gradients are the global
batch's over ranks and micro-batches, the loss pieces are what they claim, the frozen
router warm-up trains the routers alone, the capacity split is the labels', and flags
fail clearly."""
import threading
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dlo
import growth
import methods
from conftest import routed_tiny, tiny_model
from router import Rule
from schedule import CapacitySchedule
from train import Trainer, TrainConfig, micro_loss, param_groups, parse_args, set_backbone_trainable


def batch(seed, B=6, T=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 97, (B, T), generator=g)
    y = torch.randint(0, 97, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):  # right padding of different lengths, and some non-learned targets
        n = int(torch.randint(3, T + 1, (1,), generator=g))
        valid[b, n:] = False
        y[b, n:] = -1
        y[b, : int(torch.randint(0, 3, (1,), generator=g))] = -1
    return x, y, valid


@pytest.mark.parametrize("route", ["mlp", "attn", "attn+mlp", "block"])
def test_accumulated_micro_batches_equal_one_big_batch(route):
    """Threshold rule + `self` labels do not depend on the batch, so k micro-batches must
    give exactly the loss and gradients of one batch k times as large."""
    cfg = TrainConfig(labels="self", train_rule="threshold")
    rule = Rule("threshold", 0.5)
    x, y, valid = batch(0)
    n_routed = len(routed_tiny(route).train().config.route_slots())
    n_lm, n_route = int((y != -1).sum()), int(valid.sum()) * n_routed

    def run(chunks):
        model = routed_tiny(route).train()
        total = 0.0
        for sl in chunks:
            loss, _, _ = micro_loss(model, model, x[sl], y[sl], valid[sl], rule, cfg, 0.9, n_lm, n_route)
            loss.backward()
            total += float(loss.detach())
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    big_loss, big_grads = run([slice(0, 6)])
    acc_loss, acc_grads = run([slice(0, 2), slice(2, 4), slice(4, 6)])
    assert abs(big_loss - acc_loss) < 1e-5
    assert big_grads.keys() == acc_grads.keys()
    for name in big_grads:
        assert torch.allclose(big_grads[name], acc_grads[name], atol=1e-6), name
    assert any("router" in n for n in big_grads)   # the router learns through g(p) and the BCE


def test_router_loss_is_added_and_zero_without_labels():
    model = routed_tiny().train()
    x, y, valid = batch(1)
    n_lm, n_route = int((y != -1).sum()), int(valid.sum()) * 4
    rule = Rule("topk", capacity=torch.full((4,), 0.5, dtype=torch.float64), similarity=True)
    loss, lm, frac = micro_loss(model, model, x, y, valid, rule, TrainConfig(labels="cos-global"), 0.7, n_lm, n_route)
    assert float(loss.detach()) > float(lm.detach()) and frac is not None
    n = int(valid.sum())
    assert abs(float(frac.mean()) - 0.7) <= 1.0 / n   # the global cut hits c = 0.7 up to one token
    loss, lm, _ = micro_loss(model, model, x, y, valid, rule, TrainConfig(labels="none"), 0.7, n_lm, n_route)
    assert float(loss.detach()) == float(lm.detach())


class Rows:
    """A stand-in for data.TokenData: fixed random right-padded rows, some targets unlearned,
    with its row-order functions (a seeded permutation per step; val rows from 0)."""

    def __init__(self, n=24, T=12, seed=9):
        g = torch.Generator().manual_seed(seed)
        self.num_rows = n
        self.x = torch.randint(0, 97, (n, T), generator=g)
        self.valid = torch.arange(T)[None] < torch.randint(4, T + 1, (n, 1), generator=g)
        learn = self.valid & (torch.rand(n, T, generator=g) > 0.3)
        self.y = torch.where(learn, torch.randint(0, 97, (n, T), generator=g), -1)

    def rows_at(self, step, global_batch, seed):
        g = torch.Generator().manual_seed(seed + step)
        return torch.randperm(self.num_rows, generator=g)[:global_batch].numpy()

    def val_rows(self, n):
        return np.arange(min(n, self.num_rows))

    def batch(self, rows):
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return self.x[rows], self.y[rows], self.valid[rows]


def make_trainer(tmp_path, model, rank=0, world=1, **flags):
    """train.py's Trainer on a tiny routed model and Rows, in fp32 on the CPU."""
    base = dict(batch_size=2, grad_accum=2, max_steps=10, route_warmup=0.2, eval_rows=2, calib_rows=2,
                dtype="float32", device="cpu", out_dir=str(tmp_path / f"rank{rank}"))
    data = Rows()
    return Trainer(TrainConfig(**{**base, **flags}), model, data, data, None, rank, world, "cpu")


def router_names(model):
    return {n for n, _ in model.named_parameters() if dlo.is_router(n.split(".", 2)[-1])}


def test_frozen_warmup_trains_the_routers_alone(tmp_path):
    """Trainer.step with --warmup_freeze, as train.py runs it: during the router warm-up
    (steps 0-1 of 10 at route_warmup 0.2) only the routers get a gradient and move, every
    backbone parameter stays bit for bit; from step 2 on the backbone trains and the
    routers read their input undetached again."""
    model = routed_tiny().train()
    tr = make_trainer(tmp_path, model, warmup_freeze=True, labels="cos-global")
    routers, seen, real_step = router_names(model), [], tr.optimizer.step

    def spy():   # which parameters hold a gradient when the optimizer steps
        seen.append({n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0})
        real_step()
    tr.optimizer.step = spy
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr.step(0)
    assert seen[-1] == routers
    assert all(r.detach_input for layer in model.layers for r in layer.routers())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == routers
    tr.step(2)
    assert routers < seen[-1] and any(n.startswith("layers.0.mlp") for n in seen[-1])
    assert not any(r.detach_input for layer in model.layers for r in layer.routers())
    assert all(p.requires_grad for p in model.parameters())
    after = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert after == set(before)   # everything trains once the warm-up is over


def test_frozen_backbone_gets_no_gradient_through_the_router_input():
    """set_backbone_trainable(False) also makes each router read a detached input: FSDP
    computes with unsharded copies that keep requires_grad=True, so the router loss would
    reach the backbone through x. Simulated by switching requires_grad back on: the BCE
    must still reach the routers alone. Without the detach it reaches the layers below."""
    model = routed_tiny().train()
    x, y, valid = batch(2)
    rule = Rule("topk", capacity=torch.ones(4, dtype=torch.float64), similarity=True)

    def grads():
        model.zero_grad(set_to_none=True)
        loss, lm, _ = micro_loss(model, model, x, y, valid, rule, TrainConfig(labels="cos-global"), 0.8,
                                 int((y != -1).sum()), int(valid.sum()) * 4, frozen=True)
        loss.backward()
        assert float(loss.detach()) != float(lm.detach())   # frozen: the router loss alone
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    set_backbone_trainable(model, False)
    assert all(r.detach_input for layer in model.layers for r in layer.routers())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == router_names(model)
    for p in model.parameters():   # what FSDP's unsharded compute copies look like
        p.requires_grad_(True)
    assert grads() == router_names(model)
    for layer in model.layers:
        for r in layer.routers():
            r.detach_input = False
    assert any(n.startswith("layers.0.") and "router" not in n for n in grads())   # the test can see a leak


def test_backbone_unfreezes_as_it_was_and_llama_pro_layers_stay_frozen():
    """set_backbone_trainable(True) after a warm-up restores every requires_grad flag as the
    model was built: all on for DLO; for LLaMA Pro (freeze_original) the original layers,
    embeddings, norm and head stay frozen, and only the new layers and routers train."""
    for model in (routed_tiny(), methods.activate(growth.expand(tiny_model(), "interleave", n_new=2, freeze_original=True),
                                              "mlp")):
        built = {n: p.requires_grad for n, p in model.named_parameters()}
        set_backbone_trainable(model, False)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == router_names(model)
        set_backbone_trainable(model, True)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == built
        assert not any(r.detach_input for layer in model.layers for r in layer.routers())
    assert not built["layers.0.mlp.down_proj.weight"] and built["layers.2.mlp.down_proj.weight"]   # LLaMA Pro


class FakeDDP:
    """DDP's forward is the module's; the test does DDP's gradient averaging itself."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return nullcontext()


def step_gradients(tr):
    """The gradients Trainer.step hands the optimizer at step 0 (the step itself is skipped)."""
    seen = {}
    tr.optimizer.step = lambda: seen.update(
        {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
    tr.step(0)
    return seen


def two_ranks(tmp_path, monkeypatch, models, **flags):
    """Trainer.step on two ranks, as two threads: all_reduce sums across them (a barrier
    pairs the calls), and DDP's averaging of gradients is done here, over the two ranks."""
    barrier, slots, out, errors = threading.Barrier(2, timeout=120), {}, {}, []

    def all_reduce(t, op=None):
        rank = int(threading.current_thread().name)
        slots[rank] = t.clone()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        t.copy_(total)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(Trainer, "wrap", lambda self, model: FakeDDP(model))
    trainers = [make_trainer(tmp_path, m, rank, 2, **flags) for rank, m in enumerate(models)]

    def run(rank):
        try:
            out[rank] = step_gradients(trainers[rank])
        except Exception as e:   # re-raised in the main thread
            errors.append(e)
            barrier.abort()
    threads = [threading.Thread(target=run, args=(r,), name=str(r)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {n: (out[0][n] + out[1][n]) / 2 for n in out[0]}


def global_mean_gradients(model, data, rows, B):
    """The gradient of the global batch's loss written out from scratch: the mean
    cross-entropy over every target of every row (full logits, F.cross_entropy) plus the
    BCE against `self` labels summed over routed parts x routable tokens and divided by
    their count. At capacity 1 every routable token runs, so its label is 1: BCE = softplus(-logit)."""
    model.zero_grad(set_to_none=True)
    parts = [data.batch(rows[i:i + B]) for i in range(0, len(rows), B)]
    n_lm = sum(int((y != -1).sum()) for _, y, _ in parts)
    ce, bce, n_route = 0.0, 0.0, 0
    for x, y, valid in parts:
        logits, _ = model(x, valid=valid, rule=Rule("all"))
        ce = ce + F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        for t in model.route_trace:
            bce = bce + F.softplus(-t.logit)[t.routable].sum()
            n_route += int(t.routable.sum())
    (ce / n_lm + bce / n_route).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_reduction_scale_over_ranks_and_micro_batches(tmp_path, monkeypatch):
    """The gradients one optimizer step sees are those of the global batch's mean loss:
    one process with 4 micro-batches, and two ranks with 2 each whose gradients DDP
    averages, both equal the loss written out from scratch. This pins train.py's
    `(loss * self.world).backward()` and the all-reduced counts it divides by: a reduction
    scaled x2 (or a missing x world, or a rank dividing by its own counts) moves every
    gradient by a factor, far beyond the fp32 round-off allowed here. AdamW and clipping
    would hide such a factor in the losses of a run; the gradients show it."""
    flags = dict(labels="self", dynamic_lr=False, grad_clip=0.0)
    single = step_gradients(make_trainer(tmp_path, routed_tiny().train(), grad_accum=4, **flags))
    pair = two_ranks(tmp_path, monkeypatch, [routed_tiny().train(), routed_tiny().train()], grad_accum=2, **flags)
    data, cfg = Rows(), TrainConfig(seed=1337)
    want = global_mean_gradients(routed_tiny().train(), data, data.rows_at(0, 8, cfg.seed), 2)
    assert single.keys() == pair.keys() == want.keys() and router_names(routed_tiny()) <= set(want)
    for name in want:
        scale = float(want[name].abs().max())
        assert scale > 0, name
        assert (single[name] - want[name]).abs().max() <= 1e-5 * scale + 1e-8, name
        assert (pair[name] - want[name]).abs().max() <= 1e-5 * scale + 1e-8, name


def test_label_split_takes_capacity_where_the_labels_put_it():
    """schedule.CapacitySchedule's two splits at c_bar = 0.8 with label fractions
    f = (1.0, 0.5, 0.2, 0.5), mean 0.55. Labels (default): c_l = 1 - a (1 - f_l) with
    a = 0.2 / 0.45, so a layer labelled "run all" keeps 1.0. Rescale (DLO's code):
    c_l = f_l * 0.8 / 0.55, clamped to 1. The two differ in every skipping layer, so using
    either in the other's place fails; train.py defaults to the label split."""
    f = torch.tensor([1.0, 0.5, 0.2, 0.5], dtype=torch.float64)
    a = 0.2 / 0.45
    want = {"labels": [1.0, 1 - a * 0.5, 1 - a * 0.8, 1 - a * 0.5],
            "rescale": [1.0, 0.4 / 0.55, 0.16 / 0.55, 0.4 / 0.55]}
    for split, caps in want.items():
        s = CapacitySchedule(4, start=1.0, end=0.8, warmup=0, anneal=10, split=split)
        s.update(f)
        assert s.capacities(10).tolist() == pytest.approx(caps, abs=1e-12), split
    # mid-anneal (c_bar 0.9): the label split reads labels made at the end capacity, rescale at c_bar
    assert CapacitySchedule(4, end=0.8, anneal=10).label_capacity(5) == [0.8]
    assert CapacitySchedule(4, end=0.8, anneal=10, split="rescale").label_capacity(5) == [pytest.approx(0.9)]
    assert TrainConfig().capacity_split == "labels"


def test_param_groups_cover_each_trainable_parameter_once():
    model = methods.activate(growth.expand(tiny_model(), "interleave", n_new=2), "mlp")
    groups = param_groups(model, router_lr_scale=3.0, new_lr_scale=10.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    assert [g["layer"] for g in groups] == [0, 1, 2, 3, 4, 5, None, None]
    assert [g["scale"] for g in groups[:6]] == [1.0, 1.0, 10.0, 1.0, 1.0, 10.0]   # new layers 2 and 5
    assert groups[-1]["params"] == [layer.router.weight for layer in model.layers] and groups[-1]["scale"] == 3.0


def test_unknown_flag_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--learning_rat", "3"])
    assert "unknown flag --learning_rat" in str(e.value)
    with pytest.raises(SystemExit) as e:
        parse_args(["--max_step", "3"])
    assert "did you mean --max_steps?" in str(e.value)
    with pytest.raises(SystemExit) as e:
        parse_args(["--capacity_end", "1.5"])
    assert "(0, 1]" in str(e.value)
    with pytest.raises(SystemExit) as e:
        parse_args(["--route_warmup", "0.5", "--route_anneal", "0.6"])
    assert "at most 1" in str(e.value)
