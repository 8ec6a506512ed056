"""The code paths a GPU run takes, exercised on the CPU: bf16 autocast training steps for
every routed method, evaluation and routed generation under autocast, the router loss
under CUDA's autocast rule, and the process-group backend string a GPU run uses."""
import pytest
import torch
import torch.nn.functional as F

import evaluate
import growth
import methods
import train
from conftest import tiny_model
from router import Rule
from schedule import part_schedule
from train import TrainConfig, micro_loss, param_groups
from sample import generate

bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)

# The methods as train.py builds them (flags -> model and rule), at tiny size.
METHODS = {
    "dlo-cos-global": dict(route="mlp", labels="cos-global", train_rule="topk"),
    "dlo-cos": dict(route="mlp", labels="cos", train_rule="topk"),
    "dlo-attn+mlp-drop": dict(route="attn+mlp", labels="cos-global", train_rule="topk", kv_policy="drop"),
    "dlo-block-and-attention": dict(route="block", labels="cos-global", train_rule="topk", kv_policy="compute",
                                    attn_layers=(0, 1), attn_capacity_end=0.8),
    "attention-drop": dict(route="attn", labels="cos-global", train_rule="topk", kv_policy="drop"),
    "modification": dict(route="block", labels="none", train_rule="threshold", kv_policy="drop", gate="mod",
                         load_alpha=0.01),
    "modification-compute": dict(route="block", labels="cos-global", train_rule="threshold", kv_policy="compute"),
    "mod": dict(route="block", labels="none", train_rule="topk", gate="mod", predictor=True, kv_policy="drop",
                capacity_start=0.125, capacity_end=0.125),
}


def routed(flags, sink_tokens=1):
    model = growth.expand(tiny_model(vocab_size=97), "interleave", n_new=2)
    layers = range(1, model.config.n_layer, 2) if flags.get("gate") == "mod" else ()
    if "attn_layers" in flags:
        layers = model.config.new_layers
    model = methods.activate(model, flags["route"], layers=layers, attn_layers=flags.get("attn_layers", ()),
                         sink_tokens=sink_tokens, kv_policy=flags.get("kv_policy", "compute"),
                         route_gate=flags.get("gate", "dlo"), route_predictor=flags.get("predictor", False))
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in model.layers:
            for router in layer.routers():
                router.weight.normal_(0, 0.5)
    return model.train()


def rows(seed=0, B=4, T=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 97, (B, T), generator=g)
    valid = torch.arange(T)[None] < torch.tensor([[T], [T - 3], [9], [5]])[:B]
    y = torch.where(valid, torch.randint(0, 97, (B, T), generator=g), -1)
    return x, y, valid


def training_rule(flags, model):
    n = len(model.config.route_slots())
    if flags["train_rule"] == "threshold":
        return Rule("threshold", 0.5, similarity=flags["labels"].startswith("cos"))
    caps = torch.full((n,), flags.get("capacity_end", 0.7), dtype=torch.float64)
    return Rule("topk", capacity=caps, similarity=flags["labels"].startswith("cos"))


@pytest.fixture
def cuda_autocast_rule(monkeypatch):
    """CUDA autocast refuses binary_cross_entropy by design (torch autocast op reference:
    "unsafe to autocast"); the CPU does not, so stand in for the rule here."""
    plain = F.binary_cross_entropy

    def refuse(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("binary_cross_entropy is unsafe to autocast (as CUDA autocast raises)")
        return plain(*args, **kwargs)

    monkeypatch.setattr(F, "binary_cross_entropy", refuse)


@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_autocast_training_steps_are_finite(name, cuda_autocast_rule):
    flags = METHODS[name]
    cfg = TrainConfig(**{k: v for k, v in flags.items() if k in TrainConfig.__dataclass_fields__})
    model = routed(flags)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    rule = training_rule(flags, model)
    sched = part_schedule(model.config.route_slots(), 1.0, 0.7, cfg.attn_capacity_end)
    for step in range(3):
        x, y, valid = rows(step)
        n_route = int(valid.sum()) * len(model.config.route_slots())
        with bf16():
            loss, lm, _ = micro_loss(model, model, x, y, valid, rule, cfg, sched.label_capacity(0),
                                     int((y != -1).sum()), n_route, groups=sched.groups)
            loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lm)
        # the residual stream and the router stay fp32 under autocast
        assert all(t.logit.dtype == torch.float32 for t in model.route_trace)
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluation_and_routed_generation_under_autocast():
    model = routed(METHODS["dlo-cos-global"]).eval()
    x, y, valid = rows(1)

    class Data:
        def batch(self, r):
            return x[list(r)], y[list(r)], valid[list(r)]

    out = evaluate.evaluate(model, Data(), range(4), Rule("threshold", 0.5), 2, "cpu", "bfloat16",
                            labels="cos-global", label_capacity=0.8)
    assert torch.isfinite(torch.tensor(out["val_loss"])) and 0 < out["mlp_frac_infer"] <= 1
    for method in ("dlo-cos-global", "dlo-attn+mlp-drop", "dlo-block-and-attention", "modification", "mod"):
        model = routed(METHODS[method]).eval()
        with bf16():
            tokens = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], 6, rule=model.default_rule())
        assert [len(t) for t in tokens] == [6, 6]


