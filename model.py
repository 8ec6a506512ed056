"""
The nanoDLO model: a Llama-style decoder (GPT-2 as a config variant) whose blocks
can each carry a router that skips work per token.

Notable features
- RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU, tied or untied
  embeddings; arch="gpt2" swaps in LayerNorm, GELU and learned positions
- module names equal HF Llama's (minus "model."), so conversion is a rename
- routed blocks (router.py): skip the MLP only ("mlp", DLO's default: attention
  always runs so the KV cache stays complete) or the whole block ("block"), with
  the KV policy "compute" (skipped tokens still write K/V) or "drop" (they write
  none, and later tokens attend only to tokens that ran the layer; METHODS.md 4)
- a static, preallocated KV cache (gpt-fast style): the caller passes the cache
  slots `input_pos` and the RoPE `positions` explicitly, so a layer can skip a
  token without the cache ever losing its place
- FLOP and KV-byte estimators that account for skipped work
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from router import Router, Rule, dlo_gate, layer_threshold, select, token_similarity


@dataclass
class GPTConfig:
    arch: str = "llama"               # "llama" or "gpt2"
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
    # depth scaling and routing
    new_layers: tuple = ()            # indices of layers added by expansion (dlo.py)
    route: str = "none"               # "none", "mlp" or "block"
    routed_layers: tuple = ()         # which layers carry a router; () = all of them
    route_gate: str = "dlo"           # "dlo": g(p) = 1 + gap (p - 0.5); "mod": the block output times p
    route_gap: float = 0.05
    route_threshold: float = 0.5      # inference rule: run iff p >= threshold
    route_predictor: bool = False     # MoD's auxiliary causal predictor decides at inference
    kv_policy: str = "compute"        # whole-block skipping only: "compute" or "drop"
    frozen_layers: tuple = field(default=())  # LLaMA Pro: originals get no gradient

    def __post_init__(self):
        for name in ("new_layers", "routed_layers", "frozen_layers"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"unknown arch {self.arch!r}: use llama or gpt2")
        if self.route not in ("none", "mlp", "block"):
            raise ValueError(f"unknown route {self.route!r}: use none, mlp or block")
        if self.kv_policy not in ("compute", "drop"):
            raise ValueError(f"unknown kv_policy {self.kv_policy!r}: use compute or drop")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must divide by n_head, and n_head by n_kv_head")
        bad = [i for i in self.routed_layers + self.new_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"layer indices {bad} out of range for {self.n_layer} layers")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def routed_ids(self):
        if self.route == "none":
            return ()
        return self.routed_layers or tuple(range(self.n_layer))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # fp32 statistics, as HF Llama
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg):
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.n_embd, cfg.norm_eps)


def rope_tables(positions, head_dim, theta, dtype):
    """cos, sin of shape (B, 1, T, hs) for integer positions (B, T), computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq          # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]          # (B, 1, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # rotate-half layout (HF), x (B, nh, T, hs)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Static K/V buffers plus a `valid` flag per slot. A slot is valid once a real
    token that ran this layer's attention wrote it; padding and, under the `drop`
    policy, skipped tokens never become valid, so nobody attends to them."""

    def __init__(self, batch_size, max_seq, n_kv_head, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("valid", torch.zeros(batch_size, max_seq, dtype=torch.bool, device=device),
                             persistent=False)

    def update(self, input_pos, k, v, write):  # input_pos (T,), k/v (B, nkv, T, hs), write (B, T)
        keep = write[:, None, :, None]
        self.k[:, :, input_pos] = k.masked_fill(~keep, 0)
        self.v[:, :, input_pos] = v.masked_fill(~keep, 0)
        self.valid[:, input_pos] = write
        return self.k, self.v, self.valid


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        d, hs = cfg.n_embd, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_head * hs, bias=cfg.bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_head * hs, bias=cfg.bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_head * hs, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * hs, d, bias=cfg.bias)
        self.kv_cache = None

    def project_kv(self, x, rope, input_pos, write):
        """K/V for every token of x, stored in the cache if there is one; returns all keys
        and values this chunk may attend to, with their validity and slot positions."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            k = apply_rope(k, *rope)
        if self.kv_cache is None or input_pos is None:
            return k, v, write, torch.arange(T, device=x.device)
        k, v, valid = self.kv_cache.update(input_pos, k, v, write)
        return k, v, valid, torch.arange(k.size(2), device=x.device)

    def forward(self, x, rope, input_pos, write):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            q = apply_rope(q, *rope)
        k, v, key_valid, key_pos = self.project_kv(x, rope, input_pos, write)
        query_pos = key_pos[:T] if input_pos is None or self.kv_cache is None else input_pos
        causal = key_pos[None, :] <= query_pos[:, None]                          # (T, S)
        # a query always sees itself, so a row is never empty (padding, dropped tokens)
        mask = (causal & key_valid[:, None, :]) | (key_pos[None, :] == query_pos[:, None])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def add_rows(base, sel, gate, rows_fn):
    """base + gate * rows_fn(rows) on the selected tokens only: gather, run, scatter.
    Skipped tokens cost nothing; positions never move, so the residual is added once."""
    if not sel.any():   # e.g. a skipped token at batch-1 decode: nothing to run at all
        return base
    flat = base.reshape(-1, base.size(-1))
    idx = sel.flatten().nonzero().squeeze(1)   # ascending token order
    y = rows_fn(idx)
    return flat.index_add(0, idx, y * gate.flatten()[idx, None].to(y.dtype)).view_as(base)


