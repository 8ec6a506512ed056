"""The compact KV cache (cache.py): exact decoding, and bytes allocated as the policy says."""
import math

import pytest
import torch

from conftest import cached_logits, full_logits, routed_tiny, tiny_model
from router import Rule
from sample import kv_caches


@pytest.mark.parametrize("route,policy", [("none", "compute"), ("attn", "drop"), ("attn", "compute"),
                                          ("attn+mlp", "drop"), ("block", "drop"), ("attn", "window"),
                                          ("kv", "window")])
@pytest.mark.parametrize("page", [1, 4, 256])
def test_compact_cache_decode_equals_full_forward(route, policy, page):
    """Also under "window", where tokens not kept are evicted as the cache grows."""
    model = tiny_model() if route == "none" else routed_tiny(route, kv_policy=policy, kv_window=3, sink_tokens=1)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 21, 14)]
    rule = Rule(kind="threshold", threshold=0.5)
    for got, prompt in zip(cached_logits(model, prompts, rule, page=page), prompts):
        assert (got - full_logits(model, prompt, rule)).abs().max() < 1e-4


@pytest.mark.parametrize("page", [1, 5])
def test_compact_cache_allocates_what_the_policy_says(page):
    """Per layer, the longest row's count of tokens that ran the attention, rounded up to
    whole pages, times (K and V entries + an int32 slot) per batch row; a skipped
    attention stores nothing, a dense one stores every real token."""
    model = routed_tiny("attn", kv_policy="drop", sink_tokens=1, layers=[1, 2])
    idx = torch.randint(0, 97, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False                                              # a left-padded row
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    with kv_caches(model, 2, 12, page) as m:
        m(idx, input_pos=torch.arange(12), positions=positions, valid=valid, rule=Rule("threshold", 0.5))
        ran = {t.layer: t.sel for t in m.route_trace}
        per_entry = 2 * 2 * 8 * 4 + 4                                  # K and V: 2 heads x 8 dims, fp32; slot
        for i, layer in enumerate(m.layers):
            stored = (ran[i] & valid).sum(1) if i in ran else valid.sum(1)
            assert 0 < int(stored.min()) and (i not in ran or int(stored.max()) < 12)
            want = 2 * math.ceil(int(stored.max()) / page) * page * per_entry
            assert layer.self_attn.kv_cache.nbytes() == want
            assert torch.equal((layer.self_attn.kv_cache.slot >= 0).sum(1), stored)


def test_window_eviction_keeps_the_kept_tokens_and_the_window():
    """Decoding token by token with K/V retention: a layer holds its kept tokens, the last
    kv_window positions and at most a page more, never the whole sequence."""
    window, page = 3, 2
    model = routed_tiny("kv", kv_policy="window", kv_window=window, sink_tokens=1)
    prompt = torch.randint(0, 97, (1, 40)).tolist()[0]
    with kv_caches(model, 1, 40, page) as m:
        for t in range(40):
            m(torch.tensor([[prompt[t]]]), input_pos=torch.tensor([t]), positions=torch.tensor([[t]]),
              rule=Rule("threshold", 0.5))
        for layer in m.layers:
            cache = layer.self_attn.kv_cache
            live = cache.slot[0] >= 0
            kept = int((live & cache.kept[0]).sum())
            assert int(live.sum()) <= kept + window + page < 40
            recent = cache.slot[0][live & ~cache.kept[0]]
            assert recent.numel() == 0 or int(recent.min()) > 39 - window - page
            assert cache.nbytes() == cache.k.size(2) * (2 * 2 * 8 * 4 + 4 + 1)


def test_a_long_prompt_is_freed_at_the_first_decode_step():
    """A prompt written in one chunk is held whole while its own queries attend; the next
    token's write evicts what no later query sees and frees the emptied pages."""
    window, page, n = 3, 4, 40
    model = routed_tiny("kv", kv_policy="window", kv_window=window, sink_tokens=1)
    prompt = torch.randint(0, 97, (1, n))
    with kv_caches(model, 1, n + 1, page) as m:
        m(prompt, input_pos=torch.arange(n), rule=Rule("threshold", 0.5))
        assert all(layer.self_attn.kv_cache.k.size(2) == n for layer in m.layers)
        m(prompt[:, :1], input_pos=torch.tensor([n]), positions=torch.tensor([[n]]), rule=Rule("threshold", 0.5))
        for layer in m.layers:
            cache = layer.self_attn.kv_cache
            live = cache.slot[0] >= 0
            kept = int((live & cache.kept[0]).sum())
            assert int(live.sum()) <= kept + window + 1
            assert cache.k.size(2) == math.ceil(int(live.sum()) / page) * page
        assert any(layer.self_attn.kv_cache.k.size(2) < n for layer in m.layers)   # something was freed
