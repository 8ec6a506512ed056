"""The compiled decode step (decode.py) against eager decode: the same tokens, the same
layers run, logits within fp32 tolerance, for the dense model and every routed kind."""
import pytest
import torch

import decode
from conftest import TOL, routed, tiny_model
from sample import decode_one_token, generate, kv_caches, pad_left, prefill

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def greedy(model, prompts, steps, step_fn, forced=None):
    """Prefill, then `steps` tokens through step_fn, greedy or the tokens `forced` (steps,):
    each step's logits and its routers' decisions (n_parts, B), or None for a dense model."""
    batch = pad_left(prompts, "cpu")
    P = batch.idx.size(1)
    out = []
    with kv_caches(model, len(prompts), P + steps):
        logits, _ = prefill(model, batch, model.default_rule())
        slot, position = torch.tensor([P]), batch.positions[:, -1:] + 1
        alive = torch.ones(len(prompts), dtype=torch.bool)
        for _ in range(steps):
            token = logits.argmax(-1) if forced is None else forced[len(out)].expand(len(prompts))
            logits, _ = step_fn(model, token, slot, position, alive, model.default_rule())
            out.append((logits, torch.cat([t.sel for t in model.route_trace], 1).T if model.route_trace else None))
            slot, position = slot + 1, position + 1
    return out


@pytest.fixture
def graphs(monkeypatch):
    """The graphs torch.compile makes from here on, each traced once and run as traced."""
    torch._dynamo.reset()
    decode.compile_once.cache_clear()
    made = []

    def count(gm, example_inputs):
        made.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: torch._dynamo.optimize(count)(fn))
    return made


@pytest.mark.parametrize("kind,policy", [("dense", "compute"), ("mlp", "compute"), ("attn", "compute"),
                                         ("attn", "window"), ("attn+mlp", "drop"), ("block", "drop"),
                                         ("kv", "window")])
def test_compiled_decode_equals_eager(kind, policy):
    """Batch-1 decode (the routed layers decide on the host eagerly, by torch.cond when
    compiled; K/V retention hides keys beyond its window of 4) of 12 given tokens, so that
    every layer's decisions vary from token to token and a later query meets the K/V an
    earlier skipped one left or did not: each compiled step's logits within TOL of eager
    decode's and the same decisions. The routers both run and skip (or keep and drop).
    The dense model also decodes a ragged batch of two."""
    torch._dynamo.reset()
    decode.compile_once.cache_clear()
    model = tiny_model() if kind == "dense" else routed(kind, policy)
    step = decode.compiled_step(model, decode_one_token)
    batches = [[list(range(3, 16))]] + ([[list(range(3, 16)), [7, 8, 9, 10, 11, 12]]] if kind == "dense" else [])
    forced = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(5))
    for prompts in batches:
        eager, compiled = (greedy(model, prompts, 12, fn, forced) for fn in (decode_one_token, step))
        for (logits, sel), (c_logits, c_sel) in zip(eager, compiled):
            assert (logits - c_logits).abs().max() < TOL
            assert (sel is None and c_sel is None) or torch.equal(sel, c_sel)
        if kind != "dense":
            sel = torch.stack([s for _, s in eager])
            assert sel.any() and not sel.all()


@pytest.mark.parametrize("kind,policy", [("mlp", "compute"), ("attn+mlp", "drop"), ("block", "window")])
def test_compiled_routed_step_is_one_graph_that_still_skips(kind, policy, graphs):
    """A routed model's batch-1 decode step traces as one graph, with no break at its
    routed parts, and compiles once for every token: each decision is a torch.cond, whose
    branch the generated code runs only for a token its router selected, so skipping
    saves work. DLO's MLP routing (dlo.RoutedBlock) and, as config/dlo_fast.json routes,
    attention and MLP apart with no K/V for a skipped token (skipping.SkipBlock)."""
    model = routed(kind, policy)
    step = decode.compiled_step(model, decode_one_token)
    assert all(type(layer) in (decode.CondRoutedBlock, decode.CondSkipBlock) for layer in model.layers)
    out = greedy(model, [list(range(3, 16))], 8, step)
    assert len(graphs) == 1
    conds = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.cond]
    parts = out[0][1].size(0)
    assert len(conds) >= parts   # at least one branch per routed part (a dropped attention: two)
    sel = torch.stack([s for _, s in out])   # (steps, parts, 1): did the part run
    assert 0 < int(sel.sum()) < sel.numel()


def test_generate_compiles_once_for_prompts_of_several_lengths(graphs):
    """sample.generate(compiled=True) rounds the static cache up to whole pages of slots,
    so prompts of 5, 9 and 13 tokens share one compiled step, and each decodes the greedy
    tokens of eager decode. With the compact cache, which changes shape, it says so."""
    model = routed("mlp", "compute")
    for n in (5, 9, 13):
        prompt = [list(range(3, 3 + n))]
        assert generate(model, prompt, 6, compiled=True) == generate(model, prompt, 6)
    assert len(graphs) == 1
    with pytest.raises(ValueError, match="static cache"):
        generate(model, [[1, 2, 3]], 4, compiled=True, page=4)
