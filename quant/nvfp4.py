"""NVFP4 exactly as Transformer Engine computes it (SPEC_NVFP4.md 1.2-1.8): quantize, dequantize, fake-quantize.

NVFP4 stores 4-bit E2M1 codes, one E4M3 decode scale per 16 consecutive elements of the last dim (or per 16x16 tile
for 2D weight scaling) and one FP32 global amax. This module reproduces TE's default (non-fast-math) kernels byte for
byte on CPU and GPU, so a study run without Blackwell predicts what Blackwell does. The load-bearing details, each
one IEEE binary32 operation with round-to-nearest-even (PyTorch computes float32 tensor ops in float32; every constant
below is a float32 tensor on the input's device, so no step is done in float64 or replaced by a reciprocal multiply):

1. A = max |x| in FP32 (after the RHT for RHT'ed operands). NaN/Inf raise QuantError naming the tensor. With an
   amax reduction (TE's `with_amax_reduction`, `quant.distributed`) A is the MAX of that over the ranks.
2. S_enc = fp32(2688 / A), capped at FLT_MAX, and 1.0 when A == 0 (TE's kernel; its reference gives FLT_MAX, same
   bytes). S_dec = fp32(1 / S_enc).
3. Folded multiplier m = fp32(S_enc * fp32(1/6)); block decode scale s = fp32(b * m) rounded ONCE to E4M3 (RNE,
   saturating at 448, subnormal and zero scales kept). Not (b/6)*S_enc, not (b/6)/(A/2688): those round twice (T3).
4. Encode factor e = fp32(1 / fp32(float(s_b) * S_dec)), capped at FLT_MAX, so a zero scale gives e = FLT_MAX
   (its non-zero elements become codes 7/15 that still decode to 0).
5. y = fp32(x * e) rounded to E2M1 (RNE table of SPEC 1.3, or stochastic rounding per SPEC 1.7).
6. Dequantize with TE's formula f = fp32(fp32(float(s_b) * A) * fp32(1/2688)), x_hat = fp32(e2m1 * f) -> out dtype.

Layout: the input is viewed as 2-D [M, K] = [-1, x.shape[-1]]; blocks run along K; K is zero-padded to a multiple of
16 (and M to a multiple of 16 for 16x16 tiles); zeros never change a block max. Codes are packed two per byte with
element 2k in the low nibble. A 16x16 tile's scale byte is repeated on each of its 16 rows, so `scales` is always
[M, ceil(K/16)], and quantize(W, (16, 16)) and quantize(W.t(), (16, 16)) give transposed codes (SPEC 1.4).

RHT (`rht=True`) transforms each 16-chunk of the last dim before quantizing (quant.rht); `dequantize` then returns
values in the rotated basis, which is what the wgrad GEMM consumes (pass `undo_rht=True` to rotate back for analysis).
Stochastic rounding draws 8 random bits per element from `generator`, so CPU runs are reproducible given a seed;
TE's Philox stream cannot be reproduced, only its distribution (SPEC 1.7, T6).

Dispatch: CUDA tensors go to the fused Triton kernels of `quant.kernels` when Triton is installed (same bytes; SR from a
Philox stream seeded by `generator`; NaN/Inf raise asynchronously), everything else to the PyTorch code below.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from quant import distributed, kernels, numerics, rht as rht_transform
from quant.errors import QuantError, check_finite, check_float_tensor, describe

FORMAT = "NVFP4"
BLOCK = 16
TILES = ((1, 16), (16, 16))
E2M1_X_E4M3 = numerics.E2M1_MAX * numerics.E4M3_MAX  # 2688, the largest representable NVFP4 magnitude per unit amax


def _f32_quotient(numerator: float, denominator: float) -> float:
    """The correctly rounded float32 quotient (one IEEE division in float32)."""
    return (torch.tensor(numerator, dtype=torch.float32) / torch.tensor(denominator, dtype=torch.float32)).item()


INV_6 = _f32_quotient(1.0, 6.0)  # 0x3E2AAAAB
INV_2688 = _f32_quotient(1.0, 2688.0)  # 0x39C30C31
INV_GEMM = _f32_quotient(1.0, 6.0 * 6.0 * 448.0 * 448.0)  # TE's nvfp4.cu alpha factor


@dataclass(frozen=True, eq=False)
class NVFP4Tensor:
    """A quantized tensor in TE's rowwise layout plus what is needed to decode it.

    codes:  uint8 [M, ceil(K/16) * 8], two E2M1 codes per byte, element 2k in the low nibble (zero padding included).
    scales: uint8 [M, ceil(K/16)], raw E4M3 bytes of the block decode scales.
    amax:   float32 scalar, the global amax A (after the RHT if `rht`).
    shape, dtype: the original tensor's shape and dtype; M = prod(shape[:-1]), K = shape[-1].
    tile: (1, 16) or (16, 16). rht: the codes are of RHT(x). stochastic: codes were stochastically rounded.
    """

    codes: Tensor
    scales: Tensor
    amax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    tile: tuple[int, int]
    rht: bool
    stochastic: bool

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[-1]


def _check_tile(tile: object, name: str | None) -> tuple[int, int]:
    try:
        as_tuple = tuple(int(v) for v in tile)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        as_tuple = None
    if as_tuple not in TILES:
        raise QuantError(f"{FORMAT}: tile={tile!r} for {describe(name)} is not supported; valid tiles: {TILES}")
    return as_tuple


def _f32(value: float, like: Tensor) -> Tensor:
    """A float32 scalar tensor on `like`'s device (keeps every step a device-side float32 tensor op). Made by a fill,
    not copied from the host, so that it can be created inside a CUDA-graph capture."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def global_scales(amax: Tensor) -> tuple[Tensor, Tensor]:
    """(S_enc, S_dec) from the FP32 global amax, SPEC 1.2 steps 2-3 (S_enc = 1 for A == 0, as TE's kernel)."""
    s_enc = torch.clamp_max(_f32(E2M1_X_E4M3, amax) / amax, numerics.FLT_MAX)
    s_enc = torch.where((amax == 0) | (s_enc == 0), _f32(1.0, amax), s_enc)
    return s_enc, _f32(1.0, amax) / s_enc


