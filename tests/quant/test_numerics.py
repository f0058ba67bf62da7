"""Rounding rules of quant.numerics: E2M1 (SPEC 1.3, 1.7), E4M3/E5M2 (SPEC 2), E8M0 (SPEC 7.1), packing."""

import math

import numpy as np
import pytest
import torch

from quant import numerics


def f32_next(value: float, direction: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(direction)))


# ---- E2M1 round to nearest even ----------------------------------------------------------------------------------

# (threshold, code at the threshold, code one float32 ulp below, code one ulp above): SPEC 1.3 by hand.
E2M1_THRESHOLDS = [
    (0.25, 0, 0, 1),
    (0.75, 2, 1, 2),
    (1.25, 2, 2, 3),
    (1.75, 4, 3, 4),
    (2.5, 4, 4, 5),
    (3.5, 6, 5, 6),
    (5.0, 6, 6, 7),
]


@pytest.mark.parametrize(("t", "at", "below", "above"), E2M1_THRESHOLDS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_e2m1_every_threshold_exactly_and_one_ulp_either_side(t, at, below, above, sign):
    values = torch.tensor([t, f32_next(t, 0.0), f32_next(t, 100.0)], dtype=torch.float32) * sign
    codes = numerics.e2m1_encode_rne(values).tolist()
    sign_bit = 8 if sign < 0 else 0
    assert codes == [at | sign_bit, below | sign_bit, above | sign_bit]


def test_e2m1_grid_points_saturation_and_signed_zero():
    grid = torch.tensor(numerics.E2M1_GRID)
    assert numerics.e2m1_encode_rne(grid).tolist() == list(range(8))
    assert numerics.e2m1_encode_rne(-grid[1:]).tolist() == list(range(9, 16))
    specials = torch.tensor([6.0001, 1e30, float("inf"), -float("inf"), -0.0, -0.1, 0.0])
    assert numerics.e2m1_encode_rne(specials).tolist() == [7, 7, 7, 15, 0, 8, 0]
    assert numerics.e2m1_values(torch.arange(16, dtype=torch.uint8)).tolist() == [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0
    ]  # fmt: skip


def test_e2m1_random_values_against_nearest_even_search():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(20000, generator=g) * 14 - 7).to(torch.float32)
    grid = np.array(numerics.E2M1_GRID)
    mags = np.abs(y.numpy().astype(np.float64))
    dist = np.abs(mags[:, None] - grid[None, :])
    best = np.argmin(dist + 1e-9 * (np.arange(8) % 2), axis=1)  # exact ties prefer the even code
    expected = best | np.where(y.numpy() < 0, 8, 0)
    assert numerics.e2m1_encode_rne(y).numpy().tolist() == expected.tolist()


# ---- E2M1 stochastic rounding (SPEC 1.7) ---------------------------------------------------------------------------


def _fallback_reference(y: float, k: int) -> float:
    """TE's stochastic_round_fp4_e2m1 in numpy float32: fma(u, step(a), a), floor(t / step(t)) * step(t), min 6."""

    def step(a):
        return np.float32(0.5) if a < 2 else np.float32(1) if a < 4 else np.float32(2)

    a = np.float32(abs(y))
    t = np.float32(np.float64(k / 256) * np.float64(step(a)) + np.float64(a))  # the fma: one rounding
    return min(math.floor(t / step(t)) * float(step(t)), 6.0) * (-1 if y < 0 else 1)


def test_t6_exact_count_of_round_ups_over_all_256_random_bytes():
    y = torch.full((256,), 2.3, dtype=torch.float32)
    codes = numerics.e2m1_encode_stochastic(y, torch.arange(256, dtype=torch.int32).to(torch.uint8))
    ups = (codes == 5).nonzero().flatten().tolist()
    assert ups == list(range(180, 256))  # 76 of 256: P(up) = 76/256 = 0.296875
    assert codes[:180].eq(4).all()


