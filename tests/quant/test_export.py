"""Packed inference layers and the safetensors export: equality with the fake-quantized model, bit-exact round trips,
file sizes against first-principles byte counts, corrupted / truncated / inconsistent files, bitsandbytes as a peer.

Tolerance of "equal": none. A packed layer runs the QAT layer's own forward with its stored weight operand, so its
output must be bit-identical (torch.equal) to the fake-quantized layer's, for every format and compute dtype here.
"""
from __future__ import annotations

import copy
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import quant
from quant import export, inference, mxfp4, nf4, nvfp4
from quant.errors import QuantError


class Net(nn.Module):
    """One of each packable layer type; channel counts multiples of 32 so every format can quantize every layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 64, 3, padding=1)
        self.norm = nn.GroupNorm(4, 64)
        self.up = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.fc = nn.Linear(32, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(torch.relu(self.norm(self.conv(x))))  # [B, 32, 2H, 2W]
        return self.fc(y.permute(0, 2, 3, 1))  # [B, 2H, 2W, 96]


POLICIES = {
    "nvfp4": quant.Policy(format="nvfp4"),  # TE recipe: W 16x16, X 1x16 quantized too (W4A4)
    "nvfp4_w_1x16": quant.Policy(format="nvfp4", roles=("weight",), recipe=quant.Recipe(disable_2d_quantization=True)),
    "nf4": quant.Policy(format="nf4", options={"blocksize": 64}),
    "nf4_dq": quant.Policy(format="nf4", options={"blocksize": 64, "double_quant": True}),
    "mxfp4": quant.Policy(format="mxfp4", options={"scale_rule": "rceil"}),
}


def quantized_net(policy: quant.Policy, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        net.fc.weight.mul_(torch.exp(torch.randn_like(net.fc.weight)))  # heavy-ish tails: blocks with different scales
    quant.apply(net, policy)
    return net.eval()


def forward(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return model(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(POLICIES))
def test_packed_model_output_equals_the_fake_quantized_model_bit_for_bit(name, dtype):
    net = quantized_net(POLICIES[name])
    x = torch.randn(2, 32, 6, 6)
    packed = copy.deepcopy(net)
    assert inference.pack(packed) == ["conv", "up", "fc"]
    assert not any("weight" in key for key in packed.state_dict() if not key.startswith("norm"))
    assert torch.equal(forward(packed, x, dtype), forward(net, x, dtype))


def test_pack_reads_the_same_operand_as_the_qat_forward():
    net = quantized_net(POLICIES["nvfp4"])
    expected = net.conv.quantized_weight()  # NVFP4Tensor over [Co, kh*kw*Ci], 16x16 tiles
    packed = copy.deepcopy(net)
    inference.pack(packed)
    got = packed.conv.quantized_weight()
    for field in ("codes", "scales", "amax"):
        assert torch.equal(getattr(got, field), getattr(expected, field))
    assert (got.shape, got.tile, got.dtype) == (expected.shape, (16, 16), torch.float32)
    assert torch.equal(packed.conv.dequantized_weight(), net.conv.dequantized_weight())


@pytest.mark.parametrize("name", list(POLICIES))
def test_export_load_round_trip_is_bit_exact_for_codes_and_scales(tmp_path, name):
    net = quantized_net(POLICIES[name])
    packed = copy.deepcopy(net)
    inference.pack(packed)
    path = tmp_path / "m.safetensors"
    export.save(net, path, config={"model": "Net"}, other_dtype=torch.float32)
    state, meta = export.read(path)
    assert meta["config"] == {"model": "Net"} and set(state.layers) == {"conv", "up", "fc"}
    for layer, module in inference.packed_modules(packed).items():
        original = module.quantizer.weight_buffers()
        assert state.layers[layer].buffers.keys() == original.keys()
        for key, tensor in original.items():
            assert torch.equal(state.layers[layer].buffers[key], tensor), (layer, key)
            assert state.layers[layer].buffers[key].dtype == tensor.dtype
    rebuilt = export.load_into(Net(), state).eval()
    x = torch.randn(2, 32, 4, 4)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(forward(rebuilt, x, dtype), forward(net, x, dtype))


def test_bf16_storage_of_other_tensors_equals_the_fake_quant_model_with_those_tensors_rounded(tmp_path):
    net = quantized_net(POLICIES["nvfp4"])
    export.save(net, tmp_path / "m.safetensors")  # default: BF16 for everything that is not a packed weight
    state, meta = export.read(tmp_path / "m.safetensors")
    assert meta["other_dtype"] == "bfloat16" and state.tensors["norm.weight"].dtype == torch.bfloat16
    rebuilt = export.load_into(Net(), state).eval()
    with torch.no_grad():
        for name in ("conv.bias", "norm.weight", "norm.bias", "up.bias", "fc.bias"):
            net.get_parameter(name).copy_(net.get_parameter(name).to(torch.bfloat16))
    x = torch.randn(2, 32, 4, 4)
    assert torch.equal(forward(rebuilt, x, torch.bfloat16), forward(net, x, torch.bfloat16))


def _nvfp4_bytes(rows: int, cols: int) -> int:
    """First principles: 4 bits per element + one E4M3 byte per 16 elements + one FP32 amax."""
    return rows * cols // 2 + rows * cols // 16 + 4


def _nf4_dq_bytes(numel: int, blocksize: int) -> int:
    """4 bits per element + one uint8 absmax code per block + FP32 scale per 256 blocks + FP32 offset."""
    blocks = numel // blocksize
    return numel // 2 + blocks + 4 * math.ceil(blocks / 256) + 4


@pytest.mark.parametrize(("policy", "theory"), [
    (quant.Policy(format="nvfp4"), lambda n, k: _nvfp4_bytes(n, k)),
    (quant.Policy(format="nf4", options={"double_quant": True}), lambda n, k: _nf4_dq_bytes(n * k, 64)),
    (quant.Policy(format="mxfp4"), lambda n, k: n * k // 2 + n * k // 32),
])
def test_file_size_is_within_two_percent_of_the_theoretical_bits(tmp_path, policy, theory):
    n, k = 512, 1024
    model = nn.Sequential(nn.Linear(k, n))
    quant.apply(model, policy)
    summary = export.save(model, tmp_path / "m.safetensors")
    expected = theory(n, k) + 2 * n  # + the BF16 bias
    assert summary.file_bytes == (tmp_path / "m.safetensors").stat().st_size
    assert abs(summary.file_bytes - expected) / expected < 0.02
    assert summary.packed_bytes == theory(n, k)
    assert summary.bits_per_weight == pytest.approx(8 * theory(n, k) / (n * k))
    assert summary.bf16_state_bytes == 2 * (n * k + n)
    state, _ = export.read(tmp_path / "m.safetensors")
    rebuilt = export.load_into(nn.Sequential(nn.Linear(k, n)), state)
    memory = inference.weight_memory(rebuilt)
    assert (memory.packed_bytes, memory.bf16_bytes, memory.elements) == (theory(n, k), 2 * n * k, n * k)
    if policy.format == "nvfp4":
        assert 4.5 <= memory.bits_per_weight < 4.501


def test_nvfp4_file_holds_te_layout_and_metadata(tmp_path):
    net = quantized_net(POLICIES["nvfp4"])
    export.save(net, tmp_path / "m.safetensors")
    raw = load_file(tmp_path / "m.safetensors")
    q = nvfp4.quantize(net.fc.weight.detach(), tile=(16, 16))
    assert torch.equal(raw["fc.weight.codes"], q.codes) and torch.equal(raw["fc.weight.scales"], q.scales)
    assert raw["fc.weight.amax"].dtype == torch.float32 and raw["fc.weight.amax"].shape == ()
    assert "fc.weight" not in raw and raw["fc.bias"].dtype == torch.bfloat16
    _, meta = export.read(tmp_path / "m.safetensors")
    fc = meta["layers"]["fc"]
    assert fc["options"] == {"tile": [16, 16]} and fc["matrix_shape"] == [96, 32] and fc["weight_dtype"] == "float32"
    assert fc["roles"] == ["weight", "input", "grad"] and fc["recipe"]["backward"] == "full"
    assert "low nibble" in fc["packing"] and meta["layers"]["conv"]["weight_shape"] == [64, 32, 3, 3]


# ---- bad files ------------------------------------------------------------------------------------------------------


def _rewrite_header(path: Path, mutate) -> None:
    """Parse the safetensors header as JSON, let ``mutate`` change it, write it back (data section unchanged)."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])


