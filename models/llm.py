"""Llama-style causal decoder through Hugging Face ``transformers``: random init from a config, or a local directory.

Why ``transformers``: its Llama is the decoder everyone benchmarks (RMSNorm, SwiGLU, rotary positions, grouped-query
attention), and ``from_pretrained`` lets a study start from a real checkpoint. Load-bearing details:

* Nothing touches the network: ``HF_HUB_OFFLINE=1`` is set before ``transformers`` is imported here, and
  ``from_pretrained`` is called with ``local_files_only=True`` (the guarantee even when another module imported
  ``transformers`` first). A missing or unreadable directory is a ``ConfigError`` naming the path.
* Weights are float32 master weights whatever the checkpoint's dtype (mixed precision is the trainer's business).
* ``transformers`` is imported inside the builder: ``import models`` stays cheap for UNet/ResNet runs.
* The wrapper's forward returns logits [B, T, V]; the loss lives in the LM task. Token embeddings and ``lm_head``
  (tied by default) are listed in ``high_precision_modules``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from conf.errors import ConfigError
from conf.schemas.model import LLMConfig
from data.info import DataInfo

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class CausalLM(nn.Module):
    """input_ids [B, T] -> next-token logits [B, T, V] of a Hugging Face causal LM held as ``self.decoder``."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        names = {id(module): name for name, module in self.named_modules()}
        embeddings = (decoder.get_input_embeddings(), decoder.get_output_embeddings())
        self.high_precision_modules: tuple[str, ...] = tuple(names[id(m)] for m in embeddings if m is not None)

    @property
    def vocab_size(self) -> int:
        return self.decoder.get_output_embeddings().out_features

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=input_ids, use_cache=False).logits  # [B, T, V]


def build_llm(cfg: LLMConfig, info: DataInfo) -> CausalLM:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the progress bar readable; real problems raise
    decoder = _load_pretrained(cfg) if cfg.pretrained else _from_config(cfg, info)
    model = CausalLM(decoder)
    max_positions = getattr(decoder.config, "max_position_embeddings", None)
    source = f"model.pretrained={cfg.pretrained}" if cfg.pretrained else f"model.max_seq_len={cfg.max_seq_len}"
    if max_positions is not None and info.seq_len > max_positions:
        raise ConfigError(f"the data set's sequence length {info.seq_len} exceeds {source} ({max_positions} "
                          f"positions); valid: a data seq_len <= {max_positions} or a larger model.max_seq_len")
    if info.vocab_size > model.vocab_size:
        raise ConfigError(f"the data set's vocabulary ({info.vocab_size} tokens) is larger than the model's "
                          f"({model.vocab_size}) from {source}; use the tokenizer the model was trained with")
    return model


def _from_config(cfg: LLMConfig, info: DataInfo) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if info.vocab_size < 1:
        raise ConfigError(f"model=llm needs a tokenized text data set (DataInfo.vocab_size > 0); got "
                          f"vocab_size={info.vocab_size} from a {info.task} data set")
    config = LlamaConfig(
        vocab_size=info.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation=cfg.attn_implementation,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def _load_pretrained(cfg: LLMConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM

    path = Path(cfg.pretrained).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.pretrained={cfg.pretrained!r}: no such directory; valid: a local Hugging Face "
                          f"model directory (config.json + weights, as written by save_pretrained) or null")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.pretrained={cfg.pretrained!r} has no config.json; valid: a directory written by "
                          f"save_pretrained (config.json + model.safetensors)")
    try:
        decoder = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, attn_implementation=cfg.attn_implementation
        )
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.pretrained={cfg.pretrained!r} cannot be loaded: {reason}") from None
    return decoder.to(torch.float32)
