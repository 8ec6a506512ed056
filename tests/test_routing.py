"""Routing rules, labels and routed KV-cache decoding on tiny random models."""
import math

import pytest
from hypothesis import given, settings, strategies as st
import torch

import dlo
from conftest import cached_logits, full_logits, routed_tiny, tiny_model
from router import (Rule, Trace, add_selected, load_loss, make_labels, router_loss, select_threshold, select_topk,
                    similarity_labels)
from schedule import CapacitySchedule, dynamic_lr_scales
from model import Context, rope_tables
from sample import generate, generate_stream, kv_caches


ROUTINGS = [("mlp", {}), ("attn", {}), ("attn+mlp", {}), ("block", {}),
            ("block", {"layers": [1, 3], "attn_layers": [0, 2]})]   # inserted blocks whole, attention elsewhere


@pytest.mark.parametrize("route,layers", ROUTINGS + [("kv", {})])
@pytest.mark.parametrize("policy", ["compute", "drop", "window"])
@pytest.mark.parametrize("lengths", [(9, 21, 14), (21,)])
def test_cached_decode_equals_full_forward_with_routing(route, layers, policy, lengths):
    """Prefill then token-by-token decode of a ragged batch, or of one prompt (whose
    decode steps take Block.route_one), gives the logits of the full forward of each
    prompt alone, whatever is routed and whichever KV policy (a window of 4 positions)."""
    if route == "kv" and policy != "window":
        pytest.skip("K/V retention needs the window policy")
    model = routed_tiny(route, kv_policy=policy, kv_window=4, sink_tokens=1, **layers)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]
    rule = Rule(kind="threshold", threshold=0.5)
    for got, prompt in zip(cached_logits(model, prompts, rule), prompts):
        want = full_logits(model, prompt, rule)
        frac = float(torch.cat([t.sel.float().flatten() for t in model.route_trace]).mean())
        assert 0.2 < frac < 0.8, "the test must route some tokens and skip others"
        assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("route,layers", ROUTINGS[1:])
@pytest.mark.parametrize("policy", ["compute", "drop", "window"])
def test_gathered_attention_equals_the_masked_dense_pass(route, layers, policy):
    """The selected tokens' attention, run alone (gathered queries; under drop their K/V
    only), equals the labels' dense pass over every token, whose skipped rows are discarded:
    in training and evaluation (no cache), right-padded rows included."""
    model = routed_tiny(route, kv_policy=policy, kv_window=4, sink_tokens=1, **layers)
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 97, (3, 13), generator=g)
    valid = torch.arange(13)[None] < torch.tensor([[13], [7], [10]])
    with torch.no_grad():
        sparse, _ = model(idx, valid=valid, rule=Rule("threshold", 0.5))
        dense, _ = model(idx, valid=valid, rule=Rule("threshold", 0.5, similarity=True))
    assert (sparse - dense)[valid].abs().max() < 1e-5


def test_window_policy_hides_unkept_keys_beyond_the_window():
    """Under "window", a later query sees a token that skipped (or is not kept) only while
    fewer than kv_window positions separate them: perturbing that token's value at the
    last layer moves its output and the next two, and no later one."""
    model = dlo.activate(tiny_model(n_layer=2), "kv", layers=[1], kv_policy="window", kv_window=3)
    with torch.no_grad():
        model.layers[1].attn_router.weight.normal_(0, 0.5)
    idx = torch.randint(0, 97, (1, 16))
    model(idx)
    kept = model.route_trace[0].sel[0]
    j = int((~kept[:8]).nonzero()[0, 0])          # a token that is not kept, with many after it
    attn = model.layers[1].self_attn
    original = attn.qkv_proj.forward

    def perturbed(x):
        out = original(x).clone()
        out[:, j, -attn.sizes[2]:] += 5.0
        return out

    with torch.no_grad():
        base = model(idx)[0]
        attn.qkv_proj.forward = perturbed
        moved = model(idx)[0]
        attn.qkv_proj.forward = original
    changed = (moved - base).abs().amax(-1)[0] > 1e-6
    assert changed[j:j + 3].all() and not changed[j + 3:].any() and not changed[:j].any()


