"""Whole training runs on a tiny routed model: resume after SIGKILL, DDP and FSDP under
torchrun (gloo) against one process, atomic checkpoints, and clear errors on bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import weights
from conftest import ByteTokenizer, tiny_model, write_sharegpt
from data import prepare_sharegpt
from sample import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow   # whole runs in subprocesses: minutes, not seconds


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model as a HF folder and a tiny chat dataset, both on disk."""
    d = tmp_path_factory.mktemp("run")
    weights.save_hf(tiny_model(vocab_size=300, block_size=128), d / "model")
    records = [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"question {i} " * (1 + i % 4)},
        {"from": "gpt", "value": f"answer {i * 7} " * (2 + i % 5)}]} for i in range(120)]
    write_sharegpt(d / "s.json", records, cut=False)
    prepare_sharegpt(str(d / "data" / "sharegpt"), ByteTokenizer(), val_every=8, path=str(d / "s.json"))
    return d


def flags(setup, out, **over):
    base = dict(init_from=setup / "model", data_dir=setup / "data", placement="interleave", n_new=2,
                route="mlp", labels="cos-global", route_warmup=0.25, route_anneal=0.5, capacity_end=0.6, seq_len=32,
                batch_size=2, dtype="float32", calib_rows=4, routed="all", new_lr_scale=1, router_lr_scale=1,
                warmup_freeze=True,
                grad_accum=4, max_steps=8, lr=3e-3, eval_every=4, eval_rows=4, ckpt_every=2, out_dir=out)
    base.update(over)
    return [f"--{k}={v}" for k, v in base.items()]