def test_stochastic_rounding_matches_the_software_fallback():
    g = torch.Generator().manual_seed(1)
    y = torch.cat([torch.rand(400, generator=g) * 14 - 7, torch.tensor(numerics.E2M1_GRID), torch.tensor([7.5, -9.0])])
    for k in (0, 1, 77, 128, 200, 255):
        codes = numerics.e2m1_encode_stochastic(y, torch.full(y.shape, k, dtype=torch.uint8))
        got = numerics.e2m1_values(codes).tolist()
        assert got == [_fallback_reference(float(v), k) for v in y]


def test_stochastic_rounding_keeps_grid_values_and_zero():
    grid = torch.tensor(numerics.E2M1_GRID).repeat(256)
    random_bits = torch.arange(256).repeat_interleave(8).to(torch.uint8)
    assert torch.equal(numerics.e2m1_values(numerics.e2m1_encode_stochastic(grid, random_bits)), grid)


# ---- E4M3 and E5M2 -------------------------------------------------------------------------------------------------

SPEC_E4M3_BYTES = {1.0: 0x38, 1.125: 0x39, 1.25: 0x3A, 56.0: 0x66, 320.0: 0x7A, 352.0: 0x7B, 448.0: 0x7E, 2**-9: 0x01}


def test_e4m3_bytes_listed_in_spec():
    values = torch.tensor(list(SPEC_E4M3_BYTES), dtype=torch.float32)
    assert numerics.e4m3_encode(values).tolist() == list(SPEC_E4M3_BYTES.values())
    assert numerics.e4m3_decode(torch.tensor(list(SPEC_E4M3_BYTES.values()), dtype=torch.uint8)).tolist() == list(
        SPEC_E4M3_BYTES
    )


@pytest.mark.parametrize(
    ("value", "byte"),
    [
        (1.0625, 0x38),  # tie between 1.0 and 1.125 -> even mantissa (T2 B1)
        (1.1875, 0x3A),  # tie between 1.125 and 1.25 -> 1.25
        (336.0, 0x7A),  # tie between 320 and 352 -> 320 (T3, two-rounding order)
        (f32_next(336.0, 1e9), 0x7B),  # one ulp above the tie (T3, TE's order)
        (2**-10, 0x00),  # subnormal tie between 0 and 2^-9 -> 0
        (f32_next(2**-10, 1.0), 0x01),
        (3 * 2**-10, 0x02),  # tie between 1 and 2 (x 2^-9) -> 2
        (5 * 2**-10, 0x02),  # tie between 2 and 3 -> 2
        (15 * 2**-10, 0x08),  # tie between 7 * 2^-9 and 2^-6 (the smallest normal) -> 2^-6
        (0.0016666667, 0x01),  # T2 B4: 0.853 * 2^-9
        (0.00083333, 0x00),  # T2 B5: 0.427 * 2^-9
        (1e-30, 0x00),
        (0.0, 0x00),
        (449.0, 0x7E),  # saturation, never NaN
        (480.0, 0x7E),
        (1e30, 0x7E),
        (float("inf"), 0x7E),
        (-448.0, 0xFE),
        (-(2**-9), 0x81),
    ],
)
def test_e4m3_ties_subnormals_and_saturation(value, byte):
    assert numerics.e4m3_encode(torch.tensor([value], dtype=torch.float32)).item() == byte


def test_e4m3_table_matches_torch_float8():
    table = numerics.e4m3_decode(torch.arange(256, dtype=torch.int32).to(torch.uint8))
    theirs = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(table.isnan(), theirs.isnan())
    finite = ~table.isnan()
    assert torch.equal(table[finite], theirs[finite])


