"""Triton device functions for the rounding rules of ``quant.numerics``, one IEEE binary32 operation at a time.

Why a second copy of rules that exist in ``quant.numerics``: a kernel cannot call PyTorch ops, so each rule is written
again here with scalar Triton arithmetic, and ``tests/quant/test_kernels.py`` holds the two copies to the same bytes.
What is load-bearing (each item was a way to silently break bit-compatibility):

* No PTX cast does the rounding. E4M3 is computed from the float32 exponent bits and one round-half-even to an integer
  (``round_half_even``: ``(v + 2^23) - 2^23``, exact for 0 <= v < 2^22 in IEEE float32), so the result does not depend
  on how a given Triton/PTX version lowers ``float8e4nv`` casts (saturation and subnormals differ between paths).
* Multiplications by powers of two are built from bit patterns (``exp2i``) and are exact; no ``exp2``/``log2`` call.
* E2M1 round-to-nearest is a chain of comparisons against the interval table of SPEC 1.3 (ties 0.75, 1.75, 3.5 up;
  0.25, 1.25, 2.5, 5 down; saturation above 5), exactly ``numerics.e2m1_encode_rne``.
* Stochastic rounding follows TE's software fallback (SPEC 1.7): ``t = a + u * step(a)`` (``u * step`` is exact, so
  FMA contraction cannot change it), ``floor(t / step(t)) * step(t)`` with the division done as an exact
  multiplication by a power of two, saturated at 6.
* Divisions that must be correctly rounded use ``tl.div_rn``: Triton's ``/`` on float32 lowers to the approximate
  ``div.full.f32`` on NVIDIA GPUs. Kernels are also launched with ``enable_fp_fusion=False``.
"""
import triton
import triton.language as tl


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
def e2m1_rne_index(a):
    """|y| (float32, >= 0, may be +inf) -> E2M1 magnitude index 0..7 (int32), RNE with saturation (SPEC 1.3)."""
    index = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    index += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    return index


@triton.jit
def e2m1_magnitude(index):
    """E2M1 magnitude index 0..7 (int32) -> grid value 0, 0.5, 1, 1.5, 2, 3, 4, 6 (float32)."""
    high = tl.where(index == 4, 2.0, tl.where(index == 5, 3.0, tl.where(index == 6, 4.0, 6.0)))
    return tl.where(index < 4, index.to(tl.float32) * 0.5, high)


@triton.jit
def e2m1_index_of_magnitude(m):
    """Exact E2M1 grid value (float32) -> its magnitude index (int32)."""
    return (m >= 0.5).to(tl.int32) + (m >= 1.0).to(tl.int32) + (m >= 1.5).to(tl.int32) + (m >= 2.0).to(tl.int32) \
        + (m >= 3.0).to(tl.int32) + (m >= 4.0).to(tl.int32) + (m >= 6.0).to(tl.int32)


@triton.jit
def _e2m1_step(a):
    return tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))


@triton.jit
def e2m1_sr_magnitude(a, u):
    """Stochastic E2M1 rounding of |y| = a with u = k/256 (float32): TE's software fallback (SPEC 1.7)."""
    t = a + u * _e2m1_step(a)
    inv_step_t = tl.where(t < 2.0, 2.0, tl.where(t < 4.0, 1.0, 0.5))
    return tl.minimum(tl.floor(t * inv_step_t) * _e2m1_step(t), 6.0)


@triton.jit
def with_sign(magnitude, negative):
    """float32 magnitude (>= 0) with its sign bit set where ``negative``: -0.0 stays -0.0.

    Done on the bits because the GPU compiler does not keep the sign of zero through ``where(c, -m, m)`` (seen on an
    H100 with Triton 3.6: code 8 decoded to +0.0, while TE's dequantize gives -0.0)."""
    bits = magnitude.to(tl.uint32, bitcast=True) | (negative.to(tl.uint32) << 31)
    return bits.to(tl.float32, bitcast=True)


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
def bf16_round(v):
    """float32 -> the float32 value of its bfloat16 rounding (RNE, overflow to inf, NaN kept), by integer arithmetic.

    Used instead of ``.to(tl.bfloat16)`` because Triton's CPU interpreter truncates that cast; on the GPU both are
    ``cvt.rn.bf16.f32``. NaN is passed through: the integer rounding would carry the GPU's canonical NaN 0x7FFFFFFF
    into the sign bit and return -0.0, silently turning a NaN into a finite value."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, rounded)


@triton.jit
def bf16_bits(v):
    """float32 -> bit pattern (int16) of its bfloat16 rounding (RNE): stored through an int16 view of the output.

    NaN becomes 0x7FC0, PyTorch's bfloat16 NaN (the integer rounding alone would turn the GPU's canonical NaN
    0x7FFFFFFF into 0x8000, i.e. -0.0)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(v != v, 0x7FC0, rounded).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def store_values(ptrs, values, mask, OUT_BF16_BITS: tl.constexpr):
    """Store float32 values rounded (RNE) to the output: bfloat16 bits through an int16 view, else a plain cast."""
    if OUT_BF16_BITS:
        tl.store(ptrs, bf16_bits(values), mask=mask)
    else:
        tl.store(ptrs, values.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def rht_tile(x, BM: tl.constexpr, BK: tl.constexpr, SIGN_MASK: tl.constexpr):
    """RHT of each 16-chunk of the rows of a bfloat16 tile [BM, BK] (SPEC 1.6), returned as float32 [BM, BK] holding
    bfloat16 values. The products of BF16 inputs with +-1/4 are exact in float32 and the 16 products are summed with
    IEEE float32 FMAs (``input_precision="ieee"``: no TF32, no tensor-core accumulation), then rounded once to BF16."""
    chunks = tl.reshape(x.to(tl.float32), (BM * BK // 16, 16))
    rotated = tl.dot(chunks, rht_matrix(SIGN_MASK).to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    return tl.reshape(bf16_round(rotated), (BM, BK))