def _layer_meta(header: dict, layer: str) -> dict:
    return json.loads(header["__metadata__"][f"fp4lab.layer.{layer}"])


def _set_layer_meta(header: dict, layer: str, meta: dict) -> None:
    header["__metadata__"][f"fp4lab.layer.{layer}"] = json.dumps(meta)


@pytest.fixture
def exported(tmp_path) -> Path:
    path = tmp_path / "m.safetensors"
    export.save(quantized_net(POLICIES["nvfp4"]), path)
    return path


def test_truncated_file_names_the_tensor_it_cuts(exported):
    raw = exported.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    exported.write_bytes(raw[:-5])
    with pytest.raises(QuantError, match=f"tensor '{last}' needs bytes .* the file is truncated"):
        export.read(exported)
    exported.write_bytes(raw[:6])
    with pytest.raises(QuantError, match="too short"):
        export.read(exported)


def test_a_flipped_byte_names_the_corrupted_tensor(exported):
    raw = bytearray(exported.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    begin, _ = json.loads(raw[8:8 + length])["up.weight.scales"]["data_offsets"]
    raw[8 + length + begin + 3] ^= 0x10
    exported.write_bytes(bytes(raw))
    with pytest.raises(QuantError, match="tensor 'up.weight.scales' does not match its SHA-256"):
        export.read(exported)


def test_a_garbled_header_is_a_clear_error(exported):
    raw = bytearray(exported.read_bytes())
    raw[8] = ord("[")
    exported.write_bytes(bytes(raw))
    with pytest.raises(QuantError, match="header is not valid UTF-8 JSON"):
        export.read(exported)
    raw[8] = ord("{")
    raw[10:22] = b'__x_etadata_'  # renames __metadata__: its object becomes a malformed tensor entry
    exported.write_bytes(bytes(raw))
    with pytest.raises(QuantError, match="tensor '__x_etadata_' has a malformed header entry"):
        export.read(exported)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda h: _set_layer_meta(h, "fc", {**_layer_meta(h, "fc"), "matrix_shape": [48, 64]}),
     r"tensor 'fc.weight.codes': has uint8 \[96, 16\], but format nvfp4 with matrix \[48, 64\]"),
    (lambda h: _set_layer_meta(h, "fc", {**_layer_meta(h, "fc"), "options": {"tile": [1, 16]}}),
     r"layer 'fc': options \{'tile': \[1, 16\]\} disagree"),
    (lambda h: _set_layer_meta(h, "conv", {**_layer_meta(h, "conv"), "weight_shape": "64x32x3x3"}),
     r"layer 'conv': metadata 'weight_shape'='64x32x3x3' must be a JSON list"),
    (lambda h: _set_layer_meta(h, "conv", {**_layer_meta(h, "conv"), "format": "int4"}),
     r"layer 'conv'.*format 'int4' cannot be packed; packable formats: nvfp4, nf4, mxfp4"),
    (lambda h: h["__metadata__"].pop("fp4lab.layer.up"),
     r"tensor 'up.weight.amax' is neither a part of a layer in the metadata nor listed"),
    (lambda h: h.__setitem__("fc.weight.scales", {**h["fc.weight.scales"], "dtype": "F16"}),
     r"tensor 'fc.weight.scales' \(F16 \[96, 2\]\) needs 384 bytes"),
    (lambda h: h["__metadata__"].__setitem__("fp4lab.format_version", "7"), r"format_version='7'"),
])
def test_mismatched_metadata_is_a_clear_error_naming_the_tensor_or_layer(exported, mutate, message):
    _rewrite_header(exported, mutate)
    with pytest.raises(QuantError, match=message):
        export.read(exported)