@torch.no_grad()
def test_retention_labels_are_the_attention_far_queries_give():
    """received_attention: a key that every far query attends to gets the most mass; keys
    with no query kv_window or more positions later get no label."""
    from cache import Keys, received_attention
    T, window = 8, 3
    k = torch.zeros(1, 1, T, 4)
    k[0, 0, 2] = torch.tensor([4.0, 0, 0, 0])      # key 2 matches every query
    q = torch.tensor([1.0, 0, 0, 0]).expand(1, 2, T, 4)
    keys = Keys(k, k, torch.ones(1, T, dtype=torch.bool), torch.arange(T))
    mass, far = received_attention(q, keys, window)
    assert far[0].tolist() == [True] * (T - window) + [False] * window
    assert int(mass[0].argmax()) == 2 and mass[0, 2] > 0.5 and (mass[0, T - window:] == 0).all()


@pytest.mark.parametrize("route", ["attn", "attn+mlp", "block"])
def test_drop_policy_writes_no_kv_for_tokens_that_skip_attention(route):
    model = routed_tiny(route, kv_policy="drop")
    idx = torch.randint(0, 97, (1, 12))
    with kv_caches(model, 1, 12):
        model(idx, input_pos=torch.arange(12))
        for t in model.route_trace:
            if t.part == "mlp":
                continue
            cache = model.layers[t.layer].self_attn.kv_cache
            skipped = ~t.sel[0]
            assert skipped.any() and t.sel[0].any()
            assert torch.equal(cache.valid[0], t.sel[0])               # never attended to
            assert cache.k[0][:, skipped].abs().sum() == 0             # never stored
            assert cache.v[0][:, skipped].abs().sum() == 0


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
    sel = model.route_trace[0].sel[0]
    j = int((~sel[:-1]).nonzero()[0, 0])        # a skipped token with later tokens after it
    base = model(idx)[0]
    attn = model.layers[1].self_attn
    original = attn.qkv_proj.forward

    def perturbed(x):                             # change only token j's value vector
        out = original(x).clone()
        if out.size(1) > j:
            out[:, j, -attn.sizes[2]:] += 5.0
        return out

    attn.qkv_proj.forward = perturbed
    moved = model(idx)[0]
    attn.qkv_proj.forward = original
    assert (moved - base).abs().max() < 1e-6


def test_add_selected_runs_only_the_selected_rows_and_matches_the_dense_label_path():
    g = torch.Generator().manual_seed(0)
    base, w, gate = torch.randn(2, 5, 8, generator=g), torch.randn(8, 8, generator=g), torch.rand(2, 5, generator=g)
    sel = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    ran = []
    branch = lambda idx: ran.append(idx) or base.reshape(-1, 8)[idx] @ w
    sparse, no_sim = add_selected(base, sel, gate, branch, similarity=False)
    assert no_sim is None and ran[0].tolist() == [0, 2, 8, 9]          # the skipped rows never ran
    assert torch.equal(sparse[~sel], base[~sel])
    torch.testing.assert_close(sparse, base + (sel * gate)[..., None] * (base @ w))
    dense, sim = add_selected(base, sel, gate, branch, similarity=True)  # the label rules' path
    torch.testing.assert_close(dense, sparse)
    torch.testing.assert_close(sim, torch.cosine_similarity(base, base + base @ w, dim=-1))
    nothing = torch.zeros_like(sel)
    assert add_selected(base, nothing, gate, branch, similarity=False)[0] is base and len(ran) == 2


def test_topk_keeps_ties_and_never_selects_padding():
    p = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.5, 0.99, 0.2, 0.3]])
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    sel = select_topk(p, valid, 0.3)                           # k = ceil(0.3 * 7) = 3
    assert sel.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert select_topk(torch.full((2, 3), 0.5), torch.ones(2, 3, dtype=torch.bool), 0.1).all()
    p = torch.tensor([[0.4, 0.5, 0.6]])
    assert select_threshold(p, torch.ones(1, 3, dtype=torch.bool), 0.5).tolist() == [[False, True, True]]


def traces_of(sims, valids):
    return [Trace(i, torch.zeros_like(s), v.clone(), v, v, s) for i, (s, v) in enumerate(zip(sims, valids))]


