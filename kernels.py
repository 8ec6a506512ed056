"""
Fused Triton kernels for a routed layer's skip path, with the PyTorch references that
are the source of truth (and the path on CPU, under autograd, and without Triton).

1. route + gather: for N tokens of width C, the router score p = sigmoid(x . w) with the
   logit in fp32 (F.linear(x.float(), w.float()), as router.Router: nothing is rounded to
   x's dtype), the decision (p >= threshold, or the top-k of p with ties kept), the
   ascending list idx of the M selected tokens, and their rows of h RMS-normalised by the
   block's norm, packed (M, C): exactly what the routed branch (the MLP) reads next.
2. scale + scatter: base[idx] += g[idx] * y, the branch output added back, gated.
3. route + MLP, for decode on CUDA: p, sel = (p >= threshold) & valid and
   out = h + sel * g(p) * mlp(RMSNorm(h)) for the SwiGLU MLP, with the decision read on the
   device. Route + gather must size its packed rows on the host, a sync in every routed
   layer that stalls batch-1 decode; this path has none, so the CPU queues the next layers
   ahead of the GPU and a decode step can be captured in a CUDA graph.

Memory traffic, b = bytes per element of x and h (2 for bf16), fp32 temporaries 4 bytes,
eager PyTorch launching one kernel per op (O(N) vectors listed apart):

  unfused route + gather                      read              write
    x.float(), @ w, sigmoid                   NC(b + 4)         4NC + O(N)
    p >= t, & valid, nonzero                  O(N)              O(N) + 8M
    h[idx]                                    MCb               MCb
    RMSNorm: .float, pow, mean, *rsqrt,       MC(2b + 16)       MC(2b + 12)
             .type_as, *weight
    total  ~ NC(b + 8) + MC(6b + 28) bytes, b < 4   (bf16: 10NC + 40MC)
  fused: kernel (a) reads x, writes p and the decision; kernel (b) reads the M selected
    rows of h, writes them normalised plus idx
    total  ~ NCb + 2MCb + O(N) bytes          (bf16: 2NC +  4MC)

  unfused scale + scatter: y * g reads and writes MCb; index_add copies base (2NCb) and
    reads and writes M rows of it (3MCb): 2NCb + 5MCb
  fused: reads y and M rows of base, writes them: 3MCb, plus 2NCb for the copy unless
    inplace=True (the caller owns base, as dlo.RoutedBlock.forward_fused's fresh residual does)

Saved per routed layer: 8NC + MC(4b + 28) bytes in route + gather (bf16: 8NC + 36MC; fp32,
where the .float/.type_as copies vanish: 28MC), 2MCb in scale + scatter, 2NCb more with
inplace; and skipped tokens cost one read of their row of x and nothing more.

  fused route + MLP, weights of I x C with b_w bytes each: a skipped row reads its row of
    x and the router weight, C(b + 4), writes p and sel, and nothing more. A run row reads
    each of the three weight matrices once, split over its program tiles (3ICb_w), its row
    of h twice per tile of I (statistics, then values: 2Cb next to the tile's 2 x BLOCK_I x C
    weights), writes and reads I fp32 activations, and reads and writes its row of out;
    plus 2NCb for the copy of h unless inplace=True. Weights are not shared between rows:
    right for decode's few rows, wrong for prefill, where route + gather and a dense MLP
    on the packed (M, C) rows read them once.
"""
import os
import sys

import torch
import torch.nn.functional as F

FORCE_TRITON = False   # tests set this to run the kernels on CPU tensors under the interpreter
# triton.jit picks the interpreter when it decorates, i.e. when this module is imported
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = False
# on a CPU, outside the interpreter, nothing runs the kernels: not loading Triton saves ~70 MB
# (unless the process loaded it already, e.g. to compile them for a GPU it does not have)
if torch.cuda.is_available() or INTERPRET or "triton" in sys.modules:
    try:
        import triton
        import triton.language as tl
        HAS_TRITON = True
    except ImportError:  # CPU-only installs: the references do all the work
        pass
