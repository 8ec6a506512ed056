import json
import os
import sys

# the Triton interpreter must be chosen before triton is first imported (kernels.py)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import methods  # noqa: E402
from mod import PredictorRouter  # noqa: E402
from router import Rule  # noqa: E402
from sample import kv_caches  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the real SmolLM2 model or data, or whole runs in subprocesses "
                                       "(make test-fast skips them)")


def tiny_config(**overrides):
    """A 4-layer GQA Llama small enough to test exactly in fp32 in milliseconds."""
    base = dict(vocab_size=97, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
                block_size=64, rope_theta=10000.0)
    base.update(overrides)
    return methods.Config(**base)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = methods.build(tiny_config(**overrides)).eval()
    # random norms, so a bug that swaps or skips them shows up
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def tiny():
    return tiny_model


@pytest.fixture
def one_thread():
    """Run a test's torch ops on one thread. Tiny models gain nothing from more, and on a
    busy 2-core machine two threads made test_routing.py and test_cache.py take 7.5 minutes
    instead of 30 s (the threads spin while the other waits to be scheduled)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def standardise(linear, x, std, generator):
    """Redraw `linear` so that each of its outputs over the rows of x has mean 0 and std `std`."""
    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator))
    out = x @ linear.weight.T
    linear.weight.mul_(std / out.std(0)[:, None])
    linear.bias.copy_(-out.mean(0) * std / out.std(0))


def routed_tiny(route="mlp", seed=0, scale=1.5, base=None, **options):
    """tiny_model (or `base`) with routers on every layer (options go to methods.activate),
    built so that routing shows in the logits. tiny_model's N(0, 0.02) weights leave the
    attention nearly uniform and the MLP adding ~5% to the residual, so q/k/v are scaled x4
    (RoPE and window errors show) and the MLP's output x6. Each router is drawn at random,
    orthogonal to the mean of what it reads in a dense pass, and scaled so that its logits
    there have std `scale`: p spreads over (0.08, 0.92) (5th to 95th percentile) and about
    half the tokens run each part. The gap is 1.0, so g(p) spans (0.5, 1.5); at the default
    0.05 a gate error moved the logits by less than 1e-4. MoD's predictor, if any, is
    standardised the same way. Measured on a 13-token prompt (logits of magnitude ~0.5):
    running every part instead moves the logits by 7e-2 (mlp) to 4e-1 (attn), the gate
    forced to 1 by 2e-2 (mlp) to 4e-1 (attn+mlp), a window one position off by 8e-2 to
    3e-1, RoPE positions off by one by 2e-2 to 3e-1; cached decode differs from the full
    forward by ~1.5e-7."""
    options.setdefault("route_gap", 1.0)
    model = methods.activate(base if base is not None else tiny_model(seed=seed), route, **options)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.qkv_proj.weight.mul_(4.0)
            layer.mlp.down_proj.weight.mul_(6.0)
        # each router is drawn orthogonal to the mean of what it reads in a dense pass (the
        # residual shares a direction across tokens) and scaled so its logits have std `scale`
        reads = {}
        hooks = [router.register_forward_pre_hook(lambda r, args: reads.update({r: args[0].flatten(0, 1)}))
                 for layer in model.layers for router in layer.routers()]
        model(torch.randint(0, model.config.vocab_size, (16, 16), generator=g), rule=Rule("all"))
        for h in hooks:
            h.remove()
        for router, x in reads.items():
            m = x.mean(0)
            w = torch.randn(x.size(1), generator=g)
            w -= (w @ m) / (m @ m) * m
            router.weight.copy_(w * scale / (x @ w).std())
            if isinstance(router, PredictorRouter):   # hidden units and output standardised the same way
                first, last = router.predictor[0], router.predictor[2]
                standardise(first, x, scale, g)
                standardise(last, F.silu(first(x)), scale, g)
    return model


def full_logits(model, prompt, rule=None):
    logits, _ = model(torch.tensor([prompt]), rule=rule)
    return logits[0]


def full_decisions(model):
    """The last forward's decisions (n_parts, T) for its first row: did each routed part run?"""
    return torch.stack([t.sel[0] for t in model.route_trace])


