"""Mutation check: each mutant below is one deliberate bug, and the fast tests must fail on it.

    .venv/bin/python tests/mutants.py               # every mutant, one after another (~75 min on 2 cores)
    .venv/bin/python tests/mutants.py --only tie-skips-decode
    .venv/bin/python tests/mutants.py --list

For each mutant: copy the source (`git ls-files -co --exclude-standard`) to a temporary
folder, replace `old` with `new` in one file (`old` must occur exactly once, so a refactor
that moves the code fails here loudly instead of testing nothing), and run
`pytest tests -x -m "not slow"` there. The unmutated copy runs first: a test that already
fails there kills nothing, so it is named and left out of the mutants' runs. Prints mutant,
killed or survived, and the first failing test; exits 1 if any survived or any test
failed unmutated. Whoever changes a mechanism adds its mutant here.
Not a test module: pytest collects test_*.py only.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTEST = [sys.executable, "-m", "pytest", "tests", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
TIMEOUT = 1800   # seconds per run; a mutant that hangs the suite counts as killed


class Mutant(NamedTuple):
    name: str
    file: str
    old: str
    new: str


MUTANTS = [
    # DLO's gate g(p) = 1 + gap (p - 0.5) (arXiv 2407.11030 eq. 3): one function, which every path calls
    Mutant("gate-1", "router.py", "return 1.0 + gap * (p - 0.5)", "return 1.0 + 0.0 * (p - 0.5)"),
    Mutant("gate-p", "router.py", "return 1.0 + gap * (p - 0.5)", "return p"),
    # the gate the fused kernels are given, and MoD's gate (the block output times p)
    Mutant("kernel-ignores-gate", "kernels.py", "g = tl.load(g_ptr + row)", "g = 1.0"),
    Mutant("mod-gate-ignored", "skipping.py", 'return p if self.cfg.route_gate == "mod" else dlo_gate(p, self.gap)',
           "return dlo_gate(p, self.gap)"),
    # a tie at p == threshold runs (zero-initialised routers are the dense model)
    Mutant("tie-skips", "router.py", "return (p >= threshold) & routable", "return (p > threshold) & routable"),
    Mutant("tie-skips-decode", "dlo.py", "float(torch.sigmoid(logit)) >= layer_threshold(rule, slot)",
           "float(torch.sigmoid(logit)) > layer_threshold(rule, slot)"),
    Mutant("sinks-ignored", "router.py", "return valid & (positions >= sink_tokens) if sink_tokens else valid",
           "return valid"),
    # K/V policies and the compact cache
    Mutant("drop-writes-kv", "skipping.py", 'drop = policy == "drop"', "drop = False"),
    Mutant("kept-evicted", "cache.py", "(self.kept | (next_slot[:, None] - self.slot < self.window))",
           "(next_slot[:, None] - self.slot < self.window)"),
    Mutant("evict-window-early", "cache.py", "next_slot[:, None] - self.slot < self.window)",
           "next_slot[:, None] - self.slot < self.window - 1)"),
    Mutant("mask-window-off-by-one", "cache.py", "(key_slot > q - window)", "(key_slot >= q - window)"),
    Mutant("chunk-skips-eviction", "cache.py", "or int(counts.max()) > 1", "or False"),
    # training
    Mutant("capacity-rescale", "schedule.py", 'if self.split == "rescale" or c_bar < float(f.mean()):',
           "if True:"),
    Mutant("ddp-reduction-x2", "train.py", "(loss * self.world).backward()", "(loss * self.world ** 2).backward()"),
    Mutant("labels-wrong-branch", "dlo.py",   # cos(x, block output) instead of cos(h, h + mlp)
           "        return out, [Trace(self.index, logit, sel, ctx.valid, ctx.routable, sim)]",
           "        sim = None if sim is None else torch.cosine_similarity(x.float(), out.float(), dim=-1)\n"
           "        return out, [Trace(self.index, logit, sel, ctx.valid, ctx.routable, sim)]"),
    Mutant("loss-drops-last-chunk", "model.py", "for i in range(0, h.size(0), LOSS_CHUNK)]",
           "for i in range(0, max(h.size(0) - LOSS_CHUNK, 1), LOSS_CHUNK)]"),
    # inference
    Mutant("calibration-off-by-one", "evaluate.py", 'return rows[train_config["eval_rows"]:] if',
           'return rows[train_config["eval_rows"] - 1:] if'),
    Mutant("rope-decode-off-by-one", "sample.py", "batch.positions[:, -1:] + 1", "batch.positions[:, -1:] + 2"),
    Mutant("prefill-chunks-overwrite", "sample.py", "input_pos=torch.arange(P, device=batch.idx.device)[part]",
           "input_pos=torch.arange(part.stop - part.start, device=batch.idx.device)"),
    # loading a .pt: a copied tensor's file pages leave memory; the long held-out conversations
    # exclude the rows the run evaluated and calibrated on; decode runs under the measured choice
    Mutant("file-pages-kept", "weights.py", "LIBC.madvise(ctypes.c_void_p(first)", "(lambda *a: 0)(ctypes.c_void_p(first)"),
    Mutant("long-rows-reused", "evaluate.py", " and int(self.data.starts[r]) not in used]", "]"),
    Mutant("decode-choice-ignored", "sample.py", "with onednn(use_onednn):", "with onednn(True):"),
    Mutant("scored-chunks-overwrite", "bench.py", "input_pos=torch.arange(T, device=idx.device)[part]",
           "input_pos=torch.arange(part.stop - part.start, device=idx.device)"),
    # freed cache blocks back to the OS: without it glibc keeps heap holes resident
    Mutant("freed-blocks-kept", "cache.py", "        lib.malloc_trim(0)", "        pass"),
    # eviction frees the pages the chunk it makes room for then grows back
    Mutant("evict-frees-incoming", "cache.py", "int((counts + incoming).max())", "int(counts.max())"),
    # bench.py --long: each timed decode starts from the prefilled caches, not from the last decode's
    Mutant("bursts-not-restored", "bench.py", "                layer.self_attn.kv_cache = copy.deepcopy(cache)",
           "                pass"),
    # bench.py: a routed model's ratio to the base is also the median of the per-round ratios
    Mutant("round-ratio-of-bests", "bench.py", "statistics.median(x / y for x, y in zip(results[a], results[b]))",
           "max(results[a]) / max(results[b])"),
    # a decode step's short path through the compact cache evicts as update_rows does
    Mutant("append-skips-page-eviction", "cache.py", "(longest > self.k.size(2) or slot - self.swept >= self.page)",
           "(longest > self.k.size(2))"),
    # the compiled decode step: a skipped part's branch, and the K/V a dropped attention leaves
    Mutant("cond-skip-runs-mlp", "decode.py", "torch.cond(sel.view(()), mlp, skipped, (h, gate))",
           "torch.cond(sel.view(()), mlp, mlp, (h, gate))"),
    Mutant("cond-drop-writes-kv", "decode.py", 'ctx.valid & sel if policy == "drop" else ctx.valid', "ctx.valid"),
    # a routed branch's MLP, written out as products and sums (decode.streamed)
    Mutant("branch-gate-up-swapped", "decode.py", "gate, up = streamed(x, gate_up, mlp.gate_up_proj.bias)",
           "up, gate = streamed(x, gate_up, mlp.gate_up_proj.bias)"),
    # compiled decode keeps its static caches (the frozen step guards on their identity), and
    # routed attentions the C++ GEMM template decodes wrong compile without it
    Mutant("caches-not-kept", "sample.py", "page, keep=compiled):", "page, keep=False):"),
    Mutant("gemm-template-everywhere", "decode.py", "compile_once(step, gemm_template_safe(model))",
           "compile_once(step, True)"),
    # weights.place lays each shape out as the decode probe chose, not one way for all
    Mutant("layout-ignores-choice", "tuning.py", "laid_out(w.detach(), choice.input_major[tuple(w.shape)])",
           "laid_out(w.detach(), True)"),
    # the model built on the meta device is not initialized (that imports torch's compiler)
    Mutant("meta-init", "model.py", "        if not meta:\n            self.apply(self._init_weights)",
           "        self.apply(self._init_weights)"),
]


def copy_source(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def mutated(mutant, root):
    """The text of mutant.file under root with the bug in."""
    with open(os.path.join(root, mutant.file)) as f:
        text = f.read()
    n = text.count(mutant.old)
    assert n == 1, f"{mutant.name}: the text to replace occurs {n} times in {mutant.file}, not once"
    return text.replace(mutant.old, mutant.new)


def run_tests(mutant=None, extra=()):
    """(the failing test ids, or the reason pytest failed without naming one; seconds) for
    one fresh copy, with mutant applied."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as dest:
        copy_source(dest)
        if mutant is not None:
            text = mutated(mutant, dest)
            with open(os.path.join(dest, mutant.file), "w") as f:
                f.write(text)
        start = time.time()
        try:
            out = subprocess.run(PYTEST + list(extra), cwd=dest, capture_output=True, text=True, timeout=TIMEOUT,
                                 env={**os.environ, "TRITON_INTERPRET": "1"})
        except subprocess.TimeoutExpired:
            return [f"timeout after {TIMEOUT} s"], time.time() - start
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.M)
        if out.returncode != 0 and not failed:
            failed = (out.stdout.strip().splitlines() or [f"pytest exit code {out.returncode}"])[-1:]
        return failed, time.time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", metavar="NAME", help="run this mutant (repeatable)")
    p.add_argument("--list", action="store_true", help="print each mutant's edit and exit")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"error: unknown mutant {', '.join(sorted(unknown))}: see --list")
    for m in chosen:   # fail fast on a mutant whose text moved
        mutated(m, ROOT)
    if args.list:
        for m in chosen:
            print(f"{m.name}  {m.file}: {m.old.strip()!r} -> {m.new.strip()!r}")
        return
    broken, secs = run_tests()   # the whole fast suite, unmutated
    if any(not test.startswith("tests/") for test in broken):
        sys.exit(f"error: the unmutated suite does not run: {broken[0]}")
    print(f"unmutated: {len(broken)} fast tests fail ({secs:.0f} s)", *broken, sep="\n  ", flush=True)
    skip = [arg for test in broken for arg in ("--deselect", test)]
    rows = []
    for m in chosen:
        failed, secs = run_tests(m, ["-x"] + skip)
        rows.append((m.name, "killed" if failed else "SURVIVED", failed[0] if failed else "-"))
        print(f"{m.name:24} {rows[-1][1]:9} {rows[-1][2]}  ({secs:.0f} s)", flush=True)
    print("\n| mutant | result | killed by |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.exit(1 if broken or any(r[1] == "SURVIVED" for r in rows) else 0)


if __name__ == "__main__":
    main()
