"""NF4 (4-bit NormalFloat) as bitsandbytes computes it (SPEC_NVFP4.md 7.2): the QLoRA weight format.

NF4 is a 16-entry codebook of Gaussian quantiles normalised to [-1, 1] with an exact zero, scaled per block of
`blocksize` consecutive elements of the flattened tensor by that block's absmax (FP32). It is weight-only in practice:
the codebook assumes Gaussian-distributed values, which weights are and activations/gradients are not.

What is load-bearing for compatibility with bitsandbytes' CUDA kernel (`kQuantizeBlockwise`, `dQuantizeNF4`):
* Blocks run over the flattened tensor (row-major), not along a chosen dim; the last block may be partial.
* n = fp32(x * fp32(1 / absmax)): a reciprocal then a multiply, not a division.
* The code is the number of decision thresholds t with n > t (strict: an exact midpoint goes to the lower code).
  The thresholds are the kernel's float32 constants (midpoints of adjacent codebook entries).
* Dequantization is fp32(codebook[code] * absmax), then cast to the output dtype.
* Packing puts the FIRST element in the HIGH nibble (the opposite of NVFP4/MXFP4).
* An all-zero block: the kernel computes 1/0 = inf and 0 * inf = NaN, which falls through to code 0 (-1.0); the
  CPU backend clamps absmax to 1e-38 and gets code 7 (0.0). Both decode to zero; this module stores code 7.
* Double quantization (`double_quant=True`, bitsandbytes' `compress_statistics`): subtract the mean of all block
  absmaxes, then quantize the centred values with bitsandbytes' 8-bit signed dynamic map in blocks of 256, each with
  an FP32 absmax; dequantization adds the mean back. The 8-bit code is the nearest map entry with float32 midpoints
  (an exact midpoint goes to the lower entry), as the CUDA kernel's `dQuantize<0>` binary search. bitsandbytes'
  CPU backend divides instead of multiplying by the reciprocal and its table search occasionally returns the
  second-nearest entry, so its 8-bit absmax codes can differ by one from these (tests check ours is the nearest).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from quant import numerics
from quant.errors import QuantError, check_finite, check_float_tensor, describe

FORMAT = "NF4"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double-quantized absmax

CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# dQuantizeNF4's decision constants (csrc/kernels.cu), low to high; equal to the float32 midpoints of CODEBOOK.
THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)  # fmt: skip

_CODEBOOK = torch.tensor(CODEBOOK, dtype=torch.float32)


def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, 7, 8)), sorted float32 [256].

    For i = 0..6 it holds +-10^(i-6) times the 2^i midpoints of linspace(0.1, 1, 2^i + 1) (computed in float32, as
    bitsandbytes does), plus 0 and 1.
    """
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


_DYNAMIC_MAP = dynamic_map()
_DYNAMIC_MIDPOINTS = (_DYNAMIC_MAP[1:] + _DYNAMIC_MAP[:-1]) * 0.5  # float32, as the kernel's (upper + val) * 0.5f


@dataclass(frozen=True, eq=False)
class NF4Tensor:
    """An NF4-quantized tensor in bitsandbytes' layout.

    codes: uint8 [ceil(numel / 2)], flattened codes packed first-element-high.
    absmax: float32 [n_blocks] block absmax; None when double-quantized, see `block_absmax`.
    absmax_codes: uint8 [n_blocks] 8-bit dynamic-map codes of (absmax - absmax_offset) (double quantization only).
    absmax_scales: float32 [ceil(n_blocks / 256)] absmax of each 256-block of centred absmaxes (double quant only).
    absmax_offset: float32 scalar, the mean absmax (double quant only).
    """

    codes: Tensor
    absmax: Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax_codes: Tensor | None = None
    absmax_scales: Tensor | None = None
    absmax_offset: Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    def block_absmax(self) -> Tensor:
        """The float32 [n_blocks] absmax that dequantization multiplies by (decoded if double-quantized)."""
        if self.absmax is not None:
            return self.absmax
        return dequantize_absmax(self.absmax_codes, self.absmax_scales, self.absmax_offset)


def _blocks(flat: Tensor, blocksize: int) -> Tensor:
    """float32 [n] -> [n_blocks, blocksize], zero-padding the last block (zeros never change a block absmax)."""
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize)


def _reciprocal_or_zero(absmax: Tensor) -> Tensor:
    """fp32(1 / absmax), and 0 for an all-zero block so its elements normalise to 0 (code 7) instead of NaN."""
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.where(absmax > 0, torch.ones_like(absmax) / safe, torch.zeros_like(absmax))


