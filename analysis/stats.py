"""Statistics of weights, gradients and their quantized forms, computed in float64 with torch.

Why torch and not scipy: the callbacks run these on every quantized layer during training, and torch is fast on
the tensors we already hold. scipy/numpy are the independent references in ``tests/analysis/test_stats.py``.

Definitions (load-bearing: plots, tables and docs quote them):

* **Excess (Fisher) kurtosis**, biased moment estimator, identical to
  ``scipy.stats.kurtosis(x, fisher=True, bias=True)``: ``m4 / m2**2 - 3`` with ``m_k = mean((x - mean(x))**k)``.
  Gaussian 0, uniform -1.2, Laplace 3. A tensor (or block) with zero variance has no kurtosis: NaN, as in scipy.
  For n values the Pearson kurtosis ``m4 / m2**2`` is at most ``n - 2 + 1/(n - 1)``; for a 16-value NVFP4 block
  that is 14.0667 (excess 11.0667), reached by one non-zero value among 16.
* Granularities: **per tensor** (flattened), **per output channel** (row ``i`` of the weight viewed as
  ``[out, -1]``; summarised by median and max) and **per 16-block** (16 consecutive elements along the last,
  reduction, dimension of the 2-D operand, the NVFP4 1-D block; a trailing partial block uses its own values;
  summarised by median, 99th percentile and max over blocks with non-zero variance).
* **SNR** in dB: ``10 * log10(sum(x**2) / sum((x - x_hat)**2))`` in float64; +inf when ``x_hat == x``.
* **Clip rate**: fraction of elements whose code has the format's largest magnitude, whose block scale is
  non-zero (``x_hat != 0``), and whose magnitude exceeds the decoded value (``|x| > |x_hat|``): the element lay
  beyond the block's largest representable value and was saturated.
* **Code utilisation**: number of distinct stored codes (of the 16 four-bit codes) used by a tensor;
  **code entropy**: Shannon entropy in bits of the code histogram (at most 4).
* **Scale statistics**: histogram of the raw E4M3 scale bytes, fraction of zero scales and of subnormal scales
  (which scales are subnormal is decided by ``quant``, see ``analysis.quant_state``).
"""
from __future__ import annotations

import math

import torch

NVFP4_BLOCK = 16

TENSOR_STATS = ("mean", "std", "absmax", "rms", "kurtosis", "kurtosis_channel_median", "kurtosis_channel_max",
                "kurtosis_block_median", "kurtosis_block_p99", "kurtosis_block_max")
ERROR_STATS = ("snr_db", "rel_mse", "max_abs_err", "clip_rate")
CODE_STATS = ("codes_used", "code_entropy_bits", "scale_zero_rate", "scale_subnormal_rate")


