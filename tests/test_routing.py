"""Routing rules, labels and routed KV-cache decoding on tiny random models.

conftest.routed_tiny makes every decision show in the logits: a wrong decision, gate,
window or RoPE position moves them by 1e-2..4e-1, while cached decode matches the full
forward to ~2e-7. The tolerances below sit orders of magnitude from both."""
import math

import pytest
from hypothesis import given, settings, strategies as st
import torch

import methods
from conftest import (KINDS, KIND_POLICIES, LENGTHS, TOL, assert_decode_equals_full_forward, cached_logits,
                      full_logits, routed, routed_tiny, tiny_model)
from controls import ControlRule, mask_rule
from dlo import RoutedContext, add_selected
from mod import PredictorRule, load_loss, make_labels, router_loss
from model import Context, rope_tables
from router import Rule, Trace, select_threshold, select_topk, similarity_labels
from schedule import CapacitySchedule, dynamic_lr_scales
from sample import generate, generate_stream, kv_caches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind,policy", KIND_POLICIES)
@pytest.mark.parametrize("page", [0, 4])
def test_cached_decode_equals_full_forward_with_routing(kind, policy, page):
    """Prefill then token-by-token decode, of one prompt and of a ragged batch, makes the
    decisions and gives the logits of each prompt's full forward alone, for every routed
    kind under every K/V policy (a window of 4 positions), with the static cache (page 0)
    and the compact one (cache.py, pages of 4 entries)."""
    model = routed(kind, policy)
    assert_decode_equals_full_forward(model, page, lambda: Rule("threshold", 0.5))


def random_decisions(seed, capacity, prompts):
    """What Rule("random") decides in cached_logits' run of `prompts`: each forward draws one
    (B, T) block per routed part, in slot order, from the rule's generator; a part runs
    where its draw < capacity. (n_parts, B, P)."""
    g = torch.Generator().manual_seed(seed)
    B, P = len(prompts), max(len(p) for p in prompts)
    chunks = [P // 2] + [1] * (P - P // 2)
    draws = [[torch.rand(B, T, generator=g) for _ in capacity] for T in chunks]
    return torch.stack([torch.cat([d[s] for d in draws], 1) for s in range(len(capacity))]) < capacity[:, None, None]


# each rule over every kind it applies to ("kv" has no gate and ignores the predictor),
# under a policy where a skipped attention's K/V is handled apart ("mlp" skips none)
GATED = [kind for kind in KINDS if kind != "kv"]
RULE_CASES = ([("mod", kind, "compute" if kind == "mlp" else "drop") for kind in GATED]
              + [("predictor", kind, "compute" if kind == "mlp" else "window") for kind in GATED]
              + [("static", kind, {"mlp": "compute", "kv": "window"}.get(kind, "drop")) for kind in KINDS]
              + [("random", kind, {"mlp": "compute"}.get(kind, "window")) for kind in KINDS])


@pytest.mark.parametrize("name,kind,policy", RULE_CASES)
@pytest.mark.parametrize("page", [0, 4])
def test_cached_decode_equals_full_forward_under_every_rule(name, kind, policy, page):
    """The same for MoD's gate (the branch times p), MoD's predictor deciding, static
    pruning (whole parts) and random routing. The random rule draws in the order of its
    forwards, so the full forward's reference replays the decode's draws as a mask rule:
    the decisions and the logits must then agree exactly."""
    options = {"mod": {"route_gate": "mod"}, "predictor": {"route_predictor": True}}.get(name, {})
    model = routed(kind, policy, **options)
    n = len(model.config.route_slots())
    reference = None
    if name == "static":
        make_rule = lambda: ControlRule("static", capacity=torch.tensor([1.0, 0.0] * n)[:n])
    elif name == "random":
        capacity = torch.full((n,), 0.5)
        make_rule = lambda: ControlRule("random", capacity=capacity, generator=torch.Generator().manual_seed(5))
        reference = lambda prompts, b: mask_rule(list(
            random_decisions(5, capacity, prompts)[:, b, -len(prompts[b]):][:, None]))
    else:
        make_rule = lambda: (PredictorRule if name == "predictor" else Rule)("threshold", 0.5)
    assert_decode_equals_full_forward(model, page, make_rule, reference)
    if name == "predictor":   # the predictor decides, not the router
        full_logits(model, list(range(13)), make_rule())
        for t in model.route_trace:
            assert torch.equal(t.sel & t.routable, (torch.sigmoid(t.pred_logit) >= 0.5) & t.routable)
        assert any(not torch.equal(t.sel, (t.p >= 0.5) | ~t.routable) for t in model.route_trace)


@pytest.mark.parametrize("route", ["mlp", "attn", "attn+mlp", "block", "kv"])
def test_zero_routers_run_every_token_in_every_path(route):
    """Zero-initialised routers give p = 0.5 exactly, and a tie at the threshold runs (as
    top-k keeps ties): the full forward, ragged cached decode and batch-1 decode (whose
    decision batch-1 decode takes on the host) all run every token and give the dense
    model's logits. A tie that skips drops whole branches: the logits move by >= 7e-2."""
    model = routed_tiny(route, scale=0.0, kv_policy="window" if route == "kv" else "drop", kv_window=4)
    dense = methods.activate(model, "none")
    g = torch.Generator().manual_seed(3)
    for lengths in LENGTHS:
        prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]
        got, sel = cached_logits(model, prompts, Rule("threshold", 0.5), decisions=True)
        for b, prompt in enumerate(prompts):
            assert sel[b].all()
            assert (got[b] - full_logits(dense, prompt)).abs().max() < TOL
            assert (full_logits(model, prompt, Rule("threshold", 0.5)) - full_logits(dense, prompt)).abs().max() < TOL


