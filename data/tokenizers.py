"""Text -> token ids: one id per character, or GPT-2 BPE through tiktoken built from local files only.

Why build the tiktoken ``Encoding`` ourselves: ``tiktoken.get_encoding("gpt2")`` downloads its rank files (or reads
a cache keyed by the sha1 of their URL, and writes copies into a temp folder). Here the user names a folder
(``data.tokenizer_dir``) holding ``r50k_base.tiktoken`` (GPT-2's ranks: one ``base64(token) rank`` line per token);
its sha256 is checked against the hash tiktoken pins, and the ``Encoding`` is made from those ranks, tiktoken's
r50k split pattern and the ``<|endoftext|>`` special token (50256). Encoding and decoding then run in tiktoken's
own code, so ids equal ``tiktoken.get_encoding("r50k_base")``'s (the tests check this). ``<|endoftext|>`` in the
text (TinyStories' separator) becomes token 50256.
"""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from conf.errors import DataError

R50K_FILE = "r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's pin for this file
ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB = 50257


class CharTokenizer:
    """Ids are positions in the sorted list of the corpus's distinct characters."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet
        self._id = {ch: i for i, ch in enumerate(alphabet)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> np.ndarray:
        """int64 [len(text)]; a character outside the alphabet is an error (the alphabet is the whole corpus's)."""
        try:
            return np.fromiter((self._id[ch] for ch in text), dtype=np.int64, count=len(text))
        except KeyError as exc:
            raise DataError(f"character {exc.args[0]!r} is not in the corpus alphabet") from None

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return "".join(self.alphabet[i] for i in ids)


class Gpt2Tokenizer:
    """GPT-2 BPE (r50k_base ranks) from ``tokenizer_dir/r50k_base.tiktoken``."""

    def __init__(self, tokenizer_dir: str | None) -> None:
        if tokenizer_dir is None:
            raise DataError(f"data.tokenizer=gpt2 needs data.tokenizer_dir: a folder holding {R50K_FILE} "
                            f"(GPT-2 BPE ranks; nothing is downloaded)")
        path = Path(tokenizer_dir).expanduser() / R50K_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"tokenizer file is missing: {path}; data.tokenizer=gpt2 expects {R50K_FILE} "
                            f"(tiktoken's r50k_base ranks, sha256 {R50K_SHA256}) in data.tokenizer_dir") from None
        except OSError as exc:
            raise DataError(f"cannot read tokenizer file {path}: {exc.strerror}") from None
        if hashlib.sha256(raw).hexdigest() != R50K_SHA256:
            raise DataError(f"{path} is not tiktoken's r50k_base file (sha256 differs from {R50K_SHA256})")
        self.encoding = tiktoken.Encoding(
            name="r50k_base_local",
            pat_str=r50k_pat_str,
            mergeable_ranks=_parse_ranks(raw),
            special_tokens={ENDOFTEXT: GPT2_VOCAB - 1},
            explicit_n_vocab=GPT2_VOCAB,
        )

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.encoding.encode(text, allowed_special={ENDOFTEXT}), dtype=np.int64)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.encoding.decode([int(i) for i in ids])


def _parse_ranks(raw: bytes) -> dict[bytes, int]:
    """``base64(token) rank`` lines -> {token bytes: rank} (the file's hash was checked, so every line parses)."""
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in raw.splitlines() if line)}
