"""The 16-point Random Hadamard Transform that TE applies to the wgrad operands before NVFP4 (SPEC_NVFP4.md 1.6).

Why: NVFP4 block scales follow the block max, so one outlier coarsens its 15 neighbours. Rotating each 16-chunk of
the reduction dimension by an orthogonal matrix spreads outliers across the chunk; since T T^T = I, applying T to both
operands of `dW = dY^T X` along the token dimension cancels inside the dot product and no inverse is needed.

What is load-bearing for bit-compatibility with TE:
* T = diag(s) H / 4 with the 16x16 Sylvester Hadamard H[i][j] = (-1)^popcount(i & j) and TE's one fixed sign vector
  s (the same for every layer and step). Entries are +-1/4, exact in BF16 and FP32.
* y_row = x_row T for each contiguous 16-chunk of the last dim, i.e. y_j = 1/4 sum_i x_i s_i H[i][j].
* BF16 input only (TE: "RHT is only supported for bfloat16 input"); products are exact, the sum is taken in FP32 and
  the result rounded once to BF16, and quantization (including the global amax) runs on that BF16 tensor.
  The FP32 sum of 16 exact products is exact unless the chunk spans more than about 2^12 in magnitude; beyond that
  the summation order of TE's MMA and of this matmul could differ in the last FP32 bit before the BF16 rounding.
"""

import torch
from torch import Tensor

from quant.errors import QuantError, describe

# TE's wgrad sign vector (transformer_engine/pytorch/tensor/nvfp4_tensor.py, get_wgrad_sign_vector).
SIGN_VECTOR = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
CHUNK = 16


def hadamard_matrix() -> Tensor:
    """Unnormalised 16x16 Sylvester Hadamard matrix H[i][j] = (-1)^popcount(i & j), float32 [16, 16]."""
    idx = torch.arange(CHUNK)
    parity = torch.zeros(CHUNK, CHUNK, dtype=torch.int64)
    both = idx[:, None] & idx[None, :]
    for bit in range(4):
        parity ^= (both >> bit) & 1
    return (1 - 2 * parity).to(torch.float32)


def rht_matrix(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """T = diag(SIGN_VECTOR) H / 4, [16, 16]; orthogonal, entries +-0.25 (exact in any float dtype)."""
    signs = torch.tensor(SIGN_VECTOR, dtype=torch.float32)
    return (signs[:, None] * hadamard_matrix() * 0.25).to(dtype=dtype, device=device)


def _check_chunks(x: Tensor, name: str | None) -> None:
    if x.dim() == 0 or x.shape[-1] % CHUNK:
        raise QuantError(
            f"RHT: {describe(name)} has shape {tuple(x.shape)}; the last dim must be a multiple of {CHUNK} "
            "(the transform acts on 16-element chunks; pad tokens to a multiple of 64, SPEC 1.5)"
        )


def apply(x: Tensor, name: str | None = None) -> Tensor:
    """TE's forward RHT along the last dim: BF16 [..., K] -> BF16 [..., K], K % 16 == 0."""
    if x.dtype != torch.bfloat16:
        raise QuantError(
            f"RHT: {describe(name)} has dtype {x.dtype}; RHT is only supported for bfloat16 input (as in TE): "
            "run the NVFP4 arm with bfloat16 activations, or disable RHT"
        )
    _check_chunks(x, name)
    chunks = x.reshape(*x.shape[:-1], x.shape[-1] // CHUNK, CHUNK).to(torch.float32)  # [..., K/16, 16]
    y = torch.matmul(chunks, rht_matrix(device=x.device))  # exact products, FP32 sums
    return y.to(torch.bfloat16).reshape(x.shape)


def invert(y: Tensor, name: str | None = None) -> Tensor:
    """Undo the transform in float32 (y T^T per 16-chunk): for analysis in the original basis, never used by TE."""
    _check_chunks(y, name)
    chunks = y.reshape(*y.shape[:-1], y.shape[-1] // CHUNK, CHUNK).to(torch.float32)  # [..., K/16, 16]
    return torch.matmul(chunks, rht_matrix(device=y.device).t()).reshape(y.shape)