def test_cos_global_labels_hit_the_global_capacity():
    g = torch.Generator().manual_seed(0)
    sims = [torch.rand(3, 20, generator=g) for _ in range(5)]
    valids = [torch.rand(3, 20, generator=g) > 0.2 for _ in range(5)]
    n = sum(int(v.sum()) for v in valids)
    for cap in (1.0, 0.9, 0.5, 0.13):
        labels, frac = similarity_labels(traces_of(sims, valids), "cos-global", cap)
        assert sum(int(l.sum()) for l in labels) == math.ceil(cap * n)   # distinct sims: exact
        assert all(not (l & ~v).any() for l, v in zip(labels, valids))
        weighted = sum(float(f) * int(v.sum()) for f, v in zip(frac, valids)) / n
        assert abs(weighted - math.ceil(cap * n) / n) < 1e-6
        # labelled tokens are the least similar ones: every 1 is below every 0
        ones = torch.cat([s[l] for s, l in zip(sims, labels)])
        zeros = torch.cat([s[v & ~l] for s, v, l in zip(sims, valids, labels)])
        assert zeros.numel() == 0 or ones.max() < zeros.min()


def test_cos_global_labels_a_zero_branch_skip():
    """A layer whose branch returns exactly 0 has s = 1.0 for every token: the tie at the
    cut is labelled skip (0), even if that leaves the labels under capacity; DLO's official
    cut (ties run) labels every pair 1 here."""
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(2, 10, dtype=torch.bool)
    sims = [torch.rand(2, 10, generator=g) * 0.5, torch.ones(2, 10), torch.rand(2, 10, generator=g) * 0.5]
    labels, frac = similarity_labels(traces_of(sims, [valid] * 3), "cos-global", 0.9)
    assert not labels[1].any() and labels[0].all() and labels[2].all()
    assert frac.tolist() == [1.0, 0.0, 1.0]
    official, _ = similarity_labels(traces_of(sims, [valid] * 3), "cos-global", 0.9, ties="run")
    assert all(l.all() for l in official)


def test_cos_labels_per_layer():
    sims = [torch.tensor([[0.1, 0.9, 0.5, 0.7]])]
    labels, _ = similarity_labels(traces_of(sims, [torch.ones(1, 4, dtype=torch.bool)]), "cos", 0.5)
    assert labels[0].tolist() == [[True, False, True, False]]


def test_router_loss_is_bce_on_logits_over_routable_tokens():
    logit = torch.tensor([[0.0, 2.0, -1.0]], requires_grad=True)
    routable = torch.tensor([[True, True, False]])
    trace = Trace(0, logit, routable, torch.ones(1, 3, dtype=torch.bool), routable)
    labels = [torch.tensor([[True, False, True]])]
    loss = router_loss([trace], labels, n_route=2)
    want = (math.log(2) + math.log(1 + math.exp(2.0))) / 2
    assert abs(float(loss.detach()) - want) < 1e-6
    loss.backward()
    assert logit.grad[0, 2] == 0   # a sink or padding token takes no part


