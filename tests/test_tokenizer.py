"""Tokenizers: llama2.c's tok512.bin (run.c's algorithm) and an HF tokenizer.json built here."""
import json
import re

import pytest

import layerskip_kernels as lsk
from layerskip_kernels.model.tokenizer import HFTokenizer, Llama2cTokenizer

TEXTS = [
    "Once upon a time",
    "Hello, world! (Yes?) 'quoted' \"double\" -- semi; colon: end.",
    "two\nlines\n\nand a blank one\n",
    "  leading and trailing spaces  ",
    "café ☃ naïve 日本",  # needs byte fallback in tok512
    "x",  # odd: a single character
]
SENTENCES = ["Once upon a time, there was a little girl named Lily.",
             "She loved to play outside in the park.", "The cat sat on the mat!"]


# ---------------------------------------------------------------- llama2.c tok512.bin


@pytest.fixture
def stories_tok(stories_tokenizer_path):
    return lsk.load_tokenizer(stories_tokenizer_path)


def test_llama2c_encode_matches_run_c(stories_tok):
    assert isinstance(stories_tok, Llama2cTokenizer)
    assert stories_tok.vocab_size == 512
    assert stories_tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert stories_tok.encode("Once upon a time", bos=False) == [403, 407, 261, 378]
    assert stories_tok.decode([1, 403, 407, 261, 378]) == "Once upon a time"


@pytest.mark.parametrize("text", TEXTS)
def test_llama2c_round_trip(stories_tok, text):
    ids = stories_tok.encode(text)
    assert ids[0] == 1 and 1 not in ids[1:]
    assert all(0 <= i < 512 for i in ids)
    assert stories_tok.decode(ids) == text


def test_llama2c_byte_fallback(stories_tok):
    ids = stories_tok.encode("☃", bos=False)
    assert ids[-3:] == [b + 3 for b in "☃".encode()]  # <0xE2> <0x98> <0x83>
    assert stories_tok.decode(ids) == "☃"


# ---------------------------------------------------------------- HF tokenizer.json


def build_hf_tokenizer(directory, post_processor=True):
    """A tiny byte-level BPE trained on three sentences, with <s> and </s>."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=301, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


@pytest.mark.parametrize("post_processor", [True, False])
@pytest.mark.parametrize("via", ["json", "directory"])
def test_hf_tokenizer_bos_once_and_round_trip(tmp_path, via, post_processor):
    path = build_hf_tokenizer(tmp_path / "tok", post_processor)
    tok = lsk.load_tokenizer(path if via == "json" else path.parent)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for text in TEXTS + SENTENCES:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:], (text, ids)
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=False) == ids[1:]
    assert tok.encode("") == [tok.bos_id]


def test_hf_tokenizer_config_names_bos(tmp_path):
    """tokenizer_config.json's bos_token wins over the <s> fallback."""
    path = build_hf_tokenizer(tmp_path / "tok")
    (path.parent / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "</s>"}, "eos_token": "<unk>"}))
    tok = lsk.load_tokenizer(path.parent)
    assert (tok.bos_id, tok.eos_id) == (2, 0)
    assert tok.encode("The cat")[0] == 2


# ---------------------------------------------------------------- errors, each with a control


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        lsk.load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        lsk.load_tokenizer(tmp_path)  # a directory without one
    assert lsk.load_tokenizer(build_hf_tokenizer(tmp_path)).encode("a")[0] == 1


@pytest.mark.parametrize("suffix", [".txt", ".model"])
def test_unknown_suffix(tmp_path, suffix):
    path = build_hf_tokenizer(tmp_path)
    other = path.with_suffix(suffix)
    other.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="unknown format"):
        lsk.load_tokenizer(other)
    assert isinstance(lsk.load_tokenizer(path), HFTokenizer)
