"""Triton kernels (run by the interpreter, fp32) against their PyTorch references."""
import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from model import RMSNorm  # noqa: E402
from router import dlo_gate  # noqa: E402

pytest.importorskip("triton")
if not kernels.INTERPRET:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

N, C, EPS = 37, 50, 1e-5   # odd sizes: BLOCK_C = 64 masks 14 columns


@pytest.fixture(autouse=True)
def force_triton():
    kernels.FORCE_TRITON = True
    yield
    kernels.FORCE_TRITON = False


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, h = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g) * 3
    w, nw = torch.randn(1, C, generator=g) / C ** 0.5, torch.rand(C, generator=g) + 0.5
    valid = torch.rand(N, generator=g) > 0.25   # padding scattered through the rows
    return x, h, w, nw, valid


def block_norm(h, nw):
    norm = RMSNorm(C, EPS)
    with torch.no_grad():
        norm.weight.copy_(nw)
        return norm(h)


def check_route_gather(x, h, w, nw, valid, **rule):
    p, idx, rows = kernels.route_gather_triton(x, h, w, nw, EPS, valid=valid, **rule)
    p_ref, idx_ref, rows_ref = kernels.route_gather_reference(x, h, w, nw, EPS, valid=valid, **rule)
    assert p.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.allclose(p, p_ref, atol=1e-6)
    assert torch.equal(idx, idx_ref)                          # same tokens, same order
    assert bool((idx[1:] > idx[:-1]).all())                   # ascending token order
    if valid is not None:
        assert bool(valid[idx].all())                         # padding never selected
    assert rows.shape == (idx.numel(), C)
    assert torch.allclose(rows, rows_ref, atol=1e-5)
    assert torch.allclose(rows, block_norm(h[idx], nw), atol=1e-5)   # exactly the block's RMSNorm
    return p, idx


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("rule, expect", [
    (dict(threshold=0.5), "some"), (dict(threshold=0.0), "all"), (dict(threshold=1.01), "none"),
    (dict(k=9), "some"), (dict(k=N), "all"), (dict(k=0), "none")])
def test_route_gather_equals_reference(padded, rule, expect):
    x, h, w, nw, valid = inputs()
    valid = valid if padded else None
    p, idx = check_route_gather(x, h, w, nw, valid, **rule)
    everyone = valid.nonzero().squeeze(1) if padded else torch.arange(N)
    if expect == "all":
        assert torch.equal(idx, everyone)
    elif expect == "none":
        assert idx.numel() == 0
    else:
        assert 0 < idx.numel() < everyone.numel()
        if "k" in rule:
            assert idx.numel() == rule["k"]                   # no ties among random scores


def test_route_gather_topk_keeps_ties():
    x, h, w, nw, valid = inputs(1)
    x[3:13] = 4 * w                                           # ten equal scores, the highest of all
    valid[3:13] = True
    valid[20] = False
    x[20] = 8 * w                                             # a higher score, but padding
    p, idx = check_route_gather(x, h, w, nw, valid, k=4)
    assert torch.equal(idx, torch.arange(3, 13))              # all ten tied tokens run, padding doesn't


def test_zero_router_runs_every_token():
    """At zero init p = 0.5 exactly, and p >= 0.5 keeps a freshly routed model dense."""
    x, h, _, nw, valid = inputs(2)
    p, idx = check_route_gather(x, h, torch.zeros(1, C), nw, valid, threshold=0.5)
    assert bool((p == 0.5).all()) and torch.equal(idx, valid.nonzero().squeeze(1))


def test_route_gather_block_routing_gathers_x_itself():
    x, _, w, nw, valid = inputs(3)
    check_route_gather(x, x, w, nw, valid, threshold=0.5)


@pytest.mark.parametrize("selected", [0, 1, 20, N])
def test_scale_scatter_equals_reference(selected):
    g = torch.Generator().manual_seed(selected)
    base = torch.randn(N, C, generator=g)
    idx = torch.randperm(N, generator=g)[:selected].sort().values
    y = torch.randn(selected, C, generator=g)
    gate = 1 + 0.05 * (torch.rand(N, generator=g) - 0.5)   # DLO's g(p)
    before = base.clone()
    ref = kernels.scale_scatter_reference(base, idx, y, gate)
    out = kernels.scale_scatter_triton(base, idx, y, gate)
    assert torch.equal(out, ref)                              # the same two roundings per element
    assert torch.equal(base, before)                          # out of place by default
    skipped = torch.ones(N, dtype=torch.bool)
    skipped[idx] = False
    assert torch.equal(out[skipped], base[skipped])
    inplace = kernels.scale_scatter_triton(base, idx, y, gate, inplace=True)
    assert inplace.data_ptr() == base.data_ptr() and torch.equal(base, ref)


