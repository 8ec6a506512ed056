"""Sharing a model: checkpoints load with torch.load(weights_only=True), a file that would
run code when unpickled is refused by every script that reads one, and export.py's folder
reloads to the very same model, routing and thresholds included."""
import dataclasses
import json
import os
import pickle
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import methods
import evaluate
import sample
import weights
from conftest import ByteTokenizer, routed_tiny, tiny_model, write_sharegpt
from data import prepare_sharegpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every routing kind, and what each needs beside its routers
ROUTES = {"mlp": {}, "attn": {}, "attn+mlp": {}, "block": {}, "kv": {"kv_policy": "window", "kv_window": 4}}


def calibrated(model, seed=0):
    """The model with one threshold per routed part, as calibration leaves it."""
    g = torch.Generator().manual_seed(seed)
    n = len(model.config.route_slots())
    model.config.route_threshold = tuple((0.35 + 0.3 * torch.rand(n, generator=g)).tolist())
    return model


def write_checkpoint(model, path, **fields):
    weights.save_checkpoint(str(path), weights.Checkpoint(model=model.state_dict(),
                                                          model_config=dataclasses.asdict(model.config), **fields))
    return str(path)


def decisions(model, idx):
    """Logits and every routed part's per-token decision under the model's own rule."""
    logits, _ = model(idx)
    return logits, [t.sel for t in model.route_trace]


@pytest.mark.parametrize("route", ROUTES)
def test_export_reloads_exactly(tmp_path, route):
    model = calibrated(routed_tiny(route, sink_tokens=1, **ROUTES[route]))
    ckpt = write_checkpoint(model, tmp_path / "ckpt.pt", train_config={"seq_len": 32}, step=5,
                            schedule={"label_frac": [0.25]})
    weights.export(ckpt, str(tmp_path / "export"))
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]   # no optimizer, no pickle
    again = weights.load_checkpoint(str(tmp_path / "export"))
    assert again.model_config == dataclasses.asdict(model.config)   # the thresholds, as tuples, too
    assert (again.train_config, again.step, again.schedule) == ({"seq_len": 32}, 5, {"label_frac": [0.25]})
    assert again.optimizer is None and again.rng == {}
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    want, want_sel = decisions(model, idx)
    assert any(not s.all() for s in want_sel) and any(s.any() for s in want_sel)   # both decisions occur
    for reloaded in (weights.model_from_checkpoint(again), weights.from_pretrained(str(tmp_path / "export"))):
        got, got_sel = decisions(reloaded, idx)
        assert torch.equal(got, want)
        assert all(torch.equal(g, w) for g, w in zip(got_sel, want_sel))


def test_bf16_export_halves_the_bytes(tmp_path):
    model = calibrated(routed_tiny("mlp"))
    ckpt = write_checkpoint(model, tmp_path / "ckpt.pt")
    weights.export(ckpt, str(tmp_path / "fp32"))
    weights.export(ckpt, str(tmp_path / "bf16"), torch.bfloat16)
    size = lambda d: os.path.getsize(tmp_path / d / "model.safetensors")
    assert 0.45 < size("bf16") / size("fp32") < 0.55
    bf16 = weights.load_checkpoint(str(tmp_path / "bf16"))
    assert all(t.dtype == torch.bfloat16 for t in bf16.model.values())
    assert bf16.model_config["route_threshold"] == model.config.route_threshold