@pytest.mark.parametrize("kind,policy", [(k, p) for k, p in KIND_POLICIES if k not in ("mlp", "kv")])
def test_gathered_attention_equals_the_masked_dense_pass(kind, policy):
    """The selected tokens' attention, run alone (gathered queries; under drop their K/V
    only), equals the labels' dense pass over every token, whose skipped rows are discarded:
    in training and evaluation (no cache), right-padded rows included."""
    model = routed(kind, policy)
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 97, (3, 13), generator=g)
    valid = torch.arange(13)[None] < torch.tensor([[13], [7], [10]])
    with torch.no_grad():
        sparse, _ = model(idx, valid=valid, rule=Rule("threshold", 0.5))
        dense, _ = model(idx, valid=valid, rule=Rule("threshold", 0.5, similarity=True))
    assert (sparse - dense)[valid].abs().max() < TOL


def perturbing_hook(norm, row, delta=5.0):
    """A forward hook on `norm` that adds delta to every output row whose input equals `row`:
    it changes the q, k and v that Attention projects from that token, whichever path
    projects them (the module call or F.linear on the weights). Returns (handle, hits):
    hits counts the matching rows of each call."""
    hits = []

    def hook(module, args, out):
        match = (args[0] == row).all(-1)
        hits.append(int(match.sum()))
        return out + delta * match[..., None]
    return norm.register_forward_hook(hook), hits


def block_inputs(model, i, idx):
    """The input of block i for every token of idx (1, T), and the full forward's logits (T, V)."""
    seen = []
    handle = model.layers[i].register_forward_pre_hook(lambda m, args: seen.append(args[0][0]))
    with torch.no_grad():
        logits = model(idx)[0][0]
    handle.remove()
    return seen[0], logits


