"""The compact KV cache (cache.py): exact decoding, bytes allocated as the policy says, and
eviction under "window" that keeps exactly the kept tokens and the window.

Decoding matches the full forward to ~2e-7; a kept token evicted, or a window one position
short, moves the logits by ~1e-1 (conftest.routed_tiny). A window one position long leaves
the logits alone (the mask still hides the extra entry), so the live entries are checked
one by one."""
import math
import os

import pytest
import torch

import bench
from cache import CompactKVCache
from conftest import (KIND_POLICIES, TOL, assert_decode_equals_full_forward, cached_logits, full_decisions,
                      full_logits, routed, routed_tiny, tiny_model)
from router import Rule
from sample import generate, kv_caches, pad_left, prefill

pytestmark = pytest.mark.usefixtures("one_thread")

PER_ENTRY = 2 * 2 * 8 * 4 + 4   # K and V (2 heads x 8 dims, fp32) and an int32 slot


def live_slots(cache, b=0):
    """The slots of row b's entries, in the order the cache holds them."""
    slot = cache.slot[b]
    return slot[slot >= 0].tolist()


@pytest.mark.parametrize("kind,policy", [("none", "compute")] + KIND_POLICIES)
@pytest.mark.parametrize("page", [1, 256])
def test_compact_cache_decode_equals_full_forward(kind, policy, page):
    """The compact cache, grown an entry at a time (under "window": evicting at every
    step) or never regrown, decodes one prompt (the host decision of batch-1 decode) and a ragged batch with
    the decisions and logits of each prompt's full forward, for every routed kind under
    every K/V policy it takes (test_routing covers pages of 4)."""
    model = tiny_model() if kind == "none" else routed(kind, policy)
    assert_decode_equals_full_forward(model, page, lambda: Rule("threshold", 0.5))


@pytest.mark.parametrize("page", [1, 5])
def test_compact_cache_allocates_what_the_policy_says(page):
    """Per layer, the longest row's count of tokens that ran the attention, rounded up to
    whole pages, times (K and V entries + an int32 slot) per batch row; a skipped
    attention stores nothing, a dense one stores every real token."""
    model = routed_tiny("attn", kv_policy="drop", sink_tokens=1, layers=[1, 2])
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False                                              # a left-padded row
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    with kv_caches(model, 2, 12, page) as m:
        m(idx, input_pos=torch.arange(12), positions=positions, valid=valid, rule=Rule("threshold", 0.5))
        ran = {t.layer: t.sel for t in m.route_trace}
        for i, layer in enumerate(m.layers):
            stored = (ran[i] & valid).sum(1) if i in ran else valid.sum(1)
            assert 0 < int(stored.min()) and (i not in ran or int(stored.max()) < 12)
            want = 2 * math.ceil(int(stored.max()) / page) * page * PER_ENTRY
            assert layer.self_attn.kv_cache.nbytes() == want
            assert torch.equal((layer.self_attn.kv_cache.slot >= 0).sum(1), stored)


def test_window_eviction_keeps_exactly_the_kept_tokens_and_the_window():
    """Decoding token by token under K/V retention (window 3, pages of 2), after every step
    each layer holds, in arrival order, exactly its kept tokens and the positions fewer than
    kv_window behind its last eviction, which came less than a page of positions ago; its
    bytes are those entries rounded up to whole pages. The logits equal the full forward's."""
    window, page, n = 3, 2, 40
    model = routed_tiny("kv", kv_policy="window", kv_window=window, sink_tokens=1)
    prompt = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(4)).tolist()
    kept = {}   # layer -> kept flag per slot so far

    def check(m, last):
        for t in m.route_trace:
            kept.setdefault(t.layer, []).extend(t.sel[0].tolist())
        for i, layer in enumerate(m.layers):
            cache = layer.self_attn.kv_cache
            assert last - page < cache.swept <= last or last < page
            want = [s for s in range(last + 1) if kept[i][s] or cache.swept - s < window]
            assert live_slots(cache) == want
            assert cache.nbytes() == math.ceil(len(want) / page) * page * (PER_ENTRY + 1)   # + a kept flag

    rule = Rule("threshold", 0.5)
    got = cached_logits(model, [prompt], rule, page=page, split=1, on_step=check)[0]
    assert (got - full_logits(model, prompt, rule)).abs().max() < TOL
    assert all(4 < sum(flags) < n - 4 for flags in kept.values())   # both kinds of entry, in every layer


def test_a_long_prompt_is_freed_at_the_first_decode_step():
    """A prompt written in one chunk is held whole while its own queries attend; the next
    token's write evicts exactly the prompt's tokens that are not kept and kv_window or more
    positions behind it, and frees the emptied pages."""
    window, page, n = 3, 4, 40
    model = routed_tiny("kv", kv_policy="window", kv_window=window, sink_tokens=1)
    prompt = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(5))
    rule = Rule("threshold", 0.5)
    with kv_caches(model, 1, n + 1, page) as m:
        m(prompt, input_pos=torch.arange(n), rule=rule)
        kept = {t.layer: t.sel[0].tolist() for t in m.route_trace}
        assert all(layer.self_attn.kv_cache.k.size(2) == n for layer in m.layers)
        m(prompt[:, :1], input_pos=torch.tensor([n]), positions=torch.tensor([[n]]), rule=rule)
        for i, layer in enumerate(m.layers):
            cache = layer.self_attn.kv_cache
            want = [s for s in range(n) if kept[i][s] or n - s < window] + [n]
            assert live_slots(cache) == want
            assert cache.k.size(2) == math.ceil(len(want) / page) * page < n   # pages were freed