def _probe_values(table: torch.Tensor, max_value: float) -> torch.Tensor:
    """Every representable value, every midpoint, +-1 float32 ulp around them, and random floats (both signs)."""
    grid = table[torch.isfinite(table) & (table >= 0)].sort().values.double()
    mids = ((grid[1:] + grid[:-1]) / 2).float()
    points = torch.cat([grid.float(), mids])
    up, down = torch.nextafter(points, torch.tensor(1e38)), torch.nextafter(points, torch.tensor(0.0))
    around = torch.cat([points, up, down])
    g = torch.Generator().manual_seed(7)
    random = torch.exp(torch.rand(50000, generator=g) * 60 - 45)  # ~1e-20 .. ~1e6
    probe = torch.cat([around, random, torch.tensor([2 * max_value, 1e38])])
    return torch.cat([probe, -probe])


@pytest.mark.parametrize(
    ("encode", "decode", "dtype", "max_value"),
    [
        (numerics.e4m3_encode, numerics.e4m3_decode, torch.float8_e4m3fn, numerics.E4M3_MAX),
        (numerics.e5m2_encode, numerics.e5m2_decode, torch.float8_e5m2, numerics.E5M2_MAX),
    ],
)
def test_fp8_encode_matches_torch_cast_after_clamping(encode, decode, dtype, max_value):
    table = decode(torch.arange(256, dtype=torch.int32).to(torch.uint8))
    x = _probe_values(table, max_value)
    theirs = x.clamp(-max_value, max_value).to(dtype).view(torch.uint8)
    assert torch.equal(encode(x), theirs)
    assert torch.equal(decode(encode(x)), x.clamp(-max_value, max_value).to(dtype).float())


def test_e5m2_specials():
    values = torch.tensor([57344.0, 61440.0, 1e9, 2**-16, 2**-17, 3 * 2**-17, 1.0], dtype=torch.float32)
    assert numerics.e5m2_encode(values).tolist() == [0x7B, 0x7B, 0x7B, 0x01, 0x00, 0x02, 0x3C]
    assert numerics.e5m2_decode(torch.tensor([0x7C, 0xFC], dtype=torch.uint8)).tolist() == [math.inf, -math.inf]


# ---- E8M0, exponent helpers, packing ------------------------------------------------------------------------------


def test_e8m0_round_trip_and_specials():
    codes = torch.tensor([0x00, 0x01, 0x7B, 0x7F, 0x80, 0xFE, 0xFF], dtype=torch.uint8)
    decoded = numerics.e8m0_decode(codes)
    assert decoded[:6].tolist() == [2.0**-127, 2.0**-126, 1 / 16, 1.0, 2.0, 2.0**127]
    assert math.isnan(decoded[6].item())
    assert numerics.e8m0_encode(torch.tensor([-127, -4, 0, 127])).tolist() == [0x00, 0x7B, 0x7F, 0xFE]


def test_exp2i_is_exact_over_the_whole_float32_range():
    k = torch.arange(-149, 128)
    assert numerics.exp2i(k).tolist() == [math.ldexp(1.0, int(v)) for v in k]


def test_floor_log2_is_exact_including_subnormals():
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(1, 0x7F800000, (20000,), generator=g, dtype=torch.int32)
    a = raw.view(torch.float32)
    expected = [math.frexp(v)[1] - 1 for v in a.tolist()]
    assert numerics.floor_log2(a).tolist() == expected


def test_nibble_packing_orders():
    codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    low_first = numerics.pack_nibbles(codes)
    assert low_first.tolist() == [[0x21, 0x43, 0x05]]
    assert numerics.pack_nibbles(codes, high_first=True).tolist() == [[0x12, 0x34, 0x50]]
    assert numerics.unpack_nibbles(low_first)[:, :5].tolist() == codes.tolist()
    assert numerics.unpack_nibbles(numerics.pack_nibbles(codes, True), True)[:, :5].tolist() == codes.tolist()


def test_e4m3_smallest_normal_is_torchs():
    # analysis counts scales below it as subnormal; torch's finfo is the independent reference
    assert numerics.E4M3_MIN_NORMAL == torch.finfo(torch.float8_e4m3fn).smallest_normal
    assert numerics.e4m3_decode(torch.tensor([0x08], dtype=torch.uint8)).item() == numerics.E4M3_MIN_NORMAL
