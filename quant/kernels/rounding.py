"""Triton device functions for the rounding rules of ``quant.numerics``, one IEEE binary32 operation at a time.

Why a second copy of rules that exist in ``quant.numerics``: a kernel cannot call PyTorch ops, so each rule is written
again here with scalar Triton arithmetic, and ``tests/quant/test_kernels.py`` holds the two copies to the same bytes.
What is load-bearing (each item was a way to silently break bit-compatibility):

* No PTX cast does an FP8 or FP4 rounding. E4M3 is computed from the float32 exponent bits and one round-half-even to
  an integer (``round_half_even``: ``(v + 2^23) - 2^23``, exact for 0 <= v < 2^22 in IEEE float32), so the result
  does not depend on how a given Triton/PTX version lowers ``float8e4nv`` casts (saturation and subnormals differ
  between paths).
* Multiplications by powers of two are built from bit patterns (``exp2i``) and are exact; no ``exp2``/``log2`` call.
* E2M1 round-to-nearest is one IEEE addition of C = step * 2^23 and its exact subtraction (``e2m1_rne``), the step
  read off the exponent bits; its ties fall as the interval table of SPEC 1.3 says (0.75, 1.75, 3.5 up; 0.25, 1.25,
  2.5, 5 down; saturation above 5), exactly ``numerics.e2m1_encode_rne``. The quantize passes are bound by the issue
  rate of the ALU pipe (compares, selects, logic, min/max), not by memory, so the cheapest exact form of each rule is
  the one used, preferring the FMA pipe: this replaced a chain of seven comparisons, then a form with two compares and
  four selects per element.
* BF16 outputs: the hardware ``cvt.rn.bf16.f32`` (RNE) when compiled for a GPU, integer rounding under Triton's CPU
  interpreter (which truncates that cast); the kernels take this as ``NATIVE_BF16`` (``nvfp4.launch_options``).
* Stochastic rounding follows TE's software fallback (SPEC 1.7): ``t = a + u * step(a)`` (``u * step`` formed exactly
  from bit patterns, no multiply), t rounded down to a multiple of step(t), saturated at 6, computed as t rounded
  down to a multiple of step(a), which ``e2m1_sr`` shows is the same grid value: on a GPU one addition rounding toward
  -inf (``libdevice.add_rd``) of step(a) * 2^23, in the interpreter (no rounding-mode addition)
  ``floor(t / step(a)) * step(a)`` with the division an exact multiplication by a power of two.
* The RHT is a fast Walsh-Hadamard transform on chunks held by one thread (``rht_halves``), or a tensor-core product
  where a chunk is spread over threads (``rht_tile``); the two agree wherever the FP32 sum of a chunk is exact.
* Divisions that must be correctly rounded use ``tl.div_rn``: Triton's ``/`` on float32 lowers to the approximate
  ``div.full.f32`` on NVIDIA GPUs. Kernels are also launched with ``enable_fp_fusion=False``.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def exp2i(k):
    """Exact 2^k as float32 for int32 k in the normal range [-126, 127] (built from the exponent bits)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_half_even(v):
    """Round float32 v (0 <= v < 2^22) to the nearest integer, ties to even: one IEEE addition of 2^23 and back."""
    return (v + 8388608.0) - 8388608.0


@triton.jit
def e4m3_round(s):
    """Non-negative finite float32 s <= 448 -> (E4M3 byte as int32, its float32 value): RNE with subnormals.

    E = max(floor(log2 s), -6) from the exponent bits (float32 subnormals and 0 give -6); r = RNE(s * 2^(3 - E)) in
    [0, 16] (exact scaling); byte = ((E + 6) << 3) + r covers subnormals (E = -6), normals and the carry r = 16;
    value = r * 2^(E - 3).
    """
    exponent = tl.maximum((s.to(tl.int32, bitcast=True) >> 23) - 127, -6)
    r = round_half_even(s * exp2i(3 - exponent))
    byte = ((exponent + 6) << 3) + r.to(tl.int32)
    return byte, r * exp2i(exponent - 3)


