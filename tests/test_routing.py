"""Routing rules, labels and routed KV-cache decoding on tiny random models."""
import math

import pytest
from hypothesis import given, settings, strategies as st
import torch

import dlo
from conftest import tiny_model
from router import (Rule, annealed_capacity, dynamic_lr_scales, rescale_capacities, router_bce,
                    select_threshold, select_topk, similarity_labels)
from model import rope_tables
from test_model import cached_logits, full_logits


def routed_model(route, policy, seed=0):
    model = dlo.activate(tiny_model(seed=seed), route, kv_policy=policy)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.layers:
            layer.router.weight.normal_(0, 0.5)   # about half the tokens run each layer
    return model


@pytest.mark.parametrize("route,policy", [("mlp", "compute"), ("block", "compute"), ("block", "drop")])
def test_cached_decode_equals_full_forward_with_routing(route, policy):
    model = routed_model(route, policy)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 21, 14)]
    rule = Rule(kind="threshold", threshold=0.5)
    for got, prompt in zip(cached_logits(model, prompts, rule), prompts):
        want = full_logits(model, prompt, rule)
        frac = float(torch.cat([t["sel"].float().flatten() for t in model.route_trace]).mean())
        assert 0.2 < frac < 0.8, "the test must route some tokens and skip others"
        assert (got - want).abs().max() < 1e-4


def test_drop_policy_stores_and_attends_no_skipped_kv():
    model = routed_model("block", "drop")
    idx = torch.randint(0, 97, (1, 12))
    model.setup_caches(1, 12)
    model(idx, input_pos=torch.arange(12))
    for t in model.route_trace:
        cache = model.layers[t["layer"]].self_attn.kv_cache
        skipped = ~t["sel"][0]
        assert torch.equal(cache.valid[0], t["sel"][0])            # never attended to
        assert cache.k[0][:, skipped].abs().sum() == 0             # never stored
        assert cache.v[0][:, skipped].abs().sum() == 0
    model.clear_caches()


def test_skipped_token_kv_is_not_attended_under_drop():
    """Change the input embedding of a token that skips layer 1; outputs of later tokens
    may only change through layers that token ran, so with all other layers dense and
    only layer 1 routed (and the token skipping it), perturbing its K/V at layer 1 alone
    must not move anything."""
    model = dlo.activate(tiny_model(), "block", layers=[1], kv_policy="drop")
    with torch.no_grad():
        model.layers[1].router.weight.normal_(0, 0.5)
    idx = torch.randint(0, 97, (1, 12))
    model(idx)
    sel = model.route_trace[0]["sel"][0]
    j = int((~sel[:-1]).nonzero()[0, 0])        # a skipped token with later tokens after it
    base = model(idx)[0]
    attn = model.layers[1].self_attn
    original = attn.v_proj.forward

    def perturbed(x):                             # change only token j's value vector
        out = original(x).clone()
        if out.size(1) > j:
            out[:, j] += 5.0
        return out

    attn.v_proj.forward = perturbed
    moved = model(idx)[0]
    attn.v_proj.forward = original
    assert (moved - base).abs().max() < 1e-6


def test_topk_keeps_ties_and_never_selects_padding():
    p = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.5, 0.99, 0.2, 0.3]])
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    sel = select_topk(p, valid, 0.3)                           # k = ceil(0.3 * 7) = 3
    assert sel.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert select_topk(torch.full((2, 3), 0.5), torch.ones(2, 3, dtype=torch.bool), 0.1).all()
    p = torch.tensor([[0.4, 0.5, 0.6]])
    assert select_threshold(p, torch.ones(1, 3, dtype=torch.bool), 0.5).tolist() == [[False, True, True]]


def test_cos_global_labels_hit_the_global_capacity():
    g = torch.Generator().manual_seed(0)
    sims = [torch.rand(3, 20, generator=g) for _ in range(5)]
    valids = [torch.rand(3, 20, generator=g) > 0.2 for _ in range(5)]
    n = sum(int(v.sum()) for v in valids)
    for cap in (1.0, 0.9, 0.5, 0.13):
        labels, caps = similarity_labels(sims, valids, "cos-global", global_capacity=cap)
        assert sum(int(l.sum()) for l in labels) == math.ceil(cap * n)   # distinct sims: exact
        assert all(not (l & ~v).any() for l, v in zip(labels, valids))
        weighted = sum(c * int(v.sum()) for c, v in zip(caps, valids)) / n
        assert abs(weighted - math.ceil(cap * n) / n) < 1e-9
        # labelled tokens are the least similar ones: every 1 is below every 0
        ones = torch.cat([s[l] for s, l in zip(sims, labels)])
        zeros = torch.cat([s[v & ~l] for s, v, l in zip(sims, valids, labels)])
        assert zeros.numel() == 0 or ones.max() < zeros.min()


