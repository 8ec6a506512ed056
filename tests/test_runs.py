"""Whole training runs on a tiny routed model: resume after SIGKILL, DDP and FSDP under
torchrun (gloo) against one process, atomic checkpoints, and clear errors on bad input."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate
import weights
from conftest import ByteTokenizer, tiny_model, write_sharegpt
from data import prepare_sharegpt
from router import Rule
from sample import generate
from schedule import part_schedule

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
    the run ends with thresholds calibrated so that inference executes what training did.
    Exactly, on the calibration rows: the saved thresholds select the very tokens that top-k
    at the run's final capacities selects. On the held-out eval rows, approximately: the
    executed fraction of MLPs at inference (final eval) against training's at its last step."""
    steps = losses(single)
    assert [s["mlp_frac_train"] for s in steps[:2]] == [1.0, 1.0]
    assert steps[-1]["mlp_frac_train"] < 0.95
    evals = [json.loads(line) for line in open(single / "log.jsonl") if "val_loss" in line]
    final = evals[-1]
    assert len(final["thresholds"]) == 6 and final["mlp_frac_infer"] < 0.97
    # Thresholds set on 4 calibration rows, applied to 4 other rows: per layer, a fraction
    # c ~ 0.8 over ~120 routable tokens on each side has a sampling SE of about
    # sqrt(2 c (1 - c) / 120) ~ 0.05, and the 6-layer mean (two layers pinned at 0 and
    # about 1) about 0.025; training's is measured on other rows again. 0.05 is ~2 SE, far
    # below what a calibration at the wrong capacities (1.0 at the warm-up: +0.38), or
    # p >= 0.5 in place of the thresholds, moves it.
    assert abs(final["mlp_frac_infer"] - steps[-1]["mlp_frac_train"]) < 0.05
    ckpt = weights.load_checkpoint(str(single / "ckpt.pt"))
    assert tuple(ckpt.model_config["route_threshold"]) == tuple(final["thresholds"])
    c = ckpt.train_config
    model = weights.model_from_checkpoint(ckpt)
    sched = part_schedule(model.config.route_slots(), c["capacity_start"], c["capacity_end"], c["attn_capacity_end"],
                          warmup=round(c["route_warmup"] * c["max_steps"]),
                          anneal=round(c["route_anneal"] * c["max_steps"]), split=c["capacity_split"])
    sched.load_state_dict(ckpt.schedule)
    data = evaluate.held_out(c)
    x, _, valid = data.batch(evaluate.calibration_rows(data, c))
    with torch.no_grad():
        model(x, valid=valid, rule=Rule("topk", capacity=sched.capacities(c["max_steps"])))
        trained = [t.sel & t.valid for t in model.route_trace]
        model(x, valid=valid)   # the checkpoint's own rule: its thresholds
    assert 0 < sum(int(s.sum()) for s in trained) < len(trained) * int(valid.sum())
    assert all(torch.equal(t.sel & t.valid, s) for t, s in zip(model.route_trace, trained))


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
    assert weights.model_from_checkpoint(weights.load_checkpoint(str(path))).config.kv_window == 16


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_one_process(setup, single, mode):
    out = setup / mode
    r = run(flags(setup, out, grad_accum=2, dist=mode), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = losses(out), losses(single)
    assert len(got) == len(want) == 8
    # All 8 optimizer steps (3 after the warm-up at full capacity, 5 while it anneals and
    # skips): the ranks differ from the one process only in the order the gradients are
    # summed (two partial sums all-reduced), which moves the weights in the last bits;
    # measured, loss and router loss then differ by at most 2e-6 and 5e-6 on a CPU without
    # AVX512-BF16, and the router loss by 1.3e-5 on one with it (hence 3e-5). The capacities
    # follow an average of label fractions, and the cos-global cut is a quantile over
    # near-tied similarities: from step 4 (where it first skips) a token at the cut may flip,
    # one of ~250 routable tokens through the average's weight 0.1, ~3e-4 of a capacity,
    # where DDP measures 1e-9 and FSDP 2.5e-4. Its router loss moves by ~1e-5 only because
    # such a token's p is within ~1e-3 of 0.5. The gradients' scale over ranks and
    # micro-batches, which AdamW and clipping would hide in these losses, is pinned by
    # test_train.py::test_gradient_reduction_scale_over_ranks_and_micro_batches.
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) < 1e-5, (g, w)
        assert abs(g["router_loss"] - w["router_loss"]) < 3e-5, (g, w)
        assert g["caps"] == pytest.approx(w["caps"], abs=1e-6 if g["step"] <= 4 else 1e-3)
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


@pytest.fixture(scope="module")
def frontier_run(setup):
    """Inserted blocks routed whole and the original layers' attention routed on its own
    (trained to 0.7), then frontier.py at capacities 0.5 and 0.2 on up to 6 held-out rows
    (the split's 5 val rows hold 4 besides the calibration row)."""
    out = setup / "frontier_run"
    r = run(flags(setup, out, route="block", routed="new", attn_routed="rest", attn_capacity_end=0.7,
                  kv_policy="drop", warmup_freeze=False, calib_rows=2))
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "frontier.py", str(out / "ckpt.pt"), "--capacities", "0.5,0.2",
                        "--rows", "6", "--prompt_len", "8", "--new_tokens", "4", "--prompts", "1", "--repeats", "1",
                        "--out", str(setup / "frontier")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    points = {p["name"]: p for p in json.load(open(setup / "frontier" / "frontier.json"))["points"]}
    return out / "ckpt.pt", points


