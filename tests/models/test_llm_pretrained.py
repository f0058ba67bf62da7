"""``model.pretrained`` loads a local Hugging Face directory (never the hub); bad directories are ConfigErrors."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import models
from conf.errors import ConfigError
from conf.schemas.model import LLMConfig
from data.info import DataInfo

LM = DataInfo(task="lm", vocab_size=40, seq_len=8, ignore_index=-100)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         tie_word_embeddings=False)
    reference = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    reference.save_pretrained(path)
    return path, reference


def test_pretrained_dir_loads_the_same_weights(saved_dir):
    path, reference = saved_dir
    model = models.build_model(LLMConfig(pretrained=str(path)), LM).eval()
    ids = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = model(ids)
    assert got.shape == (2, 8, 48)  # the checkpoint's vocabulary covers the data's 40 tokens
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert model.high_precision_modules == ("decoder.model.embed_tokens", "decoder.lm_head")


def test_missing_dir_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"model.pretrained='{missing}': no such directory"):
        models.build_model(LLMConfig(pretrained=str(missing)), LM)


def test_dir_without_config_or_weights(tmp_path, saved_dir):
    with pytest.raises(ConfigError, match="has no config.json"):
        models.build_model(LLMConfig(pretrained=str(tmp_path)), LM)
    path, _ = saved_dir
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ConfigError, match=f"model.pretrained='{only_config}' cannot be loaded"):
        models.build_model(LLMConfig(pretrained=str(only_config)), LM)


def test_data_vocabulary_larger_than_the_checkpoint(saved_dir):
    path, _ = saved_dir
    with pytest.raises(ConfigError, match=r"vocabulary \(100 tokens\) is larger than the model's \(48\)"):
        models.build_model(LLMConfig(pretrained=str(path)), DataInfo(task="lm", vocab_size=100, seq_len=8))
