"""``data=text``: a UTF-8 text file (or the embedded story corpus) as fixed-length next-token windows.

The whole file is tokenized once (``data/tokenizers.py``: characters, or GPT-2 BPE from local tiktoken files) and
split by position: the last ``val_fraction`` of the token stream is validation, so no window straddles the split and
validation text is never seen in training. A window holds ``seq_len + 1`` consecutive tokens: ``input_ids`` are the
first ``seq_len``, ``labels`` the last ``seq_len`` (shifted by one); every label is a real next token, so the
``-100`` ignore index of the batch contract never occurs. Training windows start every ``train_stride`` tokens
(default ``seq_len``: no overlap), validation windows every ``seq_len``.

With ``path: null`` the corpus is generated (``data/story_corpus.py``) into ``cache_dir/story_corpus-<hash>/
corpus.txt`` and read back through the same path as a user's file. For ``tokenizer=char`` the alphabet is the sorted
set of the whole file's characters (so ``.info`` reads the text, which is cheap next to tokenizing it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from conf.errors import DataError
from conf.schemas.data import TextConfig
from data.base import BaseDataModule
from data.cache import params_digest, publish_dir
from data.info import DataInfo
from data.registry import DATAMODULES
from data.story_corpus import generate_stories
from data.tokenizers import CharTokenizer, Gpt2Tokenizer

LM_IGNORE_INDEX = -100
CORPUS_VERSION = 1


class TokenWindows(Dataset):
    """Window ``i``: ``input_ids`` = tokens[s : s+T], ``labels`` = tokens[s+1 : s+T+1] with s = i * stride."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, stride: int, count: int) -> None:
        self.tokens = tokens  # int64 [N]
        self.seq_len = seq_len
        self.stride = stride
        self.count = count

    @staticmethod
    def max_count(n_tokens: int, seq_len: int, stride: int) -> int:
        return 0 if n_tokens < seq_len + 1 else (n_tokens - seq_len - 1) // stride + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index = key[0] if isinstance(key, tuple) else key
        start = index * self.stride
        window = self.tokens[start : start + self.seq_len + 1]  # [T + 1]
        return {"input_ids": window[:-1], "labels": window[1:]}


@DATAMODULES.register("text")
class TextDataModule(BaseDataModule):
    task = "lm"
    config_cls = TextConfig

    def __init__(self, cfg: Any, *, cache_dir: Path, seed: int) -> None:
        super().__init__(cfg, cache_dir=cache_dir, seed=seed)
        self._text: str | None = None
        self._tokenizer: CharTokenizer | Gpt2Tokenizer | None = None
        self._tokens: torch.Tensor | None = None

    def prepare_data(self) -> None:
        self.tokenizer()

    def corpus_path(self) -> Path:
        if self.cfg.path is not None:
            return Path(self.cfg.path).expanduser()
        params = {"version": CORPUS_VERSION, "seed": self.cfg.corpus_seed, "chars": self.cfg.corpus_chars}

        def write(tmp: Path) -> None:
            (tmp / "corpus.txt").write_text(generate_stories(self.cfg.corpus_seed, self.cfg.corpus_chars),
                                            encoding="utf-8")

        return publish_dir(self.cache_dir / f"story_corpus-{params_digest(params)}", write) / "corpus.txt"

    def text(self) -> str:
        if self._text is None:
            path = self.corpus_path()
            try:
                self._text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise DataError(f"text file is missing: {path} (data.path expects a UTF-8 text file)") from None
            except IsADirectoryError:
                raise DataError(f"data.path={path} is a folder; expected a UTF-8 text file") from None
            except UnicodeDecodeError as exc:
                raise DataError(f"text file {path} is not UTF-8 (byte {exc.start}: {exc.reason})") from None
            except OSError as exc:
                raise DataError(f"cannot read text file {path}: {exc.strerror}") from None
            if not self._text:
                raise DataError(f"text file is empty: {path}")
        return self._text

    def tokenizer(self) -> CharTokenizer | Gpt2Tokenizer:
        if self._tokenizer is None:
            if self.cfg.tokenizer == "char":
                self._tokenizer = CharTokenizer.from_text(self.text())
            else:
                self._tokenizer = Gpt2Tokenizer(self.cfg.tokenizer_dir)
        return self._tokenizer

    def tokens(self) -> torch.Tensor:
        """int64 [N]: the whole corpus, tokenized once."""
        if self._tokens is None:
            self._tokens = torch.from_numpy(self.tokenizer().encode(self.text()))
        return self._tokens

    def _build_info(self) -> DataInfo:
        return DataInfo(task="lm", vocab_size=self.tokenizer().vocab_size,
                        seq_len=self.cfg.seq_len, ignore_index=LM_IGNORE_INDEX)

    def _build_split(self, split: str) -> TokenWindows:
        tokens = self.tokens()
        n_val = max(1, int(len(tokens) * self.cfg.val_fraction))
        part = tokens[: len(tokens) - n_val] if split == "train" else tokens[len(tokens) - n_val :]
        stride = (self.cfg.train_stride or self.cfg.seq_len) if split == "train" else self.cfg.seq_len
        count = TokenWindows.max_count(len(part), self.cfg.seq_len, stride)
        if count == 0:
            raise DataError(f"the {split} split of {self.corpus_path()} is empty: it has {len(part)} tokens but a "
                            f"window needs data.seq_len + 1 = {self.cfg.seq_len + 1} (shorten seq_len or add text)")
        limit = self.cfg.train_limit if split == "train" else self.cfg.val_limit
        return TokenWindows(part, self.cfg.seq_len, stride, count if limit is None else min(count, limit))
