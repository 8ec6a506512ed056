"""
The dense Llama that DLO grows and routes, nanoGPT-style: one file, torch only.

- RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU MLP, pre-norm blocks;
  HF Llama's module names, with q/k/v and gate/up fused into one matmul each
  (weights.py converts)
- a static KV cache (gpt-fast's): every slot reserved up front, so shapes never change,
  plus a `valid` flag per slot, so padding is never attended to
- no attention mask where a causal one is exact; the LM head runs only where a target is
- FLOP and KV-byte estimators
- what the routed model (dlo.py) and the other methods extend: GPT.make_block (which
  block each layer is), GPT.context (what every block of a pass is told), GPT.embed and
  GPT.new_cache; a block returns its output and what its routers did
"""
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# positions per lm_head call in the loss: LOSS_CHUNK x vocab fp32 logits alive (805 MB for SmolLM2)
LOSS_CHUNK = 4096


@dataclass
class GPTConfig:
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    n_embd: int = 576
    intermediate_size: int = 1536
    block_size: int = 8192            # longest context, in tokens
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_embeddings: bool = True
    bias: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must divide by n_head, and n_head by n_kv_head")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # fp32 statistics, as HF Llama
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(positions, head_dim, theta):
    """cos, sin of shape (B, 1, T, hs) in fp32 for integer positions (B, T)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq          # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]          # (B, 1, T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate-half layout (HF), x (B, nh, T, hs). The rotation runs in fp32 whatever x's
    dtype: bf16 angles cost a bf16 model a few tenths of a percent of perplexity."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class Keys(NamedTuple):
    """Every key and value a chunk's queries may attend to."""
    k: torch.Tensor       # (B, nkv, S, hs)
    v: torch.Tensor       # (B, nkv, S, hs)
    valid: torch.Tensor   # (B, S): written by a real token
    slot: torch.Tensor    # (S,) or (B, S): each key's place in the sequence, for the causal mask


def causal_mask(q_slot, keys):
    """(B, M, S): the valid keys at or before each query at q_slot (B or 1, M). A query
    always sees itself, so a row is never empty (a padding query attends to itself, unread)."""
    key_slot, q = keys.slot.view(-1, 1, keys.slot.size(-1)), q_slot[..., None]
    return ((key_slot <= q) & keys.valid[:, None, :]) | (key_slot == q)


def attend(q, k, v, mask):
    """SDPA that keeps CUDA on its fast kernels. mask None: causal only, which the flash
    kernel serves with GQA. With a mask, flash is out; the memory-efficient kernel takes
    masks but not GQA (torch docs: GQA "works only for Flash_attention and math kernel on
    CUDA"), so K/V heads are repeated for it. A single query row (decode) is cheap even in
    the math kernel, and the CPU kernel takes mask and GQA together: no copy there."""
    gqa = k.size(1) != q.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if gqa and q.is_cuda and q.size(2) > 1:
        repeat = q.size(1) // k.size(1)
        k, v, gqa = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)