@pytest.mark.parametrize("route", ["kv", "attn"])
def test_eviction_at_long_context_equals_the_uncached_window_policy(route):
    """600 tokens, a window of 16, pages of 64: decoding one prompt token by token (under
    "attn" through the host decision of batch-1 decode) and a ragged batch 8 tokens per forward evicts pages
    along the way and still makes the decisions and gives the logits of each prompt's full
    forward under the window policy. At the end each row of each layer holds exactly its
    kept tokens and the window behind the last eviction, in fewer pages than 600 positions."""
    window, page = 16, 64
    model = routed_tiny(route, base=tiny_model(block_size=640), kv_policy="window", kv_window=window, sink_tokens=1)
    g = torch.Generator().manual_seed(6)
    rule = Rule("threshold", 0.5)
    for lengths, split, step in (((600,), 472, 1), ((600, 537), 344, 8)):
        prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]
        P, end = max(lengths), {}

        def check(m, last):
            if last == P - 1:
                end.update(swept=[layer.self_attn.kv_cache.swept for layer in m.layers],
                           live=[[live_slots(layer.self_attn.kv_cache, b) for b in range(len(prompts))]
                                 for layer in m.layers],
                           capacity=[layer.self_attn.kv_cache.k.size(2) for layer in m.layers])

        got, sel = cached_logits(model, prompts, rule, page=page, split=split, step=step, decisions=True,
                                 on_step=check)
        for b, prompt in enumerate(prompts):
            assert (got[b] - full_logits(model, prompt, rule)).abs().max() < TOL
            assert torch.equal(sel[b], full_decisions(model))
        for i in range(len(model.layers)):     # one routed part per layer: decision i is layer i's
            assert P - 1 - page < end["swept"][i] and end["swept"][i] > split   # decode evicted, lately
            for b, prompt in enumerate(prompts):
                offset = P - len(prompt)
                want = [offset + s for s in range(len(prompt))
                        if sel[b][i, s] or end["swept"][i] - (offset + s) < window]
                assert end["live"][i][b] == want and len(want) < len(prompt) - page
            longest = max(len(row) for row in end["live"][i])
            assert end["capacity"][i] == math.ceil(longest / page) * page < P


@pytest.mark.parametrize("kind,policy", [("dense", "compute")] + KIND_POLICIES)
@pytest.mark.parametrize("page", [0, 4])
def test_chunked_prefill_equals_one_chunk(kind, policy, page, one_thread):
    """sample.prefill in chunks of 5 tokens (then 1, the smallest) of a ragged, left-padded
    batch: the last logits within TOL of the one-forward prefill, the same attentions and
    MLPs run per prompt token, and the same greedy tokens after it, on both caches."""
    model = tiny_model() if kind == "dense" else routed(kind, policy)
    prompts = [list(range(3, 16)), [7, 8, 9, 10, 11, 12]]
    batch = pad_left(prompts, "cpu")

    def run(chunk):
        with kv_caches(model, len(prompts), batch.idx.size(1), page):
            return prefill(model, batch, model.default_rule(), chunk)

    logits, ran = run(0)
    decided = torch.cat([t.sel[t.routable] for t in model.route_trace]) if model.route_trace else None
    for chunk in (5, 1):
        chunked, chunked_ran = run(chunk)
        assert (chunked - logits).abs().max() < TOL
        assert (ran is None and chunked_ran is None) or torch.equal(ran, chunked_ran)
    assert generate(model, prompts, 6, page=page, prefill_chunk=4) == generate(model, prompts, 6, page=page)
    if decided is not None:   # the routers both run and skip (or, under K/V retention, keep and drop)
        assert decided.any() and not decided.all()


def test_chunked_prefill_under_retention_holds_the_window_the_kept_and_one_chunk(one_thread):
    """K/V retention with the compact cache, a ragged batch prefilled 8 tokens per forward:
    after every chunk, each layer holds per row at most the tokens its router kept so far,
    the window and one chunk, since a chunk first evicts what no later query sees."""
    model = routed("kv", "window")
    window, chunk = model.config.kv_window, 8
    prompts = [list(range(3, 43)), list(range(50, 83))]
    kept = torch.zeros(len(model.layers), len(prompts), dtype=torch.long)
    held = []

    def check(model, last):
        for t in model.route_trace:
            kept[t.layer] += (t.sel & t.valid).sum(1)
            length = model.layers[t.layer].self_attn.kv_cache.length
            assert (length <= kept[t.layer] + window + chunk).all(), (t.layer, length, kept[t.layer])
            held.append(int(length.max()))

    cached_logits(model, prompts, Rule("threshold", 0.5), page=256, split=chunk, step=chunk, on_step=check)
    assert max(held) < len(prompts[0])   # eviction happened: not every token's K/V is held


