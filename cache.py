"""
A KV cache that stores only what ran. model.KVCache reserves a slot for every position
of every layer up front; under routed attention with the "drop" policy a token that
skips a layer's attention writes nothing there, so here each layer keeps, per batch row,
only the K/V of the tokens that wrote them, packed in arrival order, and grows a page
at a time. The bytes allocated follow the routing: a layer whose attention ran for half
the tokens holds half the K/V, and decoding attends over those alone.
"""
import math

import torch

from model import Keys


class CompactKVCache:
    """One layer's written K/V per batch row, packed: k, v (B, nkv, capacity, hs) and each
    entry's slot (its place in the sequence, for the causal mask; -1 = unused). Capacity
    grows `page` entries at a time for all rows together, so the bytes allocated are
    (2 * nkv * hs * element size + 4) * B * page * ceil(longest row / page), the 4 being
    the int32 slot; `nbytes` counts them."""

    def __init__(self, batch_size, n_kv_head, head_dim, dtype, device, page=256):
        self.page = page
        self.k = torch.zeros(batch_size, n_kv_head, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot = torch.zeros(batch_size, 0, dtype=torch.int32, device=device)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)   # entries used per row

    def reserve(self, need):
        """Room for `need` entries per row, rounded up to whole pages; the old entries move over."""
        B, nkv, have, hs = self.k.shape
        if need <= have:
            return
        grow = math.ceil(need / self.page) * self.page - have
        self.k = torch.cat([self.k, self.k.new_zeros(B, nkv, grow, hs)], 2)
        self.v = torch.cat([self.v, self.v.new_zeros(B, nkv, grow, hs)], 2)
        self.slot = torch.cat([self.slot, self.slot.new_full((B, grow), -1)], 1)

    def update_rows(self, b, slot, k, v):
        """Append the K/V rows k, v (N, nkv, hs) of tokens (b, slot) (N,), in ascending order."""
        counts = torch.bincount(b, minlength=self.length.numel())
        within = torch.arange(b.numel(), device=b.device) - (counts.cumsum(0) - counts)[b]
        at = self.length[b] + within
        self.reserve(int((self.length + counts).max()))
        self.k[b, :, at] = k.to(self.k.dtype)   # autocast: bf16 into the cache
        self.v[b, :, at] = v.to(self.v.dtype)
        self.slot[b, at] = slot.to(torch.int32)
        self.length += counts
        return Keys(self.k, self.v, self.slot >= 0, self.slot)

    def update(self, input_pos, k, v, write):
        """A chunk's K/V (B, nkv, T, hs) at slots input_pos (T,): the tokens with write (B, T) are stored."""
        b, t = write.nonzero(as_tuple=True)
        return self.update_rows(b, input_pos[t], k[b, :, t], v[b, :, t])

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.slot))
