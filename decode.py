"""
The compiled decode step (gpt-fast's): torch.compile over one batch-1 token, for the
dense model and for DLO's routed one. It sits behind one call in the decode loop
(sample.generate_stream, compiled=True); the model's own forwards stay the reference it
is tested against.

- Eager decode dispatches ~80 operators per layer (2,402 per token for SmolLM2 in fp32),
  and at SmolLM2's size their cost, not the weights' bytes, takes a large share of each
  token. Inductor fuses the elementwise ones (the norms, RoPE with the cache write,
  SiLU * up) into loops: 422 kernels per token beside the matmuls.
- Eager batch-1 decode decides a routed layer on the host (dlo.RoutedBlock.forward_one:
  one sync, then the MLP runs or not). Traced as it is, every such decision would break
  the graph. Under compilation the decision becomes torch.cond here, so the router, the
  comparison and both branches stay in one graph, and the generated code still runs the
  MLP only for a token its router selected: skipping still saves the MLP's bytes.
- The same holds for the other routed kinds at batch 1 (skipping.SkipBlock: attention,
  attention and MLP apart, whole blocks, under each K/V policy): the K/V a token leaves
  is written outside the branch, as `write` and `kept` flags, since a branch may not
  write the cache. Rules that decide for a whole batch (top-k, MoD's predictor) and
  batches of several rows decide on the host, and run eagerly between the compiled parts.
- On CPU the weights' bytes, not the operators, set most of a token's time once compiled:
  ATen's single-row matmuls stream them at ~17 GB/s where the machine reaches ~21. With
  the weights frozen into the compiled code, inductor's own C++ GEMM kernels read them in
  a blocked layout faster (CPU_OPTIONS), and decode runs at about the ceiling. Inside a
  torch.cond branch the weights are inputs, not constants, so the routed parts' matmuls
  are written as products and sums that inductor fuses into loops (streamed).
"""
import functools

import torch
import torch.nn.functional as F

from cache import key_mask
from dlo import RoutedBlock
from model import attend
from router import Trace, select
from skipping import PART_SKIPS, SkipBlock


def gated(base, gate, y):
    """base + g * y, the gate (fp32) applied to y in fp32 as eager decode's Python float is."""
    return base + (gate * y.float()).to(base.dtype)


def streamed(x, w, bias=None):
    """F.linear(x, w, bias) inside a torch.cond branch, w (out, in) stored row by row. A
    branch's weights are its inputs, not frozen constants, so there F.linear runs ATen's
    matmul and not inductor's GEMM template: on a 2-core AVX2 EPYC, ~15 GB/s against the
    28 at which the frozen base layers read. On CPU, a product and a sum over each row,
    which inductor fuses into one loop that streams w (22.5 GB/s there, in a script)."""
    if w.device.type != "cpu":
        return F.linear(x, w, bias)
    y = (x.unsqueeze(-2) * w).sum(-1)
    return y if bias is None else y + bias


def row_major(linear):
    """A Linear's weight stored row by row, for streamed: weights.place may have stored it
    input-major, which the fused sum reads at 15.4 GB/s there. Taken outside the branch,
    where freezing folds the copy into a constant once."""
    return linear.weight.contiguous()


def mlp_branch(mlp):
    """model.MLP's forward for a branch, its weights taken here, outside it."""
    gate_up, down = row_major(mlp.gate_up_proj), row_major(mlp.down_proj)

    def run(x):
        gate, up = streamed(x, gate_up, mlp.gate_up_proj.bias).chunk(2, -1)
        return streamed(F.silu(gate) * up, down, mlp.down_proj.bias)
    return run


def skipped(base, gate):
    return base.clone()   # a branch may not return its input itself


def decision(router, reads, ctx, slot, gate):
    """The batch-1 decision on the device: (the router's logit (1, 1), run (1, 1): p >= t
    or a sink, the gate (1, 1, 1))."""
    logit = router(reads)
    return logit, select(logit, ctx.routable, ctx.valid, ctx.rule, slot), gate(torch.sigmoid(logit))[..., None]


class CondRoutedBlock(RoutedBlock):
    """dlo.RoutedBlock whose batch-1 decision is a torch.cond while torch.compile traces it;
    run eagerly, it is the RoutedBlock itself."""

    def forward_one(self, x, h, ctx):
        if not torch.compiler.is_compiling():
            return super().forward_one(x, h, ctx)
        # the router reads the block input (arXiv 2407.11030, section 3.2)
        logit, sel, gate = decision(self.router, x, ctx, len(ctx.traces), self.gate)
        run_mlp = mlp_branch(self.mlp)
        mlp = lambda h, g: gated(h, g, run_mlp(self.post_attention_layernorm(h)))
        return torch.cond(sel.view(()), mlp, skipped, (h, gate)), [Trace(self.index, logit, sel, ctx.valid,
                                                                           ctx.routable)]


