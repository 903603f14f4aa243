"""Tokenizers: Hugging Face tokenizer.json (through `tokenizers`) and llama2.c .bin files."""
import json
import re
import struct
from pathlib import Path

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def load_tokenizer(path=None):
    """A tokenizer from a llama2.c .bin file, a tokenizer.json, or an HF directory holding one;
    with no path, the embedded default model's."""
    from .checkpoint import DEFAULT_MODEL
    path = Path(DEFAULT_MODEL / "tokenizer.json" if path is None else path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.is_dir():
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"tokenizer path {path}: no tokenizer.json in the directory")
        return HFTokenizer(path / "tokenizer.json")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".bin":
        return Llama2cTokenizer(path)
    raise ValueError(f"tokenizer path {path}: unknown format (expected tokenizer.json, an HF "
                     "directory or a llama2.c tokenizer .bin)")


class Llama2cTokenizer:
    """llama2.c's format and algorithm (run.c): a leading space, one piece per character with
    byte fallback, then repeatedly merge the adjacent pair whose merge has the best score."""

    bos_id, eos_id = 1, 2

    def __init__(self, path):
        data = Path(path).read_bytes()
        self.pieces, self.scores, offset = [], [], 4  # skip max_token_length
        while offset < len(data):
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            self.pieces.append(data[offset:offset + length].decode("utf-8", "replace"))
            self.scores.append(score)
            offset += length
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}
        self.vocab_size = len(self.pieces)

    def encode(self, text, bos=True):
        ids = [self.ids[" "]] if text else []
        for char in text:
            if char in self.ids:
                ids.append(self.ids[char])
            else:  # byte fallback: ids 3..258 are the bytes 0x00..0xFF
                ids.extend(b + 3 for b in char.encode("utf-8"))
        while True:
            best, best_score = None, float("-inf")
            for i in range(len(ids) - 1):
                merged = self.ids.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best, best_score = (i, merged), self.scores[merged]
            if best is None:
                break
            ids[best[0]:best[0] + 2] = [best[1]]
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids):
        out, prev = bytearray(), None
        for i in ids:
            if i in (self.bos_id, self.eos_id):
                prev = i
                continue
            piece = self.pieces[i]
            if prev in (self.bos_id, None) and piece.startswith(" "):
                piece = piece[1:]  # the leading space encode() added
            byte = BYTE_PIECE.fullmatch(piece)
            out += bytes([int(byte.group(1), 16)]) if byte else piece.encode("utf-8")
            prev = i
        return out.decode("utf-8", "replace")


class HFTokenizer:
    """tokenizer.json through the `tokenizers` library; BOS first as HF Llama does."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        path = Path(path)
        self.tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self.tokenizer.get_vocab_size()
        config = path.parent / "tokenizer_config.json"
        config = json.loads(config.read_text()) if config.exists() else {}
        self.bos_id = self._special_id(config.get("bos_token"), ("<s>", "<|begin_of_text|>"))
        self.eos_id = self._special_id(config.get("eos_token"),
                                       ("</s>", "<|end_of_text|>", "<|endoftext|>"))

    def _special_id(self, configured, fallbacks):
        if isinstance(configured, dict):
            configured = configured.get("content")
        for token in ([configured] if configured else []) + list(fallbacks):
            if (i := self.tokenizer.token_to_id(token)) is not None:
                return i
        return None

    def encode(self, text, bos=True):
        ids = self.tokenizer.encode(text).ids
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]  # the post-processor's BOS: we add our own below when asked
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
