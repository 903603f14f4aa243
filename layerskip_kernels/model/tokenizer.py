"""Tokenizers: Hugging Face tokenizer.json (through `tokenizers`) and llama2.c .bin files."""
import heapq
import math
import re
import struct
from pathlib import Path

from ..ops._checks import check, fail

BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
RUN_C_FLOOR = -1e10  # run.c's starting best score: a merge must score above it


def load_tokenizer(path=None):
    """A tokenizer from a llama2.c .bin file, a tokenizer.json, an HF directory holding one, or
    an HF model id already in the local HF cache; with no path, the embedded default model's."""
    from .checkpoint import DEFAULT_MODEL, local_path
    path = DEFAULT_MODEL / "tokenizer.json" if path is None else local_path(path, "tokenizer path")
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


def _check_ids(ids, vocab_size):
    ids = list(ids)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    check(not bad, "ids", f"token ids in [0, {vocab_size})", bad[:5])
    return ids


def read_llama2c_vocab(path):
    """(pieces as bytes, scores) of a llama2.c tokenizer file: uint32 max_token_length, then
    per piece a float32 score, an int32 length and that many bytes, up to the end of the file.
    Every number is checked against the file before it is used."""
    from .checkpoint import regular_file
    data = regular_file(Path(path), "tokenizer path").read_bytes()
    check(len(data) >= 4, f"tokenizer {path}", "a uint32 max_token_length first",
          f"{len(data)} bytes")
    (max_length,) = struct.unpack_from("<I", data)
    check(0 < max_length <= len(data), f"tokenizer {path} max_token_length",
          f"a length in [1, {len(data)}] (the file size)", max_length)
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        what = f"tokenizer {path} piece {len(pieces)} at byte {offset}"
        check(offset + 8 <= len(data), what, "a float32 score and an int32 length (8 bytes)",
              f"{len(data) - offset} trailing bytes")
        score, length = struct.unpack_from("<fi", data, offset)
        check(math.isfinite(score), what, "a finite score", score)
        check(0 <= length <= max_length, what, f"a length in [0, {max_length}] "
              "(max_token_length)", length)
        check(offset + 8 + length <= len(data), what, f"{length} bytes of text",
              f"{len(data) - offset - 8} left in the file")
        pieces.append(data[offset + 8:offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    check(len(pieces) >= 259 and all(pieces[3 + b] == b"<0x%02X>" % b for b in range(256)),
          f"tokenizer {path}", "<unk>, BOS, EOS, then the 256 byte pieces <0x00>..<0xFF> "
          "(ids 3..258)", f"{len(pieces)} pieces" + (" without them" if len(pieces) >= 259 else ""))
    check(b" " in pieces, f"tokenizer {path}", "a ' ' piece (encode starts with it)",
          "none")
    return pieces, scores


class Llama2cTokenizer:
    """llama2.c's format and algorithm (run.c): a leading space, one piece per character with
    byte fallback, then repeatedly merge the adjacent pair whose merge has the best score (the
    leftmost among equals). Pieces are bytes, as in run.c."""

    bos_id, eos_id = 1, 2

    def __init__(self, path):
        self.pieces, self.scores = read_llama2c_vocab(path)
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}
        self.vocab_size = len(self.pieces)

    def encode(self, text, bos=True):
        ids = [self.ids[b" "]] if text else []
        for char in text:
            piece = char.encode("utf-8", "surrogatepass")
            if piece in self.ids:
                ids.append(self.ids[piece])
            else:  # byte fallback: ids 3..258 are the bytes 0x00..0xFF
                ids.extend(b + 3 for b in piece)
        return [self.bos_id] + self._merge(ids) if bos else self._merge(ids)

    def _merge(self, ids):
        """run.c's merges in O(n log n). A heap holds the candidate pairs keyed by (-score,
        position of the left token), so it pops run.c's choice: the best score, leftmost among
        equals. A merge keeps the left token's position (positions stay in text order) and
        unlinks the right one; an entry whose tokens changed since it was pushed is skipped."""
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))

        def candidate(i):  # the pair (i, nxt[i]) as a heap entry, or None
            j = nxt[i]
            merged = self.ids.get(self.pieces[ids[i]] + self.pieces[ids[j]]) if j < n else None
            if merged is not None and self.scores[merged] > RUN_C_FLOOR:
                return (-self.scores[merged], i, ids[i], ids[j], merged)

        heap = [c for c in map(candidate, range(n)) if c]
        heapq.heapify(heap)
        while heap:
            _, i, left, right, merged = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] != left or j >= n or ids[j] != right:
                continue  # stale: one of the two has merged since
            ids[i], ids[j] = merged, -1
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            for k in (prv[i], i):
                if k >= 0 and (c := candidate(k)):
                    heapq.heappush(heap, c)
        return [t for t in ids if t >= 0]

    def decode(self, ids):
        out, prev = bytearray(), None
        for i in _check_ids(ids, self.vocab_size):
            if i in (self.bos_id, self.eos_id):
                prev = i
                continue
            piece = self.pieces[i]
            if prev in (self.bos_id, None) and piece.startswith(b" "):
                piece = piece[1:]  # the leading space encode() added
            byte = BYTE_PIECE.fullmatch(piece)
            out += bytes([int(byte.group(1), 16)]) if byte else piece
            prev = i
        return out.decode("utf-8", "replace")


class HFTokenizer:
    """tokenizer.json through the `tokenizers` library; BOS first as HF Llama does."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        from .checkpoint import read_json_object, regular_file
        path = regular_file(Path(path), "tokenizer path")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception
            fail(f"tokenizer {path}", "a valid tokenizer.json", str(e).splitlines()[0])
        self.vocab_size = self.tokenizer.get_vocab_size()
        config = path.parent / "tokenizer_config.json"
        config = read_json_object(config, "tokenizer config") if config.exists() else {}
        self.bos_id = self._special_id(config, "bos_token", ("<s>", "<|begin_of_text|>"))
        self.eos_id = self._special_id(config, "eos_token",
                                       ("</s>", "<|end_of_text|>", "<|endoftext|>"))

    def _special_id(self, config, key, fallbacks):
        configured = config.get(key)
        if isinstance(configured, dict):
            configured = configured.get("content")
        check(configured is None or isinstance(configured, str), f"tokenizer config {key}",
              "a token string or {\"content\": string}", repr(config.get(key)))
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
        return self.tokenizer.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=True)
