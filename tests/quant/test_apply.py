"""quant.apply and QuantReport: which layers are swapped, and the reason for every one that is not."""
import pytest
import torch
from torch import nn

import quant
from quant import Policy, QuantConv2d, QuantConvTranspose2d, QuantError, QuantLinear, Recipe


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(4, cout)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


class TinyUNet(nn.Module):
    """A UNet-shaped net: stem (Cin = 3), numbered down/up blocks, transposed-conv upsampling, 1x1 output conv."""

    def __init__(self, declare: bool = True) -> None:
        super().__init__()
        self.stem = ConvBlock(3, 16)
        self.downs = nn.ModuleList([ConvBlock(16, 32), ConvBlock(32, 32)])
        self.ups = nn.ModuleList([nn.Sequential(nn.ConvTranspose2d(32, 16, 2, stride=2), ConvBlock(16, 16))])
        self.head = nn.Conv2d(16, 16, 1)  # 16 classes: block-aligned, so only the model's own list keeps it
        if declare:
            self.high_precision_modules = ("stem.conv", "head")

    def forward(self, x):
        x = self.stem(x)
        for down in self.downs:
            x = nn.functional.max_pool2d(down(x), 2)
        for up in self.ups:
            x = up(x)
        return self.head(x)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, n_blocks: int = 12, dim: int = 16, vocab: int = 40) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(n_blocks))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.high_precision_modules = ("embed", "lm_head")

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def test_unet_defaults_keep_stem_head_and_norms_high_precision():
    model = TinyUNet()
    report = quant.apply(model, Policy(format="nvfp4"))
    assert report.quantized_names() == ["downs.0.conv", "downs.1.conv", "ups.0.0", "ups.0.1.conv"]
    assert isinstance(model.downs[0].conv, QuantConv2d) and isinstance(model.ups[0][0], QuantConvTranspose2d)
    assert type(model.stem.conv) is nn.Conv2d and type(model.head) is nn.Conv2d
    assert "high_precision_modules" in report.row("stem.conv").reason
    assert "high_precision_modules" in report.row("head").reason
    assert report.row("downs.0.norm").reason == "not a GEMM layer (GroupNorm): stays high precision"
    assert report.blocks == ("downs.0", "downs.1", "ups.0")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 3, 8, 8)).shape == (1, 16, 4, 4)


def test_stem_with_three_input_channels_is_left_high_precision_by_its_shape():
    model = TinyUNet(declare=False)
    report = quant.apply(model, Policy(format="nvfp4"))
    assert report.row("stem.conv").reason == (
        "in_channels=3 is not a multiple of 16: nvfp4 blocks of 16 run along the forward GEMM's reduction dim "
        "(in_channels)"
    )
    assert report.row("head").quantized  # without the model's list, a block-aligned head is quantized


def test_llm_defaults_keep_embedding_head_and_attention_internals():
    model = TinyLM(n_blocks=2)
    report = quant.apply(model, Policy(format="nvfp4"))
    assert report.quantized_names() == ["layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2"]
    assert report.row("embed").reason == "not a GEMM layer (Embedding): stays high precision"
    assert report.row("lm_head").reason == "the model keeps 'lm_head' in high precision (high_precision_modules)"
    assert "MultiheadAttention" in report.row("layers.0.attn.out_proj").reason
    assert report.row("layers.0.attn").reason == "not a GEMM layer (MultiheadAttention): stays high precision"
    assert report.blocks == ("layers.0", "layers.1")


def test_keep_first_and_last_blocks_are_anchored_at_the_trailing_dot():
    model = TinyLM(n_blocks=12)
    report = quant.apply(model, Policy(format="nvfp4", keep_first_n=2, keep_last_n=2))
    quantized_blocks = sorted({int(name.split(".")[1]) for name in report.quantized_names()})
    assert quantized_blocks == list(range(2, 10))  # layers.1 kept; layers.10/11 kept as the last two, not via "1"
    assert report.row("layers.1.fc1").reason == "in block layers.1 (one of the first 2: keep_first_n)"
    assert report.row("layers.10.fc2").reason == "in block layers.10 (one of the last 2: keep_last_n)"
    assert report.row("layers.2.fc1").quantized


def test_include_exclude_patterns_cover_sub_trees():
    model = TinyLM(n_blocks=3)
    report = quant.apply(model, Policy(format="nvfp4", include=("layers.*",), exclude=("layers.1", "*.fc2")))
    assert report.quantized_names() == ["layers.0.fc1", "layers.2.fc1"]
    assert report.row("layers.1.fc1").reason == "matches exclude pattern 'layers.1'"
    assert report.row("layers.0.fc2").reason == "matches exclude pattern '*.fc2'"


def test_type_filters_and_model_defaults_switch():
    model = TinyUNet()
    report = quant.apply(model, Policy(format="nvfp4", exclude_types=("ConvTranspose2d",), model_defaults=False))
    assert report.row("ups.0.0").reason == "type ConvTranspose2d in exclude_types"
    assert report.row("head").quantized
    report = quant.apply(TinyUNet(), Policy(format="nvfp4", include_types=("Linear",)))
    assert report.num_quantized == 0 and report.row("downs.0.conv").reason == "type Conv2d not in include_types"


