"""
Choices that make batch-1 decode fast, measured on the machine at hand, not assumed.

Decoding one token multiplies one row by every weight matrix, so it is bound by how fast
the kernels stream the weights. Which kernel streams them faster differs between CPUs:
switching oneDNN off for bf16 decode made it much faster on one 2-core CPU and much
slower on another (a Xeon with AMX), so no CPU's answer is hard-coded. The first decode
on a CPU times the model's own decode-shaped linears both ways (a fraction of a second,
once per process for each set of shapes) and keeps the faster. Both compute the same
matmul, summed in another order (the tests check that greedy tokens do not change).
bench.py prints the choice and the GB/s of each, beside the machine's ceiling.
"""
import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

CHOICES = {}   # (dtype, weight shapes) -> Choice, once per process


class Choice:
    """oneDNN on or off for batch-1 decode, and the GB/s each streamed the weights at."""

    def __init__(self, onednn, gbps):
        self.onednn, self.gbps = onednn, gbps   # gbps: {True: GB/s with oneDNN, False: without}

    def __repr__(self):
        if math.isnan(self.gbps[True]):
            return "oneDNN on for batch-1 decode (not measured: the weights fit in the caches)"
        return (f"oneDNN {'on' if self.onednn else 'off'} for batch-1 decode ({self.gbps[True]:.1f} GB/s with it, "
                f"{self.gbps[False]:.1f} without)")


@contextmanager
def onednn(enabled):
    """Switch oneDNN on or off for a block."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def stream_gbps(weights, seconds=0.1):
    """GB/s at which single-row linears over `weights` (each (out, in) or its transposed
    view, as the model holds them) read them, one after another, as a decode step does."""
    x = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    for w in weights:   # warm-up: oneDNN builds its primitives on first use
        F.linear(x[w.shape[1]], w)
    passes, t0 = 0, time.perf_counter()
    while passes < 2 or time.perf_counter() - t0 < seconds:
        for w in weights:
            F.linear(x[w.shape[1]], w)
        passes += 1
    return passes * nbytes / (time.perf_counter() - t0) / 1e9


def decode_choice(model, seconds=0.05, min_mbytes=16):
    """The faster setting for this model's decode on CPU, measured on the first call for
    its dtype and weight shapes: its Linear weights (each shape once) are streamed with
    oneDNN on and off, twice in alternation, and the better time of each kept. Weights of
    under `min_mbytes` MB fit in the caches, where dispatch, not bandwidth, sets the speed:
    those keep oneDNN on, unmeasured."""
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = {(tuple(w.shape), w.stride()): w for w in linears}
    key = (linears[0].dtype, tuple(shapes))
    weights = list(shapes.values())
    if sum(w.numel() * w.element_size() for w in weights) < min_mbytes * 2 ** 20:
        return Choice(True, {True: float("nan"), False: float("nan")})
    if key not in CHOICES:
        gbps = {True: 0.0, False: 0.0}
        for enabled in (True, False, True, False):
            with onednn(enabled), torch.no_grad():
                gbps[enabled] = max(gbps[enabled], stream_gbps(weights, seconds))
        CHOICES[key] = Choice(gbps[True] >= gbps[False], gbps)
    return CHOICES[key]


def ceiling_gbps(dtype=torch.float32, mbytes=256, seconds=1.0):
    """The bandwidth ceiling of batch-1 decode in `dtype`: one single-row GEMV over a matrix
    of `mbytes` MB (far larger than any cache), the better of oneDNN on and off."""
    cols = 4096
    rows = mbytes * 2 ** 20 // (cols * torch.tensor([], dtype=dtype).element_size())
    w = torch.randn(rows, cols).to(dtype)
    best = 0.0
    for enabled in (True, False):
        with onednn(enabled), torch.no_grad():
            best = max(best, stream_gbps([w], seconds))
    return best

