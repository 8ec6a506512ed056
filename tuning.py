"""
Choices that make batch-1 decode fast, measured on the machine at hand, not assumed.

Decoding one token multiplies one row by every weight matrix, so it is bound by how fast
the kernels stream the weights. Which kernel streams them faster differs between CPUs and
between shapes: switching oneDNN off for bf16 decode made it much faster on one 2-core
CPU and much slower on another (a Xeon with AMX), and on a third (an AVX2 EPYC) the
input-major layout streamed SmolLM2's gate/up matrix 1.7x faster than (out, in) while its
down matrix streamed 1.3x faster the other way round. So no CPU's answer is hard-coded:
weights.place times the model's own decode-shaped linears under each choice (a second or
less, once per process for each set of shapes), and lays out each weight shape the faster
way; the decode loop runs under the faster oneDNN setting. Every choice computes the same
matmul, summed in another order (the tests check that greedy tokens do not change).
bench.py prints the choice and the GB/s of each, beside the machine's ceiling.
"""
import glob
import math
import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.nn.functional as F

CHOICES = {}   # (dtype, weight shapes and counts) -> Choice, once per process


class Choice:
    """oneDNN on or off for batch-1 decode, and which weight shapes are stored input-major;
    gbps: {oneDNN on?: GB/s at which the decode's linears stream, each shape in its faster
    layout}."""

    def __init__(self, onednn, input_major, gbps):
        self.onednn, self.input_major, self.gbps = onednn, input_major, gbps

    def __repr__(self):
        if math.isnan(self.gbps[True]):
            return "oneDNN on, (out, in) weights for batch-1 decode (not measured: the weights fit in the caches)"
        ways = {True: [], False: []}
        for (rows, cols), major in sorted(self.input_major.items()):
            ways[major].append(f"{rows}x{cols}")
        return (f"oneDNN {'on' if self.onednn else 'off'} for batch-1 decode ({self.gbps[True]:.1f} GB/s with it, "
                f"{self.gbps[False]:.1f} without); input-major: {', '.join(ways[True]) or 'none'}; "
                f"(out, in): {', '.join(ways[False]) or 'none'}")


@contextmanager
def onednn(enabled):
    """Switch oneDNN on or off for a block."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def laid_out(w, input_major):
    """w (out, in) with the same values, stored input-major (the transposed view of an
    (in, out) tensor, so F.linear hands the BLAS x @ W with W row-major) or (out, in)."""
    return w.t().contiguous().t() if input_major else w.contiguous()


def largest_cache_bytes(default=32 * 2 ** 20):
    """The size of the CPU's largest cache (the L3 on most), read from Linux's sysfs;
    `default` where the system does not say."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        sizes.append(int(text[:-1]) * {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[text[-1]] if text[-1].isalpha()
                     else int(text))
    return max(sizes, default=default)


def pass_seconds(weights, seconds, evict=None):
    """The best time of one pass of single-row linears over `weights`, one after another,
    as a decode step runs them; passes repeat for `seconds` (at least two). evict: a
    tensor larger than the caches, read (untimed) before each pass, so that the pass reads
    `weights` from memory as a decode does, where the rest of the model passes through
    the caches between two reads of the same matrix."""
    x = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    for w in weights:   # warm-up: oneDNN builds its primitives on first use
        F.linear(x[w.shape[1]], w)
    best, passes, t0 = float("inf"), 0, time.perf_counter()
    while passes < 2 or time.perf_counter() - t0 < seconds:
        if evict is not None:
            evict.sum()
        start = time.perf_counter()
        for w in weights:
            F.linear(x[w.shape[1]], w)
        best, passes = min(best, time.perf_counter() - start), passes + 1
    return best


def stream_gbps(weights, seconds=0.1):
    """GB/s at which single-row linears over `weights` read them, one after another."""
    return sum(w.numel() * w.element_size() for w in weights) / pass_seconds(weights, seconds) / 1e9


def decode_choice(model, seconds=0.01, min_mbytes=16, max_mbytes=64):
    """The faster settings for this model's batch-1 decode on CPU, measured on the first call
    for its dtype and weight shapes. For each shape, the model's own weights of that shape
    (up to `max_mbytes` MB of them) are streamed in both layouts with oneDNN on and off,
    twice in alternation, each pass after reading twice the largest cache's bytes, so that
    they come from memory as in a decode whatever the cache's size; each kept at its best
    time. The oneDNN setting whose decode (every weight, each shape in its faster layout)
    takes less time wins. Weights of under `min_mbytes` MB
    in all fit in the caches, where dispatch, not bandwidth, sets the speed: those keep
    oneDNN on and the (out, in) layout, unmeasured."""
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    count = Counter(tuple(w.shape) for w in linears)
    key = (linears[0].dtype, tuple(sorted(count.items())))
    if sum(w.numel() * w.element_size() for w in linears) < min_mbytes * 2 ** 20:
        return Choice(True, {shape: False for shape in count}, {True: float("nan"), False: float("nan")})
    if key not in CHOICES:
        best = {}   # (shape, oneDNN, input-major) -> seconds to stream one weight of the shape
        evict = torch.ones(2 * largest_cache_bytes() // 4)
        for shape in count:
            same = [w for w in linears if tuple(w.shape) == shape]
            per_weight = same[0].numel() * same[0].element_size()
            same = same[:max(1, max_mbytes * 2 ** 20 // per_weight)]
            for major in (True, False):
                copies = [laid_out(w.detach(), major) for w in same]
                for enabled in (True, False, True, False):
                    with onednn(enabled), torch.no_grad():
                        t = pass_seconds(copies, seconds, evict) / len(copies)
                    best[shape, enabled, major] = min(best.get((shape, enabled, major), t), t)
                del copies
        nbytes = sum(w.numel() * w.element_size() for w in linears)
        total = {enabled: sum(n * min(best[shape, enabled, m] for m in (True, False)) for shape, n in count.items())
                 for enabled in (True, False)}
        enabled = total[True] <= total[False]
        input_major = {shape: best[shape, enabled, True] < best[shape, enabled, False] for shape in count}
        CHOICES[key] = Choice(enabled, input_major, {e: nbytes / total[e] / 1e9 for e in (True, False)})
    return CHOICES[key]


def lay_out(model, choice):
    """Store each Linear weight in the layout `choice` found faster for its shape. Same
    values; tied weights stay tied: the shared Parameter gets new storage, not a replacement."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            w.data = laid_out(w.detach(), choice.input_major[tuple(w.shape)])
    return model


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
