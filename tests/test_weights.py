"""Weight loading and export: HF folders (Llama, GPT-2), GGUF un-permutation, bad files."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import growth
import methods
import weights
from conftest import tiny_model
from tokenizer import load_tokenizer
from sample import generate


def same_logits(a, b, vocab=97):
    idx = torch.randint(0, vocab, (2, 11))
    return torch.equal(a(idx)[0], b(idx)[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_round_trip(tmp_path, arch):
    model = tiny_model(arch=arch, bias=arch == "gpt2", n_kv_head=4 if arch == "gpt2" else 2,
                       tie_embeddings=arch == "gpt2")
    weights.save_hf(model, tmp_path)
    assert same_logits(model, weights.load_hf(str(tmp_path)))


def test_expanded_routed_model_round_trips(tmp_path):
    model = methods.activate(growth.expand(tiny_model(), "interleave", n_new=2, init="copy"), "block", kv_policy="drop")
    with torch.no_grad():
        for layer in model.layers:
            layer.router.weight.normal_()
    weights.save_hf(model, tmp_path)
    again = weights.load_hf(str(tmp_path))
    assert again.config == model.config and same_logits(model, again)


def test_loading_leaves_torchs_compiler_unloaded(tmp_path):
    """weights.build makes the model on the meta device and assigns the loaded tensors.
    Initializing meta tensors would import torch._dynamo, ~150 MB resident in every
    process that only loads and samples."""
    import subprocess
    import sys
    model = methods.activate(growth.expand(tiny_model(), "interleave", n_new=2, init="copy"), "mlp")
    weights.save_hf(model, tmp_path)
    probe = ("import sys, weights; weights.load_hf(sys.argv[1]); "
             "assert 'torch._dynamo' not in sys.modules, 'loading imported torch._dynamo'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]


def hf_llama_folder(model, folder):
    """A folder written the way HF transformers writes Llama (no nanodlo key): separate
    q/k/v and gate/up matrices, split here by hand from our fused ones."""
    from safetensors.torch import save_file
    cfg, hs, I = model.config, model.config.head_dim, model.config.intermediate_size
    state = {}
    for k, v in model.state_dict().items():
        if "qkv_proj" in k:
            for part, t in zip("qkv", v.split([cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs])):
                state[k.replace("qkv_proj", f"{part}_proj")] = t
        elif "gate_up_proj" in k:
            for part, t in zip(("gate", "up"), v.split([I, I])):
                state[k.replace("gate_up_proj", f"{part}_proj")] = t
        else:
            state[k] = v
    state = {("model." + k if k != "lm_head.weight" else k): v.contiguous() for k, v in state.items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
                   "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
                   "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.block_size,
                   "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": False,
                   "vocab_size": cfg.vocab_size}, f)


def test_loads_genuine_hf_llama_and_gpt2_names(tmp_path):
    llama = tiny_model(tie_embeddings=False)
    hf_llama_folder(llama, tmp_path)
    assert same_logits(llama, weights.load_hf(str(tmp_path)))
    gpt2 = tiny_model(arch="gpt2", bias=True, n_kv_head=4)
    from safetensors.torch import save_file
    d = tmp_path / "gpt2"
    d.mkdir()
    sd = {k: v for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}
    hf = {"transformer.wte.weight": sd.pop("embed_tokens.weight"), "transformer.wpe.weight": sd.pop("pos_embed.weight"),
          "transformer.ln_f.weight": sd.pop("norm.weight"), "transformer.ln_f.bias": sd.pop("norm.bias")}
    for i in range(4):   # Conv1D stores (in, out); c_attn is q, k, v side by side, as our qkv_proj
        g = lambda n: sd[f"layers.{i}.{n}"]
        hf[f"transformer.h.{i}.attn.c_attn.weight"] = g("self_attn.qkv_proj.weight").t().contiguous()
        hf[f"transformer.h.{i}.attn.c_attn.bias"] = g("self_attn.qkv_proj.bias")
        hf[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))   # old causal buffer
        for hf_name, ours in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                              ("mlp.c_proj", "mlp.down_proj")):
            hf[f"transformer.h.{i}.{hf_name}.weight"] = g(f"{ours}.weight").t().contiguous()
            hf[f"transformer.h.{i}.{hf_name}.bias"] = g(f"{ours}.bias")
        for hf_name, ours in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            hf[f"transformer.h.{i}.{hf_name}.weight"] = g(f"{ours}.weight")
            hf[f"transformer.h.{i}.{hf_name}.bias"] = g(f"{ours}.bias")
    save_file(hf, str(d / "model.safetensors"))
    with open(d / "config.json", "w") as f:
        json.dump({"model_type": "gpt2", "n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 64,
                   "n_inner": 48, "vocab_size": 97, "layer_norm_epsilon": 1e-5}, f)
    assert same_logits(gpt2, weights.load_hf(str(d)))


def test_matches_transformers(tmp_path):
    """The reference implementation: HF's own tiny Llama (GQA) and GPT-2 load with its
    logits, and our exports load back into transformers (requirements-test.txt)."""
    import transformers
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000.0, tie_word_embeddings=False))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    idx = torch.randint(0, 97, (2, 11))
    for name, hf in (("llama", llama), ("gpt2", gpt2)):
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 1:   # norms start at 1 and biases at 0: randomize so a swap shows
                    p.uniform_(0.5, 1.5)
        hf.eval().save_pretrained(tmp_path / name)
        ours = weights.load_hf(str(tmp_path / name))
        weights.save_hf(ours, tmp_path / f"{name}-export")
        back = type(hf).from_pretrained(tmp_path / f"{name}-export").eval()
        with torch.no_grad():
            want = hf(idx).logits
            assert torch.allclose(ours(idx)[0], want, atol=1e-5), name
            assert torch.equal(back(idx).logits, want), name


def write_gguf(model, path, quant=None):
    """A tiny llama.cpp-style GGUF: q/k rows permuted as llama.cpp's converter does."""
    import gguf
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    names = {v: k for k, v in weights.GGUF_NAMES.items()}

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)

    state = weights.unfuse({k: v.detach() for k, v in model.state_dict().items()}, cfg)   # GGUF: HF's matrices
    for key, t in state.items():
        t = t.numpy().astype(np.float32)
        if key == "lm_head.weight":
            continue
        if key.startswith("layers."):
            _, i, mod, sub, leaf = (key.split(".") + [""])[:5]
            kind = names[f"{mod}.{sub}"] if leaf else names[mod]
            name = f"blk.{i}.{kind}.{leaf or sub}"
            if kind in ("attn_q", "attn_k"):
                t = permute(t, cfg.n_head if kind == "attn_q" else cfg.n_kv_head)
        else:
            name = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}[key]
        if quant is not None and t.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_unpermutes_q_and_k(tmp_path):
    model = tiny_model(intermediate_size=64, n_embd=64, n_head=4, n_kv_head=2)
    write_gguf(model, tmp_path / "m.gguf")
    loaded = weights.load_gguf(str(tmp_path / "m.gguf"))
    assert same_logits(model, loaded)