def _block_amax(xp: Tensor, tile: tuple[int, int]) -> Tensor:
    """Max |x| per block: xp float32 [Mp, Kp] (padded) -> [Mp, Kp/16]; a 16x16 tile's max repeated on its rows."""
    rows, cols = xp.shape
    if tile == (1, BLOCK):
        return xp.abs().view(rows, cols // BLOCK, BLOCK).amax(dim=-1)
    tiles = xp.abs().view(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK).amax(dim=(1, 3))  # [Mp/16, Kp/16]
    return tiles.repeat_interleave(BLOCK, dim=0)


def _quantize_unpacked(
    x: Tensor, tile: tuple[int, int], rht: bool, stochastic: bool, generator: torch.Generator | None, name: str | None,
    amax_reduce: distributed.AmaxReducer | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SPEC 1.2 steps 1-9: x [..., K] -> (codes uint8 [M, Kp] unpacked, scale bytes uint8 [M, Kp/16], amax fp32).

    `tile` must already be validated by `_check_tile`. `amax_reduce` maps the local amax (after the RHT if `rht`)
    to the one the scales use; it runs before the finiteness checks, so a collective reduction is reached on every
    rank even when this rank's tensor holds a NaN.
    """
    check_float_tensor(x, FORMAT, name)
    x2d = x.detach().reshape(-1, x.shape[-1])  # [M, K]
    xf = x2d.to(torch.float32).contiguous()
    input_amax = amax = xf.abs().amax()
    rotated = rht_transform.apply(x2d, name=name).to(torch.float32) if rht else None  # [M, K]
    if rotated is not None:
        amax = rotated.abs().amax()
    group_amax = amax_reduce(amax) if amax_reduce is not None else None
    check_finite(input_amax, xf, FORMAT, name)
    if rotated is not None:
        xf = rotated
        check_finite(amax, xf, FORMAT, name, stage="after the RHT (BF16 overflow)")
    if group_amax is not None:
        amax = distributed.checked_group_amax(amax, group_amax, FORMAT, name)
    m_rows, k = xf.shape
    pad_rows = (-m_rows) % BLOCK if tile == (BLOCK, BLOCK) else 0
    xp = torch.nn.functional.pad(xf, (0, (-k) % BLOCK, 0, pad_rows))  # [Mp, Kp]

    s_enc, s_dec = global_scales(amax)
    multiplier = s_enc * _f32(INV_6, amax)  # m = fp32(S_enc * fp32(1/6))
    block_scale = torch.clamp_max(_block_amax(xp, tile) * multiplier, numerics.E4M3_MAX)  # [Mp, Kp/16]
    scale_bytes = numerics.e4m3_encode(block_scale)
    decode_scale = numerics.e4m3_decode(scale_bytes)
    encode = torch.clamp_max(_f32(1.0, amax) / (decode_scale * s_dec), numerics.FLT_MAX)  # [Mp, Kp/16]

    y = (xp.view(xp.shape[0], -1, BLOCK) * encode[..., None]).view(xp.shape)  # [Mp, Kp]
    if stochastic:
        bits = torch.randint(0, 256, y.shape, generator=generator, dtype=torch.uint8, device=y.device)
        codes = numerics.e2m1_encode_stochastic(y, bits)
    else:
        codes = numerics.e2m1_encode_rne(y)
    return codes[:m_rows], scale_bytes[:m_rows], amax


def quantize(
    x: Tensor,
    tile: tuple[int, int] = (1, 16),
    rht: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    name: str | None = None,
    amax_reduce: distributed.AmaxReducer | None = None,
) -> NVFP4Tensor:
    """Quantize x (float32/bfloat16/float16; float64 is rounded to float32 first) to NVFP4 as TE does.

    x is viewed as [-1, x.shape[-1]] and blocked along the last dim. tile: (1, 16) or (16, 16). rht: apply TE's RHT
    along the last dim first (bfloat16 input, last dim % 16 == 0). stochastic: SR with 8 bits/element from
    `generator`. name: how errors refer to the tensor (e.g. "layer3.conv1 weight"). amax_reduce: replaces the
    global amax before the scales are derived (TE's `with_amax_reduction`, e.g. `quant.distributed.all_reduce_amax`);
    the fused CUDA kernels take no external amax, so such a call runs the PyTorch code below (same bytes).
    """
    if kernels.enabled_for(x) and amax_reduce is None:
        return kernels.load().nvfp4_quantize(x, tile, rht, stochastic, generator, name)
    tile = _check_tile(tile, name)
    codes, scale_bytes, amax = _quantize_unpacked(x, tile, rht, stochastic, generator, name, amax_reduce)
    return NVFP4Tensor(
        codes=numerics.pack_nibbles(codes),
        scales=scale_bytes,
        amax=amax,
        shape=x.shape,
        dtype=x.dtype,
        tile=tile,
        rht=rht,
        stochastic=stochastic,
    )


def _decode(codes: Tensor, scale_bytes: Tensor, amax: Tensor) -> Tensor:
    """TE's dequantize: codes uint8 [M, Kp], scale bytes [M, Kp/16] -> float32 [M, Kp]."""
    factor = (numerics.e4m3_decode(scale_bytes) * amax) * _f32(INV_2688, amax)  # f = fp32(fp32(s_b * A) / 2688)
    values = numerics.e2m1_values(codes).view(codes.shape[0], -1, BLOCK)  # [M, Kp/16, 16]
    return (values * factor[..., None]).view(codes.shape)


def _restore(values: Tensor, shape: torch.Size, dtype: torch.dtype, rotated: bool, undo_rht: bool) -> Tensor:
    """float32 [M, Kp] -> the original shape in `dtype` (trim the K padding, optionally rotate back)."""
    values = values[:, : shape[-1]]
    if rotated and undo_rht:
        values = rht_transform.invert(values)
    return values.reshape(shape).to(dtype)


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32, undo_rht: bool = False) -> Tensor:
    """Decode to q.shape in `dtype` with TE's dequant formula (in the RHT basis if q.rht, unless undo_rht)."""
    if kernels.enabled_for(q.codes):
        if q.rht and undo_rht:
            rotated = kernels.load().nvfp4_decode(q, torch.float32, scaled_codes=False)
            return _restore(rotated, q.shape, dtype, rotated=True, undo_rht=True)
        return kernels.load().nvfp4_dequantize(q, dtype)
    return _restore(_decode(unpack_codes(q, padded=True), q.scales, q.amax), q.shape, dtype, q.rht, undo_rht)


def fake_quantize(
    x: Tensor,
    tile: tuple[int, int] = (1, 16),
    rht: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    name: str | None = None,
    amax_reduce: distributed.AmaxReducer | None = None,
) -> Tensor:
    """dequantize(quantize(x, ...)) in x.dtype, without the packing round trip. Not differentiable (no autograd)."""
    if kernels.enabled_for(x) and amax_reduce is None:
        return kernels.load().nvfp4_fake_quantize(x, tile, rht, stochastic, generator, name)
    codes, scale_bytes, amax = _quantize_unpacked(x, _check_tile(tile, name), rht, stochastic, generator, name,
                                                  amax_reduce)
    return _restore(_decode(codes, scale_bytes, amax), x.shape, x.dtype, rotated=rht, undo_rht=False)


def unpack_codes(q: NVFP4Tensor, padded: bool = False) -> Tensor:
    """The 4-bit codes as uint8 [M, K] (or [M, ceil(K/16) * 16] with the zero padding if `padded`)."""
    codes = numerics.unpack_nibbles(q.codes)
    return codes if padded else codes[:, : q.cols]


def e2m1_values(codes: Tensor) -> Tensor:
    """E2M1 grid value of each 4-bit code, float32, same shape (code 8 is -0.0)."""
    return numerics.e2m1_values(codes)


def scale_values(q: NVFP4Tensor) -> Tensor:
    """The decoded E4M3 block scales float(s_b), float32 [M, ceil(K/16)]."""
    return numerics.e4m3_decode(q.scales)


def scaled_codes(q: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """e2m1(code) * float(s_b) per element, [M, K] in `dtype`: the GEMM operand of SPEC 1.8.

    Each product has at most 6 significant bits and lies in [2^-10, 2688], so it is exact in bfloat16, float16 and
    float32; a GEMM of two such operands with FP32 accumulation, times `gemm_alpha`, is TE's NVFP4 GEMM up to the
    FP32 summation order. In the RHT basis if q.rht (as TE's wgrad operands).
    """
    if kernels.enabled_for(q.codes):
        return kernels.load().nvfp4_decode(q, dtype, scaled_codes=True)
    values = numerics.e2m1_values(unpack_codes(q, padded=True)).view(q.rows, -1, BLOCK)  # [M, Kp/16, 16]
    products = (values * scale_values(q)[..., None]).view(q.rows, -1)[:, : q.cols]
    return products.to(dtype)


def gemm_alpha(amax_a: Tensor, amax_b: Tensor) -> Tensor:
    """TE's per-GEMM factor alpha = fp32(fp32(amax_a * amax_b) * fp32(1/(6*6*448*448))) (alpha_in = 1), float32.

    The product of two NVFP4 operands' `scaled_codes`, summed in FP32, times alpha is the GEMM TE computes.
    """
    amax_a = amax_a.to(torch.float32)
    return (amax_a * amax_b.to(device=amax_a.device, dtype=torch.float32)) * _f32(INV_GEMM, amax_a)
