"""Autograd functions of the QAT layers: the three GEMMs of linear, conv2d and conv_transpose2d, quantized per recipe.

Why custom autograd functions and not fake-quant + STE around ``F.linear``: TE's recipe quantizes each of the three
GEMMs' operands *differently* (dY with stochastic rounding, RHT on the wgrad operands along tokens, W^T requantized
along N without 2D tiles), which no straight-through composition reproduces. Each backward mode (``Recipe.backward``)
decides what the two backward GEMMs multiply:

* ``full``: every operand is quantized for its own GEMM (slots of ``quant.layer_formats``), in the format of its
  role; with NVFP4 on both sides the GEMM runs on scaled codes times TE's alpha, with two different formats (per-role
  formats, e.g. NVFP4 W and FP8 X) on the dequantized operands with FP32 accumulation (``quant.gemm``).
* ``dequantized``: dgrad ``dX = dY W_hat`` and wgrad ``dW = dY^T X_hat`` with the forward's dequantized operands
  and an unquantized dY, in the compute dtype (TE ``backward_override="dequantized"``).
* ``high_precision``: the original X and W in the compute dtype (TE ``backward_override="high_precision"``).

Compute dtype and autocast: the layers run where autocast is enabled for the input's device (CPU or CUDA) in the
autocast dtype, else in the input's dtype. Inputs are cast to it, autocast is switched off inside forward and
backward (the emulation's float32 contractions must not be downcast), and every GEMM output (Y, dX, dW) is rounded
once to the compute dtype, as TE's GEMMs emit the activation dtype; autograd then casts dX/dW to the input and
parameter dtypes (FP32 master weights stay FP32). Weights are quantized from their own dtype (the FP32 master weight,
as TE's weight quantizer reads the parameter), activations and gradients from the compute dtype. NVFP4 refuses FP16
compute (TE's FP4 GEMM has no FP16 output, its RHT takes only BF16) and refuses FP32 compute when the wgrad RHT is on.

Convolutions (no TE counterpart; SPEC 8.5): implicit GEMM with the reduction dim K ordered (kh, kw, Cin).
``Conv2d`` (weight [Cout, Cin, kh, kw]; tokens = output pixels n, oh, ow):

* fprop ``Y = X * W``: X is quantized per input pixel in 1x16 blocks along Cin (NHWC rows ``[N*H*W, Cin]``); W as
  ``[Cout, kh*kw*Cin]`` (1x16 along Cin within each tap, or 16x16 tiles over (Cout, Cin) of one tap). With
  Cin % 16 == 0 every block of the im2col matrix is one pixel's 16-channel group (or zero padding), so quantizing X
  per pixel *is* quantizing the implicit-GEMM operand, with the same global amax.
* dgrad ``dX = dY *^T W``: reduction over (kh, kw, Cout). dY is quantized per output pixel along Cout (needs
  Cout % 16 == 0 for the same reason); W as ``[Cin, kh*kw*Cout]`` along Cout (with 16x16 tiles: the fprop tiles
  transposed, so the same codes).
* wgrad ``dW = dY^T X_col``: reduction over tokens. dY^T is ``[Cout, tokens]``; the input operand is the im2col matrix
  ``[kh*kw*Cin, tokens]`` (F.unfold), blocked (and RHT'ed) along tokens. Each input pixel appears in up to kh*kw taps
  and is quantized separately in each, as an implicit-GEMM kernel would see it; this costs kh*kw times the input's
  memory in the emulation. Layers with vertical stride 1 and output rows of whole 16-token blocks quantize only the
  kw column taps and multiply them with row-shifted dY^T (``_row_shared_wgrad``: the same blocks, so the same codes
  and scales, for a third of the bytes with 3x3 kernels).

``ConvTranspose2d`` (weight [Cin, Cout, kh, kw]) is the same with the roles of the GEMMs exchanged: fprop reduces over
(kh, kw, Cin) (X per pixel along Cin), dgrad is a plain convolution of dY reducing over (kh, kw, Cout) (dY per pixel
along Cout), and wgrad's tokens are the *input* pixels: X^T ``[Cin, tokens]`` and the unfolded dY
``[kh*kw*Cout, tokens]``. Supported: groups == 1 and the channel counts above (``layer_formats.unsupported_reason``);
any stride, padding, dilation, output_padding. Tokens are ordered (n, h, w) and zero-padded to a multiple of 16 for
the RHT (zero tokens add nothing to dW and the RHT cancels between the two equally padded operands).
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from quant import conv_layout, distributed, gemm, im2col, kernels, layer_formats, nvfp4, shared_operands
from quant.errors import QuantError
from quant.gemm import Operand
from quant.kernels import checks
from quant.layer_formats import LayerFormat, SlotRequest
from quant.shared_operands import OperandShare
from quant.recipe import Recipe

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_RHT_TOKEN_MULTIPLE = 16
_SLOT_WORDS = {
    "fprop_input": "input",
    "fprop_weight": "weight",
    "dgrad_grad": "output gradient (dgrad)",
    "dgrad_weight": "weight (dgrad)",
    "wgrad_grad": "output gradient (wgrad)",
    "wgrad_input": "input (wgrad)",
}
_WGRAD_SLOT = {"fprop_input": "wgrad_input", "dgrad_grad": "wgrad_grad"}  # the slot of the same tensor transposed
_KEY_MASK = (1 << 63) - 1  # Philox keys are non-negative int64
_PHILOX_TAG = 0x6670346C61625352  # first word of a Philox SR state in ``sr_state`` ("fp4labSR")


def _philox_bytes(key: int, counter: int) -> Tensor:
    """A Philox SR state as ``sr_state`` returns it: uint8 CPU [24] = int64 (tag, key, counter)."""
    return torch.tensor([_PHILOX_TAG, key, counter], dtype=torch.int64).view(torch.uint8)


def _is_philox_bytes(state: Tensor) -> bool:
    return state.dtype == torch.uint8 and state.numel() == 24 and int(state.view(torch.int64)[0]) == _PHILOX_TAG


class LayerQuantizer:
    """The quantization state of one layer: format, recipe, quantized roles, its stochastic-rounding stream and how
    its activation and gradient amax are shared across data-parallel ranks (``quant.distributed``).

    ``format`` quantizes every role that has no entry in ``role_formats`` (role -> ``LayerFormat``, from
    ``Policy.role_overrides``); each operand slot asks ``format_of`` its role. The recipe's NVFP4 switches act on the
    roles whose format is NVFP4 (weight tiles, SR of dY, and the wgrad RHT when dY^T and X^T are both NVFP4).

    Stochastic rounding has one stream per layer, seeded with ``distributed.rank_seed(seed, rank)`` (``seed`` on rank
    0 and without a process group), in one of two forms that follow the device:

    * reference path (CPU, or CUDA without the kernels): a ``torch.Generator`` created lazily on the device of the
      first gradient it rounds; each SR operand draws its bits from it (``torch.randint``).
    * kernel path (CUDA with the Triton kernels): a Philox (key, counter) int64 tensor on the device. Each training
      call reserves two counters (dgrad dY, wgrad dY^T) and advances the counter in place on the device
      (``_reserve_sr_counters``), so torch.compile traces SR without a graph break and a CUDA graph's replays draw
      new bits; the kernels draw 8 bits per element from Philox(key, (block, counter)).

    The stream's state can be read and restored (``sr_state`` / ``load_sr_state``: the generator's state, or a
    24-byte Philox state) so a resumed run continues the same stream. Checkpoints hold rank 0's state: a state loaded
    on a rank r > 0 is taken as rank 0's, and rank r continues on a stream of its own (a Philox key mixed with r, or a
    generator seeded from the state and r), so ranks still draw different bits after a resume.

    Traced code never reads the layer's name or seed (Dynamo would guard on them and compile every layer again):
    error messages name operands through an ``OwnedName`` handle, and the Philox state is created outside the trace.
    """

    def __init__(self, name: str, fmt: LayerFormat, recipe: Recipe, roles: frozenset[str], seed: int,
                 amax_reduction: str = "none", role_formats: Mapping[str, LayerFormat] | None = None) -> None:
        unknown = sorted(set(role_formats or {}) - set(layer_formats.ROLES))
        if unknown:
            raise QuantError(f"{name}: role_formats has role {unknown[0]!r}; valid roles: "
                             f"{', '.join(layer_formats.ROLES)}")
        self.name = name
        self.format = fmt
        self.role_formats = dict(role_formats or {})
        self.recipe = recipe
        self.roles = frozenset(roles)
        self.seed = int(seed)
        self.amax_reduction = distributed.AmaxReduction(amax_reduction)
        self._owner = checks.register_owner(name)
        self._sibling_owner = checks.register_sibling(name)  # names input operands in compiled code
        self._generator: torch.Generator | None = None
        self._philox: Tensor | None = None  # int64 [2] (key, counter) on the kernel path's device
        self._pending_state: Tensor | None = None  # a loaded state, applied when the stream is next created

    @property
    def backward(self) -> str:
        return self.recipe.backward

    def format_of(self, role: str) -> LayerFormat:
        """The format that quantizes ``role`` (its entry in ``role_formats``, else the layer's ``format``)."""
        return self.role_formats.get(role, self.format)

    def quantized_formats(self) -> dict[str, LayerFormat]:
        """Each quantized role -> its format."""
        return {role: self.format_of(role) for role in layer_formats.ROLES if role in self.roles}

    @property
    def wgrad_rht(self) -> bool:
        """RHT on both wgrad operands: only when the recipe asks and both of them are quantized in a format that
        rotates (NVFP4); otherwise it would not cancel (``layer_formats.wgrad_rht``)."""
        return layer_formats.wgrad_rht(self.quantized_formats(), self.recipe)

    def describe_roles(self) -> dict[str, str]:
        """Role -> what happens to it, e.g. {"weight": "nvfp4 16x16 RN", "input": "fp8 e4m3 per-tensor", "grad": "-"}
        (for reports)."""
        out = {}
        for role in layer_formats.ROLES:
            used = role in self.roles and (role != "grad" or self.backward == "full")
            out[role] = self.format_of(role).describe(role, self.recipe, self.wgrad_rht) if used else "-"
        return out

    def __repr__(self) -> str:
        roles = ", ".join(f"{k}={v}" for k, v in self.describe_roles().items())
        reduction = self.amax_reduction.describe()
        shared = "" if reduction == "none" else f", amax_reduction={reduction}"
        return f"LayerQuantizer({self.name!r}, backward={self.backward}, {roles}{shared})"

    # -- stochastic rounding stream -------------------------------------------------------------------------------
    def _rank_seed(self) -> int:
        return distributed.rank_seed(self.seed, distributed.process_rank())

    def generator(self, device: torch.device) -> torch.Generator:
        """The reference path's SR generator on ``device`` (created, and a loaded state applied, on first use)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._rank_seed())
            if self._pending_state is not None:
                self._restore(self._generator, self._pending_state)
                self._pending_state = None
        return self._generator

    @staticmethod
    def _restore(generator: torch.Generator, state: Tensor) -> None:
        rank = distributed.process_rank()
        if rank == 0 and not _is_philox_bytes(state):
            generator.set_state(state)
        else:  # another rank's state, or a kernel-path state: a generator stream of this rank's own derived from it
            generator.manual_seed(distributed.rank_seed(distributed.state_seed(state), rank))

    def sr_seeds(self, x: Tensor, track: bool) -> Tensor | None:
        """Philox (key, counter) of this call's two SR operands, int64 [2, 2] (rows: dgrad dY, wgrad dY^T), and the
        layer's counter advanced past them; None unless this call will round gradients stochastically on the kernel
        path (autograd records it, ``full`` backward, SR on, ``x`` on CUDA with the kernels, no amax reduction)."""
        grad_sr = "grad" in self.roles and self.format_of("grad").uses_sr(self.recipe)
        if not (track and self.backward == "full" and grad_sr and kernels.enabled_for(x)
                and self.amax_reduction.reducer() is None):
            return None
        if self._philox is None or self._philox.device != x.device:
            self._place_philox(x.device)
        return _advance_sr_counters(self._philox)

    def prime(self, device: torch.device) -> None:
        """Load the kernels (importing Triton) and create the kernel path's SR state on ``device`` now, before anything
        is compiled. Optional: the first call does both, but inside a traced region the import is a side effect that
        makes Dynamo return every intermediate of the Function's forward, and creating the SR state costs one graph
        break in the first compiled call of each layer (never later)."""
        if not kernels.enabled_for(torch.empty(0, device=device)):  # loads the kernel module on a kernel device
            return
        if self.backward == "full" and "grad" in self.roles and self.format_of("grad").uses_sr(self.recipe):
            self._place_philox(torch.device(device))

    @torch.compiler.disable
    def _place_philox(self, device: torch.device) -> None:
        """Create the Philox state on ``device`` (from a loaded state if any), or move it there; runs outside the
        trace so that compiled code never reads the seed."""
        _sr_counter_constants(device)
        if self._philox is not None:
            self._philox = self._philox.to(device)
            return
        key, counter = self._rank_seed() & _KEY_MASK, 0
        pending, self._pending_state = self._pending_state, None
        rank = distributed.process_rank()
        if pending is not None and _is_philox_bytes(pending):
            _, key, counter = pending.view(torch.int64).tolist()
            key = key if rank == 0 else distributed.rank_seed(key, rank) & _KEY_MASK
        elif pending is not None and not torch.equal(pending, _fresh_generator_state(self.seed)):
            key = distributed.rank_seed(distributed.state_seed(pending), rank) & _KEY_MASK  # a reference-path stream
        self._philox = torch.tensor([key, counter], dtype=torch.int64, device=device)

    def sr_state(self) -> Tensor:
        """The SR stream's state (a CPU uint8 tensor): the Philox state of the kernel path if it exists, else the
        generator's state, else the state loaded last, else the seeded initial generator state."""
        if self._philox is not None:
            key, counter = self._philox.tolist()
            return _philox_bytes(key, counter)
        if self._generator is not None:
            return self._generator.get_state()
        if self._pending_state is not None:
            return self._pending_state.clone()
        return _fresh_generator_state(self._rank_seed())

    def load_sr_state(self, state: Tensor) -> None:
        """Restore a state from ``sr_state``; the stream continues from it on its next use (on either path)."""
        self._pending_state = state.clone()
        if self._philox is not None:  # recreate it now, from the loaded state (so no compiled call has to)
            device, self._philox = self._philox.device, None
            self._place_philox(device)
        if self._generator is not None:  # recreate it now, from the loaded state
            device, self._generator = self._generator.device, None
            self.generator(device)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # Generators and device tensors do not survive pickling on every device: keep the state as CPU bytes (an unused
        # stream is re-seeded, per rank, after loading); the name handle is registered again in this process.
        used = self._generator is not None or self._philox is not None or self._pending_state is not None
        state["_pending_state"] = self.sr_state() if used else None
        state["_generator"] = state["_philox"] = state["_owner"] = state["_sibling_owner"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._owner = checks.register_owner(self.name)
        self._sibling_owner = checks.register_sibling(self.name)

    # -- operands -------------------------------------------------------------------------------------------------
    def compute_dtype(self, x: Tensor, weight: Tensor) -> torch.dtype:
        """The dtype the GEMMs compute and output in; rejects what the format cannot do, naming the layer."""
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        if dtype not in COMPUTE_DTYPES:
            raise QuantError(
                f"{self.name}: compute dtype {dtype} is not supported by quantized layers; valid: float32, bfloat16, "
                "float16 (not with nvfp4)"
            )
        nvfp4_roles = [role for role, fmt in self.quantized_formats().items() if fmt.name == "nvfp4"]
        if nvfp4_roles and dtype == torch.float16:
            raise QuantError(
                f"{self.name}: NVFP4 cannot compute in float16 (NVFP4 roles: {', '.join(nvfp4_roles)}; TE's FP4 GEMM "
                "has no FP16 output and its RHT takes only BF16 input); run the NVFP4 arm with bfloat16 autocast "
                "(precision=bf16-mixed)"
            )
        if self.wgrad_rht and dtype != torch.bfloat16 and weight.requires_grad and torch.is_grad_enabled():
            raise QuantError(
                f"{self.name}: the NVFP4 wgrad RHT needs bfloat16 operands (TE: RHT is only supported for bfloat16 "
                f"input) but this layer computes in {dtype}; run under bfloat16 autocast (precision=bf16-mixed) or "
                "set disable_rht=True"
            )
        return dtype

    def operand(self, slot: str, x: Tensor, compute_dtype: torch.dtype, rht: bool = False,
                seed: Tensor | None = None, scaled_dtype: torch.dtype | None = None,
                dequantized_dtype: torch.dtype | None = None) -> Operand:
        """Quantize the 2-D operand ``x`` of ``slot`` if its role is quantized, else return it in the compute dtype.

        ``seed``: the Philox (key, counter) of a grad slot on the kernel path (``sr_seeds``); without it, stochastic
        rounding draws from the layer's generator. ``scaled_dtype``: the GEMM's operand dtype when the other operand
        is quantized too (``gemm_operand_dtype``); NVFP4 on the kernel path then writes the scaled codes as well, and
        with ``dequantized_dtype`` TE's dequantized values too (``keeps_dequantized``)."""
        if layer_formats.SLOT_ROLE[slot] not in self.roles:
            return x.to(compute_dtype)
        request = self._request(slot, x, rht, seed, scaled_dtype, dequantized_dtype)
        return self.format_of(layer_formats.SLOT_ROLE[slot]).quantize(x, request, self.recipe, compute_dtype)

    def _request(self, slot: str, x: Tensor, rht: bool, seed: Tensor | None, scaled_dtype: torch.dtype | None,
                 dequantized_dtype: torch.dtype | None) -> SlotRequest:
        role = layer_formats.SLOT_ROLE[slot]
        draws = role == "grad" and seed is None and self.format_of(role).uses_sr(self.recipe)
        generator = self.generator(x.device) if draws else None
        amax_reduce = None if role == "weight" else self.amax_reduction.reducer()  # weights agree across ranks
        # compiled input operands carry the sibling handle, so the graph's identical quantizations of one input
        # (q/k/v) merge (``checks.register_sibling``); eager code shares them itself (``quant.shared_operands``)
        owner = self._sibling_owner if role == "input" and torch.compiler.is_compiling() else self._owner
        return SlotRequest(slot=slot, name=checks.OwnedName(owner, _SLOT_WORDS[slot]), rht=rht, generator=generator,
                           amax_reduce=amax_reduce, seed=seed, scaled_dtype=scaled_dtype,
                           dequantized_dtype=dequantized_dtype)

    def operand_pair(self, slot: str, x: Tensor, compute_dtype: torch.dtype,
                     seeds: tuple[Tensor | None, Tensor | None] = (None, None),
                     scaled_dtype: torch.dtype = torch.bfloat16) -> tuple[Operand, Operand] | None:
        """The operands of ``slot`` (x [M, K], blocked along K) and of its wgrad slot (x^T [K, M], RHT'ed and blocked
        along the tokens M) from one quantize pass, where the format has one (``LayerFormat.quantize_pair``: NVFP4
        on the kernel path, TE's default recipe); None otherwise, and the caller quantizes each with ``operand``.
        ``slot``: "fprop_input" (X) or "dgrad_grad" (dY); ``seeds``: the two operands' SR Philox counters;
        ``scaled_dtype``: the dtype of x's GEMM operand (float32 for a convolution; x^T's is BF16).

        Both operands are GEMM-only scaled codes (``gemm.ScaledCodes``), so every GEMM they enter must multiply two
        operands of this format: all three roles quantized alike."""
        slot_t = _WGRAD_SLOT[slot]
        role = layer_formats.SLOT_ROLE[slot]
        gemm_dtypes = [self.gemm_operand_dtype(a, b, torch.bfloat16)
                       for a, b in (("input", "weight"), ("grad", "weight"), ("grad", "input"))]
        if not (self.wgrad_rht and all(gemm_dtypes) and compute_dtype == torch.bfloat16 and x.dim() == 2):
            return None
        request = self._request(slot, x, False, seeds[0], scaled_dtype, None)
        request_t = self._request(slot_t, x, True, seeds[1], torch.bfloat16, None)
        return self.format_of(role).quantize_pair(x, request, request_t, self.recipe)

    def keeps_dequantized(self, track: bool, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype in which the forward's quantize pass also writes TE's dequantized X and W, or None: ``dtype``
        when autograd records this call and the backward is ``dequantized``, whose GEMMs multiply exactly those values
        (kept for the backward instead of the codes: no decode pass there, 2 bytes per element saved instead of
        0.56, as the BF16 layer saves X)."""
        return dtype if track and self.backward == "dequantized" else None

    def gemm_operand_dtype(self, role_a: str, role_b: str, dtype: torch.dtype) -> torch.dtype | None:
        """``dtype`` if both operands of a GEMM (their roles) are quantized in the same format, so that the GEMM
        multiplies scaled codes in ``dtype`` (BF16 for a GEMM, float32 for a convolution); None otherwise (a
        mixed-format GEMM dequantizes each operand, ``quant.gemm``)."""
        same_format = self.format_of(role_a).name == self.format_of(role_b).name
        return dtype if {role_a, role_b} <= self.roles and same_format else None

    def multiplies_nvfp4(self, role_a: str, role_b: str) -> bool:
        """Are both operands of a GEMM (their roles) NVFP4, so that it multiplies scaled codes times TE's alpha?"""
        return {role_a, role_b} <= self.roles and all(self.format_of(r).name == "nvfp4" for r in (role_a, role_b))

    def reuses_fprop_weight(self) -> bool:
        """Does the dgrad GEMM use the forward's quantized W (relaid) instead of quantizing W^T? (``full`` backward)"""
        return "weight" in self.roles and self.format_of("weight").dgrad_weight_is_fprop_weight(self.recipe)

    def kept_for_dgrad(self, fprop_weight: Operand, weight: Tensor) -> Operand | Tensor:
        """What a ``full`` forward saves for the dgrad weight operand: the quantized forward operand when the backward
        reuses it (no requantization), else the weight parameter itself. The reused operand is kept packed (0.56
        bytes per element for NVFP4), or on the fast path, when the dgrad GEMM multiplies two NVFP4 operands, as the
        scaled codes the forward GEMM read (``gemm.ScaledCodes``: 2 or 4 bytes per element, no decode pass in the
        backward)."""
        if not self.reuses_fprop_weight():
            return weight
        if isinstance(fprop_weight, gemm.Prescaled) and self.gemm_operand_dtype("grad", "weight", torch.bfloat16):
            return gemm.ScaledCodes(fprop_weight.values, fprop_weight.amax)
        return gemm.packed(fprop_weight)

    def dgrad_weight(self, kept: Operand | Tensor, fprop_matrix: Callable[[Tensor], Tensor],
                     to_dgrad: Callable[[Tensor], Tensor], dtype: torch.dtype,
                     scaled_dtype: torch.dtype | None = None) -> Operand:
        """The dgrad GEMM's weight operand from what ``kept_for_dgrad`` saved. ``fprop_matrix`` maps the weight
        parameter to the forward GEMM's layout ([N, K] or [Co, kh*kw*Ci]); ``to_dgrad`` maps that layout to the dgrad
        one ([K, N] or [Ci, kh*kw*Co]).

        Reused forward operands (weight-storage formats; NVFP4 16x16 tiles, whose W^T codes are the forward codes
        transposed, SPEC 1.4) are relaid; otherwise W^T is quantized along the dgrad reduction dim."""
        if self.reuses_fprop_weight():
            return gemm.Relaid(kept, to_dgrad) if gemm.is_nvfp4(kept) else to_dgrad(kept)
        return self.operand("dgrad_weight", to_dgrad(fprop_matrix(kept)), dtype, scaled_dtype=scaled_dtype)


def _reserve_sr_counters(state: Tensor) -> Tensor:
    """The seeds of one call's two SR operands, int64 [2, 2] = [[key, c], [key, c + 1]], from the Philox state
    [key, c]; the state advances to [key, c + 2] in place.

    Why in place, inside a custom op that declares the mutation: a CUDA graph (``torch.cuda.graph`` around a training
    step, compiled blocks included) replays its kernels on the addresses it captured, so the counter must advance in
    the state tensor itself, or every replay would draw the same bits. Declared as a mutation, torch.compile
    functionalizes it (the new state is copied back into the input at the graph's end) and the seeds are the op's
    output, which the backward graph receives as a saved tensor: an in-place ``add_`` traced as plain tensor ops let
    AOTAutograd's partitioner recompute the seeds in the backward from the already advanced state (the counters of
    the next call)."""
    offsets, advance = _sr_counter_constants(state.device)
    seeds = state + offsets  # [2] + [[0, 0], [0, 1]]
    state.add_(advance)  # + [0, 2]
    return seeds


_SR_CONSTANTS: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _sr_counter_constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """The int64 constants of ``_reserve_sr_counters`` on ``device`` ([[0, 0], [0, 1]] and [0, 2]), made once per
    device: two launches per call instead of five, and no host-to-device copy inside a CUDA graph capture (the first
    call happens outside any capture: ``LayerQuantizer._place_philox`` makes them)."""
    device = torch.device(device)
    if device not in _SR_CONSTANTS:
        _SR_CONSTANTS[device] = (torch.tensor([[0, 0], [0, 1]], dtype=torch.int64, device=device),
                                 torch.tensor([0, 2], dtype=torch.int64, device=device))
    return _SR_CONSTANTS[device]


_reserve_sr_counters_op = torch.library.custom_op("fp4lab::reserve_sr_counters", _reserve_sr_counters,
                                                  mutates_args=("state",))


@_reserve_sr_counters_op.register_fake
def _(state: Tensor) -> Tensor:
    return state.new_empty(2, 2)


def _advance_sr_counters(state: Tensor) -> Tensor:
    return kernels.traced_or_eager(_reserve_sr_counters_op, _reserve_sr_counters, state)


def _fresh_generator_state(seed: int) -> Tensor:
    fresh = torch.Generator()
    fresh.manual_seed(seed)
    return fresh.get_state()


def _autocast_off(x: Tensor):
    """Autocast off for ``x``'s device inside forward and backward: the emulation's float32 contractions must not be
    downcast. The backward's block is load-bearing under torch.compile too, where AOTAutograd runs the backward under
    the forward's autocast state.

    Load-bearing for torch.compile: no code inside the backward's block may read the strides, contiguity or storage
    offset of a gradient-derived tensor (layout decisions belong inside custom ops, as ``kernels.epilogue``). Dynamo
    speculates the backward while tracing the forward, without those properties; reading one makes it abandon the
    trace and retrace, and (torch 2.14.1; the 2.11 GPU run showed the same) the abandoned trace never leaves this
    block, so the rest of the frame is traced with autocast off: later layers' ``compute_dtype`` became float32,
    which failed the NVFP4 RHT check inside the trace or silently compiled a float32 layer where eager computes in
    BF16 (tests/quant/test_compile_autocast.py)."""
    device_type = x.device.type
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _pad_tokens(x: Tensor) -> Tensor:
    """Zero-pad the last (token) dim of a [rows, tokens] operand to a multiple of 16 for the RHT."""
    extra = (-x.shape[-1]) % _RHT_TOKEN_MULTIPLE
    return F.pad(x, (0, extra)) if extra else x


def _wgrad_pair(q: LayerQuantizer, grad_t: Tensor | None, input_t: Tensor | None, dtype: torch.dtype,
                seed: Tensor | None, input_source: Tensor | None = None,
                paired: tuple[Operand | None, Operand | None] = (None, None)) -> tuple[Operand, Operand]:
    """Quantized wgrad operands dY^T [rows_a, T] and X^T [rows_b, T], blocked (and RHT'ed) along tokens T.

    ``input_source``: the saved tensor X^T is a view of, when it is one (linear layers); layers that saved the same X
    then share one X^T operand (``quant.shared_operands``). ``paired``: (dY^T, X^T) operands already made by a paired
    quantize pass (``LayerQuantizer.operand_pair``), used instead of quantizing ``grad_t`` / ``input_t``."""
    rht = q.wgrad_rht
    scaled = q.gemm_operand_dtype("grad", "input", torch.bfloat16)
    grad_operand, input_operand = paired

    def make_input() -> Operand:
        return q.operand("wgrad_input", _pad_tokens(input_t) if rht else input_t, dtype, rht=rht, scaled_dtype=scaled)

    if grad_operand is None:
        grad_operand = q.operand("wgrad_grad", _pad_tokens(grad_t) if rht else grad_t, dtype, rht=rht, seed=seed,
                                 scaled_dtype=scaled)
    if input_operand is None:
        key = None if input_source is None else _share_key(q, "wgrad_input", "input", dtype, scaled, rht)
        input_operand = make_input() if key is None else _BACKWARD_SHARE.get(input_source, key, make_input)
    return grad_operand, input_operand


# Operands shared by layers that read the same tensor (q/k/v, gate/up): one per key, see quant.shared_operands.
_FORWARD_SHARE = OperandShare()
_BACKWARD_SHARE = OperandShare()


def _share_key(q: LayerQuantizer, slot: str, role: str, *settings: object) -> tuple | None:
    """What an operand of ``slot`` depends on besides its source tensor; None when it is not shared: sharing is not
    active (``shared_operands.active``), or the amax is reduced across ranks (the layers' groups may differ)."""
    if not shared_operands.active() or q.amax_reduction.mode != "none":
        return None
    return (slot, role in q.roles, q.format_of(role), q.recipe, *settings)


def _fprop_input(q: LayerQuantizer, x: Tensor, dtype: torch.dtype, scaled: torch.dtype | None,
                 keep: torch.dtype | None, pair: bool) -> tuple[Tensor, Operand, Operand | None]:
    """X as [M, K] in the compute dtype, its forward operand and, with ``pair`` (a ``full`` step that needs dW), X^T's
    wgrad operand from the same quantize pass where there is one (``LayerQuantizer.operand_pair``; else None); shared
    with the layers that read the same x.

    A shared X is detached (same storage and version counter): a reshaped view would hold x, and through x's
    ``grad_fn`` the step's whole autograd graph, in the share entry after the step. PyTorch then hands that graph's
    AccumulateGrad nodes, with the stream they were made on, to the next step's parameters; after an eager step on the
    default stream that breaks a CUDA-graph capture on another stream (seen on an H200). Unshared (and under
    torch.compile, where nothing is shared) X stays a view: Dynamo rejects a detached alias of an input made inside a
    higher-order op (autocast) and used outside it."""
    def make(detached: bool) -> tuple[Tensor, Operand, Operand | None]:
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        if detached:
            x2 = x2.detach()
        operands = q.operand_pair("fprop_input", x2, dtype) if pair else None
        if operands is not None:
            return x2, *operands
        return x2, q.operand("fprop_input", x2, dtype, scaled_dtype=scaled, dequantized_dtype=keep), None

    key = _share_key(q, "fprop_input", "input", dtype, scaled, keep, pair)
    return make(False) if key is None else _FORWARD_SHARE.get(x, key, lambda: make(True))


def _kept_values(operand: Operand) -> Operand | Tensor:
    """What a ``dequantized`` forward saves of a quantized operand: its dequantized values when the quantize pass wrote
    them (``LayerQuantizer.keeps_dequantized``), else the operand (NVFP4: packed, decoded in the backward)."""
    if isinstance(operand, gemm.Prescaled) and operand.dequantized is not None:
        return operand.dequantized
    return operand


def _forward_input_values(saved_x: Operand | Tensor, dtype: torch.dtype) -> Tensor:
    """The ``dequantized`` backward's X: the forward's NVFP4 operand decoded (once for the layers that share it: they
    saved the same codes), or the saved tensor in the compute dtype."""
    def decode() -> Tensor:
        return gemm.dense(saved_x, dtype).to(dtype)

    if not isinstance(saved_x, nvfp4.NVFP4Tensor):
        return decode()
    key = ("decoded_input", dtype, saved_x.shape, saved_x.tile, saved_x.rht)
    return _BACKWARD_SHARE.get(saved_x.codes, key, decode)


def _seed(seeds: Tensor | None, gemm_index: int) -> Tensor | None:
    """The Philox (key, counter) of the dgrad (0) or wgrad (1) SR operand, or None (the generator serves)."""
    return None if seeds is None else seeds[gemm_index]


def _save(ctx, *items: Operand | Tensor | None) -> None:
    """save_for_backward that also takes NVFP4 operands (codes, scales and amax saved; the rest kept on ctx) and
    ``gemm.ScaledCodes`` (values and amax)."""
    tensors, layouts = [], []
    for item in items:
        item = gemm.packed(item)
        if isinstance(item, nvfp4.NVFP4Tensor):
            tensors += [item.codes, item.scales, item.amax]
            layouts.append((item.shape, item.dtype, item.tile, item.rht, item.stochastic))
        elif isinstance(item, gemm.ScaledCodes):
            tensors += [item.values, item.amax]
            layouts.append(gemm.ScaledCodes)
        else:
            tensors.append(item)
            layouts.append(None)
    ctx.save_for_backward(*tensors)
    ctx.layouts = layouts


def _saved(ctx) -> list[Operand | Tensor | None]:
    tensors, items, i = ctx.saved_tensors, [], 0
    for layout in ctx.layouts:
        if layout is None:
            items.append(tensors[i])
            i += 1
        elif layout is gemm.ScaledCodes:
            items.append(gemm.ScaledCodes(tensors[i], tensors[i + 1]))
            i += 2
        else:
            items.append(nvfp4.NVFP4Tensor(tensors[i], tensors[i + 1], tensors[i + 2], *layout))
            i += 3
    return items


def _round(acc: Tensor, dtype: torch.dtype) -> Tensor:
    """An FP32 result rounded once to the compute dtype (the GEMM epilogue without alpha or bias)."""
    return gemm.finish(acc, None, dtype)


def _bias_grad(dy: Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The bias gradient: an FP32 sum of dY over ``dims``, rounded to the compute dtype (without an FP32 copy of dY
    on the fast path)."""
    if gemm.fast_path(dy):
        return _round(dy.sum(dims, dtype=torch.float32), dtype)
    return dy.to(torch.float32).sum(dims).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------------------------------
class _QuantLinearFunction(torch.autograd.Function):
    """What the forward saves per backward mode (no operand is quantized twice):

    * ``full``: X in the compute dtype (wgrad quantizes X^T along tokens, a different blocking), or on the fast path
      X^T's wgrad operand itself, made with X's forward operand in one paired pass (``LayerQuantizer.operand_pair``;
      the backward likewise makes dY and dY^T in one pass); and, for the dgrad W^T, the forward's quantized W when
      the 16x16 tiles make it reusable (``LayerQuantizer.kept_for_dgrad``; else the weight parameter);
    * ``dequantized``: the forward's quantized X and W: on the kernel path their dequantized values in the compute
      dtype, written by the forward's quantize pass (``LayerQuantizer.keeps_dequantized``); otherwise NVFP4 packed
      codes (0.56 bytes per element), decoded to the compute dtype in the backward;
    * ``high_precision``: X in the compute dtype and the weight parameter (cast in the backward).
    Unquantized roles save their input. ``seeds``: the call's SR Philox counters on the kernel path (``sr_seeds``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, seeds: Tensor | None, q: LayerQuantizer,
                dtype: torch.dtype, track: bool) -> Tensor:
        with _autocast_off(x):
            scaled = q.gemm_operand_dtype("input", "weight", torch.bfloat16)
            keep = q.keeps_dequantized(track, dtype)
            pair = track and q.backward == "full" and weight.requires_grad
            x2, xq, xtq = _fprop_input(q, x, dtype, scaled, keep, pair)  # [M, K]; X^T's wgrad operand or None
            wq = q.operand("fprop_weight", weight, dtype, scaled_dtype=scaled, dequantized_dtype=keep)  # [N, K]
            y = gemm.mm(xq, wq, dtype, None if bias is None else bias.to(dtype))  # [M, N]
        if not track:
            _save(ctx)
        elif q.backward == "full":
            _save(ctx, x2 if xtq is None else xtq, q.kept_for_dgrad(wq, weight), seeds)
        elif q.backward == "dequantized":
            _save(ctx, _kept_values(xq) if "input" in q.roles else x2, _kept_values(wq) if "weight" in q.roles
                  else weight)
        else:
            _save(ctx, x2, weight)
        ctx.q, ctx.dtype, ctx.x_shape, ctx.has_bias = q, dtype, x.shape, bias is not None
        return y  # [M, N]; reshaped outside: a view created inside a Function could not be modified in place

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, dtype = ctx.q, ctx.dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        with _autocast_off(grad_out):
            dy = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # [M, N]
            if q.backward == "full":
                # X [M, K] or its paired wgrad operand X^T (gemm.ScaledCodes [K, M]); quantized W [N, K] or the weight
                saved_x, kept_w, seeds = _saved(ctx)
                paired = (q.operand_pair("dgrad_grad", dy, dtype, (_seed(seeds, 0), _seed(seeds, 1)))
                          if need_x and need_w else None)
                dy_q, dy_t = (None, None) if paired is None else paired  # dY [M, N] and dY^T [N, M] from one pass
                if need_x:
                    scaled = q.gemm_operand_dtype("grad", "weight", torch.bfloat16)
                    a = dy_q if dy_q is not None else q.operand("dgrad_grad", dy, dtype, seed=_seed(seeds, 0),
                                                                 scaled_dtype=scaled)
                    b = q.dgrad_weight(kept_w, _same, torch.t, dtype, scaled)  # [K, N]
                    grad_x = gemm.mm(a, b, dtype)  # [M, K]
                if need_w:
                    x_t = saved_x if isinstance(saved_x, gemm.ScaledCodes) else None
                    a, b = _wgrad_pair(q, dy.t(), None if x_t is not None else saved_x.t(), dtype, _seed(seeds, 1),
                                       input_source=None if x_t is not None else saved_x, paired=(dy_t, x_t))
                    grad_w = gemm.mm(a, b, dtype)  # [N, K] from [N, M], [K, M]
            else:
                saved_x, saved_w = _saved(ctx)
                # dequantized: the forward's operands decoded (unquantized roles: as they are); else X and W
                x_hat = _forward_input_values(saved_x, dtype)  # [M, K]
                w_hat = gemm.dense(saved_w, dtype).to(dtype)  # [N, K]
                if need_x:
                    grad_x = gemm.mm(dy, w_hat.t(), dtype)  # [M, K]
                if need_w:
                    grad_w = gemm.mm(dy.t(), x_hat.t(), dtype)  # [N, K]
            if need_x:
                grad_x = grad_x.reshape(ctx.x_shape)
            if need_b and ctx.has_bias:
                grad_b = _bias_grad(dy, (0,), dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def _same(t: Tensor) -> Tensor:
    return t


def _check_reduction_size(x: Tensor, dim: int, size: int, q: LayerQuantizer, layout: str) -> None:
    """Refuse an input whose reduction dim ``x.shape[dim]`` (K of a linear, Ci of a convolution) is not the weight's
    ``size``, naming the layer.

    Load-bearing for torch.compile, not only for the message: the comparison runs *before* the autograd Function, so
    a reduction dim that Dynamo traces as a symbol is specialized to the weight's size here. That happens when a
    frame is recompiled with automatic dynamic shapes (torch 2.11 compiles each ``ConvNormAct.forward`` of a UNet
    block as its own frame; the block's second conv reads another width, so the frame is recompiled with the channel
    dim dynamic) or under ``dynamic=True``. Left to the GEMM or the convolution inside the Function's forward, the
    specialization happens mid-trace: sizes derived from the symbol that the forward hands on (the saved shapes, the
    operands' logical shapes) were traced as SymInts, but come back as constants when Dynamo replays the forward on
    fake tensors, and Dynamo asserts ("Expected subgraph_vt to be a tensor, SymNodeVariable, ...",
    ``overwrite_tensor_vt_proxy``; issue 6). Dims that stay
    symbolic (batch, tokens, pixels) are traced consistently and need nothing."""
    if x.shape[dim] != size:
        raise QuantError(f"{q.name}: input of shape {tuple(x.shape)} does not fit the weight: expected {layout} with "
                         f"{'K' if dim == -1 else 'Ci'} = {size}")


def _tracks(*tensors: Tensor | None) -> bool:
    """Will autograd record this call? (Then the operands the backward mode needs are saved.)"""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def quant_linear(x: Tensor, weight: Tensor, bias: Tensor | None, q: LayerQuantizer) -> Tensor:
    """``F.linear(x, weight, bias)`` with the three GEMMs quantized by ``q``: x [..., K], weight [N, K] -> [..., N]."""
    _check_reduction_size(x, -1, weight.shape[1], q, "[..., K]")
    track = _tracks(x, weight, bias)
    seeds = q.sr_seeds(x, track)
    y = _QuantLinearFunction.apply(x, weight, bias, seeds, q, q.compute_dtype(x, weight), track)  # [M, N]
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvGeometry:
    """What ``aten.convolution`` needs besides the tensors (groups is always 1 for quantized convolutions).

    The three contractions take float32 tensors and return float32 sums; on the fast path (``gemm.fast_path``) they
    run on cuDNN with TF32 switched on for the call (``quant.kernels.ops.cudnn_tf32``), which reads the emulation's
    BF16-representable operands exactly. The backward GEMMs without an epilogue take ``rounded_grads``; the forward
    and the ``full`` input gradient of two NVFP4 operands take ``scaled_conv`` where cuDNN's graph API is
    installed."""

    transposed: bool
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    output_padding: tuple[int, int] = (0, 0)

    def pointwise(self, kernel: tuple[int, int]) -> bool:
        """Is this a 1x1 convolution with stride 1 and no padding, i.e. a GEMM of the pixel rows [N*H*W, Ci] with the
        weight [Co, Ci]? On the fast path such a layer runs its fprop and ``full`` dgrad as ``gemm.mm`` (BF16
        operands, the fused epilogue) instead of an FP32 convolution and an epilogue pass."""
        return (not self.transposed and tuple(kernel) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                and self.output_padding == (0, 0))

    def _args(self) -> tuple[list[int], list[int], list[int], bool, list[int]]:
        return list(self.stride), list(self.padding), list(self.dilation), self.transposed, list(self.output_padding)

    def input_grad_geometry(self, dy_shape: torch.Size, x_shape: torch.Size, kernel: tuple[int, int]
                            ) -> ConvGeometry:
        """The geometry of the contraction that gives dX from dY and the module weight: a Conv2d's input gradient is
        the transposed convolution with the same window (``output_padding`` restores the input rows and columns the
        stride left out), a ConvTranspose2d's is the plain convolution."""
        if self.transposed:
            return ConvGeometry(False, self.stride, self.padding, self.dilation)
        full = im2col.transposed_grid(tuple(dy_shape[2:]), kernel, list(self.stride), list(self.padding),
                                      list(self.dilation), [0, 0])
        left_out = (x_shape[2] - full[0], x_shape[3] - full[1])
        return ConvGeometry(True, self.stride, self.padding, self.dilation, left_out)

    def convolution(self, x: Tensor, weight: Tensor) -> Tensor:
        if gemm.fast_path(x):
            return kernels.load().tf32_convolution(x, weight, *self._args())
        return torch.ops.aten.convolution(
            x, weight, None, self.stride, self.padding, self.dilation, self.transposed, self.output_padding, 1
        )

    def input_grad(self, dy: Tensor, weight: Tensor, x_shape: torch.Size) -> Tensor:
        if gemm.fast_path(dy):
            return kernels.load().tf32_conv_input_grad(dy, weight, list(x_shape), *self._args())
        unread_x = conv_layout.unread_input(dy, weight.dtype, x_shape)
        return torch.ops.aten.convolution_backward(
            dy, unread_x, weight, None, self.stride, self.padding, self.dilation, self.transposed, self.output_padding,
            1, [True, False, False],
        )[0]

    def weight_grad(self, dy: Tensor, x: Tensor, w_shape: torch.Size) -> Tensor:
        if gemm.fast_path(dy):
            return kernels.load().tf32_conv_weight_grad(dy, x, list(w_shape), *self._args())
        unread_w = conv_layout.unread_weight(dy, w_shape)
        return torch.ops.aten.convolution_backward(
            dy, x, unread_w, None, self.stride, self.padding, self.dilation, self.transposed, self.output_padding, 1,
            [False, True, False],
        )[1]

    def rounded_grads(self, dy: Tensor, x: Tensor, weight: Tensor, need: tuple[bool, bool], dtype: torch.dtype
                      ) -> tuple[Tensor | None, Tensor | None]:
        """(dX, dW) of the backward GEMMs that multiply dense operands (``dequantized``, ``high_precision``), each the
        FP32 contraction rounded once to ``dtype``; None where ``need`` says not needed.

        Fast path in BF16: cuDNN's BF16 convolutions (``rounded_conv_grads``), whose tensor-core kernels accumulate in
        FP32 and round once (held to that by ``test_gpu_bf16_conv_grads_are_fp32_sums_rounded_once``), the way
        ``quant.gemm.rounded_gemm`` serves linear layers; no FP32 copies of dY, X and W and no FP32 results.
        Otherwise (and for FP16, not tested on cuDNN): float32 contractions, then one rounding."""
        if gemm.fast_path(dy) and dtype == torch.bfloat16:
            return rounded_conv_grads(self, dy.to(dtype), x.to(dtype), weight.to(dtype), need)
        dy32 = dy.to(torch.float32)
        grad_x = _round(self.input_grad(dy32, weight.to(torch.float32), x.shape), dtype) if need[0] else None
        grad_w = _round(self.weight_grad(dy32, x.to(torch.float32), weight.shape), dtype) if need[1] else None
        return grad_x, grad_w

    def unfold(self, t: Tensor, kernel: tuple[int, int], positions: tuple[int, int]) -> Tensor:
        """Im2col of t [N, C, H, W] with this geometry's taps: -> [kh*kw*C, N*P] (``quant.im2col``; a custom op on
        the fast path, so torch.compile keeps ATen's im2col)."""
        args = (t, list(kernel), list(positions), list(self.stride), list(self.padding), list(self.dilation))
        if gemm.fast_path(t):
            return kernels.load().conv_unfold(*args)
        return im2col.unfold_tokens(*args)


def _contraction(geo: ConvGeometry, kernel: tuple[int, int], t: Tensor, dtype: torch.dtype, nvfp4_pair: bool
                 ) -> tuple[str, torch.dtype]:
    """How a layer's forward and ``full`` dgrad contract on t's device, and the dtype of their operands' scaled codes:
    "gemm" (``ConvGeometry.pointwise`` on the fast path, BF16 or FP16 compute: ``gemm.mm`` of pixel rows), "cudnn"
    (fast path, BF16 compute, cuDNN's graph API present, and ``nvfp4_pair``: both operands NVFP4, whose ``scaled_conv``
    applies TE's alpha in the kernel; other formats have no alpha for it), else "fp32" (float32 convolution and the
    epilogue)."""
    if geo.pointwise(kernel) and gemm.fast_path(t) and dtype in (torch.bfloat16, torch.float16):
        return "gemm", dtype
    if nvfp4_pair and dtype == torch.bfloat16 and gemm.fast_path(t) and kernels.load().scaled_convolution_available():
        return "cudnn", dtype
    return "fp32", torch.float32


def scaled_conv(geo: ConvGeometry, x: Tensor, weight: Tensor, alpha: gemm.Alpha, bias: Tensor | None) -> Tensor:
    """The convolution (or, ``geo.transposed``, the transposed convolution) of two NVFP4 operands' BF16 scaled codes
    with TE's epilogue applied to the FP32 accumulator inside cuDNN's kernel (``quant.kernels.cudnn_conv``):
    ``gemm.finish`` of the FP32 contraction, in one pass. CPU tests of the fast path replace this function."""
    return kernels.load().scaled_convolution(x, weight, alpha.amax_a, alpha.amax_b, bias, *geo._args())


def rounded_conv_grads(geo: ConvGeometry, dy: Tensor, x: Tensor, weight: Tensor, need: tuple[bool, bool]
                       ) -> tuple[Tensor | None, Tensor | None]:
    """``ConvGeometry.rounded_grads`` on the fast path: cuDNN convolutions of BF16 tensors writing BF16. CPU tests of
    the fast path replace this function."""
    ops = kernels.load()
    grad_x = ops.rounded_conv_input_grad(dy, weight, list(x.shape), *geo._args()) if need[0] else None
    grad_w = ops.rounded_conv_weight_grad(dy, x, list(weight.shape), *geo._args()) if need[1] else None
    return grad_x, grad_w


def _pixels(t: Tensor) -> Tensor:
    """[N, C, H, W] -> [N*H*W, C]: one row per pixel, channels last (the per-pixel quantization layout)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _unpixels(m: Tensor, like_shape: torch.Size) -> Tensor:
    n, c, h, w = like_shape
    return m.reshape(n, h, w, c).permute(0, 3, 1, 2)


def conv_weight_matrix(w_oi: Tensor) -> Tensor:
    """[Co, Ci, kh, kw] -> [Co, kh*kw*Ci]: rows = GEMM output channels, K ordered (kh, kw, Ci)."""
    return w_oi.permute(0, 2, 3, 1).reshape(w_oi.shape[0], -1)


def conv_weight_from_matrix(m: Tensor, oi_shape: torch.Size) -> Tensor:
    co, ci, kh, kw = oi_shape
    return m.reshape(co, kh, kw, ci).permute(0, 3, 1, 2)


def _dgrad_matrix(w_oi: Tensor) -> Tensor:
    """[Co, Ci, kh, kw] -> [Ci, kh*kw*Co]: the dgrad GEMM's weight operand, K ordered (kh, kw, Co)."""
    return w_oi.permute(1, 2, 3, 0).reshape(w_oi.shape[1], -1)


def _from_dgrad_matrix(m: Tensor, oi_shape: torch.Size) -> Tensor:
    co, ci, kh, kw = oi_shape
    return m.reshape(ci, kh, kw, co).permute(3, 0, 1, 2)


class _QuantConvFunction(torch.autograd.Function):
    """Conv2d / ConvTranspose2d. Internally the weight is held as w_oi [Co, Ci, kh, kw] (Co = GEMM output channels,
    Ci = reduction channels of fprop): the module weight itself for Conv2d, its transpose(0, 1) for ConvTranspose2d.
    Saved per backward mode as in ``_QuantLinearFunction``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, seeds: Tensor | None, q: LayerQuantizer,
                dtype: torch.dtype, geo: ConvGeometry, track: bool) -> Tensor:
        with _autocast_off(x):
            x_c = x.to(dtype)  # [N, Ci, H, W]
            w_oi = _w_oi(weight, geo)  # [Co, Ci, kh, kw]
            path, operand_dtype = _contraction(geo, tuple(w_oi.shape[2:]), x_c, dtype,
                                               q.multiplies_nvfp4("input", "weight"))
            scaled = q.gemm_operand_dtype("input", "weight", operand_dtype)
            keep = q.keeps_dequantized(track, dtype)
            # a pointwise layer's wgrad X^T is its pixel rows transposed: made with X in one pass (``full``)
            pair = track and q.backward == "full" and weight.requires_grad and path == "gemm"
            x_rows = _pixels(x_c)  # [N*H*W, Ci]
            operands = q.operand_pair("fprop_input", x_rows, dtype) if pair else None
            xq, xtq = operands if operands is not None else (
                q.operand("fprop_input", x_rows, dtype, scaled_dtype=scaled, dequantized_dtype=keep), None)
            # xq [N*H*W, Ci]; xtq: X^T's wgrad operand [Ci, N*H*W] or None
            wq = q.operand("fprop_weight", conv_weight_matrix(w_oi), dtype, scaled_dtype=scaled,
                           dequantized_dtype=keep)  # [Co, kh*kw*Ci]
            bias_c = None if bias is None else bias.to(dtype)
            if path == "gemm":
                n, _, h, w = x_c.shape
                y = _unpixels(gemm.mm(xq, wq, dtype, bias_c), (n, w_oi.shape[0], h, w))
            elif path == "cudnn" and scaled is not None:
                xs, ws, alpha = gemm.fast_operands(xq, wq, dtype)
                w_mod = _module_weight(conv_weight_from_matrix(ws, w_oi.shape), geo)
                y = scaled_conv(geo, _unpixels(xs, x_c.shape), w_mod, alpha, bias_c)  # [N, Co, OH, OW], channels-last
            else:
                x32, w32, alpha = gemm.prepare(xq, wq, dtype)
                w_mod = _module_weight(conv_weight_from_matrix(w32, w_oi.shape), geo)
                acc = geo.convolution(_unpixels(x32, x_c.shape), w_mod)
                y = gemm.finish(acc, alpha, dtype, bias_c, bias_dim=1)  # [N, Co, OH, OW]
        if not track:
            _save(ctx)
        elif q.backward == "full":
            _save(ctx, x_c if xtq is None else xtq, q.kept_for_dgrad(wq, weight), seeds)
        elif q.backward == "dequantized":
            _save(ctx, _kept_values(xq) if "input" in q.roles else x_c, _kept_values(wq) if "weight" in q.roles
                  else weight)
        else:
            _save(ctx, x_c, weight)
        ctx.q, ctx.dtype, ctx.geo, ctx.has_bias = q, dtype, geo, bias is not None
        ctx.x_shape, ctx.w_shape, ctx.w_oi_shape = x_c.shape, weight.shape, w_oi.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, dtype, geo = ctx.q, ctx.dtype, ctx.geo
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        with _autocast_off(grad_out):
            dy = grad_out.to(dtype)  # [N, Co, OH, OW]
            if q.backward == "full":
                # x [N, Ci, H, W] or, pointwise, X^T's paired wgrad operand; quantized W [Co, kh*kw*Ci] or the weight
                saved_x, kept_w, seeds = _saved(ctx)
                # [T, Co]: the dgrad operand's rows, and the Conv2d wgrad's dY^T transposed (one layout copy for both)
                dy_rows = _pixels(dy) if need_x or (need_w and not geo.transposed) else None
                dy_q = dy_t = None
                if need_x and need_w and not geo.transposed:  # dY [T, Co] and dY^T [Co, T] from one pass
                    paired = q.operand_pair("dgrad_grad", dy_rows, dtype, (_seed(seeds, 0), _seed(seeds, 1)),
                                            scaled_dtype=_contraction(geo, tuple(ctx.w_oi_shape[2:]), dy, dtype,
                                                                      q.multiplies_nvfp4("grad", "weight"))[1])
                    dy_q, dy_t = (None, None) if paired is None else paired
                if need_x:
                    grad_x = _full_dgrad(q, dy, dy_rows, kept_w, ctx, geo, _seed(seeds, 0), dy_q)
                if need_w:
                    grad_w = _full_wgrad(q, dy, dy_rows, saved_x, ctx.w_shape, dtype, geo, _seed(seeds, 1), dy_t)
            else:
                saved_x, saved_w = _saved(ctx)
                x_val, w_val = _forward_values(q, saved_x, saved_w, ctx, geo)
                grad_x, grad_w = geo.rounded_grads(dy, x_val, w_val, (need_x, need_w), dtype)
            if need_b and ctx.has_bias:
                grad_b = _bias_grad(dy, (0, 2, 3), dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _w_oi(weight: Tensor, geo: ConvGeometry) -> Tensor:
    """The module weight as [Co, Ci, kh, kw] (Co = GEMM output channels)."""
    return weight.transpose(0, 1) if geo.transposed else weight


def _module_weight(w_oi: Tensor, geo: ConvGeometry) -> Tensor:
    return w_oi.transpose(0, 1) if geo.transposed else w_oi


def _forward_values(q: LayerQuantizer, saved_x: Operand | Tensor, saved_w: Operand | Tensor, ctx,
                    geo: ConvGeometry) -> tuple[Tensor, Tensor]:
    """X [N, Ci, H, W] and the module-layout weight as the non-``full`` backward multiplies them: the forward's
    operands dequantized (``dequantized``; an unquantized role's operand rebuilt as the forward built it), or X and W
    in the compute dtype (``high_precision``)."""
    dtype = ctx.dtype
    if q.backward != "dequantized":
        return saved_x, saved_w.to(dtype)
    xq = saved_x if "input" in q.roles else q.operand("fprop_input", _pixels(saved_x), dtype)
    wq = saved_w if "weight" in q.roles else q.operand("fprop_weight", conv_weight_matrix(_w_oi(saved_w, geo)), dtype)
    x_val = _unpixels(gemm.dense(xq, dtype), ctx.x_shape)
    w_val = _module_weight(conv_weight_from_matrix(gemm.dense(wq, dtype), ctx.w_oi_shape), geo)
    return x_val, w_val


def _full_dgrad(q: LayerQuantizer, dy: Tensor, dy_rows: Tensor, kept_w: Operand | Tensor, ctx, geo: ConvGeometry,
                seed: Tensor | None, dyq: Operand | None = None) -> Tensor:
    """dX with dY quantized per output pixel along Co (its rows ``dy_rows`` = ``_pixels(dy)``, or ``dyq`` when a
    paired pass made it) and W^T along Co per tap ([Ci, kh*kw*Co])."""
    dtype, w_oi_shape = ctx.dtype, ctx.w_oi_shape
    path, operand_dtype = _contraction(geo, tuple(w_oi_shape[2:]), dy, dtype, q.multiplies_nvfp4("grad", "weight"))
    scaled = q.gemm_operand_dtype("grad", "weight", operand_dtype)
    if dyq is None:
        dyq = q.operand("dgrad_grad", dy_rows, dtype, seed=seed, scaled_dtype=scaled)  # [N*OH*OW, Co]
    to_dgrad = lambda m: _dgrad_matrix(conv_weight_from_matrix(m, w_oi_shape))  # noqa: E731
    fprop_matrix = lambda w: conv_weight_matrix(_w_oi(w, geo))  # noqa: E731
    wq = q.dgrad_weight(kept_w, fprop_matrix, to_dgrad, dtype, scaled)  # [Ci, kh*kw*Co]
    if path == "gemm":
        return _unpixels(gemm.mm(dyq, wq, dtype), ctx.x_shape)
    if path == "cudnn" and scaled is not None:
        dys, ws, alpha = gemm.fast_operands(dyq, wq, dtype)
        w_mod = _module_weight(_from_dgrad_matrix(ws, w_oi_shape), geo)
        dgrad_geo = geo.input_grad_geometry(dy.shape, ctx.x_shape, tuple(w_oi_shape[2:]))
        return scaled_conv(dgrad_geo, _unpixels(dys, dy.shape), w_mod, alpha, None)  # channels-last
    dy32, w32, alpha = gemm.prepare(dyq, wq, dtype)
    w_mod = _module_weight(_from_dgrad_matrix(w32, w_oi_shape), geo)
    return gemm.finish(geo.input_grad(_unpixels(dy32, dy.shape), w_mod, ctx.x_shape), alpha, dtype)


def _full_wgrad(q: LayerQuantizer, dy: Tensor, dy_rows: Tensor | None, x: Operand, w_shape: torch.Size,
                dtype: torch.dtype, geo: ConvGeometry, seed: Tensor | None, dy_t: Operand | None = None) -> Tensor:
    """dW as a GEMM over tokens: Conv2d tokens = output pixels, ConvTranspose2d tokens = input pixels. ``dy_rows``:
    ``_pixels(dy)`` (Conv2d; None for ConvTranspose2d, whose dY is unfolded); ``x``: the saved input, or (pointwise
    Conv2d) X^T's wgrad operand from the forward's paired pass; ``dy_t``: dY^T's operand when a paired pass made it."""
    kernel = (w_shape[2], w_shape[3])
    if not geo.transposed:
        grad_t = None if dy_t is not None else dy_rows.t()  # [Co, T]
        x_t = x if isinstance(x, gemm.ScaledCodes) else None
        if x_t is None and _shares_row_taps(q, geo, w_shape, dy):
            return _row_shared_wgrad(q, grad_t, dy_t, x, w_shape, dtype, geo, seed, dy.shape)
        input_t = None if x_t is not None else geo.unfold(x, kernel, (dy.shape[2], dy.shape[3]))  # [kh*kw*Ci, T]
        a, b = _wgrad_pair(q, grad_t, input_t, dtype, seed, paired=(dy_t, x_t))
        return conv_weight_from_matrix(gemm.mm(a, b, dtype), (w_shape[0], w_shape[1], *kernel))  # [Co, Ci, kh, kw]
    grad_t = geo.unfold(dy, kernel, (x.shape[2], x.shape[3]))  # [kh*kw*Co, T], T = input pixels
    input_t = _pixels(x).t()  # [Ci, T]
    a, b = _wgrad_pair(q, grad_t, input_t, dtype, seed)
    ci, co = w_shape[0], w_shape[1]
    dw_oi = _from_dgrad_matrix(gemm.mm(b, a, dtype), (co, ci, *kernel))  # [Ci, kh*kw*Co] -> [Co, Ci, kh, kw]
    return dw_oi.transpose(0, 1)  # module layout [Ci, Co, kh, kw]


def _shares_row_taps(q: LayerQuantizer, geo: ConvGeometry, w_shape: torch.Size, dy: Tensor) -> bool:
    """Does this Conv2d's ``full`` wgrad take ``_row_shared_wgrad``? For NVFP4 dY^T and X operands, kh > 1, vertical
    stride and dilation 1, output rows of whole scale blocks (OW a multiple of 16, so no block of 16 tokens spans two
    output rows), and Co <= 4 Ci. Both paths take it (on CPU it halved a 3x3 layer's ``full`` step); the im2col path
    stays for every other geometry, and the tests hold the two to each other.

    Why the channel bound: per token, the im2col path moves about 45 Ci + Co elements through memory (the 9 Ci im2col
    written, read for the amax, read and written by the quantize pass, read by the GEMM; dY^T read), the row-shared
    path about 15 Ci + 7 Co (the same for 3 Ci column taps, plus dY^T read, its 3 Co shifted copies written and read);
    they break even near Co = 5 Ci (3x3 kernels)."""
    co, ci, kh = w_shape[0], w_shape[1], w_shape[2]
    return (kh > 1 and geo.stride[0] == 1 and geo.dilation[0] == 1 and co <= 4 * ci
            and q.multiplies_nvfp4("grad", "input") and dy.shape[3] % q.format_of("input").block == 0)


def _row_shared_wgrad(q: LayerQuantizer, grad_t: Tensor | None, dy_t: Operand | None, x: Tensor,
                      w_shape: torch.Size, dtype: torch.dtype, geo: ConvGeometry, seed: Tensor | None,
                      dy_shape: torch.Size) -> Tensor:
    """``_full_wgrad`` of a Conv2d (``_shares_row_taps``) that quantizes kw column taps of X instead of kh*kw taps.

    Why it is the same operand: with vertical stride and dilation 1, the im2col row of tap (i, j) at output pixel
    (n, oh, ow) reads input row oh + i - pad_h, which is the "column tap" j (an im2col with kernel (1, kw) over the
    input padded by pad_h rows, kh - 1 more rows than the output) at padded row oh + i. Output rows are whole
    16-token blocks, so every block of the kh*kw-tap operand is a block of the kw column taps, and every block of
    these is a block of some tap (or zeros): the same RHT'd blocks, the same global amax, hence the same codes and
    scales. On UNet's 3x3 layers this quantizes a third of the bytes (the im2col, its amax pass and its quantize pass
    shrink 3x).

    The GEMM then pairs dY^T moved down by i rows (``_row_shifted``: kh shifted copies of its scaled codes, zeros
    between images) with the column taps over the padded token grid: one [kh*Co, kw*Ci] product whose FP32 sums hold
    exactly the im2col GEMM's products plus zeros (only the summation order differs)."""
    kh, kw = w_shape[2], w_shape[3]
    n, _, rows, cols = dy_shape
    padded_rows = rows + kh - 1
    column_geo = ConvGeometry(False, (1, geo.stride[1]), geo.padding, (1, geo.dilation[1]))
    input_t = column_geo.unfold(x, (1, kw), (padded_rows, cols))  # [kw*Ci, N*(OH+kh-1)*OW]
    grad_operand, input_operand = _wgrad_pair(q, grad_t, input_t, dtype, seed, paired=(dy_t, None))
    shifted = gemm.Relaid(grad_operand, lambda codes: _row_shifted(codes, kh, (n, rows, cols)))
    dw = gemm.mm(shifted, input_operand, dtype)  # [(kh - 1 - i, Co), (kw, Ci)]
    co, ci = w_shape[0], w_shape[1]
    return dw.view(kh, co, kw, ci).flip(0).permute(1, 3, 0, 2)  # [Co, Ci, kh, kw]


def _row_shifted(t: Tensor, shifts: int, grid: tuple[int, int, int]) -> Tensor:
    """t [C, N*OH*OW] (tokens (n, oh, ow)) -> [shifts*C, N*(OH+shifts-1)*OW]: row block r holds t moved down by
    shifts - 1 - r rows within each image, zeros elsewhere. That is the im2col of t as an image [N, C, OH, OW] with
    kernel (shifts, 1) and shifts - 1 rows of zero padding (tap r reads row q + r - (shifts - 1) at padded row q), so
    the fast path makes it with the unfold kernel in one pass."""
    n, rows, cols = grid
    image = t.reshape(t.shape[0], n, rows, cols).permute(1, 0, 2, 3)  # a view of t
    geo = ConvGeometry(False, (1, 1), (shifts - 1, 0), (1, 1))
    return geo.unfold(image, (shifts, 1), (rows + shifts - 1, cols))


def quant_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, q: LayerQuantizer, stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """``F.conv2d`` (zero padding, groups 1) with quantized GEMMs: x [N, Ci, H, W], weight [Co, Ci, kh, kw]."""
    geo = ConvGeometry(False, tuple(stride), tuple(padding), tuple(dilation))
    return _apply_conv(x, weight, bias, q, geo)


def quant_conv_transpose2d(x: Tensor, weight: Tensor, bias: Tensor | None, q: LayerQuantizer,
                           stride: tuple[int, int], padding: tuple[int, int], output_padding: tuple[int, int],
                           dilation: tuple[int, int]) -> Tensor:
    """``F.conv_transpose2d`` (groups 1) with quantized GEMMs: x [N, Ci, H, W], weight [Ci, Co, kh, kw]."""
    geo = ConvGeometry(True, tuple(stride), tuple(padding), tuple(dilation), tuple(output_padding))
    return _apply_conv(x, weight, bias, q, geo)


def _apply_conv(x: Tensor, weight: Tensor, bias: Tensor | None, q: LayerQuantizer, geo: ConvGeometry) -> Tensor:
    if x.dim() != 4:
        raise QuantError(f"{q.name}: quantized convolutions take input [N, C, H, W]; got shape {tuple(x.shape)}")
    _check_reduction_size(x, 1, _w_oi(weight, geo).shape[1], q, "[N, Ci, H, W]")
    track = _tracks(x, weight, bias)
    seeds = q.sr_seeds(x, track)
    return _QuantConvFunction.apply(x, weight, bias, seeds, q, q.compute_dtype(x, weight), geo, track)