def parts_of(ckpt_path):
    """Each routed part's kind: the two inserted blocks, then the four original attentions."""
    model = weights.from_pretrained(str(ckpt_path))
    return [part for _, part in model.config.route_slots()]


def test_frontier_runs_end_to_end(setup, frontier_run):
    """Every capacity calibrated, evaluated against its controls and timed beside the base
    and the dense pass, into a table, JSON and (with matplotlib) a PNG."""
    _, points = frontier_run
    for cap in ("0.5", "0.2"):
        assert {f"routers @ {cap}", f"static @ {cap}", f"random @ {cap}"} <= set(points)
        assert points[f"static @ {cap}"]["vs_routers"] is not None and points[f"routers @ {cap}"]["decode_tok_s"] > 0
    assert points["routers @ 0.2"]["mlp_run"] < points["routers @ 0.5"]["mlp_run"] < 6
    assert points["base"]["decode_tok_s"] > 0 and points["dense (same weights)"]["mlp_run"] == 6
    assert points["base"]["mlp_run"] == points["base"]["attn_run"] < 6   # counted over its own, fewer layers
    assert (setup / "frontier" / "frontier.md").read_text().count("| routers @") == 2


def test_frontier_hits_its_capacities(setup, frontier_run):
    """At each capacity the routers run that mean fraction of the inserted blocks, and the
    attention parts stay at their trained 0.7. Exactly on the calibration rows, where the
    thresholds are set: each part runs ceil(c_l N) of the N routable tokens (ties aside),
    so a mean lies in [c, c + 1/N). On the held-out rows the blocks' mean is within 0.15:
    the thresholds come from one calibration row (N = 31, a part's SE sqrt(c (1 - c) / N)
    <= 0.09, the mean of two <= 0.065), applied to ~120 other tokens (<= 0.03)."""
    path, points = frontier_run
    kinds = parts_of(path)
    ckpt = weights.load_checkpoint(str(path))
    model = weights.model_from_checkpoint(ckpt)
    data = evaluate.held_out(ckpt.train_config)
    calib = evaluate.calibration_rows(data, ckpt.train_config)
    n = int(data.batch(calib)[2].sum()) - ckpt.train_config["sink_tokens"] * len(calib)
    for cap in (0.5, 0.2):
        model.config.route_threshold = evaluate.thresholds_at(model, ckpt, data, cap, "cpu", "float32")
        exact = evaluate.evaluate(model, data, calib, model.default_rule(), 2, "cpu", "float32")
        for kind, want in (("block", cap), ("attn", 0.7)):
            fracs = [f for f, k in zip(exact["routed_frac"], kinds) if k == kind]
            assert want - 1e-9 <= sum(fracs) / len(fracs) < want + 1 / n, (kind, cap, fracs)
        held = [f for f, k in zip(points[f"routers @ {cap}"]["routed_frac"], kinds) if k == "block"]
        assert abs(sum(held) / len(held) - cap) < 0.15, (cap, held)


def test_frontier_controls_run_at_the_routers_budget(frontier_run):
    """Static pruning keeps, per kind of part, ceil(the routers' summed fractions) parts
    whole and none of the others: never less compute than the routers. Random routing
    runs each part at the routers' own fraction: a Bernoulli draw over the ~120 routable
    tokens of the held-out rows has an SE of at most 0.045, so each part is within 0.15
    (~3 SE) and the mean of the six within 0.08."""
    path, points = frontier_run
    kinds = parts_of(path)
    for cap in ("0.5", "0.2"):
        routers = points[f"routers @ {cap}"]["routed_frac"]
        static, rand = points[f"static @ {cap}"]["routed_frac"], points[f"random @ {cap}"]["routed_frac"]
        assert set(static) <= {0.0, 1.0}
        for kind in ("block", "attn"):
            mine = sum(f for f, k in zip(routers, kinds) if k == kind)
            assert sum(f for f, k in zip(static, kinds) if k == kind) == math.ceil(mine - 1e-6), (cap, kind)
        assert all(abs(a - b) < 0.15 for a, b in zip(rand, routers)), (cap, rand, routers)
        assert abs(sum(rand) - sum(routers)) / len(routers) < 0.08


def test_frontier_losses_come_from_rows_calibration_never_saw(setup, frontier_run):
    """The frontier's held-out loss is measured on val rows disjoint from the calibration
    rows: frontier.held_out_rows leaves them out, and the dense pass's loss in the JSON is
    the loss on exactly those rows (to fp32 round-off), not with a calibration row in."""
    import frontier
    path, points = frontier_run
    ckpt = weights.load_checkpoint(str(path))
    c = ckpt.train_config
    data = evaluate.held_out(c)
    rows, calib = frontier.held_out_rows(data, c, 6), evaluate.calibration_rows(data, c).tolist()
    assert calib and len(rows) >= 4 and not set(rows) & set(calib)
    assert rows == [r for r in range(data.num_rows) if r not in calib][:6]   # all the split has left
    model = weights.model_from_checkpoint(ckpt)
    dense = lambda rows: evaluate.evaluate(model, data, rows, Rule("all"), 2, "cpu", "float32")["val_loss"]
    assert abs(dense(rows) - points["dense (same weights)"]["val_loss"]) < 1e-5
    assert abs(dense(calib + rows[1:]) - points["dense (same weights)"]["val_loss"]) > 1e-3