class KVCache(nn.Module):
    """Static K/V buffers plus a `valid` flag per slot: a slot is valid once a real token
    wrote it, so padding never is and nobody attends to it."""

    def __init__(self, batch_size, max_seq, n_kv_head, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("valid", torch.zeros(shape[0], max_seq, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("slot", torch.arange(max_seq, device=device), persistent=False)

    def update(self, input_pos, k, v, write):  # input_pos (T,), k/v (B, nkv, T, hs), write (B, T)
        keep = write[:, None, :, None]
        self.k[:, :, input_pos] = k.masked_fill(~keep, 0).to(self.k.dtype)   # autocast: bf16 into the cache
        self.v[:, :, input_pos] = v.masked_fill(~keep, 0).to(self.v.dtype)
        self.valid[:, input_pos] = write
        return Keys(self.k, self.v, self.valid, self.slot)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.buffers())


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
        # q, k and v in one matmul (gpt-fast's wqkv): rows [q | k | v]; weights.py converts
        self.qkv_proj = nn.Linear(cfg.n_embd, sum(self.sizes), bias=cfg.bias)
        self.o_proj = nn.Linear(self.sizes[0], cfg.n_embd, bias=cfg.bias)
        self.kv_cache = None

    def heads(self, t, n, rope=None):   # (B, T, n * hs) -> (B, n, T, hs), rotated when rope is given
        B, T, _ = t.shape
        t = t.view(B, T, n, self.head_dim).transpose(1, 2)
        return t if rope is None else apply_rope(t, *rope)

    def store(self, k, v, input_pos, write):
        """Caches the chunk's K/V when decoding (input_pos given); returns every key and value
        this chunk may attend to, with their validity."""
        if input_pos is None:
            return Keys(k, v, write, torch.arange(k.size(2), device=k.device))
        return self.kv_cache.update(input_pos, k, v, write)

    def forward(self, x, rope, input_pos, write, causal_only):
        """write (B, T): which tokens of x store K/V that others may attend to.
        causal_only: no cache and every real key precedes the padding, so a causal mask
        alone is exact for every real query (padded queries attend to padding, unread)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = self.heads(q, self.n_head, rope)                                        # (B, nh, T, hs)
        keys = self.store(self.heads(k, self.n_kv_head, rope), self.heads(v, self.n_kv_head), input_pos, write)
        mask = None
        if not causal_only:
            mask = causal_mask((torch.arange(T, device=x.device) if input_pos is None else input_pos)[None], keys)
        return self.o_proj(attend(q, keys.k, keys.v, mask).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # gate and up in one matmul, rows [gate | up]
        self.gate_up_proj = nn.Linear(cfg.n_embd, 2 * cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


@dataclass
class Context:
    """What every block of one forward pass needs."""
    rope: object                  # (cos, sin), each (B, 1, T, hs)
    valid: torch.Tensor           # (B, T) real tokens
    input_pos: object             # (T,) cache slots this chunk writes; None = no cache
    causal_only: bool             # no cache, right padding: attention needs no mask
    traces: list = field(default_factory=list)   # what the routed parts so far did (dlo.py)


class Block(nn.Module):
    """A pre-norm Llama block."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def routers(self):   # a dense block has none (dlo.RoutedBlock has one)
        return []

    def attention(self, x, ctx):
        return self.self_attn(self.input_layernorm(x), ctx.rope, ctx.input_pos, ctx.valid, ctx.causal_only)

    def forward(self, x, ctx):
        """The block output and what its routers did (a dense block has none). Both are
        returned, not stored: FSDP sees to the gradients of a block's outputs alone."""
        h = x + self.attention(x, ctx)
        return h + self.mlp(self.post_attention_layernorm(h)), []


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        # built on the meta device (weights.build), the loaded tensors are assigned after: no
        # init, as torch initializes meta tensors through its compiler (~150 MB resident)
        meta = torch.empty(0).is_meta
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd,
                                         _weight=torch.empty(cfg.vocab_size, cfg.n_embd) if meta else None)
        self.layers = nn.ModuleList(self.make_block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if not meta:
            self.apply(self._init_weights)
        self.route_trace = []   # what each routed part did in the last forward (dlo.py)

    def make_block(self, cfg, i):
        return Block(cfg)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size, max_seq):
        """A layer's KV cache for batch_size rows of max_seq positions, in the weights' dtype."""
        w, cfg = self.embed_tokens.weight, self.config
        return KVCache(batch_size, max_seq, cfg.n_kv_head, cfg.head_dim, w.dtype, w.device)

    def embed(self, idx, positions):
        """The token embeddings (B, T, C) and the RoPE tables of their positions (B, T)."""
        return self.embed_tokens(idx), rope_tables(positions, self.config.head_dim, self.config.rope_theta)

    def context(self, rope, valid, positions, input_pos):
        return Context(rope, valid, input_pos, causal_only=input_pos is None)

    def forward(self, idx, targets=None, *, input_pos=None, positions=None, valid=None, last_only=False,
                reduction="mean", **context):
        """idx (B, T) token ids; targets (B, T), -1 = no loss; input_pos (T,): the cache slots
        written (None: no cache, rows right-padded); positions (B, T): RoPE positions (default:
        the slots); valid (B, T): False on padding; context: what a subclass's blocks take
        (dlo.py: the routing rule). Returns (logits, loss): logits (B, T, V) or (B, 1, V) with
        last_only, None with targets (every logit is never made); loss: mean over targets,
        their sum, or per token (B, T) with reduction "none"."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"a chunk of {T} tokens exceeds the model's context of {self.config.block_size} tokens")
        if valid is None:
            valid = torch.ones_like(idx, dtype=torch.bool)
        elif input_pos is None and not torch.compiler.is_compiling() and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError("without a KV cache, rows must be right-padded (real tokens first)")
        if positions is None:
            positions = (torch.arange(T, device=idx.device) if input_pos is None else input_pos).expand(B, T)
        x, rope = self.embed(idx, positions)
        ctx = self.context(rope, valid, positions, input_pos, **context)
        for layer in self.layers:
            x, traces = layer(x, ctx)
            ctx.traces += traces
        self.route_trace = ctx.traces
        x = self.norm(x)
        if targets is not None:
            return None, self.lm_loss(x, targets, reduction)
        return self.lm_head(x[:, -1:] if last_only else x), None

    def lm_loss(self, x, targets, reduction):
        """Cross-entropy over LOSS_CHUNK rows of fp32 logits at a time; with several chunks, each
        is recomputed in the backward pass. Eager: only positions with a target go through the
        head (in SFT, the assistant's tokens). Compiled: every position, since selecting them
        has a data-dependent shape that would break the graph."""
        keep = targets != -1
        static = torch.compiler.is_compiling()
        h, t = (x.flatten(0, 1), targets.flatten()) if static else (x[keep], targets[keep])
        ce = lambda hc, tc: F.cross_entropy(self.lm_head(hc).float(), tc, ignore_index=-1, reduction="none")
        chunks = [(h[i:i + LOSS_CHUNK], t[i:i + LOSS_CHUNK]) for i in range(0, h.size(0), LOSS_CHUNK)]
        recompute = len(chunks) > 1 and torch.is_grad_enabled()
        pieces = [checkpoint(ce, hc, tc, use_reentrant=False) if recompute else ce(hc, tc) for hc, tc in chunks]
        losses = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
        if reduction == "none":
            if static:
                return losses.view(targets.shape)
            return losses.new_zeros(targets.shape).masked_scatter(keep, losses)
        return losses.sum() if reduction == "sum" else losses.sum() / keep.sum()

    # ---- cost estimators -------------------------------------------------------------

    def layer_flops(self, context):
        """Forward FLOPs per token of one layer: (attention, mlp, kv projection)."""
        cfg, hs = self.config, self.config.head_dim
        kv_proj = 2 * cfg.n_embd * 2 * cfg.n_kv_head * hs
        attn = kv_proj + 2 * cfg.n_embd * 2 * cfg.n_head * hs + 2 * 2 * cfg.n_head * hs * context
        return attn, 2 * cfg.n_embd * cfg.intermediate_size * 3, kv_proj

    def flops_per_token(self, attn=None, mlp=None, context=1024, skipped_attn=0):
        """Estimated forward FLOPs per token. attn, mlp: per layer, the fraction of tokens
        that ran its attention and its MLP (None = all); skipped_attn: what a skipped
        attention still costs. Embedding lookups are free; the LM head is not."""
        cfg = self.config
        a, m, _ = self.layer_flops(context)
        attn, mlp = attn or [1.0] * cfg.n_layer, mlp or [1.0] * cfg.n_layer
        return 2 * cfg.n_embd * cfg.vocab_size + sum(fa * a + (1 - fa) * skipped_attn + fm * m
                                                     for fa, fm in zip(attn, mlp))

    def kv_bytes_per_token(self, kept=None):
        """K/V bytes stored per token at long context: kept, per layer, the fraction of tokens
        whose K/V the layer keeps (None = all)."""
        cfg = self.config
        per_layer = 2 * cfg.n_kv_head * cfg.head_dim * self.embed_tokens.weight.element_size()
        return per_layer * (cfg.n_layer if kept is None else sum(kept))