def test_dispatch():
    x, h, w, nw, valid = inputs()
    assert kernels.use_triton(x, h, w, nw)
    assert not kernels.use_triton(x.bfloat16(), h.bfloat16())  # the interpreter has no bf16
    kernels.FORCE_TRITON = False
    assert not kernels.use_triton(x, h, w, nw)                 # CPU without the flag: references
    kernels.FORCE_TRITON = True
    w.requires_grad_()
    assert not kernels.use_triton(x, h, w, nw)                 # autograd: references
    with torch.no_grad():
        assert kernels.use_triton(x, h, w, nw)


def test_autograd_takes_the_reference_and_gets_gradients():
    x, h, w, nw, valid = inputs()
    w.requires_grad_()
    p, idx, rows = kernels.route_gather(x, h, w, nw, EPS, threshold=0.5, valid=valid)
    out = kernels.scale_scatter(h, idx, rows, 1 + 0.05 * (p - 0.5))
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_bf16_under_the_interpreter_falls_back_to_the_reference(monkeypatch):
    """The interpreter runs on numpy, which has no bf16: route_gather on bf16 tensors must
    take the PyTorch reference (a spy counts the calls of each path) even with
    FORCE_TRITON, and give what the block computes, written out here in bf16: p from an
    fp32 logit, the tokens with p >= 0.5 among the valid ones, and model.RMSNorm of their rows."""
    calls = {"triton": 0, "reference": 0}

    def spy(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted
    for name in calls:
        monkeypatch.setattr(kernels, f"route_gather_{name}", spy(name, getattr(kernels, f"route_gather_{name}")))
    x, h, w, nw, valid = (t.bfloat16() if t.is_floating_point() else t for t in inputs())
    p, idx, rows = kernels.route_gather(x, h, w, nw, EPS, threshold=0.5, valid=valid)
    assert calls == {"triton": 0, "reference": 1}
    want_p = torch.sigmoid(x.float() @ w.float().reshape(-1))
    want_idx = ((want_p >= 0.5) & valid).nonzero().squeeze(1)
    norm = RMSNorm(C, EPS).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(nw)
        want_rows = norm(h[want_idx])
    assert 0 < want_idx.numel() < int(valid.sum())
    assert torch.allclose(p, want_p, atol=1e-6) and torch.equal(idx, want_idx)
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, want_rows)
    kernels.route_gather(*(t.float() for t in (x, h, w, nw)), EPS, threshold=0.5, valid=valid)
    assert calls == {"triton": 1, "reference": 1}   # the same call in fp32 takes the kernels: the spy sees them


def test_routed_model_same_logits_with_kernels_and_references(monkeypatch):
    """End to end: a DLO-routed tiny model through the fused path equals the unfused one."""
    import methods
    from conftest import tiny_model
    from router import Rule
    model = methods.activate(tiny_model(n_embd=48), "mlp")
    with torch.no_grad():
        for layer in model.layers:
            layer.router.weight.normal_(0, 0.5)
    idx = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(3, 13, dtype=torch.bool)
    valid[0, 9:] = False
    calls = []
    launch = kernels.route_gather_triton
    monkeypatch.setattr(kernels, "route_gather_triton", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    with torch.no_grad():
        fused, _ = model(idx, valid=valid, rule=Rule("threshold", 0.5))
        fused_sel = [t.sel for t in model.route_trace]
        kernels.FORCE_TRITON = False
        ref, _ = model(idx, valid=valid, rule=Rule("threshold", 0.5))
    assert len(calls) == len(model.route_trace) > 0          # every routed layer took the kernels
    assert all(torch.equal(a, t.sel) for a, t in zip(fused_sel, model.route_trace))
    assert 0 < sum(int(s.sum()) for s in fused_sel) < len(fused_sel) * int(valid.sum())
    assert (fused[valid] - ref[valid]).abs().max() < 1e-5


# ---------------------------------------------------------------- route + MLP

I, GAP = 72, 0.05   # tiles of 32 rows of I: the last one masks 24
GATE = functools.partial(dlo_gate, gap=GAP)
SYNCS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero"}   # torch 2.13's names


def mlp_inputs(seed=0, n=N, c=C, i=I):
    g = torch.Generator().manual_seed(seed)
    x, h = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g) * 3
    w, nw = torch.randn(1, c, generator=g) / c ** 0.5, torch.rand(c, generator=g) + 0.5
    valid = torch.rand(n, generator=g) > 0.25
    gate, up = torch.randn(i, c, generator=g) / c ** 0.5, torch.randn(i, c, generator=g) / c ** 0.5
    down = torch.randn(c, i, generator=g) / i ** 0.5   # nn.Linear layout: (out, in)
    return x, h, w, nw, valid, (gate, up, down)


