import json
import os
import sys

# the Triton interpreter must be chosen before triton is first imported (kernels.py)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dlo  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from sample import kv_caches  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the real SmolLM2 model or data, or whole runs in subprocesses "
                                       "(make test-fast skips them)")


def tiny_config(**overrides):
    """A 4-layer GQA Llama small enough to test exactly in fp32 in milliseconds."""
    base = dict(vocab_size=97, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
                block_size=64, rope_theta=10000.0)
    base.update(overrides)
    return GPTConfig(**base)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides)).eval()
    # random norms, so a bug that swaps or skips them shows up
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def tiny():
    return tiny_model


def routed_tiny(route="mlp", seed=0, scale=0.5, **options):
    """tiny_model with routers on every layer, drawn N(0, scale): about half the tokens run
    each layer, so tests see both decisions. options go to dlo.activate."""
    model = dlo.activate(tiny_model(seed=seed), route, **options)
    torch.manual_seed(seed + 7)
    with torch.no_grad():
        for layer in model.layers:
            for router in layer.routers():
                router.weight.normal_(0, scale)
    return model


def full_logits(model, prompt, rule=None):
    logits, _ = model(torch.tensor([prompt]), rule=rule)
    return logits[0]


def cached_logits(model, prompts, rule=None, page=0):
    """Prefill all but the last token of each prompt, then decode token by token with the
    prompts left-padded in one batch; returns each row's logits for every real position.
    page > 0: the compact cache (cache.py), grown that many entries at a time."""
    B, P = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(B, P, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p)
        valid[b, P - len(p):] = True
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    with kv_caches(model, B, P, page):
        split = P // 2
        out = []
        logits, _ = model(idx[:, :split], input_pos=torch.arange(split), positions=positions[:, :split],
                          valid=valid[:, :split], rule=rule)
        out.append(logits)
        for t in range(split, P):
            logits, _ = model(idx[:, t:t + 1], input_pos=torch.tensor([t]), positions=positions[:, t:t + 1],
                              valid=valid[:, t:t + 1], rule=rule)
            out.append(logits)
    logits = torch.cat(out, 1)
    return [logits[b, valid[b]] for b in range(B)]


class ByteTokenizer:
    """Bytes as tokens, with the chat mask rule of tokenizer.Tokenizer."""
    vocab_size, eos_id, pad_id, im_end_id = 300, 256, 256, 257

    def encode(self, text):
        return list(text.encode())

    def encode_chat_with_mask(self, messages):
        ids, mask = [], []
        for m in messages:
            head = self.encode(m["role"] + ":")
            body = self.encode(m["content"]) + [self.im_end_id]
            ids += head + body
            mask += [False] * len(head) + [m["role"] == "assistant"] * len(body)
        return ids, mask


def write_sharegpt(path, records, cut=True):
    text = json.dumps(records, indent=1)
    if cut:   # like the real file: the last record is cut off mid-way
        text = text[: text.rindex('"value"') + 12]
    path.write_text(text)
