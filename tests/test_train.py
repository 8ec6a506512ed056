"""Training maths: gradient accumulation is exact, and the loss pieces are what they claim."""
import pytest
import torch

import dlo
from conftest import tiny_model
from router import Rule
from train import TrainConfig, micro_losses, param_groups, parse_args


def routed_tiny(route="mlp"):
    model = dlo.activate(tiny_model(), route)
    torch.manual_seed(7)
    with torch.no_grad():
        for layer in model.layers:
            layer.router.weight.normal_(0, 0.5)
    return model.train()


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


@pytest.mark.parametrize("route", ["mlp", "block"])
def test_accumulated_micro_batches_equal_one_big_batch(route):
    """Threshold rule + `self` labels do not depend on the batch, so k micro-batches must
    give exactly the loss and gradients of one batch k times as large."""
    cfg = TrainConfig(labels="self", train_rule="threshold")
    rule = Rule("threshold", 0.5)
    x, y, valid = batch(0)
    n_routed = len(routed_tiny(route).config.routed_ids())
    n_lm, n_route = int((y != -1).sum()), int(valid.sum()) * n_routed

    def run(chunks):
        model = routed_tiny(route)
        total = 0.0
        for sl in chunks:
            loss, _, _ = micro_losses(model, model, x[sl], y[sl], valid[sl], rule, cfg, 1.0, n_lm, n_route)
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
    model = routed_tiny()
    x, y, valid = batch(1)
    n_lm, n_route = int((y != -1).sum()), int(valid.sum()) * 4
    rule = Rule("topk", capacity=(0.5,) * 4, similarity=True)
    loss, lm, caps = micro_losses(model, model, x, y, valid, rule, TrainConfig(labels="cos-global"),
                                  0.7, n_lm, n_route)
    assert float(loss) > float(lm) and caps is not None and abs(sum(caps) / 4 - 0.7) < 0.05
    loss, lm, _ = micro_losses(model, model, x, y, valid, rule, TrainConfig(labels="none"), 0.7, n_lm, n_route)
    assert float(loss) == float(lm)


def test_param_groups_cover_each_trainable_parameter_once():
    model = routed_tiny()
    groups = param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    assert [g["layer"] for g in groups] == [0, 1, 2, 3, None, None]
    assert groups[-1]["params"] == [layer.router.weight for layer in model.layers]   # the routers, on their own


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