INTERPRETER_DTYPES = (torch.float32,)   # the interpreter runs on numpy, which has no bf16


# ---------------------------------------------------------------- references

def decide(p, valid, threshold=None, k=None, always=None):
    """p >= threshold, or the top-k of p among valid tokens with ties at the k-th value kept
    (k = 0 selects none). Tokens not valid are never selected, except those in `always`
    (the sink tokens: they always run and take no part in the count)."""
    valid = torch.ones_like(p, dtype=torch.bool) if valid is None else valid
    if k is None:
        sel = (p >= threshold) & valid
    elif k <= 0 or p.numel() == 0:
        sel = torch.zeros_like(valid)
    else:
        kth = p.masked_fill(~valid, -1.0).topk(min(k, p.numel())).values[-1]   # p <= 1, so -1 never ties
        sel = (p >= kth) & valid
    return sel if always is None else sel | always


def rms_norm(h, weight, eps):
    """HF Llama's RMSNorm (model.RMSNorm): fp32 statistics, round to h's dtype, then scale."""
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * weight


def router_probs(x, router_weight):
    """p = sigmoid(x . w) (N,) fp32, the logit computed in fp32 as router.Router does."""
    return torch.sigmoid(F.linear(x.float(), router_weight.reshape(1, -1).float()).squeeze(1))


def route_gather_reference(x, h, router_weight, norm_weight, eps, threshold=None, k=None, valid=None,
                           always=None):
    """x, h (N, C); router_weight (C,) or (1, C); norm_weight (C,); valid, always (N,) bool or None.
    The router reads x (the block input); rows come from h (the post-attention residual for
    MLP routing, x itself for whole-block routing). Returns p (N,) fp32, idx (M,) int64
    ascending, rows (M, C) = RMSNorm(h[idx])."""
    p = router_probs(x, router_weight)
    idx = decide(p, valid, threshold, k, always).nonzero().squeeze(1)
    return p, idx, rms_norm(h[idx], norm_weight, eps)


def scale_scatter_reference(base, idx, y, gate, inplace=False):
    """base (N, C) with base[idx] += gate[idx, None] * y; gate (N,) fp32, e.g. DLO's g(p).
    Out of place unless inplace=True. The product is rounded to y's dtype, then added in
    base's: under autocast the branch is bf16 and the residual stream stays fp32."""
    add = base.index_add_ if inplace else base.index_add
    return add(0, idx, (y * gate[idx, None].to(y.dtype)).to(base.dtype))


def route_mlp_reference(x, h, router_weight, norm_weight, eps, threshold, valid, gate_weight, up_weight,
                        down_weight, gate_fn, inplace=False, always=None):
    """x, h (N, C); threshold a float or a 0-dim tensor; valid, always (N,) bool or None; gate/up (I, C)
    and down (C, I) in nn.Linear layout. Returns out = h + sel * gate_fn(p) * mlp(RMSNorm(h)), with
    gate_fn the block's gate (router.dlo_gate for DLO), p (N,) fp32 and sel (N,) bool.
    Dense and masked: no host sync, at the price of running the MLP on every row."""
    p = router_probs(x, router_weight)
    sel = decide(p, valid, threshold=threshold, always=always)
    n = rms_norm(h, norm_weight, eps)
    y = F.linear(F.silu(F.linear(n, gate_weight)) * F.linear(n, up_weight), down_weight)
    g = gate_fn(p)
    # where, not sel * y: a skipped row is exactly h even if its y overflowed
    out = torch.where(sel[:, None], h + g[:, None].to(y.dtype) * y, h)
    return (h.copy_(out) if inplace else out), p, sel


# ---------------------------------------------------------------- kernels

