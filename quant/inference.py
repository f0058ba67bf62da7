"""Inference layers that keep quantized weights packed in memory (4-bit codes + scales) and decode them in forward.

Why: a QAT layer holds an FP32 master weight and quantizes it again in every forward; an exported model needs only
the bytes its forward weight operand is made of. A packed layer *is* the QAT layer (``PackedLinear`` subclasses
``QuantLinear``, and so on) with the weight parameter replaced by buffers, so the forward is the QAT forward itself
(``quant.functional``): the activation is quantized by the same ``LayerQuantizer`` code with the same format, recipe
and roles, and only the fprop weight operand comes from the buffers instead of from quantizing a parameter. NVFP4
codes enter the scaled-codes GEMM as stored (``quant.gemm``), NF4 and MXFP4 are decoded with their format module's
``dequantize`` and cast to the compute dtype, exactly as the QAT layer casts its fake-quantized weight. The output of
a packed layer therefore equals the fake-quantized layer's output bit for bit (tests check it).

Load-bearing details:

* ``weight`` is a *shape carrier*: a zero-stride expanded scalar of the master weight's shape and dtype, which the
  shared forward reshapes and permutes (as views) but never reads. It costs no memory.
* Buffers per format (``WeightCodec``): NVFP4 ``codes`` uint8 [M, ceil(K/16)*8] (element 2k in the low nibble),
  ``scales`` raw E4M3 bytes [M, ceil(K/16)] (a 16x16 tile's byte repeated on its rows: TE's rowwise layout), ``amax``
  FP32 scalar; MXFP4 ``codes`` [M, ceil(K/32)*16] and E8M0 ``scales`` [M, ceil(K/32)]; NF4 bitsandbytes' flattened
  ``codes`` [ceil(M*K/2)] (first element in the high nibble) and ``absmax`` (FP32, or uint8 codes with
  ``absmax_scales`` and ``absmax_offset`` when double-quantized). [M, K] is the forward GEMM operand
  (``weight_matrix()``: [N, K] for a linear, [Co, kh*kw*Ci] with K ordered (kh, kw, Ci) for a convolution).
* Packed layers have no backward: any backward operand request raises ``QuantError`` naming the layer.
* Casting a packed model with ``.to(dtype)`` would turn the FP32 amax / absmax buffers into low precision; the
  forward refuses such a buffer instead of decoding with a rounded scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from quant import formats, mxfp4, nf4, nvfp4
from quant.errors import QuantError
from quant.functional import LayerQuantizer
from quant.gemm import Operand
from quant.modules import QuantConv2d, QuantConvTranspose2d, QuantLinear, quantized_modules, shape_problem

# ---------------------------------------------------------------------------------------------------------------------
# What one packed weight is: its spec (JSON-able facts) and its codec (format-specific buffers)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSpec:
    """Everything that rebuilds one packed weight besides its tensors (the export header stores it per layer).

    matrix_shape: the forward GEMM operand [M, K]. weight_shape: the module's weight layout. dtype: the master
    weight's dtype (decoded values are produced in it, then cast to the compute dtype, as in the QAT layer).
    options: the keyword options of the format's ``quantize`` call (nvfp4 ``tile``; nf4 ``blocksize`` and
    ``double_quant``; mxfp4 ``scale_rule``), sorted by name.
    """

    format: str
    matrix_shape: tuple[int, int]
    weight_shape: tuple[int, ...]
    dtype: torch.dtype
    options: tuple[tuple[str, Any], ...]

    def option(self, key: str) -> Any:
        return dict(self.options)[key]


BufferShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class WeightCodec:
    """How one format's quantized tensor maps to module buffers and back (no numerics: those live in the format)."""

    format: ClassVar[str]
    packing: ClassVar[str]  # nibble order, recorded in the export metadata

    def quantize_options(self, quantizer: LayerQuantizer) -> dict[str, Any]:
        """Options of the format's ``quantize`` that reproduce the layer's fprop weight operand."""
        raise NotImplementedError

    def buffers(self, q: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    def expected(self, spec: WeightSpec) -> BufferShapes:
        """Buffer name -> (shape, dtype) that ``spec`` implies."""
        raise NotImplementedError

    def rebuild(self, spec: WeightSpec, buffers: dict[str, Tensor]) -> Any:
        """The format's quantized-tensor object from the buffers (no copy)."""
        raise NotImplementedError

    def operand(self, spec: WeightSpec, buffers: dict[str, Tensor], compute_dtype: torch.dtype) -> Operand:
        """The fprop weight operand the QAT layer would build: NVFP4 as codes, other formats decoded values."""
        q = self.rebuild(spec, buffers)
        if isinstance(q, nvfp4.NVFP4Tensor):
            return q
        return formats.get(spec.format).dequantize(q, dtype=spec.dtype).to(compute_dtype)


class NVFP4Codec(WeightCodec):
    format = "nvfp4"
    packing = "two E2M1 codes per byte, element 2k in the low nibble (TE rowwise layout)"

    def quantize_options(self, quantizer: LayerQuantizer) -> dict[str, Any]:
        return {"tile": list(quantizer.recipe.weight_tile)}

    def buffers(self, q: nvfp4.NVFP4Tensor) -> dict[str, Tensor]:
        return {"codes": q.codes, "scales": q.scales, "amax": q.amax}

    def expected(self, spec: WeightSpec) -> BufferShapes:
        rows, cols = spec.matrix_shape
        blocks = _ceil_div(cols, nvfp4.BLOCK)
        return {"codes": ((rows, blocks * nvfp4.BLOCK // 2), torch.uint8), "scales": ((rows, blocks), torch.uint8),
                "amax": ((), torch.float32)}

    def rebuild(self, spec: WeightSpec, buffers: dict[str, Tensor]) -> nvfp4.NVFP4Tensor:
        return nvfp4.NVFP4Tensor(codes=buffers["codes"], scales=buffers["scales"], amax=buffers["amax"],
                                 shape=torch.Size(spec.matrix_shape), dtype=spec.dtype,
                                 tile=tuple(spec.option("tile")), rht=False, stochastic=False)


class MXFP4Codec(WeightCodec):
    format = "mxfp4"
    packing = "two E2M1 codes per byte, element 2k in the low nibble"

    def quantize_options(self, quantizer: LayerQuantizer) -> dict[str, Any]:
        return {"scale_rule": quantizer.format_of("weight").scale_rule}

    def buffers(self, q: mxfp4.MXFP4Tensor) -> dict[str, Tensor]:
        return {"codes": q.codes, "scales": q.scales}

    def expected(self, spec: WeightSpec) -> BufferShapes:
        rows, cols = spec.matrix_shape
        blocks = _ceil_div(cols, mxfp4.BLOCK)
        return {"codes": ((rows, blocks * mxfp4.BLOCK // 2), torch.uint8), "scales": ((rows, blocks), torch.uint8)}

    def rebuild(self, spec: WeightSpec, buffers: dict[str, Tensor]) -> mxfp4.MXFP4Tensor:
        return mxfp4.MXFP4Tensor(codes=buffers["codes"], scales=buffers["scales"],
                                 shape=torch.Size(spec.matrix_shape), dtype=spec.dtype,
                                 scale_rule=spec.option("scale_rule"))


class NF4Codec(WeightCodec):
    format = "nf4"
    packing = "bitsandbytes: flattened row-major, two codes per byte, first element in the high nibble"

    def quantize_options(self, quantizer: LayerQuantizer) -> dict[str, Any]:
        weight = quantizer.format_of("weight")
        return {"blocksize": weight.blocksize, "double_quant": weight.double_quant}

    def buffers(self, q: nf4.NF4Tensor) -> dict[str, Tensor]:
        if not q.double_quant:
            return {"codes": q.codes, "absmax": q.absmax}
        return {"codes": q.codes, "absmax": q.absmax_codes, "absmax_scales": q.absmax_scales,
                "absmax_offset": q.absmax_offset}

    def expected(self, spec: WeightSpec) -> BufferShapes:
        numel = spec.matrix_shape[0] * spec.matrix_shape[1]
        blocks = _ceil_div(numel, spec.option("blocksize"))
        shapes: BufferShapes = {"codes": ((_ceil_div(numel, 2),), torch.uint8)}
        if not spec.option("double_quant"):
            return {**shapes, "absmax": ((blocks,), torch.float32)}
        return {**shapes, "absmax": ((blocks,), torch.uint8),
                "absmax_scales": ((_ceil_div(blocks, nf4.ABSMAX_BLOCKSIZE),), torch.float32),
                "absmax_offset": ((), torch.float32)}

    def rebuild(self, spec: WeightSpec, buffers: dict[str, Tensor]) -> nf4.NF4Tensor:
        double = spec.option("double_quant")
        return nf4.NF4Tensor(codes=buffers["codes"], absmax=None if double else buffers["absmax"],
                             shape=torch.Size(spec.matrix_shape), dtype=spec.dtype,
                             blocksize=spec.option("blocksize"),
                             absmax_codes=buffers["absmax"] if double else None,
                             absmax_scales=buffers.get("absmax_scales"), absmax_offset=buffers.get("absmax_offset"))


CODECS: dict[str, WeightCodec] = {codec.format: codec for codec in (NVFP4Codec(), NF4Codec(), MXFP4Codec())}


def codec(fmt: str, where: str = "") -> WeightCodec:
    """The codec of format ``fmt``; QuantError naming ``where`` and the packable formats otherwise."""
    if fmt not in CODECS:
        prefix = f"{where}: " if where else ""
        raise QuantError(f"{prefix}format {fmt!r} cannot be packed; packable formats: {', '.join(CODECS)}")
    return CODECS[fmt]


def check_buffers(spec: WeightSpec, buffers: dict[str, Tensor], where: str | Callable[[str], str]) -> None:
    """Every buffer the spec implies is present with its shape and dtype, and nothing else; QuantError naming it.

    ``where`` names the layer (a buffer is then ``<where>.<key>``) or maps a buffer key to how errors call it.
    """
    expected = codec(spec.format).expected(spec)
    describe = where if callable(where) else lambda key: f"{where}.{key}"
    extra = sorted(set(buffers) - set(expected))
    if extra:
        raise QuantError(f"{describe(extra[0])}: unexpected for format {spec.format}; expected: {', '.join(expected)}")
    for key, (shape, dtype) in expected.items():
        if key not in buffers:
            raise QuantError(f"{describe(key)}: missing; format {spec.format} with matrix {list(spec.matrix_shape)} "
                             f"needs {key} {str(dtype).removeprefix('torch.')} {list(shape)}")
        tensor = buffers[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise QuantError(
                f"{describe(key)}: has {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, but format "
                f"{spec.format} with matrix {list(spec.matrix_shape)} and options {dict(spec.options)} needs "
                f"{str(dtype).removeprefix('torch.')} {list(shape)}"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Packed layers
# ---------------------------------------------------------------------------------------------------------------------

class PackedQuantizer(LayerQuantizer):
    """A ``LayerQuantizer`` whose fprop weight operand is decoded from its layer's buffers.

    It holds the layer's ``_buffers`` dict (updated in place by ``.to()``/``.cuda()``), not the tensors, so a moved
    layer decodes its moved buffers. The input slot is the parent's code: the activation is quantized as in QAT.
    """

    def __init__(self, name: str, base: LayerQuantizer, spec: WeightSpec, buffers: dict[str, Tensor]) -> None:
        super().__init__(name, base.format, base.recipe, base.roles, base.seed, role_formats=base.role_formats)
        self.spec = spec
        self.codec = codec(spec.format, name)
        self._module_buffers = buffers

    def weight_buffers(self) -> dict[str, Tensor]:
        return {key: self._module_buffers[key] for key in self.codec.expected(self.spec)}

    def operand(self, slot: str, x: Tensor, compute_dtype: torch.dtype, rht: bool = False, **options: Any) -> Operand:
        if slot == "fprop_weight":
            buffers = self.weight_buffers()
            for key in ("amax", "absmax_scales", "absmax_offset"):
                if key in buffers and buffers[key].dtype != torch.float32:
                    raise QuantError(
                        f"{self.name}: buffer {key} is {buffers[key].dtype}, not float32 (was the packed model cast "
                        "with .to(dtype) / .half()?); decoding with a rounded scale would change every weight; load "
                        "the model again and move it with .to(device) only"
                    )
            return self.codec.operand(self.spec, buffers, compute_dtype)
        if slot == "fprop_input":
            return super().operand(slot, x, compute_dtype, rht, **options)
        raise QuantError(
            f"{self.name}: a packed inference layer has no backward (asked for the {slot} operand); fine-tune the "
            "QAT model (quant.apply on the trainable weights) and export it again"
        )


class _PackedMixin:
    """Shared by the three packed layer types; ``_base_qat`` is the QAT class whose forward is reused."""

    _base_qat: ClassVar[type]
    quantizer: PackedQuantizer

    @property
    def weight(self) -> Tensor:
        """Shape carrier of the master weight (zero strides, no memory); the forward never reads its values."""
        spec = self.quantizer.spec
        device = self.quantizer.weight_buffers()["codes"].device
        return torch.zeros((), dtype=spec.dtype, device=device).expand(spec.weight_shape)

    @classmethod
    def from_parts(cls, module: nn.Module, quantizer: LayerQuantizer, spec: WeightSpec,
                   buffers: dict[str, Tensor]) -> _PackedMixin:
        """A packed twin of ``module`` (an nn layer or its QAT twin) holding ``buffers`` instead of its weight.

        ``quantizer`` gives the format, recipe and roles (activation handling); the module's other parameters (the
        bias) and attributes (stride, padding, ...) are kept; the weight parameter is dropped.
        """
        base = cls._base_qat._base
        if not isinstance(module, base) or type(module) not in (base, cls._base_qat):
            raise QuantError(f"{quantizer.name}: {cls.__name__} replaces an nn.{base.__name__} (or its QAT twin), "
                             f"got {type(module).__name__}")
        if tuple(module.weight.shape) != spec.weight_shape:
            raise QuantError(f"{quantizer.name}: packed weight has shape {list(spec.weight_shape)} but the module's "
                             f"weight is {list(module.weight.shape)}")
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._parameters = {key: value for key, value in module._parameters.items() if key != "weight"}
        new._buffers = dict(module._buffers)
        check_buffers(spec, buffers, quantizer.name)
        for key, tensor in buffers.items():
            new.register_buffer(key, tensor)
        new.quantizer = PackedQuantizer(quantizer.name, quantizer, spec, new._buffers)
        problem = shape_problem(new, new.quantizer)
        if problem:
            raise QuantError(f"{quantizer.name}: cannot run this {base.__name__} packed: {problem}")
        return new

    def packed_bytes(self) -> int:
        """Bytes of the storages behind the packed weight's buffers (what the device holds for this weight)."""
        return _storage_bytes(self.quantizer.weight_buffers().values())

    def extra_repr(self) -> str:
        spec = self.quantizer.spec
        options = ", ".join(f"{k}={v}" for k, v in spec.options)
        return f"{super().extra_repr()}, packed {spec.format} ({options}), {self.packed_bytes()} bytes"


class PackedLinear(_PackedMixin, QuantLinear):
    """``QuantLinear`` whose weight is packed codes + scales (inference only)."""

    _base_qat = QuantLinear


class PackedConv2d(_PackedMixin, QuantConv2d):
    """``QuantConv2d`` whose weight is packed codes + scales (inference only)."""

    _base_qat = QuantConv2d


class PackedConvTranspose2d(_PackedMixin, QuantConvTranspose2d):
    """``QuantConvTranspose2d`` whose weight is packed codes + scales (inference only)."""

    _base_qat = QuantConvTranspose2d


PACKED_MODULES: dict[type[nn.Module], type[_PackedMixin]] = {
    cls._base_qat._base: cls for cls in (PackedLinear, PackedConv2d, PackedConvTranspose2d)
}
PACKED_TYPES = tuple(PACKED_MODULES.values())


def _storage_bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------------------------
# Packing a QAT model, and measuring what it holds
# ---------------------------------------------------------------------------------------------------------------------


def quantize_weight(module: nn.Module) -> tuple[WeightSpec, dict[str, Tensor]]:
    """Quantize a QAT layer's current weight into packed buffers, exactly as its forward quantizes it.

    The format's own ``quantize`` runs on ``weight_matrix()`` with the options the layer format uses for the fprop
    weight (nvfp4: the recipe's weight tile; nf4: blocksize, double_quant; mxfp4: scale_rule).
    """
    if isinstance(module, PACKED_TYPES):
        return module.quantizer.spec, module.quantizer.weight_buffers()
    quantizer: LayerQuantizer = module.quantizer
    if "weight" not in quantizer.roles:
        raise QuantError(f"{quantizer.name}: the policy does not quantize this layer's weight (roles "
                         f"{sorted(quantizer.roles)}); there is nothing to pack; include the weight role")
    fmt = quantizer.format_of("weight").name
    weight_codec = codec(fmt, quantizer.name)
    options = weight_codec.quantize_options(quantizer)
    with torch.no_grad():
        matrix = module.weight_matrix().detach()
        q = formats.get(fmt).quantize(matrix, **options, name=f"{quantizer.name} weight")
    spec = WeightSpec(format=fmt, matrix_shape=tuple(matrix.shape), weight_shape=tuple(module.weight.shape),
                      dtype=module.weight.dtype, options=tuple(sorted(options.items())))
    return spec, {key: tensor.contiguous().clone() for key, tensor in weight_codec.buffers(q).items()}


def pack(model: nn.Module) -> list[str]:
    """Replace every QAT layer of ``model`` (from ``quant.apply``) by its packed twin, in place; return their names.

    The weight parameters of those layers are dropped (an optimizer built before no longer sees them).
    """
    names = []
    for name, module in quantized_modules(model).items():
        if isinstance(module, PACKED_TYPES):
            continue
        spec, buffers = quantize_weight(module)
        packed = PACKED_MODULES[module._base].from_parts(module, module.quantizer, spec, buffers)
        set_submodule(model, name, packed)
        names.append(name)
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def packed_modules(model: nn.Module) -> dict[str, _PackedMixin]:
    """Name -> packed layer, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PACKED_TYPES)}


@dataclass(frozen=True)
class WeightMemory:
    """What the quantized weights of a packed model occupy on its device, against BF16 copies of the same weights."""

    layers: int
    elements: int
    packed_bytes: int  # storages of codes, scales, amax / absmax buffers, as allocated
    bf16_bytes: int  # 2 bytes per element

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.packed_bytes / self.elements if self.elements else 0.0

    @property
    def ratio(self) -> float:
        """packed / BF16 (about 0.28 for NVFP4)."""
        return self.packed_bytes / self.bf16_bytes if self.bf16_bytes else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"layers": self.layers, "elements": self.elements, "packed_bytes": self.packed_bytes,
                "bf16_bytes": self.bf16_bytes, "bits_per_weight": round(self.bits_per_weight, 4),
                "ratio_vs_bf16": round(self.ratio, 4)}


def weight_memory(model: nn.Module) -> WeightMemory:
    """Measure the packed layers' weight buffers (storage bytes on their device) vs 2 bytes per weight element."""
    layers = packed_modules(model)
    elements = sum(m.quantizer.spec.matrix_shape[0] * m.quantizer.spec.matrix_shape[1] for m in layers.values())
    packed = _storage_bytes(t for m in layers.values() for t in m.quantizer.weight_buffers().values())
    return WeightMemory(layers=len(layers), elements=elements, packed_bytes=packed, bf16_bytes=2 * elements)