@pytest.mark.parametrize("quant,tol", [("Q8_0", 0.01), ("Q4_1", 0.15)])
def test_gguf_dequantizes(tmp_path, quant, tol):
    import gguf
    model = tiny_model(intermediate_size=64, n_embd=64, n_head=4, n_kv_head=2)
    write_gguf(model, tmp_path / "q.gguf", getattr(gguf.GGMLQuantizationType, quant))
    loaded = weights.load_gguf(str(tmp_path / "q.gguf"))
    a, b = model.layers[1].mlp.gate_up_proj.weight.detach(), loaded.layers[1].mlp.gate_up_proj.weight.detach()
    assert 0 < float((a - b).abs().max()) < tol * float(a.detach().abs().max())


def one_line_error(fn, *args, match):
    with pytest.raises(weights.WeightsError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg and match in msg
    return msg


def test_bad_files_give_one_line_errors(tmp_path):
    model = tiny_model(intermediate_size=64, n_embd=64, n_head=4, n_kv_head=2)
    write_gguf(model, tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    one_line_error(weights.from_pretrained, str(tmp_path / "cut.gguf"), match="cut.gguf")
    (tmp_path / "noise.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    one_line_error(weights.from_pretrained, str(tmp_path / "noise.gguf"), match="noise.gguf")
    one_line_error(weights.from_pretrained, str(tmp_path / "missing.gguf"), match="no such file")
    hf_llama_folder(tiny_model(tie_embeddings=False), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_line_error(weights.from_pretrained, str(tmp_path), match="has shape")
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_line_error(weights.from_pretrained, str(tmp_path), match="llama3")
    del cfg["rope_scaling"], cfg["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_line_error(weights.from_pretrained, str(tmp_path), match="num_attention_heads")
    cfg["num_attention_heads"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    one_line_error(weights.from_pretrained, str(tmp_path), match="model.safetensors")
    (tmp_path / "ck.pt").write_bytes(b"not a checkpoint")
    one_line_error(weights.from_pretrained, str(tmp_path / "ck.pt"), match="ck.pt")


def test_unsupported_quant_type_is_named(tmp_path, monkeypatch):
    import gguf
    q8_1 = gguf.GGMLQuantizationType.Q8_1   # gguf can neither quantize nor dequantize it
    block, size = gguf.GGML_QUANT_SIZES[q8_1]
    monkeypatch.setattr(gguf.quants, "quantize",
                        lambda t, q: np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8))
    write_gguf(tiny_model(intermediate_size=64, n_embd=64), tmp_path / "q.gguf", q8_1)
    one_line_error(weights.load_gguf, str(tmp_path / "q.gguf"), match="Q8_1")


@pytest.mark.slow
def test_real_smollm2_answers_paris(tmp_path):
    model = weights.from_pretrained("smollm2")
    tok = load_tokenizer("smollm2")
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}],
                          add_generation_prompt=True)
    answer = tok.decode(generate(model, [ids], 24, stop_ids=[tok.im_end_id])[0])
    assert "Paris" in answer
    # and the export of the real model loads back with identical logits
    weights.save_hf(model, tmp_path, tokenizer=tok)
    again = weights.load_hf(str(tmp_path))
    x = torch.tensor([ids])
    assert torch.equal(model(x)[0], again(x)[0])
    assert load_tokenizer(str(tmp_path)).encode("Paris, 1889") == tok.encode("Paris, 1889")


def test_cpu_layout_keeps_values_ties_and_gradients(tmp_path):
    """tuning.lay_out stores each weight shape the way the decode probe chose: some shapes
    input-major, others (out, in), in one model. Values, ties, gradients and the export stay
    as they were. A model small enough to sit in the caches is placed unmeasured, as it is."""
    import tuning
    model = tiny_model(tie_embeddings=True)
    placed = tiny_model(tie_embeddings=True)
    shapes = sorted({tuple(m.weight.shape) for m in placed.modules() if isinstance(m, torch.nn.Linear)})
    major = {shape: i % 2 == 0 for i, shape in enumerate(shapes)}   # every other shape input-major
    assert len(shapes) > 1
    tuning.lay_out(placed, tuning.Choice(True, major, {}))
    for m in placed.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight
            assert (w.t().is_contiguous() and not w.is_contiguous()) == major[tuple(w.shape)]
            assert w.is_contiguous() != major[tuple(w.shape)]
    assert placed.lm_head.weight is placed.embed_tokens.weight
    idx = torch.randint(0, 97, (2, 11))
    for m in (model, placed):
        m(idx, idx)[1].backward()
    torch.testing.assert_close(placed(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), placed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    weights.save_hf(placed, tmp_path)   # export writes the standard layout
    torch.testing.assert_close(weights.load_hf(str(tmp_path))(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-6)
    for dtype in (torch.float32, torch.bfloat16):
        small = weights.place(tiny_model().to(dtype), "cpu")
        assert all(m.weight.is_contiguous() for m in small.modules() if isinstance(m, torch.nn.Linear))


def test_loading_a_checkpoint_reads_its_model_once_and_never_its_optimizer_state(tmp_path):
    """A .pt is memory-mapped: building the model for inference reads its weights and never
    its optimizer state (here 256 MB, twice the model), and the file's pages are
    released as each tensor is copied out, so the process grows by about the model's 128 MB,
    not twice that. The model owns its tensors: it outlives the checkpoint and its file.
    Measured in a fresh process, with the compiler (imported by building on the meta
    device) loaded before."""
    import subprocess
    import sys
    model = tiny_model(vocab_size=2 ** 18, n_embd=64)   # the embedding and the head: 64 MB each
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = {"state": {0: {"exp_avg": torch.ones(32 * 2 ** 20), "exp_avg_sq": torch.ones(32 * 2 ** 20)}}}
    path = str(tmp_path / "ckpt.pt")
    weights.save_checkpoint(path, weights.Checkpoint(model=state, model_config=dataclasses.asdict(model.config),
                                                     optimizer=optimizer))
    probe = ("import sys, torch, torch._dynamo, weights\n"
             "def rss(): return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024\n"
             "before = rss()\n"
             "model = weights.model_from_checkpoint(weights.load_checkpoint(sys.argv[1]))\n"
             "import os; os.remove(sys.argv[1])\n"
             "x = torch.tensor([[1, 2, 3]]); print(rss() - before, float(model(x)[0].sum()))\n")
    r = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    grew_mb, logit_sum = r.stdout.split()
    assert int(grew_mb) < 180, f"loading grew the process by {grew_mb} MB for a 128 MB model"
    with torch.no_grad():
        assert float(logit_sum) == pytest.approx(float(model(torch.tensor([[1, 2, 3]]))[0].sum()), rel=1e-5)


def test_file_pages_of_a_copied_tensor_are_released(tmp_path):
    """release_file_pages drops the resident pages a memory-mapped tensor was read through
    (Linux), and leaves its values readable from the file; on memory that is not a file
    mapping it does nothing."""
    if weights.LIBC is None:
        pytest.skip("no /proc/self/maps and madvise here")
    torch.save({"w": torch.arange(16 * 2 ** 20, dtype=torch.float32)}, tmp_path / "w.pt")   # 64 MB
    w = torch.load(tmp_path / "w.pt", mmap=True, weights_only=True)["w"]
    rss = lambda: int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
    before = rss()
    total = float(w.sum())                       # reads every page in
    assert rss() - before > 48
    weights.release_file_pages(w)
    assert rss() - before < 16
    assert float(w.sum()) == total               # read again from the file
    anonymous = torch.arange(16 * 2 ** 20, dtype=torch.float32)
    weights.release_file_pages(anonymous)
    assert float(anonymous.sum()) == total