@pytest.mark.parametrize("kind,policy", [("dense", "compute")] + KIND_POLICIES)
def test_cached_loss_equals_the_full_forward_loss(kind, policy):
    """bench.cached_loss, the way long conversations and Hamlet are scored: a 40-token row
    with targets on some positions only, read 7 tokens per forward (then all at once)
    through the compact cache, sums the same loss as one uncached forward, for every
    routed kind under every K/V policy (under "window" the chunks evict as they go)."""
    model = tiny_model() if kind == "dense" else routed(kind, policy)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 97, (1, 40), generator=g)
    targets = torch.randint(0, 97, (1, 40), generator=g)
    targets[:, :9] = -1                                  # the user's turn: no target
    with torch.no_grad():
        _, want = model(idx, targets, rule=model.default_rule(), reduction="sum")
    for chunk in (7, 0):
        got = bench.cached_loss(model, idx, targets, chunk=chunk, page=4)
        assert abs(got - float(want)) < TOL * float(want), (chunk, got, float(want))   # relative


def test_freed_cache_blocks_go_back_to_the_os():
    """The compact cache frees a block each time it grows a page, and small blocks stay
    alive between them; it hands their pages back (cache.release_freed_blocks), so the
    process holds about the cache, not every size it has had (glibc's default keeps them)."""
    import subprocess
    import sys
    probe = ("import sys, torch, cache\n"
             "def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) // 1024\n"
             "if sys.argv[1] == 'default': cache.release_freed_blocks = lambda: None\n"
             "torch.ones(2 ** 22)   # a freed 16 MB block: glibc's mmap threshold rises to it\n"
             "before = rss()\n"
             "c, small = cache.CompactKVCache(1, 1, 64, torch.float32, 'cpu', page=4096), []\n"
             "for pages in range(1, 15):   # K and V 1 MB a page, each step followed by a 256 KB block\n"
             "    c.reserve(pages * 4096); c.k.fill_(1); c.v.fill_(1); small.append(torch.ones(2 ** 16))\n"
             "print(rss() - before)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    left = {}
    for mode in ("ours", "default"):
        r = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=120, cwd=root)
        assert r.returncode == 0, r.stderr[-2000:]
        left[mode] = int(r.stdout.split()[-1])
    assert left["ours"] < 45, left      # the cache (28 MB) and the small blocks (3.5 MB): 33 measured
    assert left["default"] > 70, left   # the holes that glibc's default keeps: 103 to 127 measured


def test_a_chunk_keeps_the_pages_it_is_about_to_fill():
    """Before a chunk is appended, eviction frees only the pages that neither the entries
    left nor the chunk need: a layer at a steady size then keeps its buffers, rather than
    shrinking and growing back (each a copy of the whole layer) for every chunk."""
    c = CompactKVCache(1, 1, 2, torch.float32, "cpu", page=4, window=2)
    chunk = lambda start, n: (torch.zeros(n, dtype=torch.long), torch.arange(start, start + n),
                              torch.randn(n, 1, 2), torch.randn(n, 1, 2), torch.zeros(n, dtype=torch.bool))
    c.update_rows(*chunk(0, 8))
    buffers = c.k.data_ptr(), c.v.data_ptr()
    c.update_rows(*chunk(8, 4))   # leaves slot 7 (the window) and the 4 new: 5 entries, in the 8 slots held
    assert live_slots(c) == [7, 8, 9, 10, 11]
    assert (c.k.data_ptr(), c.v.data_ptr()) == buffers


def test_a_decode_step_appends_what_update_rows_would():
    """`append`, the short path of a decode step (every row writes one token), leaves the
    entries, slots, kept flags and bytes that update_rows leaves, step by step, through
    evictions and growth."""
    g = torch.Generator().manual_seed(0)
    short, general = (CompactKVCache(2, 1, 2, torch.float32, "cpu", page=4, window=3) for _ in range(2))
    k, v = torch.randn(2, 1, 5, 2, generator=g), torch.randn(2, 1, 5, 2, generator=g)
    prompt_kept = torch.rand(2, 5, generator=g) < 0.5
    for c in (short, general):
        c.update(torch.arange(5), k, v, torch.ones(2, 5, dtype=torch.bool), prompt_kept)
    for slot in range(5, 19):
        k, v, kept = torch.randn(2, 1, 1, 2, generator=g), torch.randn(2, 1, 1, 2, generator=g), torch.rand(2, 1, generator=g) < 0.5
        fast = short.update(torch.tensor([slot]), k, v, torch.ones(2, 1, dtype=torch.bool), kept)
        slow = general.update_rows(torch.arange(2), torch.full((2,), slot), k[:, :, 0], v[:, :, 0], kept[:, 0])
        for a, b in zip(fast, slow):
            assert torch.equal(a, b), slot
        assert torch.equal(short.length, general.length) and short.nbytes() == general.nbytes()
    assert len(live_slots(short)) < 19 and len(live_slots(short, 1)) < 19   # some were evicted
