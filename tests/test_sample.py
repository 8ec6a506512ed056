"""sample.py end to end on a tiny model that carries the real tokenizer."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import dlo
import weights
from conftest import tiny_model
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    tok = load_tokenizer("smollm2")
    dense = tiny_model(vocab_size=tok.vocab_size, block_size=96)
    weights.save_hf(dense, d / "dense", tokenizer=tok)
    routed = dlo.activate(dense, "mlp")
    with torch.no_grad():
        for layer in routed.layers:
            layer.router.weight.normal_(0, 0.5)
    weights.save_checkpoint(str(d / "routed.pt"), {
        "model": routed.state_dict(), "model_config": dataclasses.asdict(routed.config),
        "train_config": {"init_from": str(d / "dense")}})
    return d


def sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_depth_view_and_picture(folders):
    html = folders / "depth.html"
    r = sample("--init_from", str(folders / "routed.pt"), "--max_new_tokens", "12", "--depth_out", str(html),
               "--mode", "raw", "--prompt", "Hello there")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("|") >= 12 and "[" in r.stdout          # not a TTY: [token|layers]
    assert "layers per token on average" in r.stdout and "% of layer FLOPs saved" in r.stdout
    page = html.read_text()
    assert page.startswith("<!doctype html>") and page.count("<tr>") == 13   # header + 12 tokens


def test_prompt_longer_than_the_context_is_one_line(folders, tmp_path):
    (tmp_path / "long.txt").write_text("word " * 200)
    r = sample("--init_from", str(folders / "dense"), "--prompt", f"@{tmp_path / 'long.txt'}", "--mode", "raw")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "exceeds the model's context of 96 tokens" in r.stderr.strip().splitlines()[-1]


def test_missing_weights_are_one_line(tmp_path):
    r = sample("--init_from", str(tmp_path / "nothing.gguf"))
    assert r.returncode == 1 and r.stderr.strip().startswith(f"error: {tmp_path / 'nothing.gguf'}: no such file")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_default_run_answers_and_reports_speed():
    r = sample("--max_new_tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "tokens/s" in r.stdout and "GB/s" in r.stdout
