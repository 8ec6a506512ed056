"""Expansion, routing and skipping invariants on tiny random models."""
import pytest
import torch

import dlo
import growth
import methods
from conftest import tiny_model
from model import Context, rope_tables
from router import Rule

ALL = Rule(kind="topk", capacity=(1.0,) * 64)


def logits(model, idx, rule=None):
    return model(idx, rule=rule)[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("placement,kw", [
    ("interleave", dict(n_new=2)), ("interleave", dict(n_new=3)), ("tli", dict(every_k=1)),
    ("tli", dict(every_k=3)), ("index", dict(after=[-1, 0, 0, 3])),
])
def test_zeros_expansion_is_identity(arch, placement, kw):
    model = tiny_model(arch=arch, bias=arch == "gpt2")
    idx = torch.randint(0, 97, (2, 13))
    big = growth.expand(model, placement, init="zeros", **kw)
    assert big.config.n_layer > model.config.n_layer
    assert (logits(big, idx) - logits(model, idx)).abs().max() < 1e-5


def test_interleave_positions_follow_dlo():
    plan = dlo.interleave_plan(30, 10)
    new = [j for j, (_, init) in enumerate(plan) if init]
    assert len(plan) == 40 and new == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39]   # last at the very end
    assert [plan[j][0] for j in new] == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]


def test_stack_trims_the_seam():
    model = tiny_model(n_layer=6)
    big = growth.expand(model, "stack", trim=2)
    sources = [0, 1, 2, 3, 2, 3, 4, 5]
    assert big.config.n_layer == 8 and big.config.new_layers == (4, 5, 6, 7)
    for j, i in enumerate(sources):
        assert torch.equal(big.layers[j].mlp.gate_up_proj.weight, model.layers[i].mlp.gate_up_proj.weight)


def test_inits_produce_the_promised_tensors():
    model = tiny_model()
    a, b = model.layers[2].state_dict(), model.layers[1].state_dict()
    copy = growth.expand(model, "index", after=[2], init="copy").layers[3].state_dict()
    lin = growth.expand(model, "index", after=[2], init="merge-linear").layers[3].state_dict()
    sl = growth.expand(model, "index", after=[2], init="merge-slerp").layers[3].state_dict()
    rnd = growth.expand(model, "index", after=[2], init="random").layers[3].state_dict()
    for k in a:
        assert torch.equal(copy[k], a[k])
        assert torch.allclose(lin[k], (a[k] + b[k]) / 2)
        assert torch.equal(sl[k], growth.slerp(b[k], a[k]))
    assert torch.equal(rnd["input_layernorm.weight"], torch.ones(32))
    assert 0.01 < float(rnd["mlp.gate_up_proj.weight"].std()) < 0.03


def test_slerp_walks_the_great_circle():
    u, v = torch.nn.functional.normalize(torch.randn(2, 50, dtype=torch.float64), dim=1)
    mid = growth.slerp(u, v)
    assert abs(float(mid.norm()) - 1) < 1e-9                     # stays on the sphere
    assert abs(float(mid @ u) - float(mid @ v)) < 1e-9           # halfway in angle
    assert torch.allclose(growth.slerp(u, u * 1.0000001), u)         # parallel: lerp fallback


def test_frozen_layers_get_no_gradient():
    model = growth.expand(tiny_model(), "interleave", n_new=2, init="zeros", freeze_original=True)
    model.train()
    idx = torch.randint(0, 97, (2, 9))
    _, loss = model(idx, idx)
    loss.backward()
    new = set(model.config.new_layers)
    for j, layer in enumerate(model.layers):
        for name, p in layer.named_parameters():
            if j in new:
                assert p.grad is not None, name
            else:
                assert p.grad is None and not p.requires_grad, name
    assert model.embed_tokens.weight.grad is None


def test_impossible_expansions_are_clear_errors():
    model = tiny_model()
    with pytest.raises(dlo.ExpansionError, match="new layers"):
        growth.expand(model, "interleave", n_new=5)
    with pytest.raises(dlo.ExpansionError, match="K="):
        growth.expand(model, "tli", every_k=-1)
    with pytest.raises(dlo.ExpansionError, match="out of range"):
        growth.expand(model, "index", after=[7])
    with pytest.raises(dlo.ExpansionError, match="seam"):
        growth.expand(model, "stack", trim=4)
    with pytest.raises(dlo.ExpansionError, match="init"):
        growth.expand(model, "interleave", n_new=1, init="ones")


