"""The emulated layers under data parallelism, on 2 gloo ranks: per-rank amax by default (as TE), the group's amax
with ``amax_reduction="world"`` (each rank's operand is then its slice of the operand quantized from the concatenated
global tensor), weights never communicate, a NaN on one rank fails every rank, and SR streams differ per rank."""
from __future__ import annotations

import pytest
import torch

from quant import Policy, QuantError, Recipe, nvfp4
from tests.distributed.ranks import run_ranks

TOKENS = 32  # per rank, a multiple of 16: blocks along tokens never straddle two ranks
FEATURES = 64
# slot -> (operand layout: "rows" = [tokens, features], "cols" = [features, tokens]; RHT)
SLOTS = {"fprop_input": ("rows", False), "dgrad_grad": ("rows", False),
         "wgrad_input": ("cols", True), "wgrad_grad": ("cols", True)}


def local_tensor(rank: int) -> torch.Tensor:
    """[TOKENS, FEATURES] bf16; rank 1's values are 8x larger, so the ranks' amax differ."""
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(TOKENS, FEATURES, generator=generator) * (1 + 7 * rank)).to(torch.bfloat16)


def rn_policy(amax_reduction: str) -> Policy:  # round-to-nearest dY, so operands are comparable bit for bit
    return Policy(format="nvfp4", recipe=Recipe(disable_stochastic_rounding=True), amax_reduction=amax_reduction)


def _operand(layout: str, x: torch.Tensor) -> torch.Tensor:
    return x if layout == "rows" else x.t()


def _fields(q: nvfp4.NVFP4Tensor) -> dict[str, torch.Tensor]:
    return {"codes": q.codes, "scales": q.scales, "amax": q.amax}


def _quantize_slots(rank: int, world_size: int) -> dict:
    x = local_tensor(rank)
    out: dict = {}
    for mode in ("none", "world"):
        quantizer = rn_policy(mode).quantizer("fc", 0)
        out[mode] = {slot: _fields(quantizer.operand(slot, _operand(layout, x), torch.bfloat16, rht=rht))
                     for slot, (layout, rht) in SLOTS.items()}
    # Weights agree across ranks and are never reduced: rank 0 alone quantizes one (as the rank-0-only analysis
    # callbacks do); a collective in there would leave it waiting for rank 1, or corrupt the reduction below.
    if rank == 0:
        weight = torch.randn(FEATURES, FEATURES, generator=torch.Generator().manual_seed(7))
        out["weight_amax"] = rn_policy("world").quantizer("fc", 0).operand("fprop_weight", weight, torch.float32).amax
        out["weight_local_amax"] = weight.abs().amax()
    marker = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(marker)  # SUM: 3 if both ranks reach it with nothing else in flight
    out["marker"] = float(marker)
    # SR: the same dY on both ranks; a fresh stream, then a stream restored from a "checkpoint" (rank 0's state).
    sr = Policy(format="nvfp4", seed=5).quantizer("fc", 3)
    dy = local_tensor(0)
    out["sr_state"] = sr.sr_state()
    out["sr_codes"] = sr.operand("dgrad_grad", dy, torch.bfloat16).codes
    restored = Policy(format="nvfp4", seed=5).quantizer("fc", 3)
    restored.load_sr_state(Policy(format="nvfp4", seed=5).quantizer("fc", 3).sr_state())
    out["sr_codes_restored"] = restored.operand("dgrad_grad", dy, torch.bfloat16).codes
    return out


def _slice(reference: nvfp4.NVFP4Tensor, layout: str, rank: int) -> dict[str, torch.Tensor]:
    if layout == "rows":  # this rank's tokens are rows
        rows = slice(rank * TOKENS, (rank + 1) * TOKENS)
        return {"codes": reference.codes[rows], "scales": reference.scales[rows], "amax": reference.amax}
    # tokens are the blocked (last) dim: 2 codes per byte, one scale per 16 tokens
    codes = slice(rank * TOKENS // 2, (rank + 1) * TOKENS // 2)
    scales = slice(rank * TOKENS // 16, (rank + 1) * TOKENS // 16)
    return {"codes": reference.codes[:, codes], "scales": reference.scales[:, scales], "amax": reference.amax}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_quantize_slots, tmp_path_factory.mktemp("ranks"))


def test_amax_per_rank_by_default_and_global_when_reduced(ranks):
    world = torch.cat([local_tensor(0), local_tensor(1)])  # [2 * TOKENS, FEATURES], the concatenated global batch
    for slot, (layout, rht) in SLOTS.items():
        reference = nvfp4.quantize(_operand(layout, world), rht=rht)
        for rank, result in enumerate(ranks):
            expected = _slice(reference, layout, rank)
            reduced = result["world"][slot]
            for key in ("codes", "scales", "amax"):
                assert torch.equal(reduced[key], expected[key]), (slot, rank, key)
            own = nvfp4.quantize(_operand(layout, local_tensor(rank)), rht=rht)  # TE's default: this rank's amax
            for key, value in _fields(own).items():
                assert torch.equal(result["none"][slot][key], value), (slot, rank, key)
        assert ranks[0]["none"][slot]["amax"] < reference.amax  # so the two modes really differ on rank 0
        assert not torch.equal(ranks[0]["none"][slot]["scales"], ranks[0]["world"][slot]["scales"])


def test_weights_never_communicate(ranks):
    rank0, rank1 = ranks
    assert torch.equal(rank0["weight_amax"], rank0["weight_local_amax"])
    assert rank0["marker"] == rank1["marker"] == 3.0


def test_stochastic_rounding_streams_differ_per_rank(ranks):
    rank0, rank1 = ranks
    single = Policy(format="nvfp4", seed=5).quantizer("fc", 3)  # no process group: a single-process run
    assert torch.equal(rank0["sr_state"], single.sr_state())  # rank 0 keeps the single-process stream
    assert torch.equal(rank0["sr_codes"], single.operand("dgrad_grad", local_tensor(0), torch.bfloat16).codes)
    assert not torch.equal(rank1["sr_state"], rank0["sr_state"])
    assert not torch.equal(rank1["sr_codes"], rank0["sr_codes"])
    # After a resume every rank loads rank 0's saved state; the ranks still draw different bits.
    assert torch.equal(rank0["sr_codes_restored"], rank0["sr_codes"])
    assert not torch.equal(rank1["sr_codes_restored"], rank0["sr_codes_restored"])


def _quantize_with_a_nan_on_rank_1(rank: int, world_size: int) -> str:
    x = local_tensor(rank)
    if rank == 1:
        x[3, 5] = float("nan")
    try:
        rn_policy("world").quantizer("fc", 0).operand("wgrad_input", x.t(), torch.bfloat16, rht=True)
    except QuantError as exc:
        return str(exc)
    return "no error"


def test_a_nan_on_one_rank_fails_every_rank_instead_of_hanging(tmp_path):
    rank0, rank1 = run_ranks(_quantize_with_a_nan_on_rank_1, tmp_path)
    assert "'fc input (wgrad)' contains 1 NaN" in rank1
    assert "'fc input (wgrad)' is finite on this rank but NaN or Inf on another rank" in rank0