def test_process_group_backend_serves_both_devices(monkeypatch):
    """A GPU run all-reduces CPU counters and GPU tensors: NCCL serves only CUDA tensors, so
    the group maps CPU tensors to gloo. The torchrun tests use train.py's own choice."""
    assert train.process_group_backend() == "cpu:gloo"      # this CPU build has no NCCL
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    assert train.process_group_backend() == "cpu:gloo,cuda:nccl"


def test_attention_takes_the_flash_shape_where_it_can(monkeypatch):
    """Training rows are right-padded: attention then needs no mask (is_causal), which CUDA's
    flash kernel serves with GQA. A mask appears only with a cache or dropped tokens."""
    seen = []
    plain = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return plain(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = routed(METHODS["dlo-cos-global"])
    x, y, valid = rows(2)
    model(x, y, valid=valid, rule=training_rule(METHODS["dlo-cos-global"], model))
    assert seen and all(s == (True, True) for s in seen)
    seen.clear()
    model = routed(METHODS["modification"])
    model(x, y, valid=valid, rule=Rule("threshold", 0.5))
    assert any(not s[0] for s in seen)    # dropped keys need the mask


def test_compiled_routed_training_step_has_no_graph_break_and_no_recompile():
    """MLP routing in training (top-k at per-layer capacities, similarity labels) traces as
    one graph: no .any(), nonzero() or int() on the hot path, and the capacities are a
    tensor, so a new value per step does not recompile."""
    model = routed(METHODS["dlo-cos-global"], sink_tokens=1)
    x, y, valid = rows(3)
    n = len(model.config.route_slots())
    rule = lambda c: Rule("topk", capacity=torch.full((n,), c, dtype=torch.float64), similarity=True)
    explained = torch._dynamo.explain(model)(x, y, valid=valid, rule=rule(0.8), reduction="sum")
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=count)
    for c in (1.0, 0.9, 0.75):
        _, loss = compiled(x, y, valid=valid, rule=rule(c), reduction="sum")
        loss.backward()
        # the compiled step routes exactly as the eager one
        eager = model(x, y, valid=valid, rule=rule(c), reduction="sum")[1]
        assert torch.allclose(loss, eager, atol=1e-4)
    assert len(graphs) == 1


def test_fused_decode_step_never_waits_on_the_host():
    """A decode step through the Triton path (the interpreter stands in for CUDA) makes no
    host sync in any routed layer: no nonzero, no item. Prefill may sync once per layer to
    size its packed rows; decode's route_mlp decides and skips on the device. The tokens are
    the ones the reference path (gather, MLP, scatter) produces."""
    import kernels
    from sample import decode_one_token, kv_caches, pad_left, prefill
    if not (kernels.HAS_TRITON and kernels.INTERPRET):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    model = routed(METHODS["dlo-cos-global"], sink_tokens=1).eval()
    batch = pad_left([[1, 2, 3, 4], [5, 6]], "cpu")
    rule = model.default_rule()

    def decode_twice():
        with kv_caches(model, 2, 8):
            logits, _ = prefill(model, batch, rule)
            token = logits.argmax(-1)
            with torch.profiler.profile() as prof:
                logits, ran = decode_one_token(model, token, torch.tensor([4]), batch.positions[:, -1:] + 1,
                                               torch.ones(2, dtype=torch.bool), rule)
        return logits, ran, {e.key for e in prof.key_averages()}

    calls = []
    fused = kernels.route_mlp_triton
    kernels.route_mlp_triton = lambda *a, **k: calls.append(1) or fused(*a, **k)
    with torch.no_grad():
        want, want_ran, _ = decode_twice()
        kernels.FORCE_TRITON = True
        try:
            got, got_ran, ops = decode_twice()
        finally:
            kernels.FORCE_TRITON = False
            kernels.route_mlp_triton = fused
    assert len(calls) == len(model.config.route_slots())    # every routed layer took the kernel
    assert not ops & {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}
    assert torch.equal(got_ran, want_ran) and 0 < int(got_ran.sum()) < got_ran.numel()
    assert torch.allclose(got, want, atol=1e-4)
