"""Tokenizers: llama2.c's tok512.bin (run.c's algorithm) and an HF tokenizer.json built here.
Hostile llama2.c tokenizer files: test_hostile_inputs."""
import json
import math
import random
import re
import struct
import time

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


# ---------------------------------------------------------------- llama2.c encode = run.c's


def read_vocab(path):
    """pieces (bytes) and scores of a llama2.c tokenizer file, read independently of the package."""
    data, pieces, scores, offset = path.read_bytes(), [], [], 4
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    return pieces, scores


def run_c_encode(pieces, scores, text, floor=-1e10):
    """run.c's encoder as written there (and as this package had it): after a leading " " and
    one piece per character (byte fallback), scan every adjacent pair, merge the first one with
    the best score above -1e10 (the floor), and rescan; quadratic, the oracle."""
    ids_of = {p: i for i, p in enumerate(pieces)}
    ids = [ids_of[b" "]] if text else []
    for char in text:
        piece = char.encode("utf-8")
        ids.extend([ids_of[piece]] if piece in ids_of else [b + 3 for b in piece])
    while True:
        best, best_score = None, floor
        for i in range(len(ids) - 1):
            merged = ids_of.get(pieces[ids[i]] + pieces[ids[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best, best_score = (i, merged), scores[merged]
        if best is None:
            return [1] + ids
        ids[best[0]:best[0] + 2] = [best[1]]


def random_texts(seed, count, alphabet, max_length):
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randrange(max_length))) for _ in range(count)]


ALPHABET = list("etaoinshrdlu     ,.!?'\n\t") + ["the", "Once", " a", "é", "☃", "日本", "🙂"]


def test_llama2c_encode_equals_run_c_on_many_texts(stories_tokenizer_path, stories_tok):
    pieces, scores = read_vocab(stories_tokenizer_path)
    data = stories_tokenizer_path.parent
    sample = (data / "tinystories_sample.txt").read_text().split("\n\n")
    val = (data / "tinystories_val.txt").read_text()
    windows = [val[i:i + 600] for i in range(0, 600_000, 75_000)]  # odd cuts mid-word
    edge = ["", " ", "   ", "\n\n", "a", "aaaaaaaa", "\x00", "\U0010ffff"]
    texts = TEXTS + SENTENCES + sample + windows + edge + random_texts(0, 150, ALPHABET, 60)
    for text in texts:
        assert stories_tok.encode(text) == run_c_encode(pieces, scores, text), text


def write_tie_heavy_tokenizer(path):
    """Every string of a, b, c and " " up to length 3 is a piece, scored from only three
    values: many ties, so the leftmost-among-equals rule decides. One merge scores below
    run.c's floor of -1e10 and must never happen."""
    rng = random.Random(1)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    scores = [0.0] * len(pieces)
    for n in (1, 2, 3):
        for i in range(4 ** n):
            pieces.append(bytes(b"abc "[i // 4 ** k % 4] for k in range(n)))
            scores.append(rng.choice([0.0, -1.0, -2.0]) if n > 1 else 0.0)
    scores[pieces.index(b"cc")] = -1e11
    path.write_bytes(struct.pack("<I", 6) + b"".join(
        struct.pack("<fi", s, len(p)) + p for s, p in zip(scores, pieces)))
    return pieces, scores


def test_llama2c_encode_ties_and_floor_as_run_c(tmp_path):
    pieces, scores = write_tie_heavy_tokenizer(tmp_path / "tok.bin")
    tok = lsk.load_tokenizer(tmp_path / "tok.bin")
    texts = random_texts(2, 300, list("abc ") + ["cc", "é"], 40)
    for text in texts:
        assert tok.encode(text) == run_c_encode(pieces, scores, text), text
        assert pieces.index(b"cc") not in tok.encode(text)  # only c + c makes it
    # Control: without the floor, "cc" is merged in some of these texts.
    assert any(run_c_encode(pieces, scores, t, -math.inf) != tok.encode(t) for t in texts)


def test_llama2c_encode_40kb_fast(stories_tokenizer_path, stories_tok):
    """Quadratic merging took up to a minute on 40 KB; the heap takes well under a second
    (bound loose for a busy machine)."""
    text = (stories_tokenizer_path.parent / "tinystories_val.txt").read_text()[:40_000]
    start = time.perf_counter()
    ids = stories_tok.encode(text)
    assert time.perf_counter() - start < 5
    assert len(ids) < len(text) // 2 and stories_tok.decode(ids) == text


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


@pytest.mark.parametrize("text", ['{"version": "1.0", "model": {', "[]", '{"model": 3}'])
def test_hf_tokenizer_json_invalid(tmp_path, text):
    path = tmp_path / "tokenizer.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"tokenizer {path}: expected a valid "
                                                   "tokenizer.json")) as error:
        lsk.load_tokenizer(path)
    assert "\n" not in str(error.value)


def test_hf_tokenizer_truncated(tmp_path):
    path = build_hf_tokenizer(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        lsk.load_tokenizer(path)
    path.write_bytes(data)
    assert lsk.load_tokenizer(path).encode("a")[0] == 1


@pytest.mark.parametrize("config, match", [("{", "invalid JSON"), ("[1]", "JSON object"),
                                           ('{"bos_token": ["<s>"]}', "bos_token"),
                                           ('{"eos_token": 2}', "eos_token")])
def test_hf_tokenizer_config_invalid(tmp_path, config, match):
    path = build_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(ValueError, match=match):
        lsk.load_tokenizer(path)


@pytest.mark.parametrize("ids", [[1, 301], [-1], [4, 10 ** 12]])
def test_hf_decode_out_of_range(tmp_path, ids):
    tok = lsk.load_tokenizer(build_hf_tokenizer(tmp_path))
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 301\)"):
        tok.decode(ids)
    assert tok.decode([1, 5]) == tok.decode([5])