def test_loading_into_another_architecture_names_the_mismatch(exported):
    state, _ = export.read(exported)
    other = Net()
    other.fc = nn.Linear(32, 48)
    with pytest.raises(QuantError, match=r"fc: packed weight has shape \[96, 32\] but the module's weight is \[48"):
        export.load_into(other, state)
    state, _ = export.read(exported)
    other = Net()
    other.extra = nn.Linear(4, 4)
    with pytest.raises(QuantError, match="missing 'extra.bias'"):
        export.load_into(other, state)


class _Payload:
    def __reduce__(self):
        return (Path.write_text, (Path(MARKER), "code ran"))


MARKER = ""


def test_loading_never_executes_code_from_the_file(tmp_path, monkeypatch):
    global MARKER
    MARKER = str(tmp_path / "executed")
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Payload()))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the export path must never call torch.load"))
    with pytest.raises(QuantError, match="evil.safetensors"):
        export.read(path)
    assert not Path(MARKER).exists()
    good = tmp_path / "good.safetensors"
    export.save(quantized_net(POLICIES["nf4_dq"]), good)
    export.load_into(Net(), export.read(good)[0])  # a valid file loads with torch.load unavailable


# ---- inference-only behaviour ---------------------------------------------------------------------------------------


def test_packed_layers_have_no_backward_and_refuse_a_cast_scale():
    net = quantized_net(POLICIES["nvfp4"])
    inference.pack(net)
    x = torch.randn(1, 32, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    with pytest.raises(QuantError, match="fc: a packed inference layer has no backward"):
        y.float().sum().backward()
    net.half()
    with pytest.raises(QuantError, match="conv: buffer amax is torch.float16, not float32"):
        forward(net, torch.randn(1, 32, 4, 4), torch.float32)


def test_packed_model_reports_its_weight_memory():
    net = quantized_net(POLICIES["nf4_dq"])
    inference.pack(net)
    memory = inference.weight_memory(net)
    numel = 64 * 32 * 9 + 64 * 32 * 4 + 96 * 32
    assert memory.elements == numel and memory.bf16_bytes == 2 * numel
    expected = sum(_nf4_dq_bytes(n, 64) for n in (64 * 32 * 9, 64 * 32 * 4, 96 * 32))
    assert memory.packed_bytes == expected
    assert net.fc.weight.shape == (96, 32) and net.fc.weight.stride() == (0, 0)  # shape carrier, no storage


# ---- bitsandbytes as a peer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_export_loads_in_bitsandbytes(tmp_path, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    model = nn.Sequential(nn.Linear(256, 192))
    torch.manual_seed(3)
    with torch.no_grad():
        model[0].weight.mul_(torch.exp(torch.randn_like(model[0].weight)))
    weight = model[0].weight.detach().clone()
    quant.apply(model, quant.Policy(format="nf4", options={"blocksize": 64, "double_quant": double_quant}))
    export.save(model, tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")

    # The state-dict entries of a bitsandbytes Linear4bit quantized by bitsandbytes itself: same names, dtypes, shapes.
    theirs = bnb.nn.Linear4bit(256, 192, quant_type="nf4", compress_statistics=double_quant)
    theirs.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64,
                                      compress_statistics=double_quant)._quantize("cpu")
    reference = {f"0.{k}": v for k, v in theirs.state_dict().items()}
    layout = {k: (v.dtype, v.shape) for k, v in tensors.items() if k != "0.bias"}
    state_key = "0.weight.quant_state.bitsandbytes__nf4"
    assert layout.keys() == reference.keys() - {"0.bias"}
    assert {k: v for k, v in layout.items() if k != state_key} == {
        k: (v.dtype, v.shape) for k, v in reference.items() if k not in ("0.bias", state_key)}
    assert torch.equal(tensors["0.weight.quant_map"], reference["0.weight.quant_map"])
    if not double_quant:
        packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
        assert torch.equal(tensors["0.weight"], packed) and torch.equal(tensors["0.weight.absmax"], state.absmax)

    # bitsandbytes' own loader and dequantizer read our file and decode exactly our values.
    stats = {k.removeprefix("0.weight."): v for k, v in tensors.items() if k.startswith("0.weight.")}
    param = bnb.nn.Params4bit.from_prequantized(tensors["0.weight"], stats, device="cpu")
    assert (param.quant_state.blocksize, param.quant_state.nested, tuple(param.quant_state.shape)) == (
        64, double_quant, (192, 256))
    ours = nf4.dequantize(nf4.quantize(weight, blocksize=64, double_quant=double_quant))
    assert torch.equal(dequantize_4bit(param.data, param.quant_state), ours)


def test_mxfp4_file_decodes_with_the_format_module(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32))
    quant.apply(model, POLICIES["mxfp4"])
    export.save(model, tmp_path / "m.safetensors")
    raw = load_file(tmp_path / "m.safetensors")
    q = mxfp4.MXFP4Tensor(codes=raw["0.weight.codes"], scales=raw["0.weight.scales"], shape=torch.Size((32, 64)),
                          dtype=torch.float32, scale_rule="rceil")
    assert torch.equal(mxfp4.dequantize(q), mxfp4.fake_quantize(model[0].weight.detach(), scale_rule="rceil"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["nvfp4", "nf4_dq", "mxfp4"])
def test_loaded_model_on_cuda_equals_the_fake_quantized_model_on_cuda(tmp_path, name):
    net = quantized_net(POLICIES[name])
    export.save(net, tmp_path / "m.safetensors", other_dtype=torch.float32)
    rebuilt = export.load_into(Net(), export.read(tmp_path / "m.safetensors", device="cuda")[0]).eval()
    net.cuda()
    x = torch.randn(2, 32, 8, 8, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(rebuilt.cuda()(x), net(x))
    assert rebuilt.fc.quantizer.weight_buffers()["codes"].device.type == "cuda"
