"""Bit-level rounding rules shared by every low-precision format in `quant` (SPEC_NVFP4.md sections 1.3, 1.7, 2, 7.1).

Each rule exists once, here, and is reused by nvfp4/mxfp4/fp8 and by the analysis code. What is load-bearing:

* E2M1 round-to-nearest-even with saturation, exactly the interval table of SPEC 1.3: ties at 0.25, 1.25, 2.5 and
  5.0 go down (to the even code), ties at 0.75, 1.75 and 3.5 go up; anything above 5 (including +inf) becomes 6.
  The sign bit is set iff the value is < 0, so -0.0 gives code 0 (as TE's reference) and a small negative value that
  rounds to zero gives code 8 ("-0").
* E2M1 stochastic rounding copies TE's software fallback `stochastic_round_fp4_e2m1` (SPEC 1.7): 8 random bits per
  element, `t = a + u * step(a)` (one rounding: `u * step` is exact, so this equals the fused multiply-add), then
  `floor(t / step(t)) * step(t)` saturated at 6.
* FP8 (E4M3, E5M2) encoding is RNE, saturating at the format maximum (448, 57344), with subnormals and zero kept.
  It is computed with FP32 arithmetic on exponent and mantissa, not with a `float8` cast, so it behaves the same on
  every PyTorch version and device (eager float8 casts did not saturate before PyTorch 2.13, SPEC 8.3); the tests
  compare it with PyTorch's own cast on clamped inputs.
* E8M0 (MX block scales) is a bare biased exponent: value 2^(byte - 127), 0xFF = NaN, no zero.
* Nibble packing: TE, torchao and ModelOpt put element 2k in the low nibble; bitsandbytes puts it in the high nibble.

Every function is vectorised and device-agnostic; inputs to the encoders must already be float32.
"""

import torch
from torch import Tensor

FLT_MAX = float(torch.finfo(torch.float32).max)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0 ** -6  # exponent bias 7: 2^(1-7); nonzero magnitudes below it are subnormal
E5M2_MAX = 57344.0

# Magnitudes of the 8 non-negative E2M1 codes (code = sign << 3 | magnitude index), SPEC 2.
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# SPEC 1.3 as (threshold, ties round up): the magnitude code is the number of thresholds a value passes, where a tie
# passes only the thresholds whose ties go up (0.75 -> 1.0, 1.75 -> 2.0, 3.5 -> 4.0; the others go to the even code).
_E2M1_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
_E2M1_VALUES = torch.tensor([*E2M1_GRID, *(-v for v in E2M1_GRID)], dtype=torch.float32)  # [16], code -> value


def _lookup(table: Tensor, codes: Tensor) -> Tensor:
    """table[codes] for uint8 codes of any shape (index_select is several times faster than advanced indexing)."""
    flat = codes.reshape(-1).to(torch.int32)
    return table.to(codes.device).index_select(0, flat).view(codes.shape)


def e2m1_values(codes: Tensor) -> Tensor:
    """Decode 4-bit E2M1 codes (uint8, any shape, values 0..15) to float32 grid values (code 8 decodes to -0.0)."""
    return _lookup(_E2M1_VALUES, codes)


def e2m1_encode_rne(y: Tensor) -> Tensor:
    """E2M1 round-to-nearest-even with saturation (PTX `cvt.rn.satfinite.e2m1x2.f32`): float32 -> uint8 codes 0..15."""
    a = y.abs()
    magnitude = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for threshold, tie_up in _E2M1_THRESHOLDS:  # 7 comparisons: several times faster than torch.bucketize on CPU
        magnitude += (a >= threshold) if tie_up else (a > threshold)
    return magnitude | ((y < 0).to(torch.uint8) << 3)


def _e2m1_step(a: Tensor) -> Tensor:
    """Spacing of the E2M1 grid just above magnitude `a`: 0.5 below 2, 1 in [2, 4), 2 from 4 on (float32)."""
    return 0.5 + 0.5 * (a >= 2.0).to(torch.float32) + (a >= 4.0).to(torch.float32)


def e2m1_encode_stochastic(y: Tensor, random_bits: Tensor) -> Tensor:
    """E2M1 stochastic rounding with TE's software-fallback semantics (SPEC 1.7); float32 -> uint8 codes.

    `random_bits` holds one uint8 per element of `y` (8 random bits, u = bits / 256). A value a fraction p of the
    way from its lower grid neighbour to the upper one rounds up with probability ceil(256 p) / 256 (T6).
    NaN inputs give +6 as the hardware does; callers reject NaN before getting here.
    """
    a = y.abs()
    u = random_bits.to(torch.float32) * (1.0 / 256.0)  # exact
    t = a + u * _e2m1_step(a)  # u * step is exact, so this is the single rounding of fma(u, step, a)
    step_t = _e2m1_step(t)
    rounded = torch.clamp_max(torch.floor(t / step_t) * step_t, E2M1_MAX)  # a grid value; division by 2^k is exact
    rounded = torch.nan_to_num(rounded, nan=E2M1_MAX)  # NaN only where y is NaN
    return e2m1_encode_rne(rounded) | ((y < 0).to(torch.uint8) << 3)


def floor_log2(a: Tensor) -> Tensor:
    """Exact floor(log2(a)) as int32 for finite a > 0 (float32, subnormals included); undefined for a <= 0."""
    return torch.frexp(a)[1] - 1


