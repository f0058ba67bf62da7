"""Every model family builds from its schema defaults and from a tiny config, has the documented output shapes, and
trains: every parameter receives a finite, non-zero gradient (timm-style)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from conf.errors import ConfigError
from conf.schemas.model import LLMConfig, ResNetConfig, UNetConfig
from data.info import DataInfo

SEG = DataInfo(task="segmentation", num_classes=4, image_size=(18, 22), category_ids=(1, 3, 7))
CLS_GRAY = DataInfo(task="classification", num_classes=10, in_channels=1, image_size=(16, 16))
CLS_RGB = DataInfo(task="classification", num_classes=7, in_channels=3, image_size=(32, 32))
LM = DataInfo(task="lm", vocab_size=50, seq_len=12, ignore_index=-100)

TINY_UNET = UNetConfig(depth=2, num_queries=4, query_dim=16, query_heads=2)
TINY_LLM = LLMConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=32)


def _outputs(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for value in out.values() for t in _outputs(value)]


def _inputs(info: DataInfo, batch: int = 2) -> torch.Tensor:
    if info.task == "lm":
        return torch.randint(0, info.vocab_size, (batch, info.seq_len))
    return torch.randn(batch, info.in_channels, *info.image_size)


def test_registry_names_tasks_and_unknown_name():
    assert models.MODELS.names() == ["llm", "resnet", "unet"]
    assert [models.task_of(n) for n in ("unet", "resnet", "llm")] == ["segmentation", "classification", "lm"]
    with pytest.raises(ConfigError, match="model='vit'.*valid choices: llm, resnet, unet"):
        models.task_of("vit")


@pytest.mark.parametrize("cfg", [UNetConfig(), TINY_UNET, UNetConfig(depth=3, upsample="interp", instance_head=False)],
                         ids=["default", "tiny", "interp-no-instance"])
def test_unet_output_shapes_on_a_size_that_needs_padding(cfg):
    torch.manual_seed(0)
    model = models.build_model(cfg, SEG)
    out = model(_inputs(SEG))
    assert out["semantic"].shape == (2, 4, 18, 22)
    if cfg.instance_head:
        assert out["instance"]["mask_logits"].shape == (2, cfg.num_queries, 18, 22)
        assert out["instance"]["class_logits"].shape == (2, cfg.num_queries, 3 + 1)  # K things + no object
    else:
        assert "instance" not in out


def test_unet_default_channels_and_nvfp4_shape_rule():
    """Width 0.25 of 64 gives 16/32/64/128; every GEMM-like layer outside the high-precision list has Cin % 16 == 0."""
    model = models.build_model(UNetConfig(), SEG)
    assert UNetConfig().channels() == [16, 32, 64, 128]
    assert model.high_precision_modules == ("stem.conv", "semantic_head", "instance_head.class_head")
    named = dict(model.named_modules())
    assert named["stem.conv"].in_channels == 3 and named["semantic_head"].out_channels == 4
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    checked = 0
    for name, module in model.named_modules():
        if name in model.high_precision_modules:
            continue
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            assert module.in_channels % 16 == 0, name
            checked += 1
        elif isinstance(module, nn.Linear):
            assert module.in_features % 16 == 0, name
            checked += 1
    assert checked > 20


def test_resnet_shapes_stems_and_high_precision_names():
    gray = models.build_model(ResNetConfig(), CLS_GRAY)
    assert gray(_inputs(CLS_GRAY)).shape == (2, 10)
    assert gray.conv1.in_channels == 1 and gray.conv1.kernel_size == (3, 3) and gray.conv1.stride == (1, 1)
    assert isinstance(gray.maxpool, nn.Identity)
    imagenet_stem = models.build_model(ResNetConfig(arch="resnet50", small_stem=False), CLS_RGB)
    assert imagenet_stem(_inputs(CLS_RGB)).shape == (2, 7)
    assert imagenet_stem.conv1.kernel_size == (7, 7) and isinstance(imagenet_stem.maxpool, nn.MaxPool2d)
    assert imagenet_stem.fc.in_features == 2048
    named = dict(gray.named_modules())
    assert gray.high_precision_modules == ("conv1", "fc") and all(n in named for n in gray.high_precision_modules)


def test_llm_shapes_config_and_high_precision_names():
    model = models.build_model(TINY_LLM, LM)
    assert model(_inputs(LM)).shape == (2, 12, 50)
    config = model.decoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (32, 2, 4, 2, 64, 50)
    assert config.rope_parameters["rope_theta"] == TINY_LLM.rope_theta
    assert model.decoder.lm_head.weight is model.decoder.model.embed_tokens.weight  # tie_embeddings=True
    assert model.high_precision_modules == ("decoder.model.embed_tokens", "decoder.lm_head")
    untied = models.build_model(LLMConfig(**{**TINY_LLM.__dict__, "tie_embeddings": False}), LM)
    assert untied.decoder.lm_head.weight is not untied.decoder.model.embed_tokens.weight


@pytest.mark.parametrize("cfg, info", [(UNetConfig(), SEG), (ResNetConfig(), CLS_RGB), (LLMConfig(), LM)],
                         ids=["unet", "resnet", "llm"])
def test_schema_defaults_build_and_run(cfg, info):
    model = models.build_model(cfg, info)
    first = _outputs(model(_inputs(info)))[0]
    assert first.shape[0] == 2 and torch.isfinite(first).all()


def test_llm_default_dims_are_nvfp4_friendly():
    cfg = LLMConfig()
    assert cfg.d_model % 64 == 0 and cfg.intermediate_size % 64 == 0
    assert (cfg.d_model // cfg.n_heads) % 16 == 0 and (cfg.d_model // cfg.n_heads * cfg.n_kv_heads) % 16 == 0


def test_llm_refuses_data_longer_than_its_positions():
    with pytest.raises(ConfigError, match="sequence length 64 exceeds model.max_seq_len=32"):
        models.build_model(TINY_LLM, DataInfo(task="lm", vocab_size=50, seq_len=64, ignore_index=-100))


@pytest.mark.parametrize(
    "cfg, info",
    [(TINY_UNET, SEG), (UNetConfig(depth=2, upsample="interp", num_queries=4, query_dim=16), SEG),
     (ResNetConfig(), CLS_GRAY), (TINY_LLM, LM)],
    ids=["unet", "unet-interp", "resnet18", "llm"],
)
def test_every_parameter_gets_a_finite_nonzero_gradient(cfg, info):
    torch.manual_seed(0)
    model = models.build_model(cfg, info)
    outputs = _outputs(model(_inputs(info)))
    loss = sum((out.float() * torch.randn_like(out.float())).mean() for out in outputs)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
