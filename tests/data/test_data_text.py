"""``data=text``: embedded corpus with char tokens, and GPT-2 BPE from the shared files checked against tiktoken."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import tiktoken
import torch

import data
from conf.schemas.data import TextConfig
from data.story_corpus import generate_stories
from data.tokenizers import Gpt2Tokenizer

from conftest import SHARED_DATA  # noqa: E402

TOKENIZER_DIR = SHARED_DATA / "gpt2_tokenizer"
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
SAMPLES = [
    "Hello world! Once upon a time",
    "It's 2024: we'll test   spaces,\ttabs\nand newlines -- café, naïve, 東京, emoji 🙂 and 12345678.",
    "The end.<|endoftext|>Once upon a time, there was a little dog named Max.",
]


def test_char_windows_from_embedded_corpus(tmp_path):
    cfg = TextConfig(seq_len=32, batch_size=8, corpus_chars=5000)
    dm = data.build_datamodule(cfg, cache_dir=tmp_path, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    text = dm.corpus_path().read_text()
    assert text == generate_stories(0, 5000) and text != generate_stories(1, 5000)
    assert dm.info.task == "lm" and dm.info.vocab_size == len(set(text)) and dm.info.ignore_index == -100
    assert dm.info.seq_len == 32
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    tok = dm.tokenizer()
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        window = tok.decode(ids.tolist()) + tok.decode(labels[-1:].tolist())
        assert window in text
    n_val = int(len(text) * 0.1)
    split = len(text) - n_val
    val_batch = next(iter(dm.val_dataloader()))
    assert tok.decode(val_batch["input_ids"][0].tolist()) == text[split : split + 32]
    assert len(dm.train_set) == (split - 33) // 32 + 1 and len(dm.val_set) == (n_val - 33) // 32 + 1


def test_train_stride_and_limits(tmp_path):
    cfg = TextConfig(seq_len=16, batch_size=4, corpus_chars=2000, train_stride=4, train_limit=10, val_limit=3)
    dm = data.build_datamodule(cfg, cache_dir=tmp_path, seed=0)
    dm.setup("fit")
    assert len(dm.train_set) == 10 and len(dm.val_set) == 3
    assert torch.equal(dm.train_set[1]["input_ids"][:12], dm.train_set[0]["input_ids"][4:])


@pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason=f"{TOKENIZER_DIR} is absent")
def test_gpt2_matches_tiktoken_r50k_base(tmp_path, monkeypatch):
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    shutil.copy(TOKENIZER_DIR / "r50k_base.tiktoken", cache / hashlib.sha1(R50K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    reference = tiktoken.get_encoding("r50k_base")  # tiktoken's own, read offline from its cache
    ours = Gpt2Tokenizer(str(TOKENIZER_DIR))
    assert ours.vocab_size == reference.n_vocab == 50257
    assert ours.encode(SAMPLES[0]).tolist() == [15496, 995, 0, 4874, 2402, 257, 640]
    for text in SAMPLES:
        ids = ours.encode(text)
        assert ids.tolist() == reference.encode(text, allowed_special={"<|endoftext|>"})
        assert ours.decode(ids) == text
    assert 50256 in ours.encode(SAMPLES[2]).tolist()


@pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason=f"{TOKENIZER_DIR} is absent")
def test_gpt2_batches(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generate_stories(3, 6000))
    cfg = TextConfig(path=str(corpus), tokenizer="gpt2", tokenizer_dir=str(TOKENIZER_DIR), seq_len=24, batch_size=4)
    dm = data.build_datamodule(cfg, cache_dir=tmp_path, seed=0)
    dm.setup("fit")
    assert dm.info.vocab_size == 50257
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (4, 24) and int(batch["input_ids"].max()) < 50257
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert dm.tokenizer().decode(batch["input_ids"][0].tolist()) in corpus.read_text()