def exp2i(k: Tensor) -> Tensor:
    """Exact 2^k as float32 for integer k in [-149, 127] (built from the bit pattern, subnormals included)."""
    k = k.to(torch.int32)
    normal_bits = (k + 127).clamp(min=0) << 23
    subnormal_bits = torch.ones_like(k) << (k + 149).clamp(min=0, max=22)
    return torch.where(k >= -126, normal_bits, subnormal_bits).view(torch.float32)


def _minifloat_encode(x: Tensor, mantissa_bits: int, bias: int, max_value: float) -> Tensor:
    """RNE encode float32 -> sign|exponent|mantissa byte of a small float with subnormals, saturating at max_value.

    With E = max(floor(log2|x|), 1 - bias) the value |x| * 2^(mantissa_bits - E) is rounded to an integer r
    (exact scaling by a power of two, then one RNE rounding); the magnitude byte is (E - (1 - bias)) << mantissa_bits
    plus r. This one formula covers subnormals (E = 1 - bias, r < 2^mantissa_bits), normals, and the carry when r
    rounds up to 2^(mantissa_bits + 1).
    """
    a = torch.clamp_max(x.abs(), max_value)
    min_exponent = 1 - bias
    exponent = torch.where(a < 2.0**min_exponent, min_exponent, floor_log2(a))
    r = torch.round(a * exp2i(mantissa_bits - exponent))
    magnitude = ((exponent - min_exponent) << mantissa_bits) + r.to(torch.int32)
    code = magnitude | (torch.signbit(x).to(torch.int32) << 7)
    return torch.where(torch.isnan(x), 0x7F, code).to(torch.uint8)


def _minifloat_table(exponent_bits: int, mantissa_bits: int, bias: int, has_inf: bool) -> Tensor:
    """Value of every byte of a sign/exponent/mantissa 8-bit float, from the bit layout (float32 [256])."""
    values = []
    for byte in range(256):
        sign = -1.0 if byte >> 7 else 1.0
        exponent = (byte >> mantissa_bits) & ((1 << exponent_bits) - 1)
        mantissa = byte & ((1 << mantissa_bits) - 1)
        top = exponent == (1 << exponent_bits) - 1
        if has_inf and top:
            values.append(sign * float("inf") if mantissa == 0 else float("nan"))
        elif not has_inf and top and mantissa == (1 << mantissa_bits) - 1:
            values.append(float("nan"))
        elif exponent == 0:
            values.append(sign * mantissa * 2.0 ** (1 - bias - mantissa_bits))
        else:
            values.append(sign * (1 + mantissa / 2**mantissa_bits) * 2.0 ** (exponent - bias))
    return torch.tensor(values, dtype=torch.float32)


_E4M3_TABLE = _minifloat_table(exponent_bits=4, mantissa_bits=3, bias=7, has_inf=False)  # float8_e4m3fn
_E5M2_TABLE = _minifloat_table(exponent_bits=5, mantissa_bits=2, bias=15, has_inf=True)  # float8_e5m2


def e4m3_encode(x: Tensor) -> Tensor:
    """float32 -> E4M3 (float8_e4m3fn) bytes: RNE, saturating at +-448, subnormals (m * 2^-9) and zero kept."""
    return _minifloat_encode(x, mantissa_bits=3, bias=7, max_value=E4M3_MAX)


def e4m3_decode(codes: Tensor) -> Tensor:
    """E4M3 bytes (uint8) -> float32 (exact; 0x7F and 0xFF are NaN)."""
    return _lookup(_E4M3_TABLE, codes)


def e5m2_encode(x: Tensor) -> Tensor:
    """float32 -> E5M2 (float8_e5m2) bytes: RNE, saturating at +-57344 (never Inf), subnormals (m * 2^-16) kept."""
    return _minifloat_encode(x, mantissa_bits=2, bias=15, max_value=E5M2_MAX)


def e5m2_decode(codes: Tensor) -> Tensor:
    """E5M2 bytes (uint8) -> float32 (exact; 0x7C/0xFC are +-Inf, 0x7D-0x7F/0xFD-0xFF NaN)."""
    return _lookup(_E5M2_TABLE, codes)


def e8m0_encode(exponent: Tensor) -> Tensor:
    """Unbiased power-of-two exponents in [-127, 127] -> E8M0 bytes (exponent + 127)."""
    return (exponent.to(torch.int32) + 127).to(torch.uint8)


def e8m0_decode(codes: Tensor) -> Tensor:
    """E8M0 bytes -> float32 2^(byte - 127), exact including 2^-127 (a float32 subnormal); 0xFF is NaN."""
    values = exp2i(codes.to(torch.int32) - 127)
    return torch.where(codes == 0xFF, float("nan"), values)


def pack_nibbles(codes: Tensor, high_first: bool = False) -> Tensor:
    """Pack 4-bit codes along the last dim, two per byte: [..., n] uint8 -> [..., ceil(n / 2)] uint8.

    Default (TE/torchao/ModelOpt): element 2k in the low nibble. `high_first=True` is bitsandbytes' order.
    An odd trailing element is paired with a zero nibble.
    """
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    first, second = codes[..., 0::2], codes[..., 1::2]
    if high_first:
        return (first << 4) | second
    return first | (second << 4)


def unpack_nibbles(packed: Tensor, high_first: bool = False) -> Tensor:
    """Inverse of `pack_nibbles`: [..., m] uint8 -> [..., 2m] uint8 codes (trim an odd tail yourself)."""
    low, high = packed & 0x0F, packed >> 4
    pair = (high, low) if high_first else (low, high)
    return torch.stack(pair, dim=-1).flatten(-2)