def test_load_loss_has_the_gradient_of_its_formula():
    """R = alpha * sum_j F_j * G_j: F_j, the hard fraction run, is a constant; G_j, the mean
    p over routable tokens, carries the gradient, so dR/dlogit_i = alpha F_j p_i (1 - p_i) / n_j."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 5, generator=g, requires_grad=True) for _ in range(2)]
    routable = torch.ones(2, 5, dtype=torch.bool)
    routable[1, 3:] = False
    traces = [Trace(j, l, l.detach() > 0, routable, routable) for j, l in enumerate(logits)]
    load_loss(traces, alpha=0.01).backward()
    for l in logits:
        n = int(routable.sum())
        ran = float(((l.detach() > 0) & routable).sum()) / n
        p = torch.sigmoid(l.detach())
        torch.testing.assert_close(l.grad, 0.01 * ran * p * (1 - p) * routable / n)


def test_router_loss_is_autocast_safe():
    """CUDA autocast raises on binary_cross_entropy by design; the loss must come from
    logits and be computed in fp32 even inside an autocast region."""
    logit = torch.randn(2, 5, dtype=torch.bfloat16).float().requires_grad_()
    v = torch.ones(2, 5, dtype=torch.bool)
    trace = Trace(0, logit, v, v, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = router_loss([trace], [torch.rand(2, 5) > 0.5], n_route=10)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    import router
    assert "binary_cross_entropy(" not in open(router.__file__).read().replace("binary_cross_entropy_with", "")


def test_capacity_schedule_warmup_anneal_and_split():
    s = CapacitySchedule(3, start=1.0, end=0.8, warmup=10, anneal=20)
    assert [s.global_capacity(t) for t in (0, 9, 10, 20, 30, 99)] == [1.0, 1.0, 1.0, 0.9, 0.8, 0.8]
    assert s.capacities(25).tolist() == [s.global_capacity(25)] * 3        # no labels seen yet: uniform
    s.update(torch.tensor([1.0, 0.4, 1.0], dtype=torch.float64))                              # labels skip only in layer 1
    assert s.capacities(5).tolist() == [1.0, 1.0, 1.0]                     # warm-up: nothing skipped
    caps = s.capacities(30)
    assert caps.tolist()[0] == 1.0 and caps.tolist()[2] == 1.0             # "run all" layers keep 1.0
    assert abs(float(caps.mean()) - 0.8) < 1e-12 and abs(float(caps[1]) - 0.4) < 1e-12
    official = CapacitySchedule(3, start=1.0, end=0.8, warmup=0, anneal=20, split="rescale")
    official.update(torch.tensor([1.0, 0.4, 1.0], dtype=torch.float64))
    assert official.capacities(10).tolist()[0] < 1.0 or official.capacities(10).tolist()[1] > 0.4
    assert abs(sum(dynamic_lr_scales([0.5, 1.0, 0.9])) / 3 - 1.0) < 1e-12


def test_sinks_never_skip():
    """The first r positions of each row run every routed layer under top-k in training,
    the threshold at inference, and in cached decode; they take no part in the top-k count."""
    model = dlo.activate(tiny_model(), "mlp", sink_tokens=2)
    with torch.no_grad():
        for layer in model.layers:
            layer.router.weight.normal_(0, 0.5)
    idx = torch.randint(0, 97, (3, 12))
    valid = torch.arange(12)[None] < torch.tensor([[12], [7], [1]])
    for rule in (Rule("topk", capacity=torch.full((4,), 0.1, dtype=torch.float64)), Rule("threshold", 1.01)):
        model(idx, valid=valid, rule=rule)
        for t in model.route_trace:
            assert bool(t.sel[:, :2][valid[:, :2]].all())
            assert not (t.sel & ~valid).any()
            routed = int((t.sel & t.routable).sum())
            assert routed == (0 if rule.kind == "threshold" else math.ceil(0.1 * int(t.routable.sum())))
    generate(model, [[5]], 4, rule=Rule("threshold", 1.01))   # a one-token prompt: decode positions 1, 2, 3
    assert model.route_trace[0].sel.tolist() == [[False]]         # the last decode step, position 3
    stream = generate_stream(model, [[5]], 2, rule=Rule("threshold", 1.01))
    assert next(stream).ran.all()                                  # the prompt token (position 0) ran all
    assert next(stream).ran.all()                                  # position 1 is a sink too


def test_labels_follow_the_mode():
    g = torch.Generator().manual_seed(2)
    v = torch.ones(2, 6, dtype=torch.bool)
    sims = [torch.rand(2, 6, generator=g) for _ in range(2)]
    traces = traces_of(sims, [v, v])
    labels, frac = make_labels(traces, "self", 0.5)
    assert frac is None and all(torch.equal(l, t.sel) for l, t in zip(labels, traces))


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
    rope = rope_tables(positions, 8, 10000.0)
    valid = torch.ones(1, T, dtype=torch.bool)
    rule = Rule("topk", capacity=torch.tensor([0.25], dtype=torch.float64))
    with torch.no_grad():
        out, (trace,) = block(x, Context(rope, valid, valid, None, rule, causal_only=True), 0)
        p = trace.p[0]
        top = p.topk(4).indices.sort().values                         # k = 0.25 * 16, causal order
        assert trace.sel[0].nonzero().squeeze(1).tolist() == top.tolist()
        dense = dlo.activate(tiny_model(), "none").layers[1]          # the same weights, no router
        dense.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("router")})
        sub = x[:, top]
        sub_valid = torch.ones(1, 4, dtype=torch.bool)
        sub_rope = rope_tables(positions[:, top], 8, 10000.0)
        sub_out, _ = dense(sub, Context(sub_rope, sub_valid, sub_valid, None, rule, causal_only=True), 0)
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
