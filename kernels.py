"""
Triton kernels for the routed MLP path of a layer, with PyTorch references that are
the source of truth and the path everywhere else (CPU, autograd, no Triton).

1. route + gather: for N tokens of width C, p = sigmoid(x . w) per token, the decision
   (p >= threshold, or the top-k by p), the ascending list of selected tokens, and
   their rows of h already RMS-normalised by the block's norm, packed into (M, C).
2. scale + scatter: h[idx] += g(p)[idx] * y, the routed branch added back in place.

Memory traffic (elements; b bytes each). Unfused PyTorch: the router reads x (NC) and
writes p (N); the decision reads p and writes a mask (2N); nonzero reads the mask (N);
the gather reads M rows of h and writes them (2MC); RMSNorm reads them, writes fp32
statistics and the normalised rows (~3MC); the scatter reads h, y and writes h (3MC
with index_add's copy). Fused: kernel 1 reads x (NC) and writes p and the decision
(2N); kernel 2 reads M rows of h and writes the normalised rows and idx (2MC + M);
kernel 3 reads y and M rows of h and writes them back (3MC). Saved: about 3MC + 2N
elements per layer, and four kernel launches become three.

Compaction in ascending token order uses an exclusive prefix sum of the decisions
between the two gather launches (torch.cumsum over N integers: tiny next to NC).
"""
import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU-only installs: the references do all the work
    HAS_TRITON = False

FORCE_TRITON = False   # tests set this under TRITON_INTERPRET=1 to run the kernels on CPU
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def decide(p, valid, threshold=None, k=None):
    """p >= threshold, or the top-k of p among valid tokens with ties at the k-th kept."""
    valid = torch.ones_like(p, dtype=torch.bool) if valid is None else valid
    if k is None:
        return (p >= threshold) & valid
    if k <= 0:
        return torch.zeros_like(valid)
    kth = p.masked_fill(~valid, -1.0).topk(min(k, p.numel())).values[-1]
    return (p >= kth) & valid


def rms_norm(h, weight, eps):
    hf = h.float()   # as the model's RMSNorm: fp32 statistics
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * weight


def route_gather_reference(x, h, router_weight, norm_weight, eps, threshold=None, k=None, valid=None):
    """x, h (N, C): the router reads x, rows come from h. Returns p (N,) fp32, idx (M,)
    ascending, rows (M, C) = RMSNorm(h[idx])."""
    p = torch.sigmoid((x @ router_weight.reshape(-1).to(x.dtype)).float())
    idx = decide(p, valid, threshold, k).nonzero().squeeze(1)
    return p, idx, rms_norm(h[idx], norm_weight, eps)


def scale_scatter_reference(base, idx, y, gate):
    """base (N, C) with base[idx] += gate[idx, None] * y, out of place."""
    return base.index_add(0, idx, y * gate[idx, None].to(y.dtype))


if HAS_TRITON:
    @triton.jit
    def _route_kernel(x_ptr, w_ptr, p_ptr, C, stride_x, BLOCK_C: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        # one read of the token's row and of the router weight, accumulated in fp32
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(p_ptr + row, tl.sigmoid(tl.sum(x * w, axis=0)))

    @triton.jit
    def _gather_norm_kernel(h_ptr, nw_ptr, sel_ptr, pos_ptr, idx_ptr, out_ptr, C, stride_h, stride_o, eps,
                            BLOCK_C: tl.constexpr):
        row = tl.program_id(0)
        if tl.load(sel_ptr + row) != 0:       # skipped tokens read nothing more
            cols = tl.arange(0, BLOCK_C)
            mask = cols < C
            dst = tl.load(pos_ptr + row)      # exclusive prefix sum: ascending compaction
            h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
            hf = h.to(tl.float32)
            inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / C + eps)
            # normalise in fp32, round to the input dtype, then scale: as the model's RMSNorm
            normed = (hf * inv).to(h.dtype) * tl.load(nw_ptr + cols, mask=mask, other=0.0)
            tl.store(out_ptr + dst * stride_o + cols, normed, mask=mask)
            tl.store(idx_ptr + dst, row.to(tl.int64))

    @triton.jit
    def _scale_scatter_kernel(base_ptr, idx_ptr, y_ptr, gate_ptr, C, stride_b, stride_y, BLOCK_C: tl.constexpr):
        m = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        row = tl.load(idx_ptr + m)
        g = tl.load(gate_ptr + row)
        y = tl.load(y_ptr + m * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(base_ptr + row * stride_b + cols, mask=mask, other=0.0)
        # each selected row is owned by one program: the in-place add needs no atomics
        tl.store(base_ptr + row * stride_b + cols, (b.to(tl.float32) + g * y).to(b.dtype), mask=mask)


def route_gather_triton(x, h, router_weight, norm_weight, eps, threshold=None, k=None, valid=None):
    N, C = x.shape
    x, h = x.contiguous(), h.contiguous()
    block = triton.next_power_of_2(C)
    p = torch.empty(N, dtype=torch.float32, device=x.device)
    _route_kernel[(N,)](x, router_weight.reshape(-1).contiguous(), p, C, x.stride(0), BLOCK_C=block)
    sel = decide(p, valid, threshold, k)
    pos = torch.cumsum(sel, 0) - sel.long()
    m = int(sel.sum())
    idx = torch.empty(m, dtype=torch.int64, device=x.device)
    rows = torch.empty(m, C, dtype=h.dtype, device=x.device)
    _gather_norm_kernel[(N,)](h, norm_weight.contiguous(), sel.to(torch.int8), pos, idx, rows, C, h.stride(0),
                              C, eps, BLOCK_C=block)
    return p, idx, rows


def scale_scatter_triton(base, idx, y, gate):
    out = base.contiguous().clone()
    if idx.numel():
        y = y.contiguous()
        _scale_scatter_kernel[(idx.numel(),)](out, idx, y, gate.float().contiguous(), out.size(1), out.stride(0),
                                              y.stride(0), BLOCK_C=triton.next_power_of_2(out.size(1)))
    return out


def use_triton(*tensors):
    """The kernels run on CUDA (or under the interpreter when FORCE_TRITON), never under
    autograd: they have no backward, so training uses the differentiable references."""
    if not HAS_TRITON:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    on_device = all(t.is_cuda for t in tensors)
    return on_device or (FORCE_TRITON and INTERPRET and tensors[0].dtype == torch.float32)


def route_gather(x, h, router_weight, norm_weight, eps, threshold=None, k=None, valid=None):
    fn = route_gather_triton if use_triton(x, h, router_weight, norm_weight) else route_gather_reference
    return fn(x, h, router_weight, norm_weight, eps, threshold, k, valid)


def scale_scatter(base, idx, y, gate):
    fn = scale_scatter_triton if use_triton(base, y) else scale_scatter_reference
    return fn(base, idx, y, gate)
