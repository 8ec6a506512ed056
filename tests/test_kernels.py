"""Triton kernels (run by the interpreter, fp32) against their PyTorch references."""
import pytest
import torch

import kernels
from model import RMSNorm

pytest.importorskip("triton")
if not kernels.INTERPRET:
    pytest.skip("set TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)


@pytest.fixture(autouse=True)
def force_triton():
    kernels.FORCE_TRITON = True
    yield
    kernels.FORCE_TRITON = False


def inputs(seed=0, N=37, C=50):
    g = torch.Generator().manual_seed(seed)
    x, h = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g) * 3
    w, nw = torch.randn(C, generator=g) / C ** 0.5, torch.rand(C, generator=g) + 0.5
    valid = torch.rand(N, generator=g) > 0.2
    return x, h, w, nw, valid


@pytest.mark.parametrize("rule", [dict(threshold=0.5), dict(threshold=0.0), dict(threshold=1.01),
                                  dict(k=9), dict(k=0), dict(k=37)])
def test_route_gather_equals_reference(rule):
    x, h, w, nw, valid = inputs()
    p, idx, rows = kernels.route_gather_triton(x, h, w, nw, 1e-5, valid=valid, **rule)
    p_ref, idx_ref, rows_ref = kernels.route_gather_reference(x, h, w, nw, 1e-5, valid=valid, **rule)
    assert torch.allclose(p, p_ref, atol=1e-6)
    assert torch.equal(idx, idx_ref) and bool((idx[1:] > idx[:-1]).all())     # ascending
    assert not (~valid[idx]).any()                                          # padding never selected
    assert torch.allclose(rows, rows_ref, atol=1e-5)
    norm = RMSNorm(50, 1e-5)
    norm.weight.data.copy_(nw)
    with torch.no_grad():
        assert torch.allclose(rows, norm(h[idx]), atol=1e-5)                # exactly the block's norm
    if rule.get("threshold") == 0.0:
        assert torch.equal(idx, valid.nonzero().squeeze(1))                 # all selected
    if rule.get("threshold") == 1.01 or rule.get("k") == 0:
        assert idx.numel() == 0 and rows.shape == (0, 50)                   # none selected


def test_topk_keeps_ties():
    x, h, w, nw, valid = inputs()
    x[:10] = x[0]                                                           # ten equal scores
    valid[:10] = True
    p, idx, _ = kernels.route_gather_triton(x, h, w, nw, 1e-5, k=3, valid=valid)
    if p[0] >= p[valid].topk(3).values[-1]:
        assert set(range(10)) <= set(idx.tolist())


@pytest.mark.parametrize("selected", [0, 1, 20, 37])
def test_scale_scatter_equals_reference(selected):
    g = torch.Generator().manual_seed(selected)
    base = torch.randn(37, 50, generator=g)
    idx = torch.randperm(37, generator=g)[:selected].sort().values
    y, gate = torch.randn(selected, 50, generator=g), torch.rand(37, generator=g) + 0.5
    out = kernels.scale_scatter_triton(base, idx, y, gate)
    assert torch.allclose(out, kernels.scale_scatter_reference(base, idx, y, gate), atol=1e-6)
    assert not torch.equal(out, base) or selected == 0                      # base itself is untouched


def test_dispatch_falls_back_under_autograd_and_without_force():
    x, h, w, nw, _ = inputs()
    assert kernels.use_triton(x, h, w, nw)
    assert not kernels.use_triton(x, h, w.requires_grad_(), nw)             # training: references
    kernels.FORCE_TRITON = False
    assert not kernels.use_triton(x, h, nw)                                 # CPU: references


def test_routed_model_same_logits_with_kernels_and_references(monkeypatch):
    import dlo
    from conftest import tiny_model
    from router import Rule
    model = dlo.activate(tiny_model(n_embd=48, n_head=4, n_kv_head=2), "mlp")
    with torch.no_grad():
        for layer in model.layers:
            layer.router.weight.normal_(0, 0.5)
    idx = torch.randint(0, 97, (3, 13))
    valid = torch.ones(3, 13, dtype=torch.bool)
    valid[0, 9:] = False
    rule = Rule("threshold", 0.5)
    calls = []
    launch = kernels.route_gather_triton
    monkeypatch.setattr(kernels, "route_gather_triton", lambda *a, **k: calls.append(1) or launch(*a, **k))
    with torch.no_grad():
        fused, _ = model(idx, valid=valid, rule=rule)
        assert len(calls) == 4                                              # every routed layer fused
        fused_sel = [t["sel"] for t in model.route_trace]
        kernels.FORCE_TRITON = False
        ref, _ = model(idx, valid=valid, rule=rule)
    assert all(torch.equal(a, t["sel"]) for a, t in zip(fused_sel, model.route_trace))
    assert 0 < sum(int(s.sum()) for s in fused_sel) < 4 * int(valid.sum())
    assert (fused[valid] - ref[valid]).abs().max() < 1e-5