class Block(nn.Module):
    def __init__(self, cfg, routed):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.router = Router(cfg.n_embd, predictor=cfg.route_predictor) if routed else None

    def forward(self, x, rope, valid, input_pos, rule, slot):
        """Returns the block output and, for a routed block, a trace: router probability p,
        predictor probability q (MoD), decisions sel, similarity sim, and valid."""
        if self.router is None:
            h = x + self.self_attn(self.input_layernorm(x), rope, input_pos, valid)
            return h + self.mlp(self.post_attention_layernorm(h)), None
        if self.fusable(x, rule):
            return self.mlp_routed_fused(x, rope, valid, input_pos, layer_threshold(rule, slot))
        p = self.router(x)
        q = self.router.predict(x) if self.router.predictor is not None else None
        sel = select(q if rule.use_predictor else p, valid, rule, slot)
        gate = p if self.cfg.route_gate == "mod" else dlo_gate(p, self.cfg.route_gap)
        if self.cfg.route == "mlp":
            out, sim = self.mlp_routed(x, rope, valid, input_pos, sel, gate, rule.similarity)
        else:
            out, sim = self.block_routed(x, rope, valid, input_pos, sel, gate, rule.similarity)
        return out, {"p": p, "q": q, "sel": sel, "sim": sim, "valid": valid}

    def fusable(self, x, rule):
        """The Triton route+gather / scale+scatter path: DLO's MLP routing at inference."""
        return (self.cfg.route == "mlp" and rule.kind == "threshold" and not rule.similarity
                and not rule.use_predictor and self.cfg.route_gate == "dlo" and self.cfg.arch == "llama"
                and kernels.use_triton(x, self.router.weight))

    def mlp_routed_fused(self, x, rope, valid, input_pos, threshold):
        """mlp_routed through kernels.py: one pass scores, selects and gathers the
        normalised rows; a second adds g(p) * mlp(rows) back in place."""
        h = x + self.self_attn(self.input_layernorm(x), rope, input_pos, valid)
        B, T, C = h.shape
        norm = self.post_attention_layernorm
        p, idx, rows = kernels.route_gather(x.reshape(-1, C), h.reshape(-1, C), self.router.weight, norm.weight,
                                            norm.eps, threshold=threshold, valid=valid.flatten())
        mlp = self.mlp(rows)
        out = kernels.scale_scatter(h.reshape(-1, C), idx, mlp, dlo_gate(p, self.cfg.route_gap))
        sel = torch.zeros(B * T, dtype=torch.bool, device=x.device)
        sel[idx] = True
        return out.view_as(h), {"p": p.view(B, T), "q": None, "sel": sel.view(B, T), "sim": None, "valid": valid}

    def mlp_rows(self, h):
        return lambda idx: self.mlp(self.post_attention_layernorm(h.reshape(-1, h.size(-1))[idx]))

    def mlp_routed(self, x, rope, valid, input_pos, sel, gate, similarity):
        # DLO "ExAttn": attention runs for every token, only the MLP is routed
        h = x + self.self_attn(self.input_layernorm(x), rope, input_pos, valid)
        if not similarity:
            return add_rows(h, sel, gate, self.mlp_rows(h)), None
        # the labels need mlp(h) for every token: compute it once, densely (METHODS.md 1)
        y = self.mlp(self.post_attention_layernorm(h))
        return h + (sel * gate).unsqueeze(-1).to(y.dtype) * y, token_similarity(h, h + y)

    def block_routed(self, x, rope, valid, input_pos, sel, gate, similarity):
        write = valid & sel if self.cfg.kv_policy == "drop" else valid
        xn = self.input_layernorm(x)
        if not similarity and not sel.any():
            if self.cfg.kv_policy == "compute" and self.self_attn.kv_cache is not None:
                self.self_attn.project_kv(xn, rope, input_pos, write)  # keep the context complete
            return x, None
        a = self.self_attn(xn, rope, input_pos, write)
        h = x + a
        if not similarity:
            mlp = self.mlp_rows(h)
            return add_rows(x, sel, gate, lambda idx: a.reshape(-1, a.size(-1))[idx] + mlp(idx)), None
        delta = a + self.mlp(self.post_attention_layernorm(h))   # block(x) - x
        return x + (sel * gate).unsqueeze(-1).to(delta.dtype) * delta, token_similarity(x, x + delta)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        routed = set(cfg.routed_ids())
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "gpt2":
            self.pos_embed = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i in routed) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        for layer in self.layers:
            if layer.router is not None:
                layer.router.reset_parameters()
        self.apply_freezing()
        self.route_trace = []   # per routed layer of the last forward: {"layer", "p", "sel", "sim", "valid"}

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def apply_freezing(self):
        """LLaMA Pro (arXiv 2401.02415): frozen layers, and with them the embeddings,
        final norm and head, get no gradient; only new blocks (and routers) train."""
        frozen = set(self.config.frozen_layers)
        if not frozen:
            return
        for module in (self.embed_tokens, self.norm, self.lm_head, getattr(self, "pos_embed", None)):
            if module is not None:
                module.requires_grad_(False)
        for i in frozen:
            for name, param in self.layers[i].named_parameters():
                param.requires_grad_(name.startswith("router."))

    def default_rule(self):
        cfg = self.config
        return Rule(kind="threshold", threshold=cfg.route_threshold, use_predictor=cfg.route_predictor)

    def forward(self, idx, targets=None, *, input_pos=None, positions=None, valid=None, rule=None,
                last_only=False):
        """idx (B, T) token ids. targets (B, T) with -1 = no loss. input_pos (T,): the
        KV-cache slots this chunk writes (None = no cache). positions (B, T): RoPE or
        learned positions (default: the slots). valid (B, T): False on padding.
        Returns logits (B, T, V) for every position (or only the last) and the mean loss."""
        B, T = idx.shape
        if valid is None:
            valid = torch.ones_like(idx, dtype=torch.bool)
        if positions is None:
            base = torch.arange(T, device=idx.device) if input_pos is None else input_pos
            positions = base.expand(B, T)
        if T > self.config.block_size or int(positions.max()) >= self.config.block_size:
            raise ValueError(f"sequence reaches position {int(positions.max())}, but the model's "
                             f"context is {self.config.block_size} tokens")
        x = self.embed_tokens(idx)
        rope = None
        if self.config.arch == "gpt2":
            x = x + self.pos_embed(positions)
        else:
            rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        rule = rule or self.default_rule()
        self.route_trace = []
        for i, layer in enumerate(self.layers):
            x, trace = layer(x, rope, valid, input_pos, rule, len(self.route_trace))
            if trace is not None:
                self.route_trace.append({"layer": i, **trace})
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    # ---- depth bookkeeping -------------------------------------------------------

    def executed_map(self):
        """(B, T, n_layer) bool of the last forward: did the routed part of the layer run?"""
        ref = self.route_trace[0]["valid"] if self.route_trace else None
        if ref is None:
            raise RuntimeError("executed_map() needs a forward pass of a routed model first")
        ran = torch.ones(*ref.shape, self.config.n_layer, dtype=torch.bool, device=ref.device)
        for t in self.route_trace:
            ran[..., t["layer"]] = t["sel"]
        return ran

    def layer_flops(self, context):
        """Forward FLOPs per token of one layer, split into (attention, mlp, kv projection)."""
        cfg, hs = self.config, self.config.head_dim
        kv_proj = 2 * cfg.n_embd * 2 * cfg.n_kv_head * hs
        attn = kv_proj + 2 * cfg.n_embd * 2 * cfg.n_head * hs + 2 * 2 * cfg.n_head * hs * context
        mlp = 2 * cfg.n_embd * cfg.intermediate_size * (3 if cfg.arch == "llama" else 2)
        return attn, mlp, kv_proj

    def flops_per_token(self, executed=None, context=1024):
        """Estimated forward FLOPs per token. executed: per layer, the fraction of tokens
        that ran the routed part (None = dense). Embedding lookups are free; the LM head is not."""
        cfg = self.config
        executed = [1.0] * cfg.n_layer if executed is None else executed
        attn, mlp, kv_proj = self.layer_flops(context)
        total = 2 * cfg.n_embd * cfg.vocab_size
        for e in executed:
            if cfg.route == "block":
                total += e * (attn + mlp) + (1 - e) * (kv_proj if cfg.kv_policy == "compute" else 0)
            else:
                total += attn + e * mlp
        return total

    def kv_bytes_per_token(self, executed=None):
        """K/V bytes stored per token: under `drop`, a layer stores only tokens that ran it."""
        cfg = self.config
        per_layer = 2 * cfg.n_kv_head * cfg.head_dim * self.embed_tokens.weight.element_size()
        executed = [1.0] * cfg.n_layer if executed is None else executed
        if not (cfg.route == "block" and cfg.kv_policy == "drop"):
            executed = [1.0] * cfg.n_layer
        return per_layer * sum(executed)

    # ---- generation ---------------------------------------------------------------

    def setup_caches(self, batch_size, max_seq):
        w = self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, max_seq, self.config.n_kv_head,
                                               self.config.head_dim, w.dtype, w.device)

    def clear_caches(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    @torch.no_grad()
    def generate_stream(self, prompts, max_new_tokens, temperature=0.0, top_k=None, stop_ids=(),
                        rule=None, generator=None):
        """Yields, per step, (next token (B,), finished before this step (B,), executed
        layers (B, n_layer) of the forward pass that produced the token, or None when
        the model has no routers). Prompts of different lengths are left-padded; each
        row keeps its own positions, so it decodes exactly as it would alone."""
        device = self.embed_tokens.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        if P + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {P} tokens + {max_new_tokens} new tokens exceeds the "
                             f"model's context of {self.config.block_size} tokens")
        idx = torch.zeros(B, P, dtype=torch.long, device=device)
        valid = torch.zeros(B, P, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            idx[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[b, P - len(p):] = True
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        self.setup_caches(B, P + max_new_tokens)
        try:
            logits, _ = self(idx, input_pos=torch.arange(P, device=device), positions=positions,
                             valid=valid, rule=rule, last_only=True)
            pos = positions[:, -1:] + 1
            for step in range(max_new_tokens):
                tok = sample_next(logits[:, -1], temperature, top_k, generator)
                ran = self.executed_map()[:, -1] if self.route_trace else None
                yield tok, done.clone(), ran
                done |= torch.isin(tok, stop)
                if done.all() or step == max_new_tokens - 1:
                    break
                slot = torch.tensor([P + step], device=device)
                logits, _ = self(tok[:, None], input_pos=slot, positions=pos, valid=~done[:, None], rule=rule)
                pos = pos + 1
        finally:
            self.clear_caches()

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, **kwargs):
        """Token lists, one per prompt, without the prompt, cut after the first stop token."""
        out = [[] for _ in prompts]
        for tok, done, _ in self.generate_stream(prompts, max_new_tokens, **kwargs):
            for b in range(len(prompts)):
                if not done[b]:
                    out[b].append(int(tok[b]))
        return out


def sample_next(logits, temperature=0.0, top_k=None, generator=None):
    """Greedy when temperature == 0; else softmax(logits / T) restricted to the top-k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