def quantize_absmax(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """bitsandbytes' double quantization of float32 [n] block absmaxes -> (codes uint8 [n], scales [ceil(n/256)],
    offset scalar)."""
    offset = absmax.mean()
    centred = absmax - offset
    blocks = _blocks(centred, ABSMAX_BLOCKSIZE)  # [n/256, 256]
    scales = blocks.abs().amax(dim=1)
    normalised = blocks * _reciprocal_or_zero(scales)[:, None]
    codes = torch.bucketize(normalised, _DYNAMIC_MIDPOINTS.to(absmax.device))  # count of midpoints < n: ties go low
    return codes.to(torch.uint8).flatten()[: absmax.numel()], scales, offset


def dequantize_absmax(codes: Tensor, scales: Tensor, offset: Tensor) -> Tensor:
    """Inverse of `quantize_absmax`: map[code] * scale of its 256-block + offset, float32 [n]."""
    values = _DYNAMIC_MAP.to(codes.device).index_select(0, codes.to(torch.int32))
    return values * scales.repeat_interleave(ABSMAX_BLOCKSIZE)[: codes.numel()] + offset


def _check_blocksize(blocksize: int, name: str | None) -> int:
    if blocksize not in BLOCKSIZES:
        raise QuantError(
            f"{FORMAT}: blocksize={blocksize!r} for {describe(name)} is not supported; valid: {BLOCKSIZES}"
        )
    return blocksize


def _quantize_codes(x: Tensor, blocksize: int, name: str | None) -> tuple[Tensor, Tensor]:
    """x -> (codes uint8 [n_blocks, blocksize] incl. padding, absmax float32 [n_blocks])."""
    check_float_tensor(x, FORMAT, name)
    _check_blocksize(blocksize, name)
    blocks = _blocks(x.detach().reshape(-1).to(torch.float32), blocksize)
    absmax = blocks.abs().amax(dim=1)
    check_finite(absmax.max(), blocks, FORMAT, name)
    normalised = blocks * _reciprocal_or_zero(absmax)[:, None]
    codes = torch.zeros(normalised.shape, dtype=torch.uint8, device=normalised.device)
    for threshold in THRESHOLDS:  # code = number of thresholds t with n > t (compared in float32, as the kernel)
        codes += normalised > threshold
    return codes, absmax


def quantize(x: Tensor, blocksize: int = 64, double_quant: bool = False, name: str | None = None) -> NF4Tensor:
    """NF4-quantize x (any float tensor) in blocks of `blocksize` consecutive elements of the flattened tensor."""
    codes, absmax = _quantize_codes(x, blocksize, name)
    numel = x.numel()
    # An odd element count is paired with a padding zero, whose code is 7 (0.0), as in bitsandbytes.
    packed = numerics.pack_nibbles(codes.flatten()[: numel + numel % 2], high_first=True)
    if not double_quant:
        return NF4Tensor(codes=packed, absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize)
    absmax_codes, absmax_scales, offset = quantize_absmax(absmax)
    return NF4Tensor(
        codes=packed,
        absmax=None,
        shape=x.shape,
        dtype=x.dtype,
        blocksize=blocksize,
        absmax_codes=absmax_codes,
        absmax_scales=absmax_scales,
        absmax_offset=offset,
    )


def unpack_codes(q: NF4Tensor) -> Tensor:
    """The 4-bit codes, uint8 [numel] (flattened order)."""
    return numerics.unpack_nibbles(q.codes, high_first=True)[: q.shape.numel()]


def _decode(codes: Tensor, absmax: Tensor, blocksize: int, numel: int) -> Tensor:
    """codes uint8 [numel], absmax float32 [n_blocks] -> float32 [numel]."""
    values = _CODEBOOK.to(codes.device).index_select(0, codes.to(torch.int32))
    padded = torch.nn.functional.pad(values, (0, (-numel) % blocksize)).view(-1, blocksize)
    return (padded * absmax[:, None]).flatten()[:numel]


def dequantize(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """codebook[code] * absmax in float32, reshaped to q.shape and cast to `dtype`."""
    return _decode(unpack_codes(q), q.block_absmax(), q.blocksize, q.shape.numel()).reshape(q.shape).to(dtype)


def fake_quantize(x: Tensor, blocksize: int = 64, double_quant: bool = False, name: str | None = None) -> Tensor:
    """dequantize(quantize(x, ...)) in x.dtype. Not differentiable (no autograd)."""
    return dequantize(quantize(x, blocksize=blocksize, double_quant=double_quant, name=name), dtype=x.dtype)
