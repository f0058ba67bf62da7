"""Export a quantized model to one safetensors file of packed 4-bit weights, and load it back for inference.

Why safetensors and this layout: the file must be readable without executing anything it contains (no pickle, so
never ``torch.load``), by tools other than fp4lab, and it must say how to decode every weight. So:

* Every quantized weight is stored as its format's raw parts (``quant.inference.WeightCodec``):
  NVFP4 ``<layer>.weight.codes`` uint8 [M, ceil(K/16)*8] (element 2k in the low nibble),
  ``<layer>.weight.scales`` raw E4M3 bytes [M, ceil(K/16)] (TE's rowwise layout; a 16x16 tile's byte repeated on its
  16 rows) and ``<layer>.weight.amax`` FP32 []; MXFP4 ``codes`` [M, ceil(K/32)*16] and E8M0 ``scales``;
  NF4 exactly the state-dict entries of a bitsandbytes ``Linear4bit`` (``<layer>.weight`` uint8 [ceil(M*K/2), 1]
  high nibble first, ``weight.absmax``, ``weight.quant_map``, and with double quantization ``weight.nested_absmax``
  and ``weight.nested_quant_map``, plus the JSON ``weight.quant_state.bitsandbytes__nf4``), so
  ``bitsandbytes.nn.Params4bit.from_prequantized`` loads it. [M, K] is the forward GEMM operand: [N, K] for a linear
  (bitsandbytes' own layout), [Co, kh*kw*Ci] with K ordered (kh, kw, Ci) for a convolution.
* Every other tensor of the state dict in ``other_dtype`` (BF16 by default; non-float tensors as they are).
* The header's ``__metadata__`` (string -> string, JSON-encoded values): ``fp4lab.format_version``;
  ``fp4lab.layer.<name>`` per quantized layer (module type, format, weight and matrix shapes, weight dtype, matrix
  layout, packing order, format options, the layer format's options, recipe and quantized roles, the formats of the
  roles quantized otherwise than the weight (``role_formats``, e.g. W4A8's FP8 input), and which file tensors hold
  it); ``fp4lab.sha256`` (tensor name -> SHA-256 of its bytes); ``fp4lab.other_dtype``;
  ``fp4lab.other_tensors`` (the names of the unpacked tensors); ``fp4lab.config`` (whatever the caller passes, e.g.
  the model/data config to rebuild the architecture).

Loading validates before it trusts: the 8-byte header length against the file size, the header as JSON, every
tensor's dtype, shape and byte range (a truncated file names the first tensor it cuts), every metadata field's type,
each layer's tensors against the shapes its metadata implies, and each tensor's SHA-256 (a flipped byte names the
tensor). Every problem is a ``QuantError`` naming the file and the tensor or layer.

Format versions: ``1`` is every file whose layers quantize all roles in the weight's format; ``2`` adds per-role
formats (``role_formats`` in a layer's metadata, from ``Policy.role_overrides``). A file is written as version 2 only
when a layer has them, so a version-1 reader refuses it instead of quantizing the activations in the weight's format.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from quant import layer_formats, nf4
from quant.errors import QuantError
from quant.functional import LayerQuantizer
from quant.inference import (
    PACKED_MODULES,
    WeightSpec,
    check_buffers,
    codec,
    packed_modules,
    quantize_weight,
    set_submodule,
)
from quant.layer_formats import ROLES
from quant.modules import quantized_modules
from quant.recipe import Recipe

FORMAT_VERSION = "1"  # written when no layer has per-role formats
ROLE_FORMATS_VERSION = "2"  # written when some layer has them (``role_formats``)
READABLE_VERSIONS = (FORMAT_VERSION, ROLE_FORMATS_VERSION)
KEY_VERSION = "fp4lab.format_version"
KEY_LAYER = "fp4lab.layer."
KEY_SHA256 = "fp4lab.sha256"
KEY_OTHER_DTYPE = "fp4lab.other_dtype"
KEY_CONFIG = "fp4lab.config"
KEY_OTHER = "fp4lab.other_tensors"
OTHER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

# safetensors dtype tag -> bytes per element (the tags a torch state dict can produce)
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_MATRIX_LAYOUT = {
    "Linear": "[out_features, in_features] (the weight itself)",
    "Conv2d": "[out_channels, kh*kw*in_channels], K ordered (kh, kw, in_channels)",
    "ConvTranspose2d": "[out_channels, kh*kw*in_channels], K ordered (kh, kw, in_channels); weight.transpose(0, 1)",
}
_NF4_STATE = "quant_state.bitsandbytes__nf4"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------------------
# File names of a packed weight's parts
# ---------------------------------------------------------------------------------------------------------------------


def _file_tensors(layer: str, spec: WeightSpec, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    """Module buffers -> file tensors (NF4: bitsandbytes' state-dict entries)."""
    if spec.format != "nf4":
        return {f"{layer}.weight.{key}": tensor for key, tensor in buffers.items()}
    out = {f"{layer}.weight": buffers["codes"].reshape(-1, 1), f"{layer}.weight.absmax": buffers["absmax"],
           f"{layer}.weight.quant_map": torch.tensor(nf4.CODEBOOK, dtype=torch.float32)}
    state: dict[str, Any] = {"quant_type": "nf4", "blocksize": spec.option("blocksize"),
                             "dtype": _dtype_name(spec.dtype), "shape": list(spec.matrix_shape)}
    if spec.option("double_quant"):
        out[f"{layer}.weight.nested_absmax"] = buffers["absmax_scales"]
        out[f"{layer}.weight.nested_quant_map"] = nf4.dynamic_map()
        state.update(nested_blocksize=nf4.ABSMAX_BLOCKSIZE, nested_dtype="float32",
                     nested_offset=float(buffers["absmax_offset"]))
    out[f"{layer}.weight.{_NF4_STATE}"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return out


def _module_buffers(layer: str, spec: WeightSpec, read: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """File tensors -> module buffers, checking NF4's constant maps and quant-state JSON against the metadata."""
    if spec.format != "nf4":
        prefix = f"{layer}.weight."
        return {name.removeprefix(prefix): tensor for name, tensor in read.items()}
    codes = read[f"{layer}.weight"]
    if codes.dim() != 2 or codes.shape[1] != 1:
        raise QuantError(f"{where}: tensor '{layer}.weight' has shape {list(codes.shape)}; bitsandbytes' packed NF4 "
                         "weight is [ceil(numel / 2), 1]")
    buffers = {"codes": codes.reshape(-1), "absmax": read[f"{layer}.weight.absmax"]}
    _check_constant(read, f"{layer}.weight.quant_map", torch.tensor(nf4.CODEBOOK, dtype=torch.float32), where,
                    "the NF4 codebook")
    state = _nf4_state(read[f"{layer}.weight.{_NF4_STATE}"], f"{where}: tensor '{layer}.weight.{_NF4_STATE}'")
    expected = {"quant_type": "nf4", "blocksize": spec.option("blocksize"), "dtype": _dtype_name(spec.dtype),
                "shape": list(spec.matrix_shape)}
    if spec.option("double_quant"):
        expected.update(nested_blocksize=nf4.ABSMAX_BLOCKSIZE, nested_dtype="float32")
        _check_constant(read, f"{layer}.weight.nested_quant_map", nf4.dynamic_map(), where,
                        "bitsandbytes' signed 8-bit dynamic map")
        buffers["absmax_scales"] = read[f"{layer}.weight.nested_absmax"]
        offset = state.get("nested_offset")
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise QuantError(f"{where}: tensor '{layer}.weight.{_NF4_STATE}' has nested_offset={offset!r}; "
                             "expected a finite number")
        buffers["absmax_offset"] = torch.tensor(float(offset), dtype=torch.float32)
    for key, value in expected.items():
        if state.get(key) != value:
            raise QuantError(f"{where}: tensor '{layer}.weight.{_NF4_STATE}' says {key}={state.get(key)!r} but the "
                             f"layer metadata says {value!r}")
    return buffers


def _file_names(layer: str, spec: WeightSpec) -> list[str]:
    """The file tensors that hold one packed weight, sorted."""
    if spec.format != "nf4":
        return sorted(f"{layer}.weight.{key}" for key in codec(spec.format, layer).expected(spec))
    parts = ["", ".absmax", ".quant_map", f".{_NF4_STATE}"]
    if spec.option("double_quant"):
        parts += [".nested_absmax", ".nested_quant_map"]
    return sorted(f"{layer}.weight{part}" for part in parts)


def _file_name(layer: str, spec: WeightSpec, key: str) -> str:
    """The file tensor that holds module buffer ``key`` (NF4: bitsandbytes' names)."""
    if spec.format != "nf4":
        return f"{layer}.weight.{key}"
    return {"codes": f"{layer}.weight", "absmax": f"{layer}.weight.absmax",
            "absmax_scales": f"{layer}.weight.nested_absmax",
            "absmax_offset": f"{layer}.weight.{_NF4_STATE} (nested_offset)"}[key]


def _nf4_state(tensor: Tensor, where: str) -> dict[str, Any]:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise QuantError(f"{where} must be uint8 [n] (UTF-8 JSON bytes), got {_dtype_name(tensor.dtype)} "
                         f"{list(tensor.shape)}")
    try:
        state = json.loads(bytes(tensor.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantError(f"{where} is not UTF-8 JSON ({exc})") from None
    if not isinstance(state, dict):
        raise QuantError(f"{where} must hold a JSON object, got {type(state).__name__}")
    return state


def _check_constant(read: dict[str, Tensor], name: str, expected: Tensor, where: str, what: str) -> None:
    tensor = read[name]
    if tensor.shape != expected.shape or tensor.dtype != expected.dtype or not torch.equal(tensor, expected):
        raise QuantError(f"{where}: tensor '{name}' is not {what} ({_dtype_name(tensor.dtype)} {list(tensor.shape)}); "
                         "this file was not written for this decoder")


# ---------------------------------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSummary:
    """Sizes of one export: the file against the model's BF16 state dict, and the bits per quantized weight."""

    path: str
    file_bytes: int
    bf16_state_bytes: int  # the same model's state dict with every float tensor in BF16
    layers: int
    elements: int  # quantized weight elements
    packed_bytes: int  # their codes + scales + amax / absmax bytes (NF4's constant code maps and JSON not counted)
    other_tensors: int
    other_bytes: int
    other_dtype: str
    by_format: dict[str, dict[str, float]] = field(default_factory=dict)  # format -> elements, bytes, bits/weight

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.packed_bytes / self.elements if self.elements else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "bits_per_weight": round(self.bits_per_weight, 4),
            "file_vs_bf16": round(self.file_bytes / self.bf16_state_bytes, 4)}

    def text(self) -> str:
        per_format = "; ".join(f"{fmt}: {int(row['elements']):,} weights at {row['bits_per_weight']:.3f} bits/weight"
                               for fmt, row in self.by_format.items())
        return (f"exported {self.layers} quantized layers ({per_format}) and {self.other_tensors} other tensors "
                f"({self.other_dtype}, {self.other_bytes:,} bytes)\n"
                f"file {self.path}: {self.file_bytes:,} bytes vs BF16 state dict {self.bf16_state_bytes:,} bytes "
                f"({100 * self.file_bytes / self.bf16_state_bytes:.1f}%); quantized weights "
                f"{self.bits_per_weight:.3f} bits/weight (BF16: 16)")


def _layer_meta(name: str, module: nn.Module, spec: WeightSpec, quantizer: LayerQuantizer) -> dict[str, Any]:
    module_type = next(base.__name__ for base in PACKED_MODULES if isinstance(module, base))
    return {
        "module": module_type,
        "format": spec.format,
        "weight_shape": list(spec.weight_shape),
        "weight_dtype": _dtype_name(spec.dtype),
        "matrix_shape": list(spec.matrix_shape),
        "matrix_layout": _MATRIX_LAYOUT[module_type],
        "packing": codec(spec.format).packing,
        "options": dict(spec.options),
        "layer_options": quantizer.format_of("weight").options(),
        "recipe": {f.name: getattr(quantizer.recipe, f.name) for f in fields(Recipe)},
        "roles": [role for role in ROLES if role in quantizer.roles],
        "role_formats": _role_formats_meta(quantizer),
        "tensors": _file_names(name, spec),
    }


def _role_formats_meta(quantizer: LayerQuantizer) -> dict[str, dict[str, Any]]:
    """Role -> {"format", "options"} of every quantized role whose format is not the weight's."""
    weight = quantizer.format_of("weight")
    return {role: {"format": fmt.name, "options": fmt.options()}
            for role, fmt in quantizer.quantized_formats().items() if fmt != weight}


def _sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def save(model: nn.Module, path: str | Path, *, config: dict[str, Any] | None = None,
         other_dtype: torch.dtype = torch.bfloat16) -> ExportSummary:
    """Write ``model``'s quantized layers packed and its other tensors in ``other_dtype`` to ``path``.

    ``model`` holds QAT layers (``quant.apply``) or packed layers (``quant.inference.pack``); its weights are not
    modified. ``config`` (JSON-serialisable) is stored as ``fp4lab.config`` and returned by ``load``.
    """
    if other_dtype not in OTHER_DTYPES.values():
        raise QuantError(f"export: other_dtype={other_dtype} is not supported; valid: {', '.join(OTHER_DTYPES)}")
    layers = quantized_modules(model)
    if not layers:
        raise QuantError("export: the model has no quantized layer; apply a policy first (quant.apply)")
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    per_role = any(_role_formats_meta(module.quantizer) for module in layers.values())
    version = ROLE_FORMATS_VERSION if per_role else FORMAT_VERSION
    metadata = {"format": "pt", KEY_VERSION: version, KEY_OTHER_DTYPE: _dtype_name(other_dtype)}
    packed_keys: set[str] = set()
    by_format: dict[str, dict[str, float]] = {}
    for name, module in layers.items():
        spec, buffers = quantize_weight(module)
        layer_tensors = _file_tensors(name, spec, buffers)
        tensors.update(layer_tensors)
        metadata[KEY_LAYER + name] = json.dumps(_layer_meta(name, module, spec, module.quantizer))
        packed_keys |= {f"{name}.weight"} | {f"{name}.{key}" for key in buffers}
        row = by_format.setdefault(spec.format, {"elements": 0, "bytes": 0})
        row["elements"] += spec.matrix_shape[0] * spec.matrix_shape[1]
        row["bytes"] += sum(t.numel() * t.element_size() for t in buffers.values())
    other_bytes = 0
    others = [key for key in state if key not in packed_keys]
    for key in others:
        tensor = state[key].detach()
        if tensor.is_floating_point():
            tensor = tensor.to(other_dtype)
        if key in tensors:
            raise QuantError(f"export: state-dict entry '{key}' collides with a packed tensor of the same name")
        tensors[key] = tensor.cpu().contiguous().clone()
        other_bytes += tensor.numel() * tensor.element_size()
    metadata[KEY_OTHER] = json.dumps(sorted(others))
    metadata[KEY_SHA256] = json.dumps({key: _sha256(tensor) for key, tensor in sorted(tensors.items())})
    try:
        metadata[KEY_CONFIG] = json.dumps(config if config is not None else {})
    except TypeError as exc:
        raise QuantError(f"export: config must be JSON-serialisable ({exc})") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: t.detach().cpu().contiguous() for key, t in tensors.items()}, str(path), metadata=metadata)
    for row in by_format.values():
        row["bits_per_weight"] = 8 * row["bytes"] / row["elements"]
    return ExportSummary(
        path=str(path), file_bytes=path.stat().st_size, bf16_state_bytes=_bf16_state_bytes(model), layers=len(layers),
        elements=int(sum(r["elements"] for r in by_format.values())),
        packed_bytes=int(sum(r["bytes"] for r in by_format.values())), other_tensors=len(others),
        other_bytes=other_bytes, other_dtype=_dtype_name(other_dtype), by_format=by_format)


def _bf16_state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict with every float tensor in BF16 (a packed weight counted as its BF16 weight)."""
    packed = packed_modules(model)
    skip = {f"{name}.{key}" for name, m in packed.items() for key in m.quantizer.weight_buffers()}
    total = sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
                for key, t in model.state_dict().items() if key not in skip)
    return total + sum(2 * math.prod(m.quantizer.spec.weight_shape) for m in packed.values())


# ---------------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PackedLayer:
    """One quantized layer read from a file: its spec, the buffers, and how its activations are quantized."""

    name: str
    module_type: str
    spec: WeightSpec
    layer_options: dict[str, Any]
    recipe: Recipe
    roles: frozenset[str]
    buffers: dict[str, Tensor]
    role_formats: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {format, options} (not weight's)

    def quantizer(self) -> LayerQuantizer:
        """The layer's quantizer as in the exported QAT model (format of each role, options, recipe, roles)."""
        return _layer_quantizer(self.name, self.spec.format, self.layer_options, self.recipe, self.roles,
                                self.role_formats)


def _layer_quantizer(name: str, weight_format: str, layer_options: dict[str, Any], recipe: Recipe,
                     roles: frozenset[str], role_formats: dict[str, dict[str, Any]]) -> LayerQuantizer:
    """A layer's quantizer from its metadata: the weight's format for every role without an entry in
    ``role_formats``."""
    own = {role: layer_formats.get(spec["format"], spec["options"]) for role, spec in role_formats.items()}
    for role, fmt in own.items():
        if role not in fmt.roles:
            raise QuantError(f"role_formats.{role}: format {fmt.name} cannot quantize the {role} role (it quantizes "
                             f"{', '.join(fmt.roles)})")
    return LayerQuantizer(name, layer_formats.get(weight_format, layer_options), recipe, roles, seed=0,
                          role_formats=own)


@dataclass
class ExportedModel:
    """What ``read`` returns besides the metadata: the packed layers and every other tensor (as stored)."""

    layers: dict[str, PackedLayer]
    tensors: dict[str, Tensor]
    other_dtype: torch.dtype


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and check the safetensors header by hand (JSON only), naming the tensor a truncated file cuts."""
    where = f"export file {path}"
    if not path.is_file():
        raise QuantError(f"{where} does not exist")
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise QuantError(f"{where} has {size} bytes: too short to be a safetensors file (truncated?)")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise QuantError(f"{where}: the header claims {length} bytes but the file has {size - 8} after the length "
                             "prefix: truncated, or not a safetensors file")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantError(f"{where}: the header is not valid UTF-8 JSON ({exc}); the file is corrupted") from None
    if not isinstance(header, dict):
        raise QuantError(f"{where}: the header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise QuantError(f"{where}: __metadata__ must map strings to strings")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        _check_entry(where, name, entry, data_bytes)
    return header, metadata


def _check_entry(where: str, name: str, entry: object, data_bytes: int) -> None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise QuantError(f"{where}: tensor '{name}' has a malformed header entry (expected an object with dtype, "
                         f"shape and data_offsets, got {str(entry)[:80]!r}); the header is corrupted")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _ST_ITEMSIZE:
        raise QuantError(f"{where}: tensor '{name}' has dtype {dtype!r}; valid: {', '.join(_ST_ITEMSIZE)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise QuantError(f"{where}: tensor '{name}' has shape {shape!r}; expected a list of integers >= 0")
    integers = isinstance(offsets, list) and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    if not integers or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise QuantError(f"{where}: tensor '{name}' has data_offsets {offsets!r}; expected [begin, end]")
    nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise QuantError(f"{where}: tensor '{name}' ({dtype} {shape}) needs {nbytes} bytes but its data_offsets "
                         f"{offsets} span {offsets[1] - offsets[0]}; the header is corrupted")
    if offsets[1] > data_bytes:
        raise QuantError(f"{where}: tensor '{name}' needs bytes [{offsets[0]}, {offsets[1]}) of the data section "
                         f"but the file holds only {data_bytes}: the file is truncated")


def _json_meta(metadata: dict[str, str], key: str, where: str, kind: type) -> Any:
    if key not in metadata:
        raise QuantError(f"{where}: header metadata lacks '{key}'; not an fp4lab export (format {FORMAT_VERSION})")
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise QuantError(f"{where}: header metadata '{key}' is not valid JSON ({exc})") from None
    if not isinstance(value, kind):
        raise QuantError(f"{where}: header metadata '{key}' must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


_LAYER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "module": str, "format": str, "weight_shape": list, "weight_dtype": str, "matrix_shape": list,
    "matrix_layout": str, "packing": str, "options": dict, "layer_options": dict, "recipe": dict, "roles": list,
    "tensors": list,
}


def _int_list(value: list, where: str, key: str, length: int | None = None) -> tuple[int, ...]:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value) or (
            length is not None and len(value) != length):
        size = f"{length} " if length else ""
        raise QuantError(f"{where}: '{key}'={value!r} must be a list of {size}positive integers")
    return tuple(value)


def _parse_layer(name: str, meta: dict[str, Any], where: str) -> tuple[dict[str, Any], WeightSpec]:
    where = f"{where}: layer '{name}'"
    for key, kind in _LAYER_FIELDS.items():
        if key not in meta:
            raise QuantError(f"{where}: metadata lacks '{key}'")
        if not isinstance(meta[key], kind):
            raise QuantError(f"{where}: metadata '{key}'={meta[key]!r} must be a JSON {kind.__name__}")
    if meta["module"] not in _MATRIX_LAYOUT:
        raise QuantError(f"{where}: module={meta['module']!r}; valid: {', '.join(_MATRIX_LAYOUT)}")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if meta["weight_dtype"] not in dtypes:
        raise QuantError(f"{where}: weight_dtype={meta['weight_dtype']!r}; valid: {', '.join(dtypes)}")
    weight_codec = codec(meta["format"], where)
    matrix = _int_list(meta["matrix_shape"], where, "matrix_shape", 2)
    weight_shape = _int_list(meta["weight_shape"], where, "weight_shape")
    if math.prod(weight_shape) != math.prod(matrix):
        raise QuantError(f"{where}: weight_shape {list(weight_shape)} and matrix_shape {list(matrix)} hold different "
                         "numbers of elements")
    bad_roles = [r for r in meta["roles"] if r not in ROLES]
    if bad_roles or "weight" not in meta["roles"]:
        raise QuantError(f"{where}: roles={meta['roles']!r}; valid: a subset of {', '.join(ROLES)} with weight")
    spec = WeightSpec(format=meta["format"], matrix_shape=matrix, weight_shape=weight_shape,
                      dtype=dtypes[meta["weight_dtype"]], options=tuple(sorted(meta["options"].items())))
    role_formats = _parse_role_formats(meta, where)
    try:
        quantizer = _layer_quantizer(name, spec.format, meta["layer_options"], Recipe(**meta["recipe"]),
                                     frozenset(meta["roles"]), role_formats)
    except (QuantError, TypeError) as exc:
        raise QuantError(f"{where}: metadata does not describe a valid layer format or recipe: {exc}") from None
    implied = dict(sorted(weight_codec.quantize_options(quantizer).items()))
    if implied != dict(spec.options):
        raise QuantError(f"{where}: options {dict(spec.options)} disagree with its layer options and recipe, which "
                         f"imply {implied}")
    if meta["tensors"] != _file_names(name, spec):
        raise QuantError(f"{where}: metadata lists tensors {meta['tensors']}; format {spec.format} with these "
                         f"options stores {_file_names(name, spec)}")
    return meta, spec


def _parse_role_formats(meta: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The layer's optional ``role_formats`` (absent in version-1 files), checked: quantized roles other than the
    weight, each {"format": str, "options": dict}. The formats and options themselves are checked when the layer's
    quantizer is built."""
    value = meta.get("role_formats", {})
    if not isinstance(value, dict):
        raise QuantError(f"{where}: metadata 'role_formats'={value!r} must be a JSON dict")
    for role, spec in value.items():
        if role not in meta["roles"] or role == "weight":
            valid = [r for r in meta["roles"] if r != "weight"]
            raise QuantError(f"{where}: role_formats has role {role!r}; valid: quantized roles other than the weight "
                             f"({', '.join(valid) or 'none'})")
        if not (isinstance(spec, dict) and set(spec) == {"format", "options"} and isinstance(spec["format"], str)
                and isinstance(spec["options"], dict)):
            raise QuantError(f"{where}: role_formats.{role}={spec!r} must be a JSON dict with a string 'format' and "
                             "a dict 'options'")
    return value


def read(path: str | Path, device: str | torch.device = "cpu") -> tuple[ExportedModel, dict[str, Any]]:
    """Read an export: (packed layers + other tensors, metadata). Never executes code from the file.

    The metadata dict holds ``format_version``, ``other_dtype``, ``config`` (what ``save`` was given) and ``layers``
    (name -> the per-layer metadata). Any inconsistency raises ``QuantError`` naming the tensor or layer.
    """
    path = Path(path)
    where = f"export file {path}"
    header, raw_meta = _read_header(path)
    version = raw_meta.get(KEY_VERSION)
    if version not in READABLE_VERSIONS:
        raise QuantError(f"{where}: {KEY_VERSION}={version!r}; this reader understands "
                         f"{', '.join(map(repr, READABLE_VERSIONS))} (is it an fp4lab export?)")
    other_name = raw_meta.get(KEY_OTHER_DTYPE)
    if other_name not in OTHER_DTYPES:
        raise QuantError(f"{where}: {KEY_OTHER_DTYPE}={other_name!r}; valid: {', '.join(OTHER_DTYPES)}")
    checksums = _json_meta(raw_meta, KEY_SHA256, where, dict)
    config = _json_meta(raw_meta, KEY_CONFIG, where, dict)
    listed_others = _json_meta(raw_meta, KEY_OTHER, where, list)
    missing_sums = sorted(set(header) - set(checksums))
    if missing_sums or set(checksums) - set(header):
        name = (missing_sums or sorted(set(checksums) - set(header)))[0]
        raise QuantError(f"{where}: tensor '{name}' is in {'the header' if missing_sums else KEY_SHA256} but not in "
                         f"{KEY_SHA256 if missing_sums else 'the header'}; the file was altered")
    layer_meta: dict[str, dict[str, Any]] = {}
    specs: dict[str, WeightSpec] = {}
    for key in sorted(k for k in raw_meta if k.startswith(KEY_LAYER)):
        name = key.removeprefix(KEY_LAYER)
        layer_meta[name], specs[name] = _parse_layer(name, _json_meta(raw_meta, key, where, dict), where)
    tensors = _read_tensors(path, header, checksums, where)
    layers: dict[str, PackedLayer] = {}
    claimed: set[str] = set()
    for name, meta in layer_meta.items():
        absent = [t for t in meta["tensors"] if t not in tensors]
        if absent:
            raise QuantError(f"{where}: tensor '{absent[0]}' of layer '{name}' is missing from the file")
        buffers = _module_buffers(name, specs[name], {t: tensors[t] for t in meta["tensors"]}, where)
        check_buffers(specs[name], buffers, lambda key, n=name: f"{where}: tensor '{_file_name(n, specs[n], key)}'")
        claimed |= set(meta["tensors"])
        layers[name] = PackedLayer(name=name, module_type=meta["module"], spec=specs[name],
                                   layer_options=meta["layer_options"], recipe=Recipe(**meta["recipe"]),
                                   roles=frozenset(meta["roles"]), role_formats=meta.get("role_formats", {}),
                                   buffers={k: v.to(device) for k, v in buffers.items()})
    if not layers:
        raise QuantError(f"{where}: no '{KEY_LAYER}<name>' entry in the header metadata; nothing is quantized")
    others = {name: tensor.to(device) for name, tensor in tensors.items() if name not in claimed}
    if set(others) != set(listed_others):
        stray = sorted(set(others) - set(listed_others))
        name = (stray or sorted(set(listed_others) - set(others)))[0]
        raise QuantError(f"{where}: tensor '{name}' " + (
            f"is neither a part of a layer in the metadata nor listed in {KEY_OTHER}" if stray else
            f"is listed in {KEY_OTHER} but {'is a packed part' if name in claimed else 'is not in the file'}")
            + "; the metadata does not match the tensors")
    for name, tensor in others.items():
        if tensor.is_floating_point() and tensor.dtype != OTHER_DTYPES[other_name]:
            raise QuantError(f"{where}: tensor '{name}' is {_dtype_name(tensor.dtype)} but {KEY_OTHER_DTYPE} says "
                             f"{other_name}")
    metadata = {"format_version": version, "other_dtype": other_name, "config": config, "layers": layer_meta}
    return ExportedModel(layers=layers, tensors=others, other_dtype=OTHER_DTYPES[other_name]), metadata


def _read_tensors(path: Path, header: dict[str, Any], checksums: dict[str, Any], where: str) -> dict[str, Tensor]:
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in header:
                tensor = handle.get_tensor(name)
                if _sha256(tensor) != checksums[name]:
                    raise QuantError(f"{where}: tensor '{name}' does not match its SHA-256 in {KEY_SHA256}: the file "
                                     "is corrupted")
                tensors[name] = tensor
    except SafetensorError as exc:
        raise QuantError(f"{where}: safetensors cannot read it ({exc})") from None
    return tensors


def load_into(model: nn.Module, exported: ExportedModel) -> nn.Module:
    """Make ``model`` (the architecture, e.g. freshly built) the exported inference model, in place; return it.

    Each exported layer replaces the module of the same name by its packed twin (``quant.inference``); every other
    parameter and buffer is copied from the file (cast to the model's dtype). A module, shape or tensor that does not
    match raises ``QuantError`` naming it.
    """
    for name, layer in exported.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise QuantError(f"export layer '{name}' is not a module of this {type(model).__name__}; the file was "
                             "exported from a different architecture") from None
        base = next((b for b in PACKED_MODULES if isinstance(module, b)), None)
        if base is None or base.__name__ != layer.module_type:
            raise QuantError(f"export layer '{name}' is a {layer.module_type} in the file but a "
                             f"{type(module).__name__} in the model")
        set_submodule(model, name, PACKED_MODULES[base].from_parts(module, layer.quantizer(), layer.spec,
                                                                   layer.buffers))
    packed = {f"{name}.{key}" for name, layer in exported.layers.items() for key in layer.buffers}
    targets = {key: t for key, t in model.state_dict(keep_vars=True).items() if key not in packed}
    missing = sorted(set(targets) - set(exported.tensors))
    unexpected = sorted(set(exported.tensors) - set(targets))
    if missing or unexpected:
        detail = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise QuantError(f"export tensors do not match the model: {detail} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected); the file was exported from a different architecture")
    with torch.no_grad():
        for key, target in targets.items():
            source = exported.tensors[key]
            if source.shape != target.shape or source.is_floating_point() != target.is_floating_point():
                raise QuantError(f"export tensor '{key}' is {_dtype_name(source.dtype)} {list(source.shape)} but the "
                                 f"model's is {_dtype_name(target.dtype)} {list(target.shape)}")
            target.copy_(source)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Rebuilding the model
# ---------------------------------------------------------------------------------------------------------------------
# quant cannot import the application's model zoo, so applications register how to build the (unquantized)
# architecture from the ``config`` they gave ``save``; ``load`` looks the builder up by the name in
# ``config["architecture"]``. A name is data: nothing named in a file is imported or executed.
ARCHITECTURES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}


def register_architecture(name: str, build: Callable[[dict[str, Any]], nn.Module]) -> None:
    """Let ``load`` rebuild files whose ``config["architecture"]["name"]`` is ``name``: ``build(config)`` returns the
    freshly built, unquantized model the file was exported from."""
    ARCHITECTURES[name] = build


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The exported inference model, rebuilt: its quantized layers keep the packed 4-bit weights and decode them in
    forward (``quant.inference``), every other tensor comes from the file; in eval mode on ``device``.

    The architecture comes from the builder registered under the file's ``config["architecture"]["name"]``
    (``register_architecture``); ``read`` + ``load_into`` do the same with a model you build yourself."""
    exported, metadata = read(path, device)
    where = f"export file {path}"
    architecture = metadata["config"].get("architecture")
    if not isinstance(architecture, dict) or not isinstance(architecture.get("name"), str):
        raise QuantError(f"{where} names no architecture (config['architecture']['name']); build the model yourself "
                         "and call quant.export.load_into(model, quant.export.read(path)[0])")
    name = architecture["name"]
    if name not in ARCHITECTURES:
        hint = architecture.get("register_with")
        raise QuantError(f"{where}: no builder is registered for architecture {name!r} (registered: "
                         f"{', '.join(sorted(ARCHITECTURES)) or 'none'}); register one with "
                         f"quant.export.register_architecture({name!r}, build)"
                         + (f" ({name}: {hint})" if isinstance(hint, str) else ""))
    model = ARCHITECTURES[name](metadata["config"])
    return load_into(model, exported).to(device).eval()