@triton.jit
def e4m3_value(byte):
    """Non-negative E4M3 byte (int32, 0..0x7F) -> float32 value; 0x7F is NaN (the poisoned-tensor marker)."""
    exponent = byte >> 3
    mantissa = byte & 7
    normal = exponent > 0
    significand = tl.where(normal, mantissa + 8, mantissa).to(tl.float32)
    value = significand * exp2i(tl.where(normal, exponent, 1) - 10)
    return tl.where(byte == 0x7F, float("nan"), value)


@triton.jit
def e2m1_unit_bits(a):
    """Bits (int32) of 2^max(floor(log2 min(a, 6)), 0) for float32 a >= 0 (NaN counts as 6): 1 below 2, 2 on [2, 4),
    4 from 4 on. The E2M1 grid's step just above a is half of it (0.5, 1, 2): ``unit - (1 << 23)`` is the step's bit
    pattern and ``0x7F800000 - unit`` its reciprocal's. ``minimum`` returns its non-NaN operand."""
    return tl.maximum(tl.minimum(a, 6.0).to(tl.int32, bitcast=True) & 0x7F800000, 0x3F800000)


@triton.jit
def e2m1_rne(a):
    """|y| (float32 >= 0, may be +inf or NaN) -> (grid magnitude float32, magnitude index int32 0..7): E2M1
    round-to-nearest-even with saturation (SPEC 1.3), the bytes of ``numerics.e2m1_encode_rne`` in six operations
    (and three more for the index), most of them on the FMA pipe.

    The grid is evenly spaced on each of three ranges: step s = 0.5 below 2, 1 on [2, 4), 2 on [4, 6]
    (``e2m1_unit_bits``). With C = s * 2^23 the sum a + C lies in [C, 2C), where float32's spacing is exactly s, so the
    one IEEE addition a + C rounds a to the nearest multiple of s, ties to the even multiple, and (a + C) - C is exact.
    The even multiple of the step is the grid point with the even code: 0.25, 1.25, 2.5, 5 round down and 0.75, 1.75,
    3.5 up, SPEC's tie table. a is clamped to 6 first (NaN and +inf saturate like the hardware's satfinite), which
    also keeps a / s <= 3 on the top range. The index is the number of steps above C (the bits of a + C less C's)
    plus 2 * max(floor(log2 a), 0)."""
    a = tl.minimum(a, 6.0)
    unit = e2m1_unit_bits(a)
    magic_bits = unit + (22 << 23)  # C = 2^22 * unit = s * 2^23
    magic = magic_bits.to(tl.float32, bitcast=True)
    shifted = a + magic  # rounded to a multiple of s (RNE)
    magnitude = shifted - magic
    index = (shifted.to(tl.int32, bitcast=True) - magic_bits) + ((unit >> 22) - 254)
    return magnitude, index


@triton.jit
def e2m1_magnitude(index):
    """E2M1 magnitude index 0..7 (int32) -> grid value 0, 0.5, 1, 1.5, 2, 3, 4, 6 (float32).

    From index 2 on, (index + 252) << 22 is the grid value's float32 bit pattern (exponent and first mantissa bit);
    indices 0 and 1 are 0 and 0.5."""
    return tl.where(index < 2, index.to(tl.float32) * 0.5, ((index + 252) << 22).to(tl.float32, bitcast=True))


