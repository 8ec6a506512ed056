"""
What a query sees under the K/V policies of routed attention, and the caches that
store it (used by skipping.py and retention.py).

- Keys: every key and value a chunk's queries may attend to, with the `kept` flags of
  the "window" policy; key_mask says which each query sees ("drop": only keys that were
  written; "window": keys not kept stay visible for kv_window positions), attend_rows
  runs SDPA for the rows that ran, received_attention labels K/V retention.
- RoutedKVCache: model.KVCache plus `kept` flags, and writes of the rows that ran alone.
- CompactKVCache. model.KVCache reserves a slot for every position of every layer up
  front; under routed attention with the "drop" policy a token that skips a layer's
  attention writes nothing there, so here each layer keeps, per batch row, only the K/V
  of the tokens that wrote them, packed in arrival order, and grows a page at a time.
  Under "window", a token that is not kept is evicted once it falls kv_window positions
  behind, before the cache grows. The bytes allocated follow the routing: a layer whose
  attention ran for half the tokens holds half the K/V, and decoding attends over those
  alone.
"""
import ctypes
import functools
import math
from typing import NamedTuple, Optional

import torch

from model import KVCache, attend


class Keys(NamedTuple):
    """Every key and value a chunk's queries may attend to."""
    k: torch.Tensor       # (B, nkv, S, hs)
    v: torch.Tensor       # (B, nkv, S, hs)
    valid: torch.Tensor   # (B, S): written by a real token
    slot: torch.Tensor    # (S,) or (B, S): each key's place in the sequence, for the causal mask
    kept: Optional[torch.Tensor] = None   # (B, S) under "window": seen beyond the window; None: all are


def key_mask(q_slot, keys, window):
    """(B, M, S): which keys each query at q_slot (B or 1, M) sees: valid ones at or before
    it and, under "window", kept ones or those fewer than `window` positions back. A query
    always sees itself, so a row is never empty (padding, dropped tokens)."""
    key_slot, q = keys.slot.view(-1, 1, keys.slot.size(-1)), q_slot[..., None]
    # in place, and slots compared as they are: a chunk of a long prompt makes (B, M, S) large
    mask = (key_slot <= q) & keys.valid[:, None, :]
    if keys.kept is not None:
        mask &= keys.kept[:, None, :] | (key_slot > q - window)
    return mask.logical_or_(key_slot == q)


def attend_rows(q, b, slot, keys, window):
    """Attention for N query rows q (N, nh, hs) of batch rows b (N,) sitting at slots
    `slot` (N,), over the keys key_mask lets them see. The queries are packed per batch
    row, (B, M) with M the most any row has. Returns (N, nh * hs)."""
    B, (N, nh, hs) = keys.k.size(0), q.shape
    if B == 1:
        m, packed, q_slot = torch.arange(N, device=q.device), q[None], slot[None]
    else:
        counts = torch.bincount(b, minlength=B)
        m = torch.arange(N, device=q.device) - (counts.cumsum(0) - counts)[b]   # index within its row
        M = int(counts.max())
        packed = q.new_zeros(B, M, nh, hs).index_put((b, m), q)
        q_slot = torch.full((B, M), -1, dtype=torch.long, device=q.device).index_put((b, m), slot)
    mask = key_mask(q_slot, keys, window) | (q_slot < 0)[..., None]    # (B, M, S); padding queries: unread
    y = attend(packed.transpose(1, 2), keys.k, keys.v, mask)            # (B, nh, M, hs)
    return y.transpose(1, 2)[b, m].reshape(N, nh * hs)


@torch.no_grad()
def received_attention(q, keys, window):
    """The labels of K/V retention: per key (B, S), the mean attention probability it gets
    (over heads) from the queries at least `window` positions later, with every key kept,
    and whether any such query exists. A key that such queries attend to is worth keeping
    (the heavy hitters of H2O, arXiv 2306.14048, section 3); nearer queries see it anyway."""
    repeat = q.size(1) // keys.k.size(1)
    k = keys.k.float().repeat_interleave(repeat, 1)
    q_slot = torch.arange(q.size(2), device=q.device)[None]
    causal = key_mask(q_slot, keys._replace(kept=None), window)                      # (B, T, S)
    scores = (q.float() @ k.transpose(-1, -2)) / q.size(-1) ** 0.5
    probs = scores.masked_fill(~causal[:, None], -math.inf).softmax(-1).mean(1)      # (B, T, S)
    far = causal & (q_slot[..., None] - keys.slot.view(-1, 1, keys.slot.size(-1)) >= window)
    return (probs * far).sum(1) / far.sum(1).clamp(min=1), far.any(1)