def check_route_mlp(x, h, w, nw, valid, mlp, threshold, inplace=False):
    before = h.clone()
    ref, p_ref, sel_ref = kernels.route_mlp_reference(x, before, w, nw, EPS, threshold, valid, *mlp, GATE)
    out, p, sel = kernels.route_mlp_triton(x, h, w, nw, EPS, threshold, valid, *mlp, GATE, inplace=inplace)
    assert p.dtype == torch.float32 and sel.dtype == torch.bool
    assert torch.allclose(p, p_ref, atol=1e-6) and torch.equal(sel, sel_ref)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)     # fp32, summed in another order
    assert torch.equal(out[~sel], before[~sel])               # skipped rows are exactly h
    if valid is not None:
        assert not sel[~valid].any()                          # padding never runs
    if inplace:
        assert out.data_ptr() == h.data_ptr()
    else:
        assert torch.equal(h, before)
    return sel


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("threshold, expect", [(0.5, "some"), (0.0, "all"), (1.01, "none")])
def test_route_mlp_equals_reference(threshold, expect, as_tensor, padded, inplace):
    x, h, w, nw, valid, mlp = mlp_inputs()
    valid = valid if padded else None
    sel = check_route_mlp(x, h, w, nw, valid, mlp, torch.tensor(threshold) if as_tensor else threshold, inplace)
    everyone = valid if padded else torch.ones(N, dtype=torch.bool)
    if expect == "all":
        assert torch.equal(sel, everyone)
    elif expect == "none":
        assert not sel.any()
    else:
        assert 0 < int(sel.sum()) < int(everyone.sum())


def test_route_mlp_wide_rows_loop_over_chunks():
    """C = 300 and I = 200 take several 128-wide chunks, the last one masked, in both kernels."""
    x, h, w, nw, valid, mlp = mlp_inputs(1, n=5, c=300, i=200)
    assert check_route_mlp(x, h, w, nw, valid, mlp, 0.5).any()


def test_route_mlp_reference_is_the_block_mlp():
    """The reference against model.MLP, model.RMSNorm and router.Router in the dense, masked
    form of Block.mlp_routed. The model runs gate and up as one matmul, the reference as two:
    the same dot products, summed in another blocking, so equal to fp32 round-off."""
    from conftest import tiny_config
    from model import MLP
    from router import Router
    x, h, w, nw, valid, (wg, wu, wd) = mlp_inputs(2)
    cfg = tiny_config(n_embd=C, n_head=5, n_kv_head=1, intermediate_size=I)
    mlp, norm, router = MLP(cfg), RMSNorm(C, EPS), Router(C)
    with torch.no_grad():
        for param, value in ((mlp.gate_up_proj.weight, torch.cat([wg, wu])), (mlp.down_proj.weight, wd),
                             (norm.weight, nw), (router.weight, w)):
            param.copy_(value)
        p = torch.sigmoid(router(x))   # Router returns the fp32 logit
        sel = (p >= 0.5) & valid
        expect = h + (sel * dlo_gate(p, GAP)).unsqueeze(-1) * mlp(norm(h))
        out, p_ref, sel_ref = kernels.route_mlp_reference(x, h, w, nw, EPS, 0.5, valid, wg, wu, wd, GATE)
    assert 0 < int(sel.sum()) < int(valid.sum())
    assert torch.equal(p_ref, p) and torch.equal(sel_ref, sel) and torch.allclose(out, expect, atol=1e-5)


def test_dlo_gate_is_the_papers_formula():
    """g(p) = 1 + gap (p - 0.5) (arXiv 2407.11030, eq. 3): 1 at p = 0.5, 1 +- gap / 2 at the ends.
    Every path (training, batch-1 decode, the fused prefill, the Triton decode) calls this one
    function, so changing the gate is one edit here, and this test says that it changed."""
    got = dlo_gate(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 0.05)
    assert torch.allclose(got, torch.tensor([0.975, 1.0, 1.025], dtype=torch.float64), rtol=0, atol=1e-12)
    assert abs(dlo_gate(0.9, 0.5) - 1.2) < 1e-12


