"""analysis.stats against independent references: scipy kurtosis, numpy histograms/percentiles, float64 SNR."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from analysis import stats


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform", "student3"])
def test_per_tensor_kurtosis_matches_scipy(dist: str) -> None:
    rng = np.random.default_rng(0)
    x = {"normal": rng.normal(size=(64, 48)), "laplace": rng.laplace(size=(64, 48)),
         "uniform": rng.uniform(-1, 1, size=(64, 48)), "student3": rng.standard_t(3, size=(64, 48))}[dist]
    expected = scipy.stats.kurtosis(x.ravel(), fisher=True, bias=True)
    assert stats.excess_kurtosis(torch.from_numpy(x).float()) == pytest.approx(
        scipy.stats.kurtosis(x.astype(np.float32).astype(np.float64).ravel(), fisher=True, bias=True), rel=1e-12)
    assert stats.excess_kurtosis(torch.from_numpy(x)) == pytest.approx(expected, rel=1e-12)


def test_known_kurtosis_values() -> None:
    # Two-point symmetric distribution: Pearson 1, excess -2. Scale mixture 50/50 of sigma 1 and 4: 3*(1+256)/2/
    # ((1+16)/2)^2 = 5.3356 Pearson (ECOSYSTEM F1), here checked on the exact population.
    assert stats.excess_kurtosis(torch.tensor([-1.0, 1.0] * 8)) == pytest.approx(-2.0, abs=1e-12)
    x = torch.randn(400_000, generator=_gen(1), dtype=torch.float64)
    mix = torch.cat([x[:200_000], 4 * x[200_000:]])
    assert stats.excess_kurtosis(mix) + 3 == pytest.approx(3 * 257 / 2 / (17 / 2) ** 2, rel=0.03)


def test_constant_tensor_has_no_kurtosis() -> None:
    assert math.isnan(stats.excess_kurtosis(torch.full((32,), 0.7)))
    assert math.isnan(stats.excess_kurtosis(torch.zeros(32)))
    with pytest.warns(RuntimeWarning):  # scipy warns about the cancellation and returns NaN as well
        assert math.isnan(scipy.stats.kurtosis(np.full(32, 0.7)))


def test_channel_kurtosis_matches_scipy_rows() -> None:
    w = torch.randn(8, 4, 3, 3, generator=_gen(2), dtype=torch.float64)  # conv weight [out, in, kh, kw]
    expected = scipy.stats.kurtosis(w.reshape(8, -1).numpy(), axis=1, fisher=True, bias=True)
    np.testing.assert_allclose(stats.channel_kurtosis(w).numpy(), expected, rtol=1e-12)


def test_block_kurtosis_matches_scipy_blocks_including_partial_tail() -> None:
    w = torch.randn(5, 40, generator=_gen(3), dtype=torch.float64)  # 40 = 16 + 16 + 8
    got = stats.block_kurtosis(w).reshape(5, 3)
    blocks = w.numpy()
    for r in range(5):
        for b, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 40)]):
            assert got[r, b].item() == pytest.approx(scipy.stats.kurtosis(blocks[r, lo:hi], bias=True), rel=1e-12)


def test_block_kurtosis_bound_reached_by_one_spike() -> None:
    """Pearson kurtosis of n values is at most n - 2 + 1/(n - 1): 14.0667 for 16 (excess 11.0667)."""
    spike = torch.zeros(1, 16, dtype=torch.float64)
    spike[0, 5] = -3.0
    bound_excess = 16 - 2 + 1 / 15 - 3
    assert stats.block_kurtosis(spike)[0].item() == pytest.approx(bound_excess, rel=1e-12)
    assert bound_excess == pytest.approx(11.0667, abs=1e-4)
    assert scipy.stats.kurtosis(spike.numpy().ravel(), bias=True) == pytest.approx(bound_excess, rel=1e-12)
    heavy = torch.distributions.StudentT(1.0).sample((4096, 16))  # Cauchy: the heaviest tails we can draw
    assert float(stats.block_kurtosis(heavy).nan_to_num(0).max()) <= bound_excess + 1e-9


def test_tensor_stats_summaries_match_numpy() -> None:
    w = torch.randn(12, 64, generator=_gen(4), dtype=torch.float64) * torch.linspace(0.1, 3, 12)[:, None]
    s = stats.tensor_stats(w)
    a = w.numpy()
    assert s["mean"] == pytest.approx(a.mean(), rel=1e-12, abs=1e-15)
    assert s["std"] == pytest.approx(a.std(), rel=1e-12)
    assert s["absmax"] == pytest.approx(np.abs(a).max())
    assert s["rms"] == pytest.approx(np.sqrt((a ** 2).mean()), rel=1e-12)
    channel = scipy.stats.kurtosis(a, axis=1, bias=True)
    assert s["kurtosis_channel_median"] == pytest.approx(np.median(channel), rel=1e-12)
    assert s["kurtosis_channel_max"] == pytest.approx(channel.max(), rel=1e-12)
    blocks = scipy.stats.kurtosis(a.reshape(-1, 16), axis=1, bias=True)
    assert s["kurtosis_block_median"] == pytest.approx(np.median(blocks), rel=1e-12)
    assert s["kurtosis_block_p99"] == pytest.approx(np.percentile(blocks, 99), rel=1e-12)
    assert s["kurtosis_block_max"] == pytest.approx(blocks.max(), rel=1e-12)


def test_quantile_matches_numpy_and_ignores_nan() -> None:
    v = torch.randn(1001, generator=_gen(5), dtype=torch.float64)
    v[::7] = math.nan
    for q in (0.0, 0.25, 0.5, 0.99, 1.0):
        assert stats.quantile(v, q) == pytest.approx(np.nanpercentile(v.numpy(), q * 100), rel=1e-12)
    assert math.isnan(stats.quantile(torch.full((3,), math.nan), 0.5))


def test_snr_in_float64() -> None:
    x = torch.randn(1000, generator=_gen(6), dtype=torch.float64)
    noise = 1e-3 * torch.randn(1000, generator=_gen(7), dtype=torch.float64)
    expected = 10 * np.log10((x.numpy() ** 2).sum() / (noise.numpy() ** 2).sum())
    assert stats.snr_db(x, x + noise) == pytest.approx(expected, rel=1e-12)
    assert stats.snr_db(x, x) == math.inf
    e = stats.error_stats(x, x + noise)
    assert e["rel_mse"] == pytest.approx((noise.numpy() ** 2).sum() / (x.numpy() ** 2).sum(), rel=1e-10)
    assert e["max_abs_err"] == pytest.approx(np.abs(noise.numpy()).max())
    # float32 inputs are promoted before the sums: a tiny error stays visible (no float32 cancellation to 0).
    x32 = torch.ones(4096)
    assert stats.snr_db(x32, x32 + 2 ** -20) == pytest.approx(10 * math.log10(2 ** 40), rel=1e-9)


def test_kurtosis_standard_error_matches_monte_carlo() -> None:
    x = np.random.default_rng(3).normal(size=(20000, 16))
    spread = scipy.stats.kurtosis(x, axis=1, bias=True).std()
    assert stats.kurtosis_standard_error(16) == pytest.approx(spread, rel=0.05)
    assert stats.kurtosis_standard_error(10 ** 6) == pytest.approx(np.sqrt(24 / 10 ** 6), rel=1e-4)
    assert stats.kurtosis_standard_error(3) == math.inf


def test_code_histogram_entropy_and_utilisation() -> None:
    codes = torch.randint(0, 16, (4096,), generator=_gen(8), dtype=torch.uint8)
    codes[:100] = 3
    np.testing.assert_array_equal(stats.code_histogram(codes).numpy(), np.histogram(codes.numpy(), bins=16,
                                                                                   range=(0, 16))[0])
    counts = np.bincount(codes.numpy(), minlength=16)
    assert stats.entropy_bits(torch.from_numpy(counts)) == pytest.approx(
        scipy.stats.entropy(counts, base=2), rel=1e-12)
    two = torch.tensor([0, 0, 7, 7], dtype=torch.uint8)
    s = stats.code_stats(two, scale_values=torch.tensor([0.0, 1.0, 2.0, 0.0]),
                         scale_subnormal=torch.tensor([False, False, True, False]))
    assert s == {"codes_used": 2.0, "code_entropy_bits": 1.0, "scale_zero_rate": 0.5, "scale_subnormal_rate": 0.25}


def test_clip_rate_counts_only_saturated_nonzero_scale_elements() -> None:
    x = torch.tensor([6.2, 5.9, -6.1, 0.3, 7.0])
    x_hat = torch.tensor([6.0, 6.0, -6.0, 0.5, 0.0])  # last: zero block scale, decodes to 0
    magnitude = torch.tensor([6.0, 6.0, 6.0, 0.5, 6.0])
    assert stats.clip_rate(x, x_hat, magnitude, 6.0) == pytest.approx(2 / 5)


def test_byte_histogram_matches_numpy() -> None:
    b = torch.randint(0, 127, (999,), generator=_gen(9), dtype=torch.uint8)
    np.testing.assert_array_equal(stats.byte_histogram(b).numpy(), np.bincount(b.numpy(), minlength=256))


def test_robust_z_and_spearman_against_references() -> None:
    v = torch.tensor([1.0, 1.2, 0.9, 1.1, 8.0, 1.05], dtype=torch.float64)
    med = np.median(v.numpy())
    mad = np.median(np.abs(v.numpy() - med))
    np.testing.assert_allclose(stats.robust_z(v).numpy(), (v.numpy() - med) / (1.4826 * mad), rtol=1e-12)
    assert stats.robust_z(torch.tensor([2.0, 2.0, 2.0, 5.0])).tolist() == [0.0, 0.0, 0.0, math.inf]
    floor = torch.tensor([0.1, 0.1, 10.0, 0.1, 0.1, 0.1], dtype=torch.float64)
    expected = (v.numpy() - med) / np.maximum(1.4826 * mad, floor.numpy())
    np.testing.assert_allclose(stats.robust_z(v, min_scale=floor).numpy(), expected, rtol=1e-12)
    a = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, math.nan, 4.0])
    b = torch.tensor([1.0, 0.5, 0.7, 0.9, 3.0, 1.0, math.inf])
    keep = np.isfinite(a.numpy()) & np.isfinite(b.numpy())
    expected = scipy.stats.spearmanr(a.numpy()[keep], b.numpy()[keep]).statistic
    assert stats.spearman(a, b) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(stats.rankdata(a[:5]).numpy(), scipy.stats.rankdata(a[:5].numpy()))