def test_dense_export_is_a_transformers_llama(tmp_path):
    import transformers
    model = tiny_model()
    weights.export(write_checkpoint(model, tmp_path / "ckpt.pt"), str(tmp_path / "export"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)


def test_new_thresholds_and_window_rewrite_only_the_exports_config(tmp_path):
    folder = tmp_path / "export"
    weights.export(write_checkpoint(calibrated(routed_tiny("kv", **ROUTES["kv"])), tmp_path / "ckpt.pt"), str(folder))
    tensors = (folder / "model.safetensors").stat().st_mtime_ns
    weights.set_thresholds(str(folder), [0.1, 0.2, 0.3, 0.4])
    weights.set_kv_window(str(folder), 8)
    with pytest.raises(ValueError, match="1 thresholds for 4 routed parts"):
        weights.set_thresholds(str(folder), [0.5])
    cfg = weights.load_checkpoint(str(folder)).model_config
    assert cfg["route_threshold"] == (0.1, 0.2, 0.3, 0.4) and cfg["kv_window"] == 8
    assert (folder / "model.safetensors").stat().st_mtime_ns == tensors


def one_line_error(fn, *args, match):
    with pytest.raises(weights.WeightsError) as e:
        fn(*args)
    assert "\n" not in str(e.value) and match in str(e.value), str(e.value)


def test_corrupt_export_is_one_line(tmp_path):
    folder = tmp_path / "export"
    weights.export(write_checkpoint(calibrated(routed_tiny("mlp")), tmp_path / "ckpt.pt"), str(folder))
    tensors, config = (folder / "model.safetensors").read_bytes(), (folder / "config.json").read_text()
    for name, text, match in [("model.safetensors", tensors[: len(tensors) // 2], "model.safetensors"),
                              ("model.safetensors", tensors[:20], "model.safetensors"),
                              ("model.safetensors", b"\0" * 64, "model.safetensors"),
                              ("config.json", config[: len(config) // 2], "cannot read config"),
                              ("config.json", "", "cannot read config")]:
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        for load in (weights.load_checkpoint, weights.from_pretrained):
            one_line_error(load, str(folder), match=match)
        (folder / "model.safetensors").write_bytes(tensors)
        (folder / "config.json").write_text(config)
    hf = json.loads(config)
    for field, value, match in [("route_threshold", [0.5, 0.5], "2 thresholds for 4 routed parts"),
                                ("route", "sideways", "unknown route"), ("n_embd", "wide", "config field")]:
        (folder / "config.json").write_text(json.dumps({**hf, "nanodlo": {**hf["nanodlo"], field: value}}))
        one_line_error(weights.load_checkpoint, str(folder), match=match)
    (folder / "config.json").write_text(json.dumps({**hf, "nanodlo_run": {"optimiser": {}}}))
    one_line_error(weights.load_checkpoint, str(folder), match="nanodlo_run")


# ---- safe loading ------------------------------------------------------------------------

class WritesAFile:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path, marker):
    """A .pt laid out like a checkpoint whose train config runs code when unpickled."""
    model = tiny_model()
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "train_config": WritesAFile(marker)}, path)
    return str(path)


def test_crafted_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = crafted(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)   # the file is what it claims: unpickled freely, it runs
    assert marker.exists()
    marker.unlink()
    for load in (weights.load_checkpoint, weights.from_pretrained, weights.load):
        one_line_error(load, path, match="refused: loading it would call posix.system")
    assert not marker.exists()


def test_checkpoints_load_safely_and_keep_the_rng(tmp_path):
    """Written now: weights_only=True with nothing allowed. Written before RNG states were
    lists (numpy's state pickled as an array): still loads, and restores the same stream."""
    model = tiny_model()
    np.random.seed(3)
    state = np.random.get_state()
    want = np.random.rand(4)
    rng = {"torch": torch.get_rng_state(), "numpy": state, "python": random.getstate()}
    path = write_checkpoint(model, tmp_path / "ckpt.pt", rng=rng)
    saved = torch.load(path, weights_only=True)
    legacy = str(tmp_path / "legacy.pt")
    torch.save({**saved, "rng": rng}, legacy)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(legacy, weights_only=True)   # numpy's array needs allowed globals
    for p in (path, legacy):
        np.random.set_state(weights.load_checkpoint(p).rng["numpy"])
        assert np.array_equal(np.random.rand(4), want)


def test_unreadable_checkpoint_is_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    one_line_error(weights.load_checkpoint, str(tmp_path / "junk.pt"), match="not a readable checkpoint")
    path = write_checkpoint(tiny_model(), tmp_path / "ckpt.pt")
    data = open(path, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    one_line_error(weights.load_checkpoint, str(tmp_path / "cut.pt"), match="not a readable checkpoint")


def script(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_every_script_refuses_a_crafted_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    path = crafted(tmp_path / "evil.pt", marker)
    (tmp_path / "run").mkdir()
    crafted(tmp_path / "run" / "ckpt.pt", marker)
    for args in (["sample.py", "--init_from", path], ["evaluate.py", path], ["frontier.py", path],
                 ["bench.py", "--init_from", path, "--ppl_only"], ["bench.py", "--long", "64", "--base", path],
                 ["train.py", "--resume=True", "--out_dir", str(tmp_path / "run")]):
        r = script(*args)
        lines = (r.stdout + r.stderr).strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1, (args, r.stdout, r.stderr)
        assert lines[0].startswith("error: ") and "refused: loading it would call posix.system" in lines[0]
        assert not marker.exists(), args


# ---- the scripts read the export as they read the checkpoint -----------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A routed tiny model with the real tokenizer's vocabulary, its checkpoint with a run's
    settings (a tiny chat dataset on disk) and the export of that checkpoint."""
    d = tmp_path_factory.mktemp("shared")
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i} " * (1 + i % 4)},
                                                 {"from": "gpt", "value": f"answer {i * 7} " * (2 + i % 5)}]}
               for i in range(40)]
    write_sharegpt(d / "s.json", records, cut=False)
    prepare_sharegpt(str(d / "data" / "sharegpt"), ByteTokenizer(), val_every=4, path=str(d / "s.json"))
    model = methods.activate(tiny_model(vocab_size=49152, block_size=2048), "attn+mlp", sink_tokens=1)
    with torch.no_grad():   # routers that run about half the tokens
        for layer in model.layers:
            for router in layer.routers():
                router.weight.normal_(0, 0.5)
    model = calibrated(model)
    run = {"init_from": "smollm2", "dataset": "sharegpt", "data_dir": str(d / "data"), "seq_len": 32,
           "eval_rows": 6, "batch_size": 3, "dtype": "float32"}
    ckpt = write_checkpoint(model, d / "ckpt.pt", train_config=run)
    weights.export(ckpt, str(d / "export"))
    return ckpt, str(d / "export")


def printed(capsys, main, *args):
    """What a script's main printed, without its timings (they differ run to run)."""
    main(list(args))
    return [line for line in capsys.readouterr().out.splitlines() if not re.search(r"prefill|tokens/s", line)]


def test_sample_evaluate_and_bench_read_the_export_as_the_checkpoint(shared, capsys, tmp_path):
    ckpt, export = shared
    runs = {"sample": lambda path: printed(capsys, sample.main, "--init_from", path, "--mode", "raw", "--prompt",
                                           "Hello there, how are you?", "--max_new_tokens", "8", "--device", "cpu",
                                           "--depth_out", str(tmp_path / "depth.html")),
            "evaluate": lambda path: printed(capsys, evaluate.main, path, "--device", "cpu"),
            "bench": lambda path: printed(capsys, bench.main, "--init_from", path, "--ppl_only", "--device", "cpu")}
    for name, run in runs.items():
        want = run(ckpt)
        assert len(want) >= 1 and run(export) == want, name
    assert re.search(r"\|a\d+ m\d+\]", "".join(runs["sample"](export)))   # tokens shown with their depth
