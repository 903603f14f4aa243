"""Stop strings in generate(): a stop that spans tokens or ends inside one ends its row after
the token that completes it (kept in tokens), texts are cut before it, and greedy
self-speculative decoding stops exactly where autoregressive decoding does."""
import json

import pytest
from random_weights import random_weights

import layerskip_kernels as lsk
from layerskip_kernels.decoding.stop import cut_at_stop

VOCAB = 61  # odd on purpose


class PairTokenizer:
    """Every id decodes to two letters of 'xyzw' (ids over 16 repeat them): a stop string
    can start and end inside a token."""
    vocab_size = VOCAB

    def decode(self, ids):
        return "".join("xyzw"[i % 16 // 4] + "xyzw"[i % 4] for i in ids)


def small_llama(generator):
    config = lsk.LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, n_kv_heads=2,
                             hidden_dim=48, max_seq_len=64)
    return random_weights(lsk.Llama(config), generator, std=0.2)


STRATEGIES = [dict(strategy="autoregressive"),
              dict(strategy="self_speculative", exit_layer=1, num_speculations=3),
              dict(strategy="self_speculative", exit_layer=2, num_speculations=5)]


@pytest.mark.parametrize("settings", STRATEGIES)
@pytest.mark.parametrize("start, length", [(3, 3), (4, 2), (5, 4)])  # odd starts: mid-token
def test_stop_spanning_tokens(generator, settings, start, length):
    model, tok = small_llama(generator), PairTokenizer()
    prompts = [[5, 9, 1], [7], [3, 3, 8, 2]]
    free = lsk.generate(model, prompts, max_new_tokens=20, eos_token_id=[])
    texts = [tok.decode(t) for t in free.tokens]
    stop = texts[0][start:start + length]  # occurs in row 0, maybe in the others
    res = lsk.generate(model, prompts, max_new_tokens=20, eos_token_id=[], stop=[stop],
                       tokenizer=tok, **settings)
    for row, (tokens, text) in enumerate(zip(free.tokens, texts)):
        at = text.find(stop)
        assert row != 0 or 0 <= at <= start
        # the row ends with the token holding the stop's last character (2 letters a token)
        keep = len(tokens) if at < 0 else (at + len(stop) + 1) // 2
        assert res.tokens[row] == tokens[:keep]
        assert res.texts[row] == (text if at < 0 else text[:at])


def test_stop_string_on_a_real_tokenizer(stories_path, stories_tokenizer_path):
    """stories260K: a stop of two words (several tokens) ends the text before it, and
    self-speculative decoding gives the same tokens and text."""
    model = lsk.load_model(stories_path)
    tok = lsk.load_tokenizer(stories_tokenizer_path)
    prompt = [tok.encode("Once upon a time, there was a little")]
    free = lsk.generate(model, prompt, max_new_tokens=60, eos_token_id=[])
    text = tok.decode(prompt[0] + free.tokens[0])[len(tok.decode(prompt[0])):]
    words = text.split(" ")
    stop = " ".join(words[4:6])  # two words from the middle of the continuation
    assert len(tok.encode(stop, bos=False)) > 1
    runs = [lsk.generate(model, prompt, max_new_tokens=60, eos_token_id=[], stop=stop,
                         tokenizer=tok, **settings) for settings in STRATEGIES]
    expected = text[:text.find(stop)]
    for res in runs:
        assert res.texts == [expected]
        assert res.tokens == runs[0].tokens
        assert len(res.tokens[0]) < len(free.tokens[0])
        # the last token kept is the one that completes the stop
        assert stop in tok.decode(prompt[0] + res.tokens[0])
        assert stop not in tok.decode(prompt[0] + res.tokens[0][:-1])


def test_texts_without_stop_are_the_new_text(generator):
    model, tok = small_llama(generator), PairTokenizer()
    res = lsk.generate(model, [[1, 2]], max_new_tokens=6, eos_token_id=[], tokenizer=tok)
    assert res.texts == [tok.decode(res.tokens[0])]
    assert lsk.generate(model, [[1, 2]], max_new_tokens=6).texts is None


@pytest.mark.parametrize("text, stops, cut", [("ab\n\ncd", ["\n\n"], "ab"),
                                              ("abcd", ["cd", "b"], "a"),
                                              ("abcd", ["z"], "abcd"),
                                              ("abcd", None, "abcd")])
def test_cut_at_the_earliest_stop(text, stops, cut):
    assert cut_at_stop(text, stops) == cut


@pytest.mark.parametrize("bad, match", [(dict(stop=["x"], tokenizer=None), "tokenizer"),
                                        (dict(stop=[""]), "stop"),
                                        (dict(stop=[]), "stop"),
                                        (dict(stop=[3]), "stop")])
def test_bad_stop_arguments(generator, bad, match):
    model = small_llama(generator)
    kw = dict(prompts=[[1, 2]], max_new_tokens=4, tokenizer=PairTokenizer())
    assert lsk.generate(model, **kw, stop=["x"]).texts is not None  # passing control
    with pytest.raises(ValueError, match=match):
        lsk.generate(model, **{**kw, **bad})


def test_cli_stop_with_escapes(stories_path, stories_tokenizer_path, capsys):
    """`layerskip generate --stop '\\n' --stop big`: both stops apply, the escape is read, and
    --json's text ends before the first stop."""
    from layerskip_kernels.cli import main
    args = ["generate", "--model", stories_path, "--tokenizer", stories_tokenizer_path,
            "--prompt", "Once upon a time", "--max-new-tokens", "60", "--json"]
    main(args)
    free = json.loads(capsys.readouterr().out)["outputs"][0]["text"]
    main(args + ["--stop", "\\n", "--stop", "big"])
    text = json.loads(capsys.readouterr().out)["outputs"][0]["text"]
    assert text == cut_at_stop(free, ["\n", "big"]) and len(text) < len(free)
