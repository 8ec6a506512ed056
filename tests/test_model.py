"""Exact invariants of the model: cached decode == full forward, GQA, GPT-2 variant."""
import pytest
import torch

import model as model_module
from conftest import cached_logits, full_logits, tiny_model
from sample import generate

TOL = 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_decode_equals_full_forward_batch1(arch):
    model = tiny_model(arch=arch, bias=arch == "gpt2", n_kv_head=4 if arch == "gpt2" else 2)
    prompt = torch.randint(0, 97, (23,)).tolist()
    got = cached_logits(model, [prompt])[0]
    assert (got - full_logits(model, prompt)).abs().max() < TOL


def test_cached_decode_equals_full_forward_batch3_ragged():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 17, 11)]
    for got, prompt in zip(cached_logits(model, prompts), prompts):
        assert (got - full_logits(model, prompt)).abs().max() < TOL


def test_gqa_equals_repeated_heads():
    """GQA with n_kv_head=2 equals full multi-head attention with each K/V head repeated."""
    gqa = tiny_model(n_kv_head=2)
    mha = tiny_model(n_kv_head=4)
    sd = gqa.state_dict()
    for i in range(4):
        q, k, v = sd[f"layers.{i}.self_attn.qkv_proj.weight"].split([32, 16, 16])
        k, v = (w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32) for w in (k, v))
        sd[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(sd)
    idx = torch.randint(0, 97, (2, 19))
    assert (gqa(idx)[0] - mha(idx)[0]).abs().max() < 1e-5


def test_generate_matches_argmax_of_full_forward():
    model = tiny_model()
    prompt = [3, 14, 15, 92, 65]
    new = generate(model, [prompt], 10)[0]
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    assert new == seq[len(prompt):]


def test_generate_batch_rows_match_single_rows_and_stop():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    batched = generate(model, prompts, 8)
    for prompt, row in zip(prompts, batched):
        assert row == generate(model, [prompt], 8)[0]
    first = batched[0][2]
    stopped = generate(model, [prompts[0]], 8, stop_ids=[first])[0]
    assert stopped == batched[0][:batched[0].index(first) + 1]


def test_sampling_is_seeded_and_topk_restricts():
    model = tiny_model()
    run = lambda seed, k: generate(model, [[1, 2]], 12, temperature=1.0, top_k=k,
                                         generator=torch.Generator().manual_seed(seed))[0]
    assert run(0, None) == run(0, None)
    top1 = run(5, 1)
    assert top1 == generate(model, [[1, 2]], 12)[0]   # top-1 sampling is greedy


@pytest.mark.parametrize("chunk", [4096, 5, 4])
def test_loss_only_on_targets_in_chunks(monkeypatch, chunk):
    """The loss never materialises all logits: it runs the head on target positions only,
    a chunk at a time (recomputed in backward), and equals plain cross-entropy, in value
    and in gradient, for every reduction. A forward hook on lm_head records the rows of
    each call: none sees more than LOSS_CHUNK rows, and laid end to end they are exactly
    the final-norm states of the 13 targets, in order, each once. 13 = 3 x 4 + 1 = 2 x 5 + 3:
    the last chunk is partial, so a loss that drops it fails."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK", chunk)
    model = tiny_model().train()
    idx = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    targets[:, :2] = -1
    targets[1, 7] = -1
    keep = targets != -1
    assert int(keep.sum()) == 13
    logits, _ = model(idx)
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")
    normed, rows = [], []
    hooks = [model.norm.register_forward_hook(lambda m, i, out: normed.append(out.detach())),
             model.lm_head.register_forward_hook(lambda m, i, out: rows.append(i[0].detach()))]
    for reduction in ("mean", "sum", "none"):
        normed.clear()
        rows.clear()
        with torch.no_grad():
            model(idx, targets, reduction=reduction)
        assert all(r.dim() == 2 and 0 < r.size(0) <= chunk for r in rows)
        assert len(rows) == -(-13 // chunk) and torch.equal(torch.cat(rows), normed[0][keep])
    for hook in hooks:
        hook.remove()
    none, mean = model(idx, targets, reduction="none"), model(idx, targets)
    assert none[0] is None and mean[0] is None
    assert torch.allclose(none[1][keep], manual, atol=1e-6) and (none[1][~keep] == 0).all()
    assert torch.allclose(mean[1], manual.mean(), atol=1e-6)
    assert torch.allclose(model(idx, targets, reduction="sum")[1], manual.sum(), atol=1e-5)
    mean[1].backward()
    got = model.lm_head.weight.grad.clone()
    model.zero_grad()
    manual.mean().backward()
    assert torch.allclose(got, model.lm_head.weight.grad, atol=1e-6)


def test_right_padding_is_required_without_a_cache():
    model = tiny_model()
    valid = torch.tensor([[False, True, True]])
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.zeros(1, 3, dtype=torch.long), valid=valid)


def test_too_long_prompt_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="context of 64 tokens"):
        generate(model, [[1] * 60], 10)
    with pytest.raises(ValueError, match="context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def reference_llama_logits(state, cfg, idx):
    """A plain Llama forward from HF-layout (unfused) weights, written out op by op: separate
    q, k, v, gate and up matmuls, rotate-half RoPE, repeated K/V heads, a causal softmax."""
    F = torch.nn.functional
    norm = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w
    T, hs = idx.size(1), cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2).float() / hs)
    ang = torch.cat([torch.arange(T).float()[:, None] * inv] * 2, -1)
    rope = lambda t: t * ang.cos() + torch.cat([-t[..., hs // 2:], t[..., :hs // 2]], -1) * ang.sin()
    heads = lambda t, n: t.view(1, T, n, hs).transpose(1, 2)
    x = state["embed_tokens.weight"][idx]
    for i in range(cfg.n_layer):
        w = lambda name: state[f"layers.{i}.{name}.weight"]
        h = norm(x, w("input_layernorm"))
        q = rope(heads(h @ w("self_attn.q_proj").T, cfg.n_head))
        k = rope(heads(h @ w("self_attn.k_proj").T, cfg.n_kv_head)).repeat_interleave(cfg.n_head // cfg.n_kv_head, 1)
        v = heads(h @ w("self_attn.v_proj").T, cfg.n_kv_head).repeat_interleave(cfg.n_head // cfg.n_kv_head, 1)
        att = (q @ k.transpose(-1, -2) / hs ** 0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -1e9)
        x = x + (att.softmax(-1) @ v).transpose(1, 2).reshape(1, T, -1) @ w("self_attn.o_proj").T
        h = norm(x, w("post_attention_layernorm"))
        x = x + (F.silu(h @ w("mlp.gate_proj").T) * (h @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T
    return norm(x, state["norm.weight"]) @ state["embed_tokens.weight"].T


def test_fused_projections_leave_the_logits_unchanged():
    """qkv_proj and gate_up_proj are the HF model's five matrices stacked: our logits equal a
    plain unfused Llama's to fp32 round-off (the stacked matmul sums in another blocking)."""
    import weights
    model = tiny_model()
    state = weights.unfuse({k: v.detach() for k, v in model.state_dict().items()}, model.config)
    assert "layers.0.self_attn.q_proj.weight" in state and "layers.0.mlp.gate_proj.weight" in state
    idx = torch.randint(0, 97, (1, 21))
    with torch.no_grad():
        want = reference_llama_logits(state, model.config, idx)
        got = model(idx)[0]
    assert (got - want).abs().max() < 1e-5
    assert torch.equal(weights.fuse(dict(state), 4)["layers.2.self_attn.qkv_proj.weight"],
                       model.layers[2].self_attn.qkv_proj.weight)   # stacking back is bit-exact