def _excess_kurtosis_rows(rows: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis of each row of ``rows`` [R, L] (float64, no NaN) -> [R]; NaN where a row has zero variance."""
    centered = rows - rows.mean(dim=1, keepdim=True)  # [R, L]
    sq = centered.square()
    m2 = sq.mean(dim=1)  # [R]
    m4 = sq.square().mean(dim=1)  # [R]
    out = m4 / m2.square() - 3.0
    # Zero variance, decided relative to the data's magnitude: float64 rounding in the mean leaves m2 ~ 1e-33 on
    # a constant row, which would otherwise produce a spurious finite kurtosis.
    degenerate = m2 <= (rows.abs().amax(dim=1) * 1e-12).square()
    return out.masked_fill(degenerate, math.nan)


def excess_kurtosis(x: torch.Tensor) -> float:
    """Excess kurtosis of the flattened tensor (scipy ``kurtosis(x.ravel(), fisher=True, bias=True)``)."""
    return float(_excess_kurtosis_rows(x.detach().reshape(1, -1).to(torch.float64))[0])


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """View a weight or gradient as ``[out, -1]`` (dim 0 kept); a 1-D tensor becomes one row."""
    return x.detach().reshape(1, -1) if x.dim() < 2 else x.detach().reshape(x.shape[0], -1)


def channel_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis of each output channel: row ``i`` of ``as_matrix(x)`` -> float64 [out]."""
    return _excess_kurtosis_rows(as_matrix(x).to(torch.float64))


def block_kurtosis(x: torch.Tensor, block: int = NVFP4_BLOCK) -> torch.Tensor:
    """Excess kurtosis of each ``block``-element block along the last dim of ``as_matrix(x)`` -> float64 [n_blocks].

    Blocks are numbered row-major: ``[out, ceil(K / block)]`` flattened. A trailing partial block is evaluated on
    its own ``K % block`` values (the quantizer's zero padding is not data).
    """
    rows = as_matrix(x).to(torch.float64)  # [M, K]
    m, k = rows.shape
    full = k // block
    out = torch.empty(m, -(-k // block), dtype=torch.float64)  # [M, n_blocks]
    out[:, :full] = _excess_kurtosis_rows(rows[:, : full * block].reshape(m * full, block)).reshape(m, full)
    if k % block:
        out[:, full] = _excess_kurtosis_rows(rows[:, full * block:])
    return out.reshape(-1)


def quantile(values: torch.Tensor, q: float) -> float:
    """Quantile with linear interpolation (numpy's default) over the non-NaN values; NaN when there are none.

    Written with a sort because ``torch.quantile`` refuses inputs above 2**24 elements.
    """
    v = values[~torch.isnan(values)].to(torch.float64).sort().values
    if v.numel() == 0:
        return math.nan
    pos = q * (v.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def _nanmax(values: torch.Tensor) -> float:
    v = values[~torch.isnan(values)]
    return float(v.max()) if v.numel() else math.nan


def tensor_stats(x: torch.Tensor) -> dict[str, float]:
    """Moments and kurtosis at the three granularities, keys ``TENSOR_STATS``. ``std`` is the population std."""
    x64 = x.detach().to(torch.float64)
    channel = channel_kurtosis(x64)
    blocks = block_kurtosis(x64)
    return {
        "mean": float(x64.mean()),
        "std": float(x64.std(correction=0)),
        "absmax": float(x64.abs().max()),
        "rms": float(x64.square().mean().sqrt()),
        "kurtosis": excess_kurtosis(x64),
        "kurtosis_channel_median": quantile(channel, 0.5),
        "kurtosis_channel_max": _nanmax(channel),
        "kurtosis_block_median": quantile(blocks, 0.5),
        "kurtosis_block_p99": quantile(blocks, 0.99),
        "kurtosis_block_max": _nanmax(blocks),
    }


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(signal energy / error energy)`` in float64; +inf for an exact copy, NaN for an all-zero reference."""
    ref = reference.detach().to(torch.float64)
    err = approx.detach().to(torch.float64) - ref
    signal = float(ref.square().sum())
    noise = float(err.square().sum())
    if noise == 0.0:
        return math.inf if signal > 0 else math.nan
    if signal == 0.0:
        return math.nan
    return 10.0 * math.log10(signal / noise)


def clip_rate(x: torch.Tensor, x_hat: torch.Tensor, code_magnitude: torch.Tensor, max_magnitude: float) -> float:
    """Fraction of saturated elements (definition in the module docstring).

    ``code_magnitude`` is ``|grid value|`` of each element's code, same shape as ``x``; ``max_magnitude`` the
    format's largest grid magnitude (6 for E2M1), both from ``quant``.
    """
    x64 = x.detach().to(torch.float64)
    xh = x_hat.detach().to(torch.float64)
    clipped = (code_magnitude == max_magnitude) & (xh != 0) & (x64.abs() > xh.abs())
    return float(clipped.to(torch.float64).mean())


def error_stats(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """SNR, relative MSE (``1 / 10**(snr/10)``) and max absolute error of ``x_hat`` against ``x``."""
    snr = snr_db(x, x_hat)
    err = (x_hat.detach().to(torch.float64) - x.detach().to(torch.float64)).abs()
    return {
        "snr_db": snr,
        "rel_mse": 10.0 ** (-snr / 10.0) if math.isfinite(snr) else (0.0 if snr > 0 else math.nan),
        "max_abs_err": float(err.max()),
    }


def code_histogram(codes: torch.Tensor, n_codes: int = 16) -> torch.Tensor:
    """Counts of each stored code value ``0..n_codes-1`` -> int64 [n_codes]. ``codes`` holds one code per element."""
    return torch.bincount(codes.reshape(-1).to(torch.int64), minlength=n_codes)


def entropy_bits(counts: torch.Tensor) -> float:
    """Shannon entropy in bits of a histogram (0 for an empty or single-bin histogram)."""
    c = counts.to(torch.float64)
    total = float(c.sum())
    if total == 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * p.log2()).sum()) + 0.0


def code_stats(codes: torch.Tensor, scale_values: torch.Tensor, scale_subnormal: torch.Tensor,
               n_codes: int = 16) -> dict[str, float]:
    """Code utilisation and entropy, zero- and subnormal-scale rates; keys ``CODE_STATS``.

    ``scale_values``: decoded block scales (float); ``scale_subnormal``: bool mask of the same shape.
    """
    hist = code_histogram(codes, n_codes)
    n_scales = max(scale_values.numel(), 1)
    return {
        "codes_used": float((hist > 0).sum()),
        "code_entropy_bits": entropy_bits(hist),
        "scale_zero_rate": float((scale_values == 0).sum()) / n_scales,
        "scale_subnormal_rate": float(scale_subnormal.sum()) / n_scales,
    }


def byte_histogram(scale_bytes: torch.Tensor) -> torch.Tensor:
    """Counts of each raw scale byte value ``0..255`` -> int64 [256]."""
    return torch.bincount(scale_bytes.reshape(-1).to(torch.int64), minlength=256)


def kurtosis_standard_error(n: int) -> float:
    """Standard deviation of the biased excess kurtosis of ``n`` Gaussian samples (Fisher 1930, exact):
    ``sqrt(24 n (n-2) (n-3) / ((n+1)^2 (n+3) (n+5)))``, about ``sqrt(24 / n)`` for large n; inf for n <= 3."""
    if n <= 3:
        return math.inf
    return math.sqrt(24.0 * n * (n - 2) * (n - 3) / ((n + 1) ** 2 * (n + 3) * (n + 5)))


def robust_z(values: torch.Tensor, min_scale: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Robust z-score ``(v - median) / max(1.4826 * MAD, min_scale)`` (MAD = median absolute deviation) -> float64.

    1.4826 makes the MAD a consistent estimator of a Gaussian's std. ``min_scale`` (a number or one per value) is a
    floor on the spread, e.g. the sampling noise of each value. With a zero spread (more than half the values equal
    and no floor) a value equal to the median scores 0 and any other value +-inf. NaN inputs give NaN and are
    ignored by the medians.
    """
    v = values.to(torch.float64)
    med = quantile(v, 0.5)
    if math.isnan(med):
        return torch.full_like(v, math.nan)
    diff = v - med
    scale = torch.clamp(torch.as_tensor(min_scale, dtype=torch.float64),
                        min=1.4826 * quantile(diff.abs(), 0.5)).expand_as(v)
    return torch.where(scale > 0, diff / scale, torch.where(diff == 0, 0.0, diff * math.inf))


def rankdata(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank (scipy ``rankdata(method="average")``) -> float64."""
    v = values.to(torch.float64)
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    ranks = torch.empty_like(v)
    n = v.numel()
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation over pairs where both values are finite; NaN with fewer than 3 pairs."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    keep = torch.isfinite(a64) & torch.isfinite(b64)
    if int(keep.sum()) < 3:
        return math.nan
    ra, rb = rankdata(a64[keep]), rankdata(b64[keep])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan
