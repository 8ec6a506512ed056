"""
The GPT-2 architecture on the same blocks: LayerNorm instead of RMSNorm, a GELU MLP
instead of SwiGLU, learned positions instead of RoPE. It loads GPT-2 checkpoints
(weights.py) so expansion and evaluation can be checked on a second architecture;
routing stays with the Llama models, which the fused kernels and the presets assume.
"""
import torch.nn as nn
import torch.nn.functional as F

from dlo import DLO
from growth import apply_freezing
from model import Block


class GeluMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class GPT2(DLO):
    def __init__(self, cfg):
        if cfg.routed_ids() or cfg.attn_routed_layers:
            raise ValueError("GPT-2 models are dense here: route the Llama models")
        super().__init__(cfg)
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.pos_embed = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.apply(self._init_weights)
        apply_freezing(self)

    def make_block(self, cfg, i):
        block = Block(cfg)
        block.input_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        block.post_attention_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        block.mlp = GeluMLP(cfg)
        return block

    def embed(self, idx, positions):   # learned positions, nothing to rotate
        return self.embed_tokens(idx) + self.pos_embed(positions), None

    def layer_flops(self, context):
        attn, mlp, kv_proj = super().layer_flops(context)
        return attn, mlp * 2 // 3, kv_proj