if HAS_TRITON:
    @triton.jit
    def _route_kernel(x_ptr, w_ptr, valid_ptr, always_ptr, p_ptr, sel_ptr, threshold, C, stride_x,
                      HAS_VALID: tl.constexpr, HAS_ALWAYS: tl.constexpr, DECIDE: tl.constexpr,
                      THRESHOLD_PTR: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)   # int64: row * stride_x can pass 2**31
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        # the only read of the token's row, upcast with w to fp32 as router.Router does
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # the logit stays fp32: no rounding to x's dtype anywhere
        p = tl.sigmoid(tl.sum(x * w, axis=0))
        tl.store(p_ptr + row, p)
        if DECIDE:   # threshold rule: per token, so decided here; top-k needs all of p first
            if THRESHOLD_PTR:   # a threshold tensor is read here: float() of it would sync the host
                threshold = tl.load(threshold)
            keep = p >= threshold
            if HAS_VALID:
                keep = keep & (tl.load(valid_ptr + row) != 0)   # padding never runs
            if HAS_ALWAYS:
                keep = keep | (tl.load(always_ptr + row) != 0)  # sink tokens always run
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

    @triton.jit
    def _gate_up_kernel(h_ptr, nw_ptr, sel_ptr, wg_ptr, wu_ptr, act_ptr, C, I, stride_h, stride_g, stride_u,
                        stride_a, eps, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        # a skipped token reads one byte and stops: no row of h, no weights
        if tl.load(sel_ptr + row) == 0:
            return
        rows_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        mask_i = rows_i < I
        # RMS statistics of the whole row, recomputed by each tile: C reads next to its 2 x BLOCK_I x C weights
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, C, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            hk = tl.load(h_ptr + row * stride_h + cols, mask=cols < C, other=0.0).to(tl.float32)
            sq += hk * hk
        inv = tl.rsqrt(tl.sum(sq, axis=0) / C + eps)
        acc_g = tl.zeros([BLOCK_I], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_I], dtype=tl.float32)
        for k in range(0, C, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            mask_k = cols < C
            hk = tl.load(h_ptr + row * stride_h + cols, mask=mask_k, other=0.0)
            nw = tl.load(nw_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
            # normalise, round to h's dtype, scale and round to the MLP's input dtype, as model.RMSNorm
            n = (hk.to(tl.float32) * inv).to(hk.dtype).to(tl.float32) * nw
            n = n.to(wg_ptr.dtype.element_ty).to(tl.float32)
            # this tile's rows of gate and up against the chunk, accumulated in fp32
            mask_w = mask_i[:, None] & mask_k[None, :]
            wg = tl.load(wg_ptr + rows_i[:, None] * stride_g + cols[None, :], mask=mask_w, other=0.0)
            wu = tl.load(wu_ptr + rows_i[:, None] * stride_u + cols[None, :], mask=mask_w, other=0.0)
            acc_g += tl.sum(wg.to(tl.float32) * n[None, :], axis=1)
            acc_u += tl.sum(wu.to(tl.float32) * n[None, :], axis=1)
        # SwiGLU in fp32, kept fp32 for the down kernel
        tl.store(act_ptr + row * stride_a + rows_i, acc_g * tl.sigmoid(acc_g) * acc_u, mask=mask_i)

    @triton.jit
    def _down_kernel(act_ptr, wd_ptr, sel_ptr, g_ptr, out_ptr, C, I, stride_a, stride_d, stride_o,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        # a skipped token stops here too: out already holds its row of h
        if tl.load(sel_ptr + row) == 0:
            return
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < C
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in range(0, I, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            mask_k = ks < I
            # this tile's rows of down against a chunk of the activations, accumulated in fp32
            a = tl.load(act_ptr + row * stride_a + ks, mask=mask_k, other=0.0)
            wd = tl.load(wd_ptr + cols[:, None] * stride_d + ks[None, :], mask=mask_n[:, None] & mask_k[None, :],
                         other=0.0)
            acc += tl.sum(wd.to(tl.float32) * a[None, :], axis=1)
        # the gate the caller computed from p (fp32), applied before the one rounding at the end
        g = tl.load(g_ptr + row)
        o = tl.load(out_ptr + row * stride_o + cols, mask=mask_n, other=0.0)
        # each (row, column tile) has one owner: no atomics needed
        tl.store(out_ptr + row * stride_o + cols, (o.to(tl.float32) + g * acc).to(o.dtype), mask=mask_n)


def _launch_settings(C):
    """One program holds a whole row: BLOCK_C = next power of two >= C; wider rows, more warps."""
    block = triton.next_power_of_2(C)
    return block, 4 if block < 2048 else 8 if block < 8192 else 16


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _threshold_arg(threshold, device):
    """(value, is_pointer) for _route_kernel: a threshold tensor on the device is read there, since
    float() of it would sync; a float or a CPU tensor (no device to wait for) goes by value."""
    if torch.is_tensor(threshold) and threshold.device == device:
        return threshold.reshape(()).float(), True
    return float(threshold), False


def route_gather_triton(x, h, router_weight, norm_weight, eps, threshold=None, k=None, valid=None, always=None):
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
    _route_kernel[(N,)](x, router_weight.reshape(-1).contiguous(), sel if valid is None else valid,
                        sel if always is None else always, p, sel,
                        0.0 if threshold is None else float(threshold), C, x.stride(0),
                        HAS_VALID=valid is not None, HAS_ALWAYS=always is not None, DECIDE=k is None,
                        THRESHOLD_PTR=False, BLOCK_C=block, num_warps=warps)
    if k is not None:
        sel = decide(p, valid, k=k, always=always)
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


MLP_BLOCK_ROWS, MLP_BLOCK_K = 32, 128   # weight tile of one program: rows x reduction chunk


def route_mlp_triton(x, h, router_weight, norm_weight, eps, threshold, valid, gate_weight, up_weight,
                     down_weight, gate_fn, inplace=False, always=None):
    """route_mlp_reference in three launches: (a) p and sel; (b) per (row, tile of I) the SwiGLU
    activations of RMSNorm(h[row]); (c) per (row, tile of C) out[row] += gate_fn(p) * (act . down),
    the gate computed by torch on the device between (a) and (c), so its formula lives in one place.
    The decision never leaves the device, so nothing here waits on the host: (b) and (c) read
    sel and return at once for unselected rows. Works on a copy of h unless inplace=True (then
    h must have unit stride along C)."""
    if inplace and h.stride(-1) != 1:
        raise ValueError("route_mlp(inplace=True) needs h with unit stride along C")
    N, C = x.shape
    I = gate_weight.size(0)
    x = _unit_stride(x)
    dev = x.device
    # out holds h from here on, and the MLP reads its rows before (c) adds into them
    out = h if inplace else h.clone(memory_format=torch.contiguous_format)
    p = torch.empty(N, dtype=torch.float32, device=dev)
    sel = torch.empty(N, dtype=torch.bool, device=dev)
    if N == 0:
        return out, p, sel
    threshold, threshold_ptr = _threshold_arg(threshold, dev)
    block, warps = _launch_settings(C)
    _route_kernel[(N,)](x, router_weight.reshape(-1).contiguous(), sel if valid is None else valid,
                        sel if always is None else always, p, sel, threshold, C, x.stride(0),
                        HAS_VALID=valid is not None, HAS_ALWAYS=always is not None, DECIDE=True,
                        THRESHOLD_PTR=threshold_ptr, BLOCK_C=block, num_warps=warps)
    wg, wu, wd = _unit_stride(gate_weight), _unit_stride(up_weight), _unit_stride(down_weight)
    act = torch.empty(N, I, dtype=torch.float32, device=dev)   # rows of skipped tokens stay unwritten
    _gate_up_kernel[(N, triton.cdiv(I, MLP_BLOCK_ROWS))](
        out, norm_weight.contiguous(), sel, wg, wu, act, C, I, out.stride(0), wg.stride(0), wu.stride(0),
        act.stride(0), float(eps), BLOCK_I=MLP_BLOCK_ROWS, BLOCK_K=MLP_BLOCK_K)
    gate = gate_fn(p).float()
    _down_kernel[(N, triton.cdiv(C, MLP_BLOCK_ROWS))](
        act, wd, sel, gate, out, C, I, act.stride(0), wd.stride(0), out.stride(0),
        BLOCK_N=MLP_BLOCK_ROWS, BLOCK_K=MLP_BLOCK_K)
    return out, p, sel


# ---------------------------------------------------------------- dispatch

def use_triton(*tensors):
    """True when the kernels should run on these tensors: Triton is importable; no autograd
    (the kernels have no backward, so training takes the differentiable references); row-major
    tensors; and all tensors on CUDA, or FORCE_TRITON under the interpreter for a dtype it can run.
    On CUDA a kernel error is raised, never papered over with the reference."""
    if not HAS_TRITON:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if not all(t.is_contiguous() for t in tensors):   # the kernels index rows; weights.place's CPU layout is not
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return (FORCE_TRITON and INTERPRET
            and all(t.device.type == "cpu" and t.dtype in INTERPRETER_DTYPES for t in tensors))


def route_gather(x, h, router_weight, norm_weight, eps, threshold=None, k=None, valid=None, always=None):
    fused = use_triton(x, h, router_weight, norm_weight)
    fn = route_gather_triton if fused else route_gather_reference
    return fn(x, h, router_weight, norm_weight, eps, threshold, k, valid, always)


def scale_scatter(base, idx, y, gate, inplace=False):
    # gate counts too: DLO's g(p) carries the router's gradient (DLO eq. 3)
    fn = scale_scatter_triton if use_triton(base, y, gate) else scale_scatter_reference
    return fn(base, idx, y, gate, inplace)


def route_mlp(x, h, router_weight, norm_weight, eps, threshold, valid, gate_weight, up_weight, down_weight,
              gate_fn, inplace=False, always=None):
    # the MLP's weights count too: under autograd they need the reference's backward
    fused = use_triton(x, h, router_weight, norm_weight, gate_weight, up_weight, down_weight)
    fn = route_mlp_triton if fused else route_mlp_reference
    return fn(x, h, router_weight, norm_weight, eps, threshold, valid, gate_weight, up_weight, down_weight,
              gate_fn, inplace, always)


def routed_mlp(x, h, router_weight, norm, mlp, threshold, routable, sinks, gate_fn, decode):
    """DLO's routed MLP at inference, fused (dlo.RoutedBlock.forward_fused): h plus
    gate_fn(p) * mlp(norm(h)) on the tokens with p >= threshold, and the sinks. x, h (N, C);
    norm, mlp: the block's RMSNorm and SwiGLU MLP. Decode (a token per row): route_mlp,
    with no host sync. Prefill: route_gather, the MLP on the packed rows, then
    scale_scatter into h in place (h is the block's own fresh tensor).
    Returns (out, p, sel), each over the N tokens."""
    if decode:
        gate, up = mlp.gate_up_proj.weight.chunk(2)
        return route_mlp(x, h, router_weight, norm.weight, norm.eps, threshold, routable, gate, up,
                         mlp.down_proj.weight, gate_fn, inplace=True, always=sinks)
    p, idx, rows = route_gather(x, h, router_weight, norm.weight, norm.eps, threshold=threshold, valid=routable,
                                always=sinks)
    out = scale_scatter(h, idx, mlp(rows), gate_fn(p), inplace=True)
    sel = torch.zeros(x.size(0), dtype=torch.bool, device=x.device).index_fill_(0, idx, True)
    return out, p, sel
