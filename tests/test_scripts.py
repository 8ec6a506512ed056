"""Smoke runs of the scripts no other test starts: bench.py (the benchmark and its
long-context table, in-process) on a tiny model with SmolLM2's vocabulary, since it
tokenizes with SmolLM2's tokenizer, and lesa_claim.py, which runs on SmolLM2 itself;
each at a few tokens and one round. And bench.py's flag errors, which need no run."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bench
import weights
from conftest import routed_tiny, tiny_model, write_sharegpt
from data import prepare_sharegpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("bad", ["abc", "1024,x", "0", ","])
def test_bench_long_says_what_it_expected(bad, capsys):
    """`bench.py --long abc` stops at the flags with one line saying what --long takes,
    not with a traceback after loading the models."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--long", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: argument --long: expected context lengths in tokens like 1024,8192" in last and repr(bad) in last
    assert bench.parse_args(["--long", "1024, 8192"]).long == [1024, 8192] and bench.parse_args([]).long == []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama with SmolLM2's vocabulary and a context of 2,048 (bench.py's Hamlet
    perplexity) as a HF folder, and a small ShareGPT tokenized with SmolLM2's tokenizer
    where bench.py looks for it: data/sharegpt under its working directory."""
    from tokenizer import load_tokenizer
    d = tmp_path_factory.mktemp("scripts")
    weights.save_hf(tiny_model(vocab_size=49152, block_size=2048), d / "model")
    records = [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"Tell me about the number {i}. " * (1 + i % 3)},
        {"from": "gpt", "value": f"The number {i} is {i * 7 % 13} more than a multiple of 13. " * (2 + i % 4)}]}
        for i in range(40)]
    write_sharegpt(d / "s.json", records, cut=False)
    prepare_sharegpt(str(d / "data" / "sharegpt"), load_tokenizer("smollm2"), val_every=4, path=str(d / "s.json"))
    return d


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    """bench.py run in-process from the work directory, its tokenizer loaded once (5 s)."""
    from tokenizer import load_tokenizer
    tok = load_tokenizer("smollm2")
    monkeypatch.setattr(bench, "load_tokenizer", lambda source="smollm2": tok)
    monkeypatch.chdir(workdir)
    return workdir


@pytest.mark.slow
def test_bench_runs_on_a_tiny_model(in_workdir):
    """Every section of bench.py on CPU in fp32: Hamlet perplexity, batch-1 decode in both
    weight layouts (and transformers', where installed), compiled and eager decode of the
    model (beside transformers again) and of a routed checkpoint (--compile --routed), the
    training steps (ours; the dense and the DLO-routed expansion), and no kernel rows
    without CUDA; the machine's ceiling and a sum's rate beside each decode rate. The JSON
    holds a positive, finite number for each. 32 new tokens: transformers' rate is the time
    of 32 tokens minus that of 1, which must stand above the timing noise."""
    out, routed = in_workdir / "bench.json", in_workdir / "routed.pt"
    model = routed_tiny("mlp", base=tiny_model(vocab_size=49152, block_size=2048))
    weights.save_checkpoint(str(routed), weights.Checkpoint(model=model.state_dict(),
                                                            model_config=dataclasses.asdict(model.config)))
    bench.main(["--init_from", str(in_workdir / "model"), "--dtype", "float32", "--prompt_len", "8",
                "--new_tokens", "32", "--repeats", "1", "--compile", "--routed", str(routed), "--out", str(out)])
    result = json.load(open(out))
    assert result["dtype"] == "float32" and result["kernel_speedup"] is None
    assert 1 < result["ppl_fp32"] < 2 * 49152   # a random model: about the vocabulary's size
    numbers = [result[k] for k in ("decode_fp32", "decode_fp32_out_in", "decode_compiled_fp32", "decode_eager_fp32",
                                   "decode_compiled_routed", "decode_eager_routed", "routed_over_base_compiled",
                                   "routed_over_base_compiled_median", "routed_compiled_gain_over_base",
                                   "ceiling_gbps_fp32", "sum_gbps_fp32")]
    numbers += [result["train"][k] for k in ("ours_float32", "dense40", "dlo40")]
    if result["hf_version"]:   # transformers beside ours in the eager and in the compiled round
        numbers += [result[k] for k in ("decode_hf_fp32", "decode_compiled_hf_fp32", "decode_compiled_over_hf_fp32")]
    assert all(math.isfinite(v) and v > 0 for v in numbers), numbers
    assert all(len(rounds) == 1 for rounds in result["compiled_decode_rounds"].values())


def test_round_ratios_pair_each_round():
    """bench.round_ratios: the ratio of the bests, and the median of the ratios within each
    round, which a slow moment shared by both contenders leaves alone."""
    results = {"a": [2.0, 4.0, 3.0], "b": [1.0, 4.0, 1.0]}
    assert bench.round_ratios(results, "a", "b") == (1.0, 2.0)
    calls = []
    rounds = bench.rounds_of(3, lambda: calls.append("x") or len(calls), lambda: calls.append("y") or len(calls))
    assert calls == ["x", "y", "x", "y", "y", "x", "x", "y"]   # one untimed call each, then reversed every other round
    assert rounds == [[3, 6, 7], [4, 5, 8]]


def test_long_decode_starts_each_burst_from_the_prefilled_caches():
    """bench.long_decode times several decodes after one prefill, each from the prefilled
    caches restored: three decodes of 3 tokens after a 250-token prompt leave the one page
    of K/V that one decode leaves, where three in a row would reach a second page."""
    model = tiny_model(block_size=512)
    prompt = torch.randint(0, 97, (250,), generator=torch.Generator().manual_seed(0)).tolist()
    one, three = (bench.long_decode(model, prompt, 4, prefill_chunk=64, bursts=n) for n in (1, 3))
    page = model.config.n_layer * 256 * (2 * model.config.n_kv_head * model.config.head_dim * 4 + 4)
    assert one[2] == three[2] == page
    assert one[0] > 0 and one[1] > 0 and three[1] > 0


@pytest.mark.slow
def test_bench_long_context_table(in_workdir, monkeypatch, capsys):
    """bench.py --long at contexts of 48 and 300 tokens (one and two pages of the compact
    cache's 256), prefilled 64 tokens at a time: prefill time, decode rate, KV bytes and
    peak memory per context (in this process, and in a fresh process per batch size), and
    Hamlet's windowed perplexity, into the table and JSON. The plays are cut to their first
    6,000 characters and the windows to 512 tokens, so that the 49,152-entry head runs on
    a few thousand tokens rather than all of Hamlet's 54,000."""
    text, windowed = bench.shakespeare_text, bench.windowed_perplexity
    monkeypatch.setattr(bench, "shakespeare_text", lambda play: text(play)[:6000])
    monkeypatch.setattr(bench, "windowed_perplexity",
                        lambda model, ids, chunk: windowed(model, ids, window=512, chunk=chunk))
    out = in_workdir / "long.json"
    ballast = torch.ones(256 * 2 ** 20)   # 1 GB held here: a fresh process must not count it
    bench.main(["--long", "48,300", "--init_from", str(in_workdir / "model"), "--new_tokens", "4", "--repeats", "1",
                "--out", str(out), "--prefill_chunk", "64", "--peak_batches", "1,2"])
    result = json.load(open(out))
    assert [(row["model"], row["context"]) for row in result["rows"]] == [("base", 48), ("base", 300)]
    assert all(row["decode_tok_s"] > 0 and row["prefill_s"] > 0 for row in result["rows"])
    assert result["rows"][1]["kv_mb"] == 2 * result["rows"][0]["kv_mb"] > 0   # two pages of the cache, then one
    assert 1 < result["quality"]["base"]["hamlet_ppl"] < 2 * 49152
    del ballast
    for row in result["rows"]:   # a fresh process holds torch and the model: tens of MB at least, not this one's GB
        assert 50 < row["fresh_peak_mb_b1"] <= row["fresh_peak_mb_b2"] * 1.05 < 1000
        assert row["decode_tok_s_b2"] > 0
    printed = capsys.readouterr().out
    assert "| base | 300 |" in printed and "peak MB, batch 2" in printed


@pytest.mark.slow
def test_lesa_claim_runs_on_smollm2(workdir):
    """lesa_claim.py on SmolLM2 (it takes no other model): one held-out layer, one epoch,
    two validation rows of 96 tokens, ~40 s of one core (factors and predictors fixed by
    the model's size). Each row holds the two weight errors and the four losses."""
    out = workdir / "lesa.json"
    r = subprocess.run([sys.executable, "lesa_claim.py", "--holdout", "14", "--epochs", "1", "--eval_rows", "2",
                        "--seq_len", "96", "--data", str(workdir / "data" / "sharegpt"), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.load(open(out))["rows"]
    assert [row["layer"] for row in rows] == [14]
    keys = ("rel_err_lesa", "rel_err_mean", "loss_lesa", "loss_mean", "loss_original", "loss_removed")
    assert all(math.isfinite(rows[0][k]) and rows[0][k] > 0 for k in keys)
    assert "| 14 |" in r.stdout