class RoutedKVCache(KVCache):
    """model.KVCache for routed attention: `update_rows` writes the tokens that ran alone
    (under "drop" the others write nothing), and under "window" each slot also says
    whether queries beyond the window see it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.kept = None   # made on the first write that says who is kept

    def update(self, input_pos, k, v, write, kept=None):
        keys = super().update(input_pos, k, v, write)
        if kept is not None:
            self.kept = torch.ones_like(self.valid) if self.kept is None else self.kept
            self.kept[:, input_pos] = kept
        return Keys(*keys, self.kept)

    def update_rows(self, b, slot, k, v):  # only the tokens (b, slot) (N,) write: k/v (N, nkv, hs)
        self.k[b, :, slot] = k.to(self.k.dtype)   # a slot starts invalid and is written once
        self.v[b, :, slot] = v.to(self.v.dtype)
        self.valid[b, slot] = True
        return Keys(self.k, self.v, self.valid, self.slot)

    def nbytes(self):
        return super().nbytes() + (0 if self.kept is None else self.kept.numel())


@functools.cache
def glibc():
    """The C library if it is glibc (it has malloc_trim), else None (macOS, musl)."""
    try:
        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def release_freed_blocks():
    """Hand the pages of freed heap blocks back to the OS (glibc's malloc_trim). glibc
    raises its mmap threshold to the largest block it has freed (up to 32 MB) and serves
    the blocks under it from its heap, where a freed one between live ones stays
    resident. The cache leaves such a hole each time it grows or shrinks, so it calls
    this then. Fresh processes, the base at 8,000 tokens in chunks of 256: peak
    1,414-1,438 MB without, 1,336 MB with, at a prefill of 33-36 s against 31 s; a fixed
    128 KB threshold (every larger block mapped and returned on free) peaked alike but
    prefilled in 40-44 s, as each fresh mapping is faulted in again."""
    lib = glibc()
    if lib is not None:
        lib.malloc_trim(0)


class CompactKVCache:
    """One layer's written K/V per batch row, packed: k, v (B, nkv, capacity, hs), each
    entry's slot (its place in the sequence, for the causal mask; -1 = unused) and, once
    a write says so, whether it is kept beyond the window. Capacity grows `page` entries
    at a time for all rows together, so the bytes allocated are
    (2 * nkv * hs * element size + 4 (+ 1 with kept flags)) * B * page * ceil(longest row / page);
    `nbytes` counts them. Under "window" a row's entries are what later queries still see
    (kept, or within the window) plus at most a page of positions since the last eviction."""

    def __init__(self, batch_size, n_kv_head, head_dim, dtype, device, page=256, window=0):
        self.page, self.window = page, window
        self.k = torch.zeros(batch_size, n_kv_head, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot = torch.zeros(batch_size, 0, dtype=torch.int32, device=device)
        self.kept = None                                                           # (B, capacity) bool
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)   # entries used per row
        self.swept = 0   # the earliest query's slot at the last eviction

    def reserve(self, need):
        """Room for `need` entries per row, rounded up to whole pages; the old entries move over."""
        B, nkv, have, hs = self.k.shape
        if need <= have:
            return
        grow = math.ceil(need / self.page) * self.page - have
        self.k = torch.cat([self.k, self.k.new_zeros(B, nkv, grow, hs)], 2)
        self.v = torch.cat([self.v, self.v.new_zeros(B, nkv, grow, hs)], 2)
        self.slot = torch.cat([self.slot, self.slot.new_full((B, grow), -1)], 1)
        if self.kept is not None:
            self.kept = torch.cat([self.kept, self.kept.new_ones(B, grow)], 1)
        release_freed_blocks()

    def evict(self, next_slot, incoming):
        """Drop the entries no later query sees: not kept, and kv_window or more positions
        behind next_slot (B,), the earliest query still to come; the rest move to the front.
        The pages that neither they nor the `incoming` (B,) entries about to be appended
        need are freed (freeing a page that the append then grows back would copy the
        whole layer twice)."""
        live = (self.slot >= 0) & (self.kept | (next_slot[:, None] - self.slot < self.window))
        b, j = live.nonzero(as_tuple=True)
        counts = live.sum(1)
        to = torch.arange(j.numel(), device=j.device) - (counts.cumsum(0) - counts)[b]
        moves = to != j   # the entries before a row's first eviction stay put: only the others are copied
        b, j, to = b[moves], j[moves], to[moves]
        self.k[b, :, to] = self.k[b, :, j]
        self.v[b, :, to] = self.v[b, :, j]
        self.slot[b, to], self.kept[b, to] = self.slot[b, j], self.kept[b, j]
        unused = torch.arange(self.slot.size(1), device=j.device)[None] >= counts[:, None]
        self.slot.masked_fill_(unused, -1)
        self.kept.masked_fill_(unused, True)
        self.length = counts
        need = math.ceil(int((counts + incoming).max()) / self.page) * self.page
        if need < self.slot.size(1):   # free the pages no row uses any more, one buffer at a time
            self.k = self.k[:, :, :need].clone()
            self.v = self.v[:, :, :need].clone()
            self.slot, self.kept = self.slot[:, :need].clone(), self.kept[:, :need].clone()
        release_freed_blocks()

    def update_rows(self, b, slot, k, v, kept=None):
        """Append the K/V rows k, v (N, nkv, hs) of tokens (b, slot) (N,), in ascending order;
        kept (N,): whether each stays beyond the window (None: all of them)."""
        counts = torch.bincount(b, minlength=self.length.numel())
        if kept is not None and self.kept is None:
            self.kept = torch.ones_like(self.slot, dtype=torch.bool)
        # evict before growing, before a chunk of several tokens per row (a chunked prefill then
        # holds the window, the kept entries and one chunk), and once a page of positions has
        # passed since the last time (decode, a token at a time, pays for it once per page)
        if self.kept is not None and slot.numel() and (int((self.length + counts).max()) > self.k.size(2)
                                                       or int(counts.max()) > 1
                                                       or int(slot.min()) - self.swept >= self.page):
            # the earliest query of this chunk, per row, still sees kv_window positions back
            first = torch.zeros_like(self.length).scatter_reduce_(0, b, slot.long(), "amin", include_self=False)
            self.evict(first, counts)
            self.swept = int(slot.min())
        within = torch.arange(b.numel(), device=b.device) - (counts.cumsum(0) - counts)[b]
        at = self.length[b] + within
        self.reserve(int((self.length + counts).max()))
        self.k[b, :, at] = k.to(self.k.dtype)   # autocast: bf16 into the cache
        self.v[b, :, at] = v.to(self.v.dtype)
        self.slot[b, at] = slot.to(torch.int32)
        if self.kept is not None:
            self.kept[b, at] = True if kept is None else kept
        self.length += counts
        return Keys(self.k, self.v, self.slot >= 0, self.slot, self.kept)

    def update(self, input_pos, k, v, write, kept=None):
        """A chunk's K/V (B, nkv, T, hs) at slots input_pos (T,): the tokens with write (B, T)
        are stored; kept (B, T) as in update_rows."""
        if write.size(1) == 1 and bool(write.all()):
            return self.append(int(input_pos), k[:, :, 0], v[:, :, 0], None if kept is None else kept[:, 0])
        b, t = write.nonzero(as_tuple=True)
        return self.update_rows(b, input_pos[t], k[b, :, t], v[b, :, t], None if kept is None else kept[b, t])

    def append(self, slot, k, v, kept=None):
        """update_rows for a decode step where every row writes its token at `slot` (an int):
        k, v (B, nkv, hs), kept (B,). The same entries in a third of the operations: this
        runs per layer per token, between the layer's matmuls and attention, where a small
        operator costs ~8 us against ~3 us in a loop by itself (at 8,192 tokens, batch 1:
        3-4 ms a token here against ~6 ms through update_rows)."""
        if kept is not None and self.kept is None:
            self.kept = torch.ones_like(self.slot, dtype=torch.bool)
        longest = int(self.length.max()) + 1
        if self.kept is not None and (longest > self.k.size(2) or slot - self.swept >= self.page):
            ones = torch.ones_like(self.length)   # as update_rows: evict before growing, or once a page has passed
            self.evict(ones * slot, ones)
            self.swept, longest = slot, int(self.length.max()) + 1
        self.reserve(longest)
        rows, at = torch.arange(self.length.numel(), device=k.device), self.length
        self.k[rows, :, at] = k.to(self.k.dtype)
        self.v[rows, :, at] = v.to(self.v.dtype)
        self.slot[rows, at] = slot
        if self.kept is not None:
            self.kept[rows, at] = True if kept is None else kept
        self.length += 1
        return Keys(self.k, self.v, self.slot >= 0, self.slot, self.kept)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.slot, self.kept) if t is not None)