def run(args, nproc=1, **kw):
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    return subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def losses(out):
    steps = {}
    with open(os.path.join(out, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                steps[r["step"]] = r   # a resumed run may log a step twice: keep the last
    return [steps[s] for s in sorted(steps)]


@pytest.fixture(scope="module")
def single(setup):
    out = setup / "single"
    r = run(flags(setup, out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_sigkill_then_resume_matches_uninterrupted(setup):
    long = dict(max_steps=200, ckpt_every=7, eval_every=100)
    reference = setup / "uninterrupted"
    assert run(flags(setup, reference, **long)).returncode == 0
    out = setup / "killed"
    proc = subprocess.Popen([sys.executable, "train.py"] + flags(setup, out, **long), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:   # kill once a few checkpoints exist
        if log.exists() and len(log.read_text().splitlines()) > 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = weights.load_checkpoint(str(out / "ckpt.pt")).step
    assert 0 < killed_at < 200, "the run must die mid-way"
    r = run(flags(setup, out, resume=True, **long))
    assert r.returncode == 0, r.stderr[-2000:]
    got, want = losses(out), losses(reference)
    assert [g["step"] for g in got] == list(range(1, 201))
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) < 1e-6 and g["caps"] == pytest.approx(w["caps"], abs=1e-9)


def test_warmup_skips_nothing_then_training_and_inference_fractions_agree(setup, single):
    """Steps 1-2 (route_warmup 0.25 of 8) run every MLP; then capacity anneals and skips;
    the run ends with thresholds calibrated so that inference executes what training did."""
    steps = losses(single)
    assert [s["mlp_frac_train"] for s in steps[:2]] == [1.0, 1.0]
    assert steps[-1]["mlp_frac_train"] < 0.95
    evals = [json.loads(line) for line in open(single / "log.jsonl") if "val_loss" in line]
    final = evals[-1]
    assert len(final["thresholds"]) == 6 and final["mlp_frac_infer"] < 0.97
    ckpt = weights.load_checkpoint(str(single / "ckpt.pt"))
    assert tuple(ckpt.model_config["route_threshold"]) == tuple(final["thresholds"])


def test_calibrate_on_demand_moves_the_thresholds(setup, single, tmp_path):
    path = tmp_path / "ckpt.pt"
    shutil.copy(single / "ckpt.pt", path)
    before = weights.load_checkpoint(str(path)).model_config["route_threshold"]
    r = subprocess.run([sys.executable, "evaluate.py", str(path), "--calibrate", "0.3", "--controls"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    after = weights.load_checkpoint(str(path)).model_config["route_threshold"]
    assert len(after) == len(before) and after != before
    assert all(a >= b for a, b in zip(after, before))     # skipping more needs higher thresholds
    assert all(name in r.stdout for name in ("routers:", "oracle:", "random:", "p>=0.5:"))
    r = subprocess.run([sys.executable, "evaluate.py", str(path), "--calibrate", "1.5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: --calibrate")


def test_kv_window_is_rewritten_only_where_the_policy_has_one(setup, single, tmp_path):
    path = tmp_path / "ckpt.pt"
    shutil.copy(single / "ckpt.pt", path)
    r = subprocess.run([sys.executable, "evaluate.py", str(path), "--kv_window", "16"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: --kv_window")
    ckpt = weights.load_checkpoint(str(path))
    ckpt.model_config = {**ckpt.model_config, "kv_policy": "window"}
    weights.save_checkpoint(str(path), ckpt)
    weights.set_kv_window(str(path), 16)
    assert weights.load_checkpoint(str(path)).model_config["kv_window"] == 16
    assert weights.model_from_checkpoint(weights.load_checkpoint(str(path))).layers[0].self_attn.window == 16


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_one_process(setup, single, mode):
    out = setup / mode
    r = run(flags(setup, out, grad_accum=2, dist=mode), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = losses(out), losses(single)
    assert len(got) == len(want) == 8
    # Step 1 sees identical weights: loss, router loss and capacities agree to fp32 round-off.
    # Later steps start from weights that differ in the last bits (the all-reduce sums in
    # another order), and the cos-global cut is a discrete quantile over near-tied
    # similarities, so a token at the cut may flip: a few tokens' worth of capacity.
    for g, w in zip(got, want):
        first = g["step"] == 1
        assert abs(g["loss"] - w["loss"]) < (1e-6 if first else 2e-4), (g, w)
        assert abs(g["router_loss"] - w["router_loss"]) < (1e-6 if first else 2e-4)
        assert g["caps"] == pytest.approx(w["caps"], abs=1e-6 if first else 1e-2)
    a = weights.from_pretrained(str(out / "ckpt.pt"))
    b = weights.from_pretrained(str(single / "ckpt.pt"))
    prompt = [[5, 6, 7, 8, 9]]
    assert generate(a, prompt, 12) == generate(b, prompt, 12)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    weights.save_checkpoint(path, weights.Checkpoint(model={}, model_config={}, step=1))

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        weights.save_checkpoint(path, weights.Checkpoint(model={"w": torch.zeros(1000)}, model_config={},
                                                         train_config={"late": Boom()}))
    assert weights.load_checkpoint(path).step == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def snapshot(folder):
    return {p: os.path.getmtime(os.path.join(folder, p)) for p in sorted(os.listdir(folder))} \
        if os.path.isdir(folder) else {}


@pytest.mark.parametrize("over,message", [
    (dict(lerning_rate=1), "unknown flag --lerning_rate"),
    (dict(n_new=40), "new layers"),
    (dict(placement="tli", every_k=-1), "K=-1"),
    (dict(placement="index", after="2,9"), "out of range"),
    (dict(capacity_end=1.5), "(0, 1]"),
    (dict(dataset="shakespear"), "--dataset must be one of sharegpt, shakespeare"),
    (dict(data_dir="CORRUPT"), "missing or corrupt"),
    (dict(data_dir="EMPTY"), "no usable rows"),
])
def test_bad_input_is_one_line_and_changes_nothing(setup, single, over, message):
    if over.get("data_dir") in ("CORRUPT", "EMPTY"):
        bad = setup / over["data_dir"] / "sharegpt"
        shutil.copytree(setup / "data" / "sharegpt", bad, dirs_exist_ok=True)
        if over["data_dir"] == "CORRUPT":
            (bad / "val.offsets.npy").write_bytes(b"garbage")
        else:   # a split whose conversations have nothing to learn
            (bad / "train.mask.bin").write_bytes(bytes(len((bad / "train.mask.bin").read_bytes())))
        over = {"data_dir": setup / over["data_dir"]}
    before = snapshot(single)
    r = run(flags(setup, single, **over))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in r.stderr
    assert snapshot(single) == before


def test_checkpoint_from_another_architecture_is_refused(setup, single):
    before = snapshot(single)
    r = run(flags(setup, single, n_new=4, resume=True))
    assert r.returncode != 0 and "n_new=2 -> 4" in r.stderr.strip().splitlines()[-1]
    other = setup / "other"   # a checkpoint whose config does not match its tensors
    other.mkdir(exist_ok=True)
    ckpt = weights.load_checkpoint(str(single / "ckpt.pt"))
    ckpt.model_config["intermediate_size"] = 64
    weights.save_checkpoint(str(other / "ckpt.pt"), ckpt)
    r = run(flags(setup, other, resume=True))
    assert r.returncode != 0 and "has shape" in r.stderr.strip().splitlines()[-1]
    assert snapshot(single) == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup):
    out = setup / "nan"
    r = run(flags(setup, out, lr=1e8, max_steps=30, grad_clip=0, ckpt_every=1))
    last = r.stderr.strip().splitlines()[-1].lower()
    assert r.returncode != 0 and "last good checkpoint" in last and ("non-finite" in last or "loss is" in last)
    ckpt = weights.load_checkpoint(str(out / "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt.model.values())


def test_compare_pairs_fresh_runs_with_each_other_and_the_controls(setup, tmp_path):
    import compare
    extra = f"--init_from={setup / 'model'} --data_dir={setup / 'data'} --dtype=float32 --n_new=2 --calib_rows=4"
    compare.main(["--methods", "base,dense,dlo", "--steps", "4", "--seq_len", "32", "--batch_size", "2",
                  "--grad_accum", "1", "--eval_rows", "4", "--decode_tokens", "0", "--out", str(tmp_path),
                  f"--extra={extra}"])
    rows = {r["method"]: r for r in json.load(open(tmp_path / "results.json"))["results"]}
    assert set(rows) == {"base", "dense", "dlo", "dlo, oracle", "dlo, random", "dlo, static", "dlo, p>=0.5"}
    assert all(len(r["eval"]["row_sums"]) == 4 for r in rows.values())
    table = (tmp_path / "table.md").read_text()
    assert "dlo - static: " in table and "dlo - random: " in table and table.count("±") >= 2 * len(rows)


def test_frontier_runs_end_to_end(setup, tmp_path):
    """Inserted blocks routed whole and the original layers' attention routed on its own,
    then the frontier: every capacity calibrated, evaluated against its controls and timed
    beside the base and the dense pass, into a table, JSON and (with matplotlib) a PNG."""
    out = tmp_path / "run"
    r = run(flags(setup, out, route="block", routed="new", attn_routed="rest", attn_capacity_end=0.7,
                  kv_policy="drop", warmup_freeze=False, calib_rows=2))
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "frontier.py", str(out / "ckpt.pt"), "--capacities", "0.5,0.2",
                        "--rows", "6", "--prompt_len", "8", "--new_tokens", "4", "--prompts", "1", "--repeats", "1",
                        "--out", str(tmp_path / "frontier")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    points = {p["name"]: p for p in json.load(open(tmp_path / "frontier" / "frontier.json"))["points"]}
    for cap in ("0.5", "0.2"):
        assert {f"routers @ {cap}", f"static @ {cap}", f"random @ {cap}"} <= set(points)
        assert points[f"static @ {cap}"]["vs_routers"] is not None and points[f"routers @ {cap}"]["decode_tok_s"] > 0
    assert points["routers @ 0.2"]["mlp_run"] < points["routers @ 0.5"]["mlp_run"] < 6
    assert points["base"]["decode_tok_s"] > 0 and points["dense (same weights)"]["mlp_run"] == 6
    assert points["base"]["mlp_run"] == points["base"]["attn_run"] < 6   # counted over its own, fewer layers
    assert (tmp_path / "frontier" / "frontier.md").read_text().count("| routers @") == 2