@pytest.mark.parametrize("route", ["kv", "attn"])
def test_window_policy_hides_unkept_keys_beyond_the_window(route):
    """Under "window", a token that is not kept (K/V retention) or skipped the attention stays
    visible for kv_window positions. Perturbing, at the last layer, the normed input its K/V
    are projected from moves exactly the outputs of the tokens whose queries ran there within
    the window from it (its own query too, under "kv"; by 1e-1 or more), and no other, not
    even the first query past the window that ran."""
    window, T = 3, 16
    model = routed_tiny(route, base=tiny_model(n_layer=2), layers=[1], kv_policy="window", kv_window=window)
    idx = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(0))
    x, base = block_inputs(model, 1, idx)
    sel = model.route_trace[0].sel[0]
    ran = torch.ones(T, dtype=torch.bool) if route == "kv" else sel      # whose queries ran layer 1's attention
    j = next(j for j in range(2, T - window)                             # tokens before it, and queries that ran
             if not sel[j] and ran[j + 1:j + window].any() and ran[j + window])   # within and just past the window
    handle, hits = perturbing_hook(model.layers[1].input_layernorm, x[j])
    with torch.no_grad():
        moved = model(idx)[0][0]
    handle.remove()
    want = torch.zeros(T, dtype=torch.bool)
    want[j:j + window] = ran[j:j + window]
    assert hits == [1]
    assert torch.equal((moved - base).abs().amax(-1) > 1e-6, want)


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
    """Under "drop", a token that skips a block writes no K/V there: perturbing the normed
    input its K/V would be projected from moves no output, and the norm never sees its row.
    The same perturbation under "compute", where the token still writes K/V, moves every
    output from the first later token that ran the block (by ~1e-2 or more), and none before."""
    T = 12
    idx = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(2))
    for policy in ("drop", "compute"):
        model = routed_tiny("block", layers=[1], kv_policy=policy)
        x, base = block_inputs(model, 1, idx)
        sel = model.route_trace[0].sel[0]
        j = next(j for j in range(2, T) if not sel[j] and sel[j + 1:].any())   # skipped, a later token ran
        handle, hits = perturbing_hook(model.layers[1].input_layernorm, x[j])
        with torch.no_grad():
            moved = model(idx)[0][0]
        handle.remove()
        changed = (moved - base).abs().amax(-1) > 1e-6
        if policy == "drop":
            assert sum(hits) == 0 and torch.equal(moved, base)
        else:
            first = j + 1 + int(sel[j + 1:].nonzero()[0, 0])
            assert sum(hits) == 1 and torch.equal(changed, torch.arange(T) >= first)


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
    """c_bar holds at `start` through warm-up, then falls linearly to `end`. The labels
    split gives c_l = 1 - a (1 - f_l) with mean c_bar (a part labelled "run all" keeps 1),
    and f_l * c_bar / mean f below the labels' own mean; "rescale" gives f_l * c_bar / mean f,
    clamped to 1. DLO's dynamic LR is c_l + (1 - mean c)."""
    s = CapacitySchedule(3, start=1.0, end=0.8, warmup=10, anneal=20)
    assert [s.global_capacity(t) for t in (0, 9, 10, 20, 30, 99)] == [1.0, 1.0, 1.0, 0.9, 0.8, 0.8]
    assert s.capacities(25).tolist() == [s.global_capacity(25)] * 3        # no labels seen yet: uniform
    s.update(torch.tensor([1.0, 0.4, 1.0], dtype=torch.float64))           # labels skip only in layer 1
    assert s.capacities(5).tolist() == [1.0, 1.0, 1.0]                     # warm-up: nothing skipped
    torch.testing.assert_close(s.capacities(25), torch.tensor([1.0, 0.55, 1.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)                         # c_bar 0.85: a = 0.15 / 0.2
    torch.testing.assert_close(s.capacities(30), torch.tensor([1.0, 0.4, 1.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)                         # c_bar 0.8: a = 1
    s.update(torch.tensor([0.6, 0.4, 1.0], dtype=torch.float64))           # a moving average, momentum 0.9
    torch.testing.assert_close(s.label_frac, torch.tensor([0.96, 0.4, 1.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    below = CapacitySchedule(3, start=0.5, end=0.5, anneal=0)
    below.update(torch.tensor([1.0, 0.4, 1.0], dtype=torch.float64))       # c_bar 0.5 < mean f 0.8
    torch.testing.assert_close(below.capacities(0), torch.tensor([0.625, 0.25, 0.625], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    official = CapacitySchedule(3, start=1.0, end=0.8, warmup=0, anneal=20, split="rescale")
    official.update(torch.tensor([1.0, 0.4, 1.0], dtype=torch.float64))
    torch.testing.assert_close(official.capacities(10), torch.tensor([1.0, 0.45, 1.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)                         # c_bar 0.9: [1.125, 0.45, 1.125]
    torch.testing.assert_close(torch.tensor(dynamic_lr_scales([0.5, 1.0, 0.9])), torch.tensor([0.7, 1.2, 1.1]),
                               rtol=0, atol=1e-12)                         # mean c = 0.8


def test_sinks_never_skip():
    """The first r positions of each row run every routed layer under top-k in training,
    the threshold at inference, and in cached decode; they take no part in the top-k count."""
    model = routed_tiny("mlp", sink_tokens=2)
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
    model = routed_tiny("block", layers=[1], kv_policy="drop", route_gate="mod")
    block = model.layers[1]
    T = 16
    x = 0.03 * torch.randn(1, T, 32, generator=torch.Generator().manual_seed(6))   # the residual's scale
    positions = torch.arange(T)[None]
    rope = rope_tables(positions, 8, 10000.0)
    valid = torch.ones(1, T, dtype=torch.bool)
    rule = Rule("topk", capacity=torch.tensor([0.25], dtype=torch.float64))
    with torch.no_grad():
        out, (trace,) = block(x, RoutedContext(rope, valid, None, True, routable=valid, rule=rule))
        p = trace.p[0]
        top = p.topk(4).indices.sort().values                         # k = 0.25 * 16, causal order
        assert trace.sel[0].nonzero().squeeze(1).tolist() == top.tolist()
        dense = methods.activate(tiny_model(), "none").layers[1]          # the same weights, no router
        dense.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("router")})
        sub = x[:, top]
        sub_valid = torch.ones(1, 4, dtype=torch.bool)
        sub_rope = rope_tables(positions[:, top], 8, 10000.0)
        sub_out, _ = dense(sub, Context(sub_rope, sub_valid, None, causal_only=True))
        want = x.clone()
        want[:, top] = sub + p[top][None, :, None] * (sub_out - sub)
    assert (out - want).abs().max() < 1e-5       # a gate of 1 instead of p (0.66..0.90 here) moves it by 6e-2


def test_dlo_gate_scales_the_selected_mlp_in_both_paths():
    """DLO (arXiv 2407.11030, eq. 3), its router reading the block input x: a token that runs
    the MLP gets h + g(p) mlp(h), g(p) = 1 + gap (p - 0.5), one that skips gets h = x + attn(x);
    in the batched path and in RoutedBlock.forward_one, which decides one token on the host."""
    model = routed_tiny("mlp", sink_tokens=1)
    block, T, gap = model.layers[2], 12, model.config.route_gap
    x = 0.03 * torch.randn(1, T, 32, generator=torch.Generator().manual_seed(6))   # the residual's scale
    positions = torch.arange(T)[None]
    rule = Rule("threshold", 0.5)

    def want(x, positions, single):
        ctx = RoutedContext(rope_tables(positions, 8, 10000.0), torch.ones_like(positions, dtype=torch.bool), None,
                            True, routable=positions >= 1, rule=rule, single=single)
        h = x + block.attention(x, ctx)
        y = block.mlp(block.post_attention_layernorm(h))
        p = torch.sigmoid(x @ block.router.weight[0])
        run = (p >= 0.5) | (positions < 1)
        gate = 1 + gap * (p - 0.5)
        return block(x, ctx)[0], h + (run * gate)[..., None] * y, run, (p - 0.5).abs()[..., None] * y

    with torch.no_grad():
        out, expected, run, gate_effect = want(x, positions, single=False)
        assert run[0, 1:].any() and not run.all()
        assert (gate_effect[run].abs().max()) > 1e-3       # g(p) = 1 would move the output by this
        assert (out - expected).abs().max() < 1e-6
        for t in range(T):                                 # each token alone: batch-1 decode's path
            out, expected, _, _ = want(x[:, t:t + 1], positions[:, t:t + 1], single=True)
            assert (out - expected).abs().max() < 1e-6


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