class CondSkipBlock(SkipBlock):
    """skipping.SkipBlock whose batch-1 decisions are torch.cond while torch.compile traces
    it; run eagerly, it is the SkipBlock itself."""

    def route_one(self, router, part, reads, base, ctx, slot):
        if not torch.compiler.is_compiling():
            return super().route_one(router, part, reads, base, ctx, slot)
        logit, sel, gate = decision(router, reads, ctx, slot, self.gate)
        if part == "mlp":
            run_mlp = mlp_branch(self.mlp)
            branch = lambda b, g: gated(b, g, run_mlp(self.post_attention_layernorm(b)))
        else:
            branch = self.attention_branch(part, sel, base, ctx)
        trace = Trace(self.index, logit, sel, ctx.valid, ctx.routable, part=part, skips=PART_SKIPS[part])
        return torch.cond(sel.view(()), branch, skipped, (base, gate)), trace

    def attention_branch(self, part, sel, base, ctx):
        """Writes the token's K/V as its policy says, outside any branch (a branch may not
        write the cache), and returns the branch that runs its query: the attention, and
        the MLP after it for a whole block."""
        attn, policy, run = self.self_attn, self.cfg.kv_policy, sel.view(())
        normed, w, bias, n_q = self.input_layernorm(base), attn.qkv_proj.weight, attn.qkv_proj.bias, attn.sizes[0]
        w_rows, o_rows = row_major(attn.qkv_proj), row_major(attn.o_proj)
        run_mlp = mlp_branch(self.mlp) if part == "block" else None
        bias_of = lambda rows: None if bias is None else bias[rows]
        project = lambda n, rows: streamed(n, w_rows[rows], bias_of(rows))   # in a branch
        # zeros reads w_rows too: w_rows may be w itself, and cond refuses two inputs that alias
        zeros = lambda n, rows: n.new_zeros(*n.shape[:-1], w_rows[rows].size(0))
        everything, queries, keys_values = slice(None), slice(0, n_q), slice(n_q, None)
        if policy == "drop":   # a skipped token writes no K/V: nothing is projected, and its slot stays invalid
            qkv = torch.cond(run, lambda n: project(n, everything), lambda n: zeros(n, everything), (normed,))
            q, kv = qkv.split([n_q, w.size(0) - n_q], -1)
        else:                  # every real token writes its K/V; only a query that runs is projected
            kv = F.linear(normed, w[keys_values], bias_of(keys_values))
            q = torch.cond(run, lambda n: project(n, queries), lambda n: zeros(n, queries), (normed,))
        k, v = kv.split(attn.sizes[1:], -1)
        keys = attn.store(attn.heads(k, attn.n_kv_head, ctx.rope), attn.heads(v, attn.n_kv_head), ctx.input_pos,
                          ctx.valid & sel if policy == "drop" else ctx.valid, sel if policy == "window" else None)
        mask = key_mask(ctx.input_pos[None], keys, attn.window)

        def branch(b, g):
            y = attend(attn.heads(q, attn.n_head, ctx.rope), keys.k, keys.v, mask)             # (1, nh, 1, hs)
            y = streamed(y.transpose(1, 2).reshape(*b.shape[:-1], -1), o_rows, attn.o_proj.bias)
            if part == "block":
                y = y + run_mlp(self.post_attention_layernorm(b + y))
            return gated(b, g, y)
        return branch


# Inductor's CPU options for the decode step. freezing: the weights become constants of
# the compiled code, so that max_autotune may lay them out in blocks for inductor's own C++
# GEMM template, which it times against ATen's matmul for each shape and keeps the faster.
# Measured on a 2-core AVX2 EPYC, SmolLM2 in fp32: ~25 ms a token against ~38 with ATen's
# matmuls. The price: a copy of the weights in that layout, a longer first compile, and
# weights fixed at the first call (the compiled step does not see later changes to them).
# cpp_wrapper: the host code that calls the kernels, and each torch.cond's branches, is
# C++ instead of Python. Profiled there, the Python wrapper's own time was 1.7 ms a token
# for the dense model and 4.4 ms for a routed one (dlo-fast: ~30 conds a token); with it,
# the compiled step took 18.5 ms against 23.3 (dense) and 21.3 against 31.6 (dlo-fast).
# The price: the first compile takes longer (90-120 s dense, 160-180 s dlo-fast there).
CPU_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "cpp_wrapper": True}


def gemm_template_safe(model):
    """False for a routed attention that projects its keys and values for every token and
    its query only when it runs (SkipBlock under the compute and window policies): the
    keys and values come from the rows of the frozen qkv weight after the query's, and
    torch 2.13's C++ GEMM template reads such a slice from the wrong place (F.linear(x,
    w[64:]) of a frozen w, alone in a module, is off by ~30; w[:32] is right), which put
    the logits 0.13 off in tests/test_decode.py. Those compile with ATen's matmuls."""
    return not any(isinstance(layer, SkipBlock) and layer.kind in ("attn", "attn+mlp", "block")
                   and layer.cfg.kv_policy != "drop" for layer in model.layers)


def compiled_step(model, step):
    """`step` (sample.decode_one_token) compiled for `model`: each routed block of the built
    model becomes its Cond class (the same module and weights; its eager forward is
    unchanged). The first call compiles, once per shape."""
    for layer in model.layers:
        layer.__class__ = {RoutedBlock: CondRoutedBlock, SkipBlock: CondSkipBlock}.get(type(layer), type(layer))
    return compile_once(step, gemm_template_safe(model))


@functools.cache
def compile_once(step, gemm_template=True):
    """On CUDA, "reduce-overhead" replays the whole step as one captured graph. On CPU,
    CPU_OPTIONS (without the GEMM template where it is not safe), with freezing also set
    while tracing (dynamo reads it there to treat the weights as constants). Made on first
    use: torch.compile loads the compiler, ~100 MB that a run which never compiles need
    not hold."""
    if torch.cuda.is_available():
        return torch.compile(step, mode="reduce-overhead", dynamic=False)
    options = CPU_OPTIONS if gemm_template else {"freezing": True, "cpp_wrapper": True}
    compiled = torch.compile(step, dynamic=False, options=options)

    def frozen(*args):
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args)
    return frozen
