"""
Fused Triton kernels for a routed layer's skip path, with the PyTorch references that
are the source of truth (and the path on CPU, under autograd, and without Triton).

1. route + gather: for N tokens of width C, the router score p = sigmoid(x . w), the
   decision (p >= threshold, or the top-k of p with ties kept), the ascending list idx
   of the M selected tokens, and their rows of h RMS-normalised by the block's norm,
   packed (M, C): exactly what the routed branch (the MLP) reads next.
2. scale + scatter: base[idx] += g[idx] * y, the branch output added back, gated.

Memory traffic, b = bytes per element of x and h (2 for bf16), fp32 temporaries 4 bytes,
eager PyTorch launching one kernel per op (O(N) vectors listed apart):

  unfused route + gather                      read              write
    x @ w, .float(), sigmoid                  NCb               O(N)
    p >= t, & valid, nonzero                  O(N)              O(N) + 8M
    h[idx]                                    MCb               MCb
    RMSNorm: .float, pow, mean, *rsqrt,       MC(2b + 16)       MC(2b + 12)
             .type_as, *weight
    total  ~ NCb + MC(6b + 28) bytes, b < 4   (bf16: 2NC + 40MC)
  fused: kernel (a) reads x, writes p and the decision; kernel (b) reads the M selected
    rows of h, writes them normalised plus idx
    total  ~ NCb + 2MCb + O(N) bytes          (bf16: 2NC +  4MC)

  unfused scale + scatter: y * g reads and writes MCb; index_add copies base (2NCb) and
    reads and writes M rows of it (3MCb): 2NCb + 5MCb
  fused: reads y and M rows of base, writes them: 3MCb, plus 2NCb for the copy unless
    inplace=True (the caller owns base, as Block.mlp_routed_fused's fresh residual does)

Saved per routed layer: MC(4b + 28) bytes in route + gather (bf16: 36MC; fp32, where the
.float/.type_as copies vanish: 28MC), 2MCb in scale + scatter, 2NCb more with inplace; and
skipped tokens cost one read of their row of x and nothing more.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU-only installs: the references do all the work
    HAS_TRITON = False

FORCE_TRITON = False   # tests set this to run the kernels on CPU tensors under the interpreter
# triton.jit picks the interpreter when it decorates, i.e. when this module is imported
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETER_DTYPES = (torch.float32,)   # the interpreter runs on numpy, which has no bf16


# ---------------------------------------------------------------- references

def decide(p, valid, threshold=None, k=None):
    """p >= threshold, or the top-k of p among valid tokens with ties at the k-th value kept
    (k = 0 selects none). Padding (valid False) is never selected."""
    valid = torch.ones_like(p, dtype=torch.bool) if valid is None else valid
    if k is None:
        return (p >= threshold) & valid
    if k <= 0 or p.numel() == 0:
        return torch.zeros_like(valid)
    kth = p.masked_fill(~valid, -1.0).topk(min(k, p.numel())).values[-1]   # p <= 1, so -1 never ties
    return (p >= kth) & valid


def rms_norm(h, weight, eps):
    """HF Llama's RMSNorm (model.RMSNorm): fp32 statistics, round to h's dtype, then scale."""
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * weight


def route_gather_reference(x, h, router_weight, norm_weight, eps, threshold=None, k=None, valid=None):
    """x, h (N, C); router_weight (C,) or (1, C); norm_weight (C,); valid (N,) bool or None.
    The router reads x (the block input); rows come from h (the post-attention residual for
    MLP routing, x itself for whole-block routing). Returns p (N,) fp32, idx (M,) int64
    ascending, rows (M, C) = RMSNorm(h[idx])."""
    p = torch.sigmoid((x @ router_weight.reshape(-1).to(x.dtype)).float())   # as router.Router
    idx = decide(p, valid, threshold, k).nonzero().squeeze(1)
    return p, idx, rms_norm(h[idx], norm_weight, eps)


def scale_scatter_reference(base, idx, y, gate, inplace=False):
    """base (N, C) with base[idx] += gate[idx, None] * y; gate (N,) fp32, e.g. DLO's g(p).
    Out of place unless inplace=True, as model.add_rows."""
    add = base.index_add_ if inplace else base.index_add
    return add(0, idx, y * gate[idx, None].to(y.dtype))


# ---------------------------------------------------------------- kernels

if HAS_TRITON:
    @triton.jit
    def _route_kernel(x_ptr, w_ptr, valid_ptr, p_ptr, sel_ptr, threshold, C, stride_x,
                      HAS_VALID: tl.constexpr, DECIDE: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)   # int64: row * stride_x can pass 2**31
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        # the only read of the token's row; w is rounded to x's dtype as F.linear sees it
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(x.dtype)
        # fp32 accumulation, then the logit rounded to x's dtype: F.linear's output, .float()
        logit = tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=0).to(x.dtype).to(tl.float32)
        p = tl.sigmoid(logit)
        tl.store(p_ptr + row, p)
        if DECIDE:   # threshold rule: per token, so decided here; top-k needs all of p first
            keep = p >= threshold
            if HAS_VALID:
                keep = keep & (tl.load(valid_ptr + row) != 0)   # padding never runs
            tl.store(sel_ptr + row, keep)

    @triton.jit
    def _gather_norm_kernel(h_ptr, nw_ptr, sel_ptr, pos_ptr, idx_ptr, out_ptr, C, stride_h, stride_o, eps,
                            BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        # a skipped token reads one byte and stops: its row of h is never touched
        if tl.load(sel_ptr + row) != 0:
            cols = tl.arange(0, BLOCK_C)
            mask = cols < C
            # its slot in the packed output: the exclusive prefix sum keeps token order
            dst = tl.load(pos_ptr + row)
            h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
            hf = h.to(tl.float32)
            # fp32 statistics; masked columns are 0, so the sum is over the C real ones
            inv = tl.rsqrt(tl.sum(hf * hf, axis=0) / C + eps)
            # round to h's dtype before the weight, exactly as model.RMSNorm does
            normed = (hf * inv).to(h.dtype).to(tl.float32)
            nw = tl.load(nw_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + dst * stride_o + cols, (normed * nw).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(idx_ptr + dst, row)

    @triton.jit
    def _scale_scatter_kernel(base_ptr, idx_ptr, y_ptr, gate_ptr, C, stride_b, stride_y, BLOCK_C: tl.constexpr):
        m = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        # the token this packed row belongs to, and its gate, rounded as the reference's .to(y.dtype)
        row = tl.load(idx_ptr + m)
        y = tl.load(y_ptr + m * stride_y + cols, mask=mask, other=0.0)
        g = tl.load(gate_ptr + row).to(y.dtype).to(tl.float32)
        # y * g rounded to y's dtype, then one rounded add: the same two roundings as index_add
        t = (y.to(tl.float32) * g).to(y.dtype).to(tl.float32)
        b = tl.load(base_ptr + row * stride_b + cols, mask=mask, other=0.0)
        # idx has no repeats, so each row of base has one owner: no atomics needed
        tl.store(base_ptr + row * stride_b + cols, (b.to(tl.float32) + t).to(b.dtype), mask=mask)


def _launch_settings(C):
    """One program holds a whole row: BLOCK_C = next power of two >= C; wider rows, more warps."""
    block = triton.next_power_of_2(C)
    return block, 4 if block < 2048 else 8 if block < 8192 else 16


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def route_gather_triton(x, h, router_weight, norm_weight, eps, threshold=None, k=None, valid=None):
    """route_gather_reference in two launches. Compacting in ascending token order needs
    each selected token's rank among the selected ones: kernel (a) writes p and the 0/1
    decision, torch.cumsum turns the decisions into slots (an exclusive prefix sum over N
    bytes, nothing next to the N x C rows), and kernel (b) writes each selected token's
    index and normalised row into its slot. An atomic counter would be one launch but
    would pack rows in a racy order."""
    if (threshold is None) == (k is None):
        raise ValueError("route_gather: give exactly one of threshold and k")
    N, C = x.shape
    x, h = _unit_stride(x), _unit_stride(h)
    dev = x.device
    p = torch.empty(N, dtype=torch.float32, device=dev)
    sel = torch.zeros(N, dtype=torch.bool, device=dev)
    rows_dtype = torch.promote_types(h.dtype, norm_weight.dtype)   # as `.to(h.dtype) * weight`
    if N == 0:
        return p, torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, C, dtype=rows_dtype, device=dev)
    block, warps = _launch_settings(C)
    _route_kernel[(N,)](x, router_weight.reshape(-1).contiguous(), sel if valid is None else valid, p, sel,
                        0.0 if threshold is None else float(threshold), C, x.stride(0),
                        HAS_VALID=valid is not None, DECIDE=k is None, BLOCK_C=block, num_warps=warps)
    if k is not None:
        sel = decide(p, valid, k=k)
    ends = torch.cumsum(sel, 0)        # inclusive prefix sum, int64
    m = int(ends[-1])                  # the one host sync: (M, C) must be allocated (nonzero syncs too)
    idx = torch.empty(m, dtype=torch.int64, device=dev)
    rows = torch.empty(m, C, dtype=rows_dtype, device=dev)
    if m:
        _gather_norm_kernel[(N,)](h, norm_weight.contiguous(), sel, ends - sel.long(), idx, rows, C, h.stride(0),
                                  rows.stride(0), float(eps), BLOCK_C=block, num_warps=warps)
    return p, idx, rows


def scale_scatter_triton(base, idx, y, gate, inplace=False):
    """scale_scatter_reference in one launch, one program per selected row. Works on a
    copy of base unless inplace=True (then base must have unit stride along C)."""
    out = base if inplace else base.clone(memory_format=torch.contiguous_format)
    if inplace and out.stride(-1) != 1:
        raise ValueError("scale_scatter(inplace=True) needs base with unit stride along C")
    if idx.numel():
        y = _unit_stride(y)
        block, warps = _launch_settings(out.size(1))
        _scale_scatter_kernel[(idx.numel(),)](out, idx.contiguous(), y, gate.float().contiguous(), out.size(1),
                                              out.stride(0), y.stride(0), BLOCK_C=block, num_warps=warps)
    return out


# ---------------------------------------------------------------- dispatch

def use_triton(*tensors):
    """True when the kernels should run on these tensors: Triton is importable; no autograd
    (the kernels have no backward, so training takes the differentiable references); and
    all tensors on CUDA, or FORCE_TRITON under the interpreter for a dtype it can run.
    On CUDA a kernel error is raised, never papered over with the reference."""
    if not HAS_TRITON:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return (FORCE_TRITON and INTERPRET
            and all(t.device.type == "cpu" and t.dtype in INTERPRETER_DTYPES for t in tensors))


def route_gather(x, h, router_weight, norm_weight, eps, threshold=None, k=None, valid=None):
    fused = use_triton(x, h, router_weight, norm_weight)
    fn = route_gather_triton if fused else route_gather_reference
    return fn(x, h, router_weight, norm_weight, eps, threshold, k, valid)


def scale_scatter(base, idx, y, gate, inplace=False):
    # gate counts too: DLO's g(p) carries the router's gradient (DLO eq. 3)
    fn = scale_scatter_triton if use_triton(base, y, gate) else scale_scatter_reference
    return fn(base, idx, y, gate, inplace)