@triton.jit
def e2m1_sr(a, byte, NATIVE: tl.constexpr):
    """Stochastic E2M1 rounding of |y| = a (float32 >= 0) with the random byte k (0..255): (grid magnitude float32,
    magnitude index int32), TE's software fallback (SPEC 1.7), the bytes of ``numerics.e2m1_encode_stochastic``.

    TE: t = a + (k/256) * step(a), then t rounded down to a multiple of step(t), saturated at 6 (NaN counts as 6).
    Here t is rounded down to a multiple of step(a) instead, with no saturation, which gives the same grid value:
    a is clamped to 6 first (NaN and +inf as well; it changes no result), and t < a + step(a). Where t lands in the
    next range up (step(t) = 2 step(a)), it is below that range's start plus step(a), which both rules round down to
    the start (2 or 4); on the top range, t < 6 + 2 rounds down to 4 or 6. So only one step is needed, read off the
    exponent bits of a (``e2m1_unit_bits``), and the increment comes from bits, with no multiply or integer-to-float
    conversion: step(a) is a power of two, so k in the top 8 mantissa bits of step(a) is (1 + k/256) * step(a), and
    subtracting step(a) is exact. NATIVE (compiled for a GPU): one addition rounding toward -inf (``add.rm.f32``) of
    C = step(a) * 2^23 (t < C, so t + C lies where float32's spacing is the step) and an exact subtraction of C, as
    ``e2m1_rne`` does with round-to-nearest; the index is read off the bits of t + C the same way. Triton's CPU
    interpreter has no rounding-mode addition: there it is floor(t / step(a)) * step(a) (exact scalings)."""
    a = tl.minimum(a, 6.0)
    unit = e2m1_unit_bits(a)
    step_bits = unit - 0x00800000
    step = step_bits.to(tl.float32, bitcast=True)
    increment = ((byte.to(tl.int32) << 15) | step_bits).to(tl.float32, bitcast=True) - step  # (k/256) * step, exact
    t = a + increment
    if NATIVE:
        magic_bits = unit + (22 << 23)
        magic = magic_bits.to(tl.float32, bitcast=True)  # C = step(a) * 2^23
        shifted = libdevice.add_rd(t, magic)
        steps = shifted.to(tl.int32, bitcast=True) - magic_bits
        magnitude = shifted - magic
    else:
        quotient = tl.floor(t * (0x7F800000 - unit).to(tl.float32, bitcast=True))
        steps = quotient.to(tl.int32)
        magnitude = quotient * step
    return magnitude, steps + ((unit >> 22) - 254)


@triton.jit
def with_sign(magnitude, negative):
    """float32 magnitude (>= 0) with its sign bit set where ``negative``: -0.0 stays -0.0.

    Done on the bits because the GPU compiler does not keep the sign of zero through ``where(c, -m, m)`` (seen on an
    H100 with Triton 3.6: code 8 decoded to +0.0, while TE's dequantize gives -0.0)."""
    return with_sign_bit(magnitude, negative.to(tl.uint32) << 31)


@triton.jit
def sign_bit(y):
    """The sign bit of float32 y (uint32: 0 or 1 << 31) where ``y < 0``, the rule of ``numerics.e2m1_encode_rne``:
    adding +0.0 turns -0.0 into +0.0 (IEEE round-to-nearest) and leaves every other value, so -0.0 gets no sign. (A
    NaN keeps its sign bit; NaN only occurs in poisoned tensors, whose codes and values no caller reads.) An FMA-pipe
    addition and one logic operation, instead of a comparison and a select on the busier ALU pipe."""
    return (y + 0.0).to(tl.uint32, bitcast=True) & 0x80000000


@triton.jit
def with_sign_bit(magnitude, sign):
    """float32 magnitude (>= 0) with the uint32 ``sign`` (0 or 1 << 31, see ``sign_bit``) or'ed into its bits."""
    return (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_code_value(code):
    """4-bit E2M1 code (int32, 0..15) -> signed float32 value (code 8 is -0.0)."""
    return with_sign(e2m1_magnitude(code & 7), (code & 8) != 0)


@triton.jit
def rht_matrix(SIGN_MASK: tl.constexpr):
    """TE's RHT matrix T = diag(s) H / 4 as float32 [16, 16]; bit i of SIGN_MASK set <=> s_i = -1 (quant.rht)."""
    i = tl.arange(0, 16)[:, None]
    j = tl.arange(0, 16)[None, :]
    both = i & j
    negative = ((both ^ (both >> 1) ^ (both >> 2) ^ (both >> 3)) & 1) ^ ((SIGN_MASK >> i) & 1)
    return tl.where(negative == 1, -0.25, 0.25)


@triton.jit
def bf16_round(v, NATIVE: tl.constexpr):
    """float32 -> the float32 value of its bfloat16 rounding (RNE, overflow to inf, NaN kept).

    NATIVE (compiled for a GPU): the hardware conversion ``cvt.rn.bf16.f32``. Otherwise (Triton's CPU interpreter,
    which truncates that cast) the same rounding by integer arithmetic; NaN is passed through there, because the
    integer rounding would carry a NaN's payload into the sign bit and return -0.0."""
    if NATIVE:
        return v.to(tl.bfloat16).to(tl.float32)
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, rounded)


