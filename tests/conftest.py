import os
import sys

# the Triton interpreter must be chosen before triton is first imported (kernels.py)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, GPTConfig  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real SmolLM2 model or data (make test-fast skips them)")


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
