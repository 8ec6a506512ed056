"""Training maths: gradient accumulation is exact, the loss pieces are what they claim,
the frozen router warm-up trains the routers alone, and flags fail clearly."""
import pytest
import torch

import dlo
from conftest import routed_tiny, tiny_model
from router import Rule
from train import TrainConfig, micro_loss, param_groups, parse_args


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


def test_frozen_warmup_trains_the_routers_alone():
    model = routed_tiny().train()
    x, y, valid = batch(2)
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[2] == "router" if name.startswith("layers.") else False)
    rule = Rule("topk", capacity=torch.ones(4, dtype=torch.float64), similarity=True)
    loss, lm, _ = micro_loss(model, model, x, y, valid, rule, TrainConfig(labels="cos-global"), 0.8,
                             int((y != -1).sum()), int(valid.sum()) * 4, frozen=True)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {f"layers.{i}.router.weight" for i in range(4)}
    assert float(loss.detach()) != float(lm.detach())


def test_param_groups_cover_each_trainable_parameter_once():
    model = dlo.activate(dlo.expand(tiny_model(), "interleave", n_new=2), "mlp")
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