def test_the_kernels_apply_the_gate_they_are_given():
    """The fused decode and prefill take the block's gate function: another gate (here g(p) = p)
    changes their output exactly as it changes the reference's, with no formula of their own."""
    x, h, w, nw, valid, mlp = mlp_inputs()
    as_p = lambda p: p
    ref_p, _, sel = kernels.route_mlp_reference(x, h.clone(), w, nw, EPS, 0.5, valid, *mlp, as_p)
    out_p, _, _ = kernels.route_mlp_triton(x, h, w, nw, EPS, 0.5, valid, *mlp, as_p)
    out_dlo, _, _ = kernels.route_mlp_triton(x, h, w, nw, EPS, 0.5, valid, *mlp, GATE)
    assert sel.any() and torch.allclose(out_p, ref_p, atol=1e-5)
    assert (out_p - out_dlo)[sel].abs().max() > 1e-2                 # the gate given, not DLO's, was applied


def event_names(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events()}


def test_route_mlp_never_syncs_the_host(monkeypatch):
    """route_gather_triton must read M back to size its rows; route_mlp reads nothing back."""
    x, h, w, nw, valid, mlp = mlp_inputs()
    calls = []
    launch = kernels.route_mlp_triton
    monkeypatch.setattr(kernels, "route_mlp_triton", lambda *a: calls.append(1) or launch(*a))
    for threshold in (0.5, torch.tensor(0.5)):
        names = event_names(lambda: kernels.route_mlp(x, h, w, nw, EPS, threshold, valid, *mlp, GATE))
        assert "aten::clone" in names and not names & SYNCS   # the profiler saw the call, and no sync in it
    assert len(calls) == 2                                    # the kernels ran, not the reference
    names = event_names(lambda: kernels.route_gather_triton(x, h, w, nw, EPS, threshold=0.5, valid=valid))
    assert names & {"aten::item", "aten::_local_scalar_dense"}


def test_route_mlp_autograd_takes_the_reference_and_gets_gradients():
    x, h, w, nw, valid, (wg, wu, wd) = mlp_inputs()
    w.requires_grad_()
    wd.requires_grad_()
    out, p, sel = kernels.route_mlp(x, h, w, nw, EPS, 0.5, valid, wg, wu, wd, GATE)
    out.sum().backward()
    assert w.grad.abs().sum() > 0 and wd.grad.abs().sum() > 0   # g(p) carries the router's gradient


COMPILE_FOR_H100 = '''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels

def build(fn, signature, constants):
    signature.update({name: "constexpr" for name in constants})
    triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32))

for dt in ("fp32", "bf16"):
    for by_pointer in (False, True):
        build(kernels._route_kernel, dict(x_ptr=f"*{dt}", w_ptr="*fp32", valid_ptr="*i1", always_ptr="*i1",
              p_ptr="*fp32", sel_ptr="*i1", threshold="*fp32" if by_pointer else "fp32", C="i32", stride_x="i32"),
              dict(HAS_VALID=True, HAS_ALWAYS=True, DECIDE=True, THRESHOLD_PTR=by_pointer, BLOCK_C=1024))
    build(kernels._gather_norm_kernel, dict(h_ptr=f"*{dt}", nw_ptr=f"*{dt}", sel_ptr="*i1", pos_ptr="*i64",
          idx_ptr="*i64", out_ptr=f"*{dt}", C="i32", stride_h="i32", stride_o="i32", eps="fp32"), dict(BLOCK_C=1024))
    build(kernels._scale_scatter_kernel, dict(base_ptr="*fp32", idx_ptr="*i64", y_ptr=f"*{dt}", gate_ptr="*fp32",
          C="i32", stride_b="i32", stride_y="i32"), dict(BLOCK_C=1024))
    build(kernels._gate_up_kernel, dict(h_ptr=f"*{dt}", nw_ptr=f"*{dt}", sel_ptr="*i1", wg_ptr=f"*{dt}",
          wu_ptr=f"*{dt}", act_ptr="*fp32", C="i32", I="i32", stride_h="i32", stride_g="i32", stride_u="i32",
          stride_a="i32", eps="fp32"), dict(BLOCK_I=32, BLOCK_K=128))
    build(kernels._down_kernel, dict(act_ptr="*fp32", wd_ptr=f"*{dt}", sel_ptr="*i1", g_ptr="*fp32",
          out_ptr=f"*{dt}", C="i32", I="i32", stride_a="i32", stride_d="i32", stride_o="i32"),
          dict(BLOCK_N=32, BLOCK_K=128))
print("compiled")
'''


@pytest.mark.slow
def test_every_kernel_compiles_for_an_h100():
    """The interpreter accepts code the GPU compiler may not: compile every kernel to PTX for
    sm_90 (H100), in fp32 and bf16, with Triton's own compiler and no GPU present."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
