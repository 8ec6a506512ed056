"""ShareGPT parsing rules, prepared files, and the deterministic batch reader."""

import numpy as np
import pytest
import torch

from conftest import ByteTokenizer, write_sharegpt
from data import DataError, TokenData, iter_sharegpt, prepare_sharegpt
from evaluate import LongConversations


RECORDS = [
    {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    {"id": "b", "conversations": [{"from": "gpt", "value": "lead"}, {"from": "human", "value": "q"},
                                  {"from": "chatgpt", "value": ""}, {"from": "bard", "value": "ans"}]},
    {"id": "c", "conversations": []},
    {"id": "d", "conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]},
    {"id": "e", "conversations": [{"from": "system", "value": "be kind"}, {"from": "user", "value": "q"},
                                  {"from": "bing", "value": "a"}]},
    {"id": "f", "conversations": [{"from": "human", "value": "only a question"}]},
    {"id": "g", "conversations": [{"from": "human", "value": "cut"}, {"from": "gpt", "value": "off here"}]},
]


def test_sharegpt_rules(tmp_path):
    write_sharegpt(tmp_path / "s.json", RECORDS)
    stats = {}
    convs = dict(iter_sharegpt(str(tmp_path / "s.json"), stats))
    assert list(convs) == ["a", "b", "e"]
    assert convs["b"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans"}]
    assert convs["e"][0] == {"role": "system", "content": "be kind"}
    assert stats == {"records": 6, "kept": 3, "truncated_tail": 1, "no_turns": 1, "unknown_role": 1,
                     "no_assistant": 1, "leading_assistant_turns": 1, "empty_turns": 1}


def prepared(tmp_path, n=60):
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "q" * (i % 7 + 1)},
                                                  {"from": "gpt", "value": "answer " * (i % 5 + 1)}]}
               for i in range(n)]
    write_sharegpt(tmp_path / "s.json", records, cut=False)
    meta = prepare_sharegpt(str(tmp_path / "out"), ByteTokenizer(), val_every=5, path=str(tmp_path / "s.json"))
    return str(tmp_path / "out"), meta


def test_prepare_and_batches(tmp_path):
    path, meta = prepared(tmp_path)
    assert meta["conversations"]["train"] + meta["conversations"]["val"] == 60
    data = TokenData(path, "train", seq_len=24)
    x, y, valid = data.batch(data.rows_at(0, 8, seed=1))
    assert x.shape == y.shape == valid.shape == (8, 24)
    assert not (y[~valid] != -1).any()                               # padding never learned
    for b in range(8):
        n = int(valid[b].sum())
        assert torch.equal(x[b, 1:n][y[b, :n - 1] != -1], y[b, :n - 1][y[b, :n - 1] != -1])  # shifted by one
        learned = y[b][y[b] != -1].tolist()
        assert learned[-1] == ByteTokenizer.im_end_id or n == 24    # assistant tokens up to <|im_end|>
        assert not any(t in b"q:" for t in learned)                  # user text and headers are not learned


def test_rows_at_is_a_deterministic_epoch_permutation(tmp_path):
    path, _ = prepared(tmp_path)
    data = TokenData(path, "train", seq_len=24)
    n = data.num_rows
    first = np.concatenate([data.rows_at(s, 7, 3) for s in range(n)])   # 7 epochs' worth
    for e in range(7):
        assert sorted(first[e * n:(e + 1) * n]) == list(range(n))       # each row once per epoch
    assert np.array_equal(data.rows_at(5, 7, 3), data.rows_at(5, 7, 3))
    assert not np.array_equal(data.rows_at(0, n, 3), data.rows_at(0, n, 4))


def test_missing_or_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="missing or corrupt"):
        TokenData(str(tmp_path / "nowhere"), "train", 16)
    path, _ = prepared(tmp_path)
    with open(f"{path}/train.tokens.bin", "ab") as f:
        f.write(b"xx")
    with pytest.raises(DataError, match="do not match"):
        TokenData(path, "train", 16)


@pytest.mark.slow
def test_real_sharegpt_has_17671_complete_records():
    stats = {}
    kept = sum(1 for _ in iter_sharegpt(stats=stats))
    assert stats["records"] == 17671 and stats["truncated_tail"] == 1 and kept == stats["kept"] == 17390


def test_long_conversations_are_whole_long_and_unused(tmp_path):
    """evaluate.LongConversations: held-out conversations of min_tokens or more, each whole up
    to max_tokens, none of the rows the run evaluated or calibrated on, and batches trimmed
    to their longest row rather than padded to max_tokens."""
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "q"},
                                                  {"from": "gpt", "value": "answer " * (3 + 7 * (i % 9))}]}
               for i in range(80)]
    write_sharegpt(tmp_path / "s.json", records, cut=False)
    prepare_sharegpt(str(tmp_path / "sharegpt"), ByteTokenizer(), val_every=2, path=str(tmp_path / "s.json"))
    c = {"dataset": "sharegpt", "data_dir": str(tmp_path), "seq_len": 32, "init_from": "smollm2",
         "eval_rows": 3, "calib_rows": 2}
    short = TokenData(str(tmp_path / "sharegpt"), "val", 32)
    every = TokenData(str(tmp_path / "sharegpt"), "val", 10_000)
    length = dict(zip(every.starts.tolist(), (every.ends - every.starts - 1).tolist()))
    used = short.starts[:5].tolist()
    assert any(length[s] >= 200 for s in used)                 # a long one among them, to be left out

    long = LongConversations(c, n=100, min_tokens=200, max_tokens=300)
    starts = long.data.starts[long.rows].tolist()
    assert starts and not set(starts) & set(used)
    assert starts == [s for s in every.starts.tolist() if length[s] >= 200 and s not in used]
    x, y, valid = long.batch(long.rows[:3])
    assert valid.sum(1).tolist() == [min(length[s], 300) for s in starts[:3]]
    assert x.shape == (3, int(valid.sum(1).max())) and long.tokens == sum(min(length[s], 300) for s in starts)
    assert len(LongConversations(c, n=2, min_tokens=200, max_tokens=300).rows) == 2
    with pytest.raises(ValueError, match="10000 tokens or more"):
        LongConversations(c, n=5, min_tokens=10_000)
