"""The SmolLM2 tokenizer read from the packaged GGUF: round trips, specials, chat mask."""
import pytest
from hypothesis import given, settings, strategies as st

from tokenizer import load_tokenizer, read_tokenizer_json, save_tokenizer

tok = load_tokenizer("smollm2")
LACKING = "\x04\x06\x13\x14\x16\x1d"   # bytes missing from SmolLM2's vocabulary
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=LACKING,
                                      codec="utf-8").filter(lambda c: not 0x40000 <= ord(c) <= 0xBFFFF),
               max_size=200)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_round_trip_any_utf8(text):
    assert tok.decode(tok.encode(text)) == text


def test_known_pieces():
    assert len(tok.encode("12345")) == 5                     # every digit on its own
    assert tok.encode("The capital of France is Paris.") == [504, 3575, 282, 4649, 314, 7042, 30]
    for text in ("héllo 🌍 中文", "  \n\n  x", "a  1", "tab\there", "<|im_start|>"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("<|im_start|>")) > 1               # specials in plain text stay text
    assert tok.decode(tok.encode("a\x04b\U000a8ddd")) == "a\ufffdb\ufffd"   # bytes the vocabulary lacks


def test_chat_template_and_mask():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tok.render_chat(messages)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                    "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")
    ids, mask = tok.encode_chat_with_mask(messages)
    assert ids == tok.encode_chat(messages) and ids.count(tok.im_start_id) == 3
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("Hello!") + [tok.im_end_id]
    prompt = tok.encode_chat(messages[:1], add_generation_prompt=True)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert ids[:len(prompt)] == prompt and mask.index(True) == len(prompt)   # SFT learns what generation emits
    with_system = tok.render_chat([{"role": "system", "content": "Be brief."}] + messages)
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "SmolLM" not in with_system


def test_tokenizer_json_round_trip(tmp_path):
    save_tokenizer(tok, tmp_path)
    again = read_tokenizer_json(str(tmp_path))
    sample = "Shall I compare thee to a summer's day? 1599 — ✓"
    assert again.encode(sample) == tok.encode(sample)
    assert again.im_end_id == tok.im_end_id and again.chat_template == tok.chat_template


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """Our tokenizer.json read by HF's own tokenizers library, the reference
    (requirements-test.txt)."""
    import tokenizers
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, folder)
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(TEXT, st.text(alphabet=" \n\t1234ab'sll.é中🌍½²", max_size=40)))
def test_same_ids_as_hf_tokenizers(hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False).ids


def test_chat_ids_as_hf_tokenizes_the_rendered_template(hf_tok):
    messages = [{"role": "user", "content": "2 + 2?\n"}, {"role": "assistant", "content": "4 \n\n"}]
    text = tok.render_chat(messages)
    assert tok.encode_chat(messages) == hf_tok.encode(text, add_special_tokens=False).ids
    # content that opens with whitespace is where the two part (see Tokenizer.chat_turns)
    lead = [{"role": "user", "content": " 2"}]
    assert tok.encode_chat(lead) != hf_tok.encode(tok.render_chat(lead), add_special_tokens=False).ids


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=50))
def test_any_text_encodes_and_lacking_characters_become_replacement(text):
    expected = "".join("\ufffd" if c in LACKING or 0x40000 <= ord(c) <= 0xBFFFF else c for c in text)
    assert tok.decode(tok.encode(text)) == expected