def test_full_backward_needs_block_aligned_out_channels():
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16))
    report = quant.apply(model, Policy(format="nvfp4"))
    assert "out_features=24 is not a multiple of 16" in report.row("0").reason
    assert "in_features=24 is not a multiple of 16" in report.row("2").reason
    dequantized = Policy(format="nvfp4", recipe=Recipe(backward="dequantized"))
    report = quant.apply(nn.Sequential(nn.Linear(32, 24)), dequantized)
    assert report.row("0").quantized  # the dequantized backward never blocks along out_features


def test_grouped_convolutions_stay_high_precision():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, groups=32))
    report = quant.apply(model, Policy(format="fp8"))
    assert report.row("0").reason.startswith("groups=32: a grouped or depthwise convolution is not one GEMM")


def test_nothing_changes_with_format_none_and_a_second_apply_is_reported():
    model = TinyLM(n_blocks=1)
    report = quant.apply(model, Policy())
    assert report.num_quantized == 0 and report.row("layers.0.fc1").reason == "policy format=none"
    quant.apply(model, Policy(format="nvfp4"))
    again = quant.apply(model, Policy(format="nvfp4"))
    assert again.num_quantized == 0
    assert again.row("layers.0.fc1").reason == "already quantized (quant.apply ran before)"


def test_block_container_errors():
    with pytest.raises(QuantError, match="covers all 2 blocks"):
        quant.apply(TinyLM(n_blocks=2), Policy(format="nvfp4", keep_first_n=1, keep_last_n=1))
    with pytest.raises(QuantError, match="'decoder' is not an nn.ModuleList/nn.Sequential of the model; valid "
                                         "choices: layers"):
        quant.apply(TinyLM(n_blocks=2), Policy(format="nvfp4", keep_first_n=1, block_containers=("decoder",)))
    with pytest.raises(QuantError, match="no block container"):
        quant.apply(nn.Sequential(nn.Linear(16, 16)), Policy(format="nvfp4", keep_last_n=1))
    with pytest.raises(QuantError, match="wrap a single layer"):
        quant.apply(nn.Linear(16, 16), Policy(format="nvfp4"))


def test_model_declared_block_containers_win_over_auto_detection():
    model = TinyUNet()
    model.quant_block_containers = ("ups",)
    assert quant.find_blocks(model) == ("ups.0",)
    assert quant.find_blocks(TinyUNet()) == ("downs.0", "downs.1", "ups.0")
    # A Sequential of leaves (an MLP) is not a block container.
    assert quant.find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))) == ()


def test_report_table_and_rows():
    report = quant.apply(TinyUNet(), Policy(format="nvfp4"))
    table = report.table()
    lines = table.splitlines()
    assert lines[0].startswith("policy: format=nvfp4")
    assert lines[1] == "blocks (3): downs.0, downs.1, ups.0"
    assert "downs.0.conv  Conv2d" in table and "nvfp4 16x16 RN" in table and "nvfp4 1x16 SR +RHT(wgrad)" in table
    assert lines[-1] == "4 of 6 GEMM layers quantized (10 modules listed)"
    rows = report.to_rows()
    assert rows[1] == {
        "name": "stem.norm", "type": "GroupNorm", "shape": "16", "quantized": False, "format": "-", "weight": "-",
        "input": "-", "grad": "-", "backward": "-", "reason": "not a GEMM layer (GroupNorm): stays high precision",
        "backend": "-",
    }
    down = next(r for r in rows if r["name"] == "downs.0.conv")
    assert down["shape"] == "32x16x3x3" and down["quantized"] and down["backward"] == "full"


def test_weight_only_report_marks_unquantized_roles():
    report = quant.apply(TinyLM(n_blocks=1), Policy(format="nf4", recipe=Recipe(backward="dequantized")))
    row = report.row("layers.0.fc1")
    assert (row.weight, row.input, row.grad) == ("nf4 /64", "-", "-")
    row = quant.apply(TinyLM(n_blocks=1), Policy(format="nvfp4", recipe=Recipe(backward="dequantized"))).row(
        "layers.0.fc1"
    )
    assert row.grad == "-" and row.input == "nvfp4 1x16 RN"  # no wgrad RHT without a quantized backward


@pytest.mark.parametrize("family, kept, blocks", [
    ("unet", {"stem.conv", "semantic_head", "instance_head.class_head"}, ("downs.0", "ups.0")),
    ("resnet", {"conv1", "fc"}, tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2))),
    ("llm", {"decoder.lm_head"}, ("decoder.model.layers.0",)),
])
def test_real_model_families_keep_their_declared_layers(cfg_factory, tmp_path, family, kept, blocks):
    import data
    import models
    from tests.tiny import FAMILIES
    from trainers.app import validate

    typed = validate(cfg_factory(*FAMILIES[family]))
    info = data.build_datamodule(typed.data, cache_dir=tmp_path, seed=0).info
    model = models.build_model(typed.model, info)
    report = quant.apply(model, Policy(format="nvfp4"))
    gemm_rows = [r for r in report.rows if r.type in ("Linear", "Conv2d", "ConvTranspose2d")]
    assert {r.name for r in gemm_rows if not r.quantized} == kept
    assert all("high_precision_modules" in report.row(name).reason for name in kept)
    assert report.num_quantized == len(gemm_rows) - len(kept) > 0
    assert report.blocks == blocks
    norms = [r for r in report.rows if r.type in ("GroupNorm", "LayerNorm", "BatchNorm2d", "LlamaRMSNorm")]
    assert norms and not any(r.quantized for r in norms)
    if family == "llm":
        assert report.row("decoder.model.embed_tokens").reason == "not a GEMM layer (Embedding): stays high precision"
