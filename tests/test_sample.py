"""sample.py end to end on a tiny model that carries the real tokenizer."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch
import growth
import methods
import weights
from conftest import tiny_model
from sample import RGB, sample_next, write_depth_png
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    tok = load_tokenizer("smollm2")
    dense = tiny_model(vocab_size=tok.vocab_size, block_size=96)
    weights.save_hf(dense, d / "dense", tokenizer=tok)
    for name in ("routed", "split"):
        if name == "routed":
            model = methods.activate(dense, "mlp", sink_tokens=1)
        else:   # the inserted layers' attention and MLP routed apart, the first two layers' attention too
            grown = growth.expand(dense, "interleave", n_new=2)
            model = methods.activate(grown, "attn+mlp", layers=grown.config.new_layers, attn_layers=[0, 1], sink_tokens=1,
                                 kv_policy="drop")
        with torch.no_grad():
            for layer in model.layers:
                for router in layer.routers():
                    router.weight.normal_(0, 0.5)
        weights.save_checkpoint(str(d / f"{name}.pt"), weights.Checkpoint(
            model=model.state_dict(), model_config=dataclasses.asdict(model.config),
            train_config={"init_from": str(d / "dense")}))
    return d


def sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_depth_view_and_picture(folders):
    """Every token is shown with its depth, the prompt's and the answer's; the depth varies
    from token to token, and the sink (the first prompt token) runs every layer."""
    html = folders / "depth.html"
    png = folders / "depth.png"
    r = sample("--init_from", str(folders / "routed.pt"), "--max_new_tokens", "12", "--depth_out", str(html),
               "--depth_png", str(png), "--mode", "raw", "--prompt", "Hello there, how are you doing today?")
    assert r.returncode == 0, r.stderr
    prompt_part, answer_part = r.stdout.split("--- answer:")
    depth = lambda text: [int(d) for d in re.findall(r"\|(\d+)\]", text)]   # not a TTY: [token|layers]
    prompt, answer = depth(prompt_part), depth(answer_part)
    assert len(prompt) >= 8 and len(answer) == 12
    assert prompt[0] == 4                                          # the sink ran all 4 layers
    assert len(set(prompt[1:])) > 1 and len(set(answer)) > 1        # depth varies token to token
    assert "4.00 attentions and" in r.stdout and "% of layer FLOPs saved" in r.stdout
    page = html.read_text()
    assert page.startswith("<!doctype html>") and page.count("<tr>") == 1 + len(prompt) + 12
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"the same as a PNG: {png}" in r.stdout


def test_depth_png_draws_what_ran(tmp_path):
    """The PNG's cells take the depth view's colours: a layer whose MLP every token skipped
    shows "attention only" (orange), and a model that ran everything shows none of it."""
    import matplotlib.image as image
    cfg = tiny_model().config
    ran = [torch.ones(cfg.n_layer, 2, dtype=torch.bool) for _ in range(6)]
    orange = torch.tensor(RGB[True, False])

    def has_orange(rows):
        write_depth_png(str(tmp_path / "d.png"), ["a", "$b", "\n"] * 2, rows, cfg)
        pixels = torch.tensor(image.imread(str(tmp_path / "d.png"))[..., :3])
        return bool(((pixels - orange).abs().amax(-1) < 0.02).any())

    assert not has_orange(ran)
    for row in ran:
        row[2, 1] = False
    assert has_orange(ran)


@pytest.mark.slow
def test_depth_view_tells_attention_and_mlp_skips_apart(folders):
    """Attention and MLPs routed apart: each token shows both counts, the summary counts
    the inserted layers, and the picture marks them and colours each part."""
    html = folders / "split.html"
    r = sample("--init_from", str(folders / "split.pt"), "--max_new_tokens", "10", "--depth_out", str(html),
               "--mode", "raw", "--prompt", "Hello there, how are you doing today?")
    assert r.returncode == 0, r.stderr
    pairs = [(int(a), int(m)) for a, m in re.findall(r"\|a(\d+) m(\d+)\]", r.stdout)]
    assert len(pairs) >= 18 and pairs[0] == (6, 6)                   # the sink ran everything
    assert len({a for a, _ in pairs}) > 1 and len({m for _, m in pairs}) > 1
    assert all(a >= 2 and m >= 4 for a, m in pairs)   # attention routed in layers 0, 1, 2, 5; MLPs in 2, 5
    assert "inserted layers" in r.stdout
    page = html.read_text()
    assert page.count('class="new"') == 2 and 'class="a"' in page and 'class="m"' in page


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--temperature=-1", "--temperature=nan", "--top_p=0", "--max_new_tokens=0"])
def test_impossible_sampling_settings_are_refused(folders, flag):
    r = sample("--init_from", str(folders / "dense"), flag)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "must be" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_prompt_longer_than_the_context_is_one_line(folders, tmp_path):
    (tmp_path / "long.txt").write_text("word " * 200)
    r = sample("--init_from", str(folders / "dense"), "--prompt", f"@{tmp_path / 'long.txt'}", "--mode", "raw")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "exceeds the model's context of 96 tokens" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_missing_weights_are_one_line(tmp_path):
    r = sample("--init_from", str(tmp_path / "nothing.gguf"))
    assert r.returncode == 1 and r.stderr.strip().startswith(f"error: {tmp_path / 'nothing.gguf'}: no such file")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_default_run_answers_and_reports_speed():
    r = sample("--max_new_tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "tokens/s" in r.stdout and "GB/s" in r.stdout


def test_sampling_rules():
    """top_k 0 means no limit (it used to raise IndexError); top_p keeps the smallest set of
    tokens whose probability reaches p (here p = 0.70, 0.26, 0.03, 0.01: 0.9 needs the two likeliest)."""
    draw = lambda logits, n, **kw: {int(sample_next(logits, 1.0, generator=gen, **kw)) for _ in range(n)}
    gen = torch.Generator().manual_seed(0)
    flat = torch.tensor([[2.0, 1.5, 1.0, 0.5]])
    assert draw(flat, 200, top_k=0) == {0, 1, 2, 3}
    assert draw(flat, 200, top_k=2) == {0, 1}
    peaked = torch.tensor([[4.0, 3.0, 1.0, 0.0]])
    assert draw(peaked, 200, top_p=0.9) == {0, 1}
    assert draw(peaked, 50, top_p=0.5) == {0}
    assert sample_next(peaked, 0.0).tolist() == [0]


def test_decode_choice_is_measured_once_and_changes_no_token(monkeypatch):
    """tuning.decode_choice times the model's decode-shaped linears in both layouts with
    oneDNN on and off (a real GB/s each), once per dtype and shapes; models small enough to
    sit in the caches keep oneDNN on and (out, in) unmeasured. Decoding under either oneDNN
    setting, and with every shape in either layout, gives the same greedy tokens."""
    import sample
    import tuning
    monkeypatch.setattr(tuning, "CHOICES", {})
    model = tiny_model(seed=3).eval()
    small = tuning.decode_choice(model)
    assert small.onednn and not any(small.input_major.values()) and not tuning.CHOICES   # under 16 MB
    choice = tuning.decode_choice(model, seconds=0.01, min_mbytes=0)
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert set(choice.input_major) == shapes
    assert all(0 < g < 10_000 for g in choice.gbps.values())
    assert choice.onednn == (choice.gbps[True] >= choice.gbps[False])
    assert tuning.decode_choice(model, min_mbytes=0) is choice and len(tuning.CHOICES) == 1
    prompt = [[5, 9, 2, 7, 1]]
    tokens = {}
    for enabled in (True, False):
        monkeypatch.setattr(sample, "decode_choice", lambda m, e=enabled: tuning.Choice(e, {}, choice.gbps))
        monkeypatch.setattr(sample, "onednn", lambda e, seen=[]: (seen.append(e), tuning.onednn(e))[1])
        tokens[enabled] = sample.generate(model, prompt, 12)
        assert sample.onednn.__defaults__[0] == [enabled] * 11   # every decode step ran under the choice
    assert tokens[True] == tokens[False]
    for major in (True, False):
        tuning.lay_out(model, tuning.Choice(True, {shape: major for shape in shapes}, {}))
        assert all(m.weight.is_contiguous() != major for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert sample.generate(model, prompt, 12) == tokens[True]