@pytest.mark.parametrize("route,policy", [(r, p) for r in ("mlp", "attn", "attn+mlp", "block")
                                          for p in ("compute", "drop", "window")] + [("kv", "window")])
def test_routing_every_token_equals_dense(route, policy):
    dense = growth.expand(tiny_model(), "interleave", n_new=2)
    others = [] if route == "kv" else [i for i in range(6) if i not in dense.config.new_layers]
    routed = methods.activate(dense, route, kv_policy=policy, kv_window=2, layers=dense.config.new_layers,
                          attn_layers=others)
    idx = torch.randint(0, 97, (3, 11))
    want = logits(dense, idx)
    assert (logits(routed, idx, ALL) - want).abs().max() < 1e-5          # top-k at init keeps all (ties)
    assert (logits(routed, idx, Rule(kind="threshold", threshold=0.5)) - want).abs().max() < 1e-5
    assert (logits(routed, idx, Rule(kind="all", similarity=True)) - want).abs().max() < 1e-5


def test_drop_layers_removes_them():
    model = tiny_model()
    small = growth.drop_layers(model, [1, 2])
    assert small.config.n_layer == 2
    assert torch.equal(small.layers[1].mlp.gate_up_proj.weight, model.layers[3].mlp.gate_up_proj.weight)


def test_dropping_routed_layers_keeps_the_thresholds_of_the_others():
    """A calibrated model keeps one threshold per surviving routed part; dropping every
    routed layer leaves a dense model, not one routed everywhere."""
    grown = growth.expand(tiny_model(), "interleave", n_new=2)
    new = grown.config.new_layers
    model = methods.activate(grown, "attn+mlp", layers=new, attn_layers=[0, 1], sink_tokens=1)
    model.config.route_threshold = tuple(0.1 * (i + 1) for i in range(len(model.config.route_slots())))
    model.config.__post_init__()
    kept = dict(zip(model.config.route_slots(), model.config.route_threshold))
    small = growth.drop_layers(model, [new[0]])
    moved = {0: 0, 1: 1, new[1]: new[1] - 1}
    assert dict(zip(small.config.route_slots(), small.config.route_threshold)) == {
        (moved[i], part): t for (i, part), t in kept.items() if i != new[0]}
    base = growth.drop_layers(model, new)
    assert base.config.route == "none" and base.config.route_slots() == ((0, "attn"), (1, "attn"))
    assert growth.drop_layers(methods.activate(grown, "mlp", layers=new), new).config.route_slots() == ()


def test_shortgpt_drops_the_lowest_measured_bi():
    model = tiny_model(n_layer=6)
    with torch.no_grad():   # make layers 2 and 4 near-identities: their BI must be lowest
        for i in (2, 4):
            model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
            model.layers[i].mlp.down_proj.weight.mul_(1e-3)
    x = torch.randint(0, 97, (3, 12))
    valid = torch.ones(3, 12, dtype=torch.bool)
    small, bi = growth.shortgpt(model, [(x, valid)], 2)
    assert set(sorted(range(6), key=lambda i: bi[i])[:2]) == {2, 4}
    assert small.config.n_layer == 4
    kept = [0, 1, 3, 5]
    for j, i in enumerate(kept):
        assert torch.equal(small.layers[j].mlp.gate_up_proj.weight, model.layers[i].mlp.gate_up_proj.weight)
    # BI is measured, not assumed: it matches a hand computation for layer 0
    with torch.no_grad():
        h = model.embed_tokens(x)
        rope = rope_tables(torch.arange(12).expand(3, 12), 8, 10000.0)
        out, _ = model.layers[0](h, Context(rope, valid, None, causal_only=True))
    manual = 1 - float(torch.nn.functional.cosine_similarity(h, out, dim=-1).mean())
    assert abs(bi[0] - manual) < 1e-6