@torch.no_grad()
def cached_logits(model, prompts, rule=None, page=0, split=None, step=1, decisions=False, on_step=None):
    """Prefill the first `split` slots (default: half the longest prompt) of the prompts
    left-padded in one batch, then decode `step` slots per forward (1: token by token, at
    batch 1 through dlo.RoutedBlock.forward_one); returns each row's logits for every real position.
    page > 0: the compact cache (cache.py), grown that many entries at a time.
    decisions: also return each row's decisions (n_parts, its length), as full_decisions.
    on_step(model, last): called after each forward, caches alive, `last` its last slot."""
    B, P = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(B, P, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p)
        valid[b, P - len(p):] = True
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    split = P // 2 if split is None else split
    out, sels = [], []
    with kv_caches(model, B, P, page):
        for start, end in [(0, split)] * (split > 0) + [(t, min(t + step, P)) for t in range(split, P, step)]:
            logits, _ = model(idx[:, start:end], input_pos=torch.arange(start, end),
                              positions=positions[:, start:end], valid=valid[:, start:end], rule=rule)
            out.append(logits)
            if model.route_trace:
                sels.append(torch.stack([t.sel for t in model.route_trace]))   # (n_parts, B, end - start)
            if on_step is not None:
                on_step(model, end - 1)
    logits = torch.cat(out, 1)
    rows = [logits[b, valid[b]] for b in range(B)]
    if not decisions:
        return rows
    sel = torch.cat(sels, 2) if sels else torch.zeros(0, B, P, dtype=torch.bool)   # a dense model decides nothing
    return rows, [sel[:, b, valid[b]] for b in range(B)]


# cached decode == full forward to ~2e-7; any routing error moves the logits by >= 1e-2
TOL = 1e-5
KINDS = {"mlp": ("mlp", {}), "attn": ("attn", {}), "attn+mlp": ("attn+mlp", {}), "block": ("block", {}),
         "block+attn": ("block", {"layers": [1, 3], "attn_layers": [0, 2]}),   # new blocks whole, attention elsewhere
         "kv": ("kv", {})}
# every kind under each K/V policy it takes: "mlp" never skips an attention, so no policy
# applies to it; K/V retention needs "window"
KIND_POLICIES = ([("mlp", "compute")] + [(kind, policy) for kind in ("attn", "attn+mlp", "block", "block+attn")
                                         for policy in ("compute", "drop", "window")] + [("kv", "window")])
LENGTHS = ((13,), (6, 13, 9))   # one prompt, whose decode steps decide on the host; a ragged batch


def routed(kind, policy, **options):
    """routed_tiny of KINDS[kind] under K/V policy `policy`, a window of 4 positions and one sink."""
    route, layers = KINDS[kind]
    return routed_tiny(route, kv_policy=policy, kv_window=4, sink_tokens=1, **layers, **options)


def assert_decode_equals_full_forward(model, page, make_rule, reference=None):
    """For each of LENGTHS: cached decode (prefill half, then token by token) makes, for
    each prompt, the decisions of its full forward alone and gives its logits within TOL.
    make_rule(): a fresh rule for each run; reference(prompts, b): the full forward's rule
    for row b (default: make_rule()). Both decisions must occur, at batch-1 decode steps too."""
    g = torch.Generator().manual_seed(3)
    for lengths in LENGTHS:
        prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]
        got, got_sel = cached_logits(model, prompts, make_rule(), page=page, decisions=True)
        for b, prompt in enumerate(prompts):
            want = full_logits(model, prompt, make_rule() if reference is None else reference(prompts, b))
            assert (got[b] - want).abs().max() < TOL
            if model.route_trace:
                assert torch.equal(got_sel[b], full_decisions(model))
        if not model.route_trace:   # a dense model
            continue
        routable = torch.cat([s[:, 1:] for s in got_sel], 1)            # position 0 is the sink
        assert routable.any() and not routable.all(), "the test must route some tokens and skip others"
        if len(lengths) == 1:
            decoded = got_sel[0][:, lengths[0] // 2:]
            assert decoded.any() and not decoded.all(), "batch-1 decode must run some parts and skip others"


class ByteTokenizer:
    """Bytes as tokens, with the chat mask rule of tokenizer.Tokenizer."""
    vocab_size, eos_id, pad_id, im_end_id = 300, 256, 256, 257

    def encode(self, text):
        return list(text.encode())

    def encode_chat_with_mask(self, messages):
        ids, mask = [], []
        for m in messages:
            head = self.encode(m["role"] + ":")
            body = self.encode(m["content"]) + [self.im_end_id]
            ids += head + body
            mask += [False] * len(head) + [m["role"] == "assistant"] * len(body)
        return ids, mask


def write_sharegpt(path, records, cut=True):
    text = json.dumps(records, indent=1)
    if cut:   # like the real file: the last record is cut off mid-way
        text = text[: text.rindex('"value"') + 12]
    path.write_text(text)