def test_cos_labels_per_layer():
    sims = [torch.tensor([[0.1, 0.9, 0.5, 0.7]])]
    labels, _ = similarity_labels(sims, [torch.ones(1, 4, dtype=torch.bool)], "cos", capacities=[0.5])
    assert labels[0].tolist() == [[True, False, True, False]]


def test_bce_capacity_schedules():
    p = [torch.tensor([[0.5, 0.5]])]
    total, count = router_bce(p, [torch.tensor([[True, False]])], [torch.ones(1, 2, dtype=torch.bool)])
    assert count == 2 and abs(float(total) - 2 * math.log(2)) < 1e-6
    assert annealed_capacity(0) == 1.0 and abs(annealed_capacity(500) - 0.95) < 1e-12
    assert annealed_capacity(5000) == 0.9
    caps = rescale_capacities([0.8, 1.0, 0.9], 0.8)
    assert abs(sum(caps) / 3 - 0.8) < 1e-9
    assert abs(sum(dynamic_lr_scales([0.5, 1.0, 0.9])) / 3 - 1.0) < 1e-12


def test_mod_topk_routes_exactly_topk_at_original_positions():
    """Mixture-of-Depths: the top-k tokens of a layer form a shorter sequence, in causal
    order, at their own RoPE positions; out = x + r * (block(x) - x) for them (the
    residual added once), and the others pass unchanged."""
    model = dlo.activate(tiny_model(), "block", layers=[1], kv_policy="drop", route_gate="mod")
    with torch.no_grad():
        model.layers[1].router.weight.normal_(0, 0.5)
    block = model.layers[1]
    T = 16
    x = torch.randn(1, T, 32)
    positions = torch.arange(T)[None]
    rope = rope_tables(positions, 8, 10000.0, x.dtype)
    valid = torch.ones(1, T, dtype=torch.bool)
    rule = Rule("topk", capacity=(0.25,))
    with torch.no_grad():
        out, trace = block(x, rope, valid, None, rule, 0)
        p = trace["p"][0]
        top = p.topk(4).indices.sort().values                         # k = 0.25 * 16, causal order
        assert trace["sel"][0].nonzero().squeeze(1).tolist() == top.tolist()
        dense = dlo.activate(tiny_model(), "none").layers[1]          # the same weights, no router
        dense.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("router")})
        sub = x[:, top]
        sub_out, _ = dense(sub, rope_tables(positions[:, top], 8, 10000.0, x.dtype),
                           torch.ones(1, 4, dtype=torch.bool), None, rule, 0)
        want = x.clone()
        want[:, top] = sub + p[top][None, :, None] * (sub_out - sub)
    assert (out - want).abs().max() < 1e-5


@st.composite
def routed_batch(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    # few distinct values, so ties are common
    p = torch.tensor(draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]), min_size=B * T, max_size=B * T)))
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T)))
    return p.view(B, T), valid.view(B, T), draw(st.floats(0.0, 1.0))


@settings(max_examples=300, deadline=None)
@given(routed_batch())
def test_topk_property_capacity_ties_padding(batch):
    p, valid, capacity = batch
    sel = select_topk(p, valid, capacity)
    n, k = int(valid.sum()), math.ceil(capacity * int(valid.sum()) - 1e-9)
    assert not (sel & ~valid).any()                                   # padding is never selected
    assert int(sel.sum()) >= min(k, n)                                # the capacity is honoured
    if k > 0 and n > 0:
        cut = p[sel].min()
        assert not (valid & ~sel & (p >= cut)).any()                 # ties at the cut are kept
        assert int((valid & (p > cut)).sum()) < k                     # and nothing beyond them
    else:
        assert not sel.any()


@settings(max_examples=200, deadline=None)
@given(routed_batch())
def test_threshold_property(batch):
    p, valid, threshold = batch
    sel = select_threshold(p, valid, threshold)
    assert torch.equal(sel, valid & (p >= threshold))