@triton.jit
def bf16_round_pair(a, b, NATIVE: tl.constexpr):
    """``bf16_round`` of two float32 tensors of one shape and layout. NATIVE: one packed hardware conversion
    (``cvt.rn.bf16x2.f32``) per pair of values and two integer operations to widen them back, instead of a scalar
    conversion (on the slower conversion pipe) and a widening per value. NaN stays NaN (the canonical BF16 NaN)."""
    if NATIVE:
        low_bits, high_bits = tl.inline_asm_elementwise(
            "{ .reg .b32 packed; cvt.rn.bf16x2.f32 packed, $3, $2; shl.b32 $0, packed, 16; "
            "and.b32 $1, packed, 0xffff0000; }",
            "=r,=r,r,r", [a, b], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
        return low_bits.to(tl.float32, bitcast=True), high_bits.to(tl.float32, bitcast=True)
    return bf16_round(a, NATIVE), bf16_round(b, NATIVE)


@triton.jit
def bf16_bits(v, NATIVE: tl.constexpr, NO_NAN: tl.constexpr = False):
    """float32 tensor -> bit pattern (int16) of its bfloat16 rounding (RNE): stored through an int16 view of the output.

    NATIVE: the hardware conversion (one instruction per two values), else integer arithmetic (``bf16_round`` says
    why). Either way NaN becomes 0x7FC0, PyTorch's bfloat16 NaN, not the GPU's canonical 0x7FFF; NO_NAN (the caller
    knows v holds no NaN) leaves out that per-element select."""
    if NATIVE:
        bits = v.to(tl.bfloat16).to(tl.int16, bitcast=True)
    else:
        word = v.to(tl.uint32, bitcast=True)
        bits = ((word + 0x7FFF + ((word >> 16) & 1)) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
    if NO_NAN:
        return bits
    return tl.where(v != v, tl.full(v.shape, 0x7FC0, tl.int16), bits)


@triton.jit
def store_values(ptrs, values, mask, OUT_BF16_BITS: tl.constexpr, NATIVE_BF16: tl.constexpr,
                 NO_NAN: tl.constexpr = False):
    """Store float32 values rounded (RNE) to the output: bfloat16 bits through an int16 view, else a plain cast
    (``bf16_bits`` says what NO_NAN leaves out)."""
    if OUT_BF16_BITS:
        tl.store(ptrs, bf16_bits(values, NATIVE_BF16, NO_NAN), mask=mask)
    else:
        tl.store(ptrs, values.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def join_halves(low, high):
    """The halves [R, NB, 8] of 16-chunks (elements 0-7 and 8-15 of each) -> the chunks [R, NB, 16]."""
    R: tl.constexpr = low.shape[0]
    NB: tl.constexpr = low.shape[1]
    return tl.reshape(tl.permute(tl.join(low, high), (0, 1, 3, 2)), (R, NB, 16))


@triton.jit
def _bit_last(v, BIT: tl.constexpr):
    """v [R, NB, 2, 2, 2] (position bits 2, 1, 0) with the axis of bit BIT swapped with the last one (its own
    inverse)."""
    if BIT == 1:
        return tl.permute(v, (0, 1, 2, 4, 3))
    if BIT == 2:
        return tl.permute(v, (0, 1, 4, 3, 2))
    return v


@triton.jit
def _butterfly(v, BIT: tl.constexpr):
    """One Walsh-Hadamard stage on bit BIT of the last dim (size 8) of v [R, NB, 8]: (a + b, a - b) for each pair
    (a, b) of positions that differ only in that bit."""
    R: tl.constexpr = v.shape[0]
    NB: tl.constexpr = v.shape[1]
    a, b = tl.split(_bit_last(tl.reshape(v, (R, NB, 2, 2, 2)), BIT))
    return tl.reshape(_bit_last(tl.join(a + b, a - b), BIT), (R, NB, 8))


@triton.jit
def rht_halves(low, high, SIGN_MASK: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """TE's RHT (SPEC 1.6) of 16-chunks given as halves (``join_halves``) of BF16 values: float32 halves holding the
    BF16-rounded transform y = x diag(s) H / 4, H the 16x16 Sylvester Hadamard matrix.

    As a fast Walsh-Hadamard transform, H16 = H2 (x) H8: the signs (exact negations), three butterfly stages inside
    each half, one across the halves, the exact scaling by 1/4, one rounding to BF16. The chunk sits in one thread, so
    this is 4 additions per element on the FMA pipe, where a tensor-core product needs the operands moved into and
    out of its register layout. Every partial sum is bounded by the sum of the 16 magnitudes, so whenever the FP32
    sum of the chunk is exact (16 BF16 values spanning less than about 2^12) every stage is exact and the result is
    the exact transform rounded once, as TE's BF16 x BF16 -> FP32 tensor-core kernel gives; beyond that the last
    FP32 bit depends on the summation order, which differs between tensor cores, the CPU reference and this."""
    position = tl.arange(0, 8)
    low = low.to(tl.float32)
    high = high.to(tl.float32)
    low = tl.where(((SIGN_MASK >> position) & 1) == 1, -low, low)
    high = tl.where(((SIGN_MASK >> (position + 8)) & 1) == 1, -high, high)
    for bit in tl.static_range(3):
        low = _butterfly(low, bit)
        high = _butterfly(high, bit)
    return bf16_round_pair((low + high) * 0.25, (low - high) * 0.25, NATIVE_BF16)


@triton.jit
def rht_tile(x, BM: tl.constexpr, BK: tl.constexpr, SIGN_MASK: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """RHT of each 16-chunk of the rows of a bfloat16 tile [BM, BK] (SPEC 1.6) whose chunks are spread over threads
    (the pair kernels' transposed tiles), returned as float32 [BM, BK] holding bfloat16 values: a BF16 x BF16 matrix
    product with FP32 accumulation on the tensor cores, as TE's Hadamard kernel computes it, then one rounding to BF16.
    The tensor cores move the data between threads themselves; the butterflies of ``rht_halves`` would need a chunk in
    one thread, which a transposed tile does not give (Triton's layouts then exchange every value between threads
    several times). Both are the exact transform rounded once whenever the FP32 sum is exact (chunks spanning less
    than about 2^12 in magnitude); beyond that the last FP32 bit may depend on the accumulation order.
    Under Triton's CPU interpreter (not NATIVE_BF16), whose dot misreads BF16 operands, the same products are summed
    in FP32 from FP32 operands."""
    if NATIVE_BF16:
        chunks = tl.reshape(x.to(tl.bfloat16), (BM * BK // 16, 16))
        rotated = tl.dot(chunks, rht_matrix(SIGN_MASK).to(tl.bfloat16), out_dtype=tl.float32)
    else:
        chunks = tl.reshape(x.to(tl.float32), (BM * BK // 16, 16))
        rotated = tl.dot(chunks, rht_matrix(SIGN_MASK), input_precision="ieee", out_dtype=tl.float32)
    return tl.reshape(bf16_round(rotated, NATIVE_BF16), (BM, BK))
