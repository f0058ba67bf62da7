"""``quant.apply(model, policy) -> QuantReport``: swap the selected GEMM layers for QAT modules, in place.

Why the report is data: "which layers are NVFP4, and why is that one not" is a result of the study that a test can
assert, a log can print (``table``) and a tracker can store (``to_rows``). Every leaf module that owns parameters
gets one row: quantized layers with what each role gets, the others with the first reason that kept them in high
precision (see ``quant.policy`` for the rules and their order).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

from torch import nn

from quant.errors import QuantError
from quant.layer_formats import ROLES
from quant.modules import QUANT_MODULES, QUANTIZED_TYPES, shape_problem
from quant.policy import NONE, Policy


@dataclass(frozen=True)
class LayerDecision:
    """One row of the report. ``weight``/``input``/``grad`` say what each role gets ("-" = high precision)."""

    name: str
    type: str
    shape: tuple[int, ...]
    quantized: bool
    format: str
    weight: str
    input: str
    grad: str
    backward: str
    reason: str  # why it stays high precision ("" when quantized); for a quantized row, why it is not on TE
    backend: str = "-"  # who runs a quantized layer's GEMMs: "emulated" (quant's layers) or "te" (quant.te_backend)


@dataclass(frozen=True)
class QuantReport:
    """What ``apply`` did: the policy, one ``LayerDecision`` per parameter-holding leaf module, the blocks it saw."""

    policy: Policy
    rows: tuple[LayerDecision, ...]
    blocks: tuple[str, ...]  # block prefixes in order (for keep_first_n / keep_last_n)

    @property
    def num_quantized(self) -> int:
        return sum(row.quantized for row in self.rows)

    def quantized_names(self) -> list[str]:
        return [row.name for row in self.rows if row.quantized]

    def row(self, name: str) -> LayerDecision:
        for row in self.rows:
            if row.name == name:
                return row
        raise QuantError(f"no module named {name!r} in the report; modules: {', '.join(r.name for r in self.rows)}")

    def to_rows(self) -> list[dict[str, object]]:
        """Plain dicts (shape as "AxB" text) for loggers and tables."""
        return [{**asdict(row), "shape": "x".join(map(str, row.shape))} for row in self.rows]

    def table(self) -> str:
        """A fixed-width text table with a header line (the policy) and a footer (counts)."""
        header = ("module", "type", "shape", "weight", "input", "grad", "backend", "backward / why not")
        body = [
            (r.name, r.type, "x".join(map(str, r.shape)), r.weight, r.input, r.grad, r.backend,
             (f"{r.backward}; {r.reason}" if r.reason else r.backward) if r.quantized else r.reason)
            for r in self.rows
        ]
        widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header) - 1)]

        def fmt(line: tuple) -> str:
            cells = [str(cell).ljust(width) for cell, width in zip(line, widths)]
            return "  ".join([*cells, str(line[-1])]).rstrip()

        gemm_rows = [r for r in self.rows if r.type in _SWAPPABLE_NAMES or r.quantized]
        lines = [f"policy: {self.policy.describe()}"]
        if self.blocks:
            lines.append(f"blocks ({len(self.blocks)}): {', '.join(self.blocks)}")
        lines += [fmt(header), fmt(tuple("-" * len(h) for h in header)), *map(fmt, body)]
        lines.append(
            f"{self.num_quantized} of {len(gemm_rows)} GEMM layers quantized ({len(self.rows)} modules listed)"
        )
        return "\n".join(lines)


_SWAPPABLE_NAMES = {cls.__name__ for cls in QUANT_MODULES} | {cls.__name__ for cls in QUANTIZED_TYPES}


def _matches(name: str, pattern: str) -> bool:
    """fnmatch on the module name or on any of its ancestors' names (a pattern covers a whole sub-tree)."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _first_match(name: str, patterns: tuple[str, ...]) -> str | None:
    return next((p for p in patterns if _matches(name, p)), None)


def find_blocks(model: nn.Module, containers: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Block prefixes in model order (see ``quant.policy``): ``containers`` if given, else the model's
    ``quant_block_containers``, else the auto-detected outermost numbered containers of GEMM blocks."""
    if containers is None:
        containers = getattr(model, "quant_block_containers", None)
    if containers is None:
        containers = _auto_containers(model)
    modules = dict(model.named_modules())
    blocks: list[str] = []
    for container in containers:
        module = modules.get(container)
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            found = ", ".join(n for n, m in modules.items() if isinstance(m, (nn.ModuleList, nn.Sequential))) or "none"
            raise QuantError(
                f"block container {container!r} is not an nn.ModuleList/nn.Sequential of the model; "
                f"valid choices: {found}"
            )
        blocks += [f"{container}.{child}" if container else child for child, _ in module.named_children()]
    return tuple(blocks)


def _auto_containers(model: nn.Module) -> tuple[str, ...]:
    chosen: list[str] = []
    for name, module in model.named_modules():
        if any(name == c or name.startswith(f"{c}.") or c == "" for c in chosen):
            continue
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        numbered = children and all(child.isdigit() for child, _ in children)
        holds_blocks = any(
            any(True for _ in child.children()) and any(type(m) in QUANT_MODULES for m in child.modules())
            for _, child in children
        )
        if numbered and holds_blocks:
            chosen.append(name)
    return tuple(chosen)


def _model_keeps(model: nn.Module) -> tuple[str, ...]:
    value = getattr(model, "high_precision_modules", ())
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise QuantError(f"model.high_precision_modules must be a tuple of module names, got {value!r}")
    return tuple(value)


def _block_reason(name: str, blocks: tuple[str, ...], policy: Policy) -> str | None:
    for index, block in enumerate(blocks):
        if name == block or name.startswith(f"{block}."):
            if index < policy.keep_first_n:
                return f"in block {block} (one of the first {policy.keep_first_n}: keep_first_n)"
            if index >= len(blocks) - policy.keep_last_n:
                return f"in block {block} (one of the last {policy.keep_last_n}: keep_last_n)"
            return None
    return None


def _owns_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def _not_gemm_reason(module: nn.Module, parent: nn.Module | None) -> str:
    if isinstance(parent, nn.MultiheadAttention):
        return "inside nn.MultiheadAttention, whose forward reads the weights directly: stays high precision"
    if isinstance(module, tuple(QUANT_MODULES)):
        return f"{type(module).__name__} subclasses a GEMM layer with its own forward; only exact nn types are swapped"
    return f"not a GEMM layer ({type(module).__name__}): stays high precision"


def apply(model: nn.Module, policy: Policy) -> QuantReport:
    """Swap the layers ``policy`` selects for ``QuantLinear``/``QuantConv2d``/``QuantConvTranspose2d`` in place.

    Parameters are shared, not copied, so optimizers and checkpoints keep working. Returns the report. Raises
    ``QuantError`` for a policy the model cannot satisfy (unknown block container, keep_first_n + keep_last_n
    covering every block, a model that is itself a single layer).
    """
    if not isinstance(policy, Policy):
        raise QuantError(f"quant.apply needs a quant.Policy, got {type(policy).__name__}")
    if type(model) in QUANT_MODULES:
        raise QuantError("quant.apply swaps sub-modules in place; wrap a single layer in nn.Sequential first")
    keeps_blocks = policy.keep_first_n + policy.keep_last_n > 0
    blocks = find_blocks(model, policy.block_containers)
    if keeps_blocks and not blocks:
        raise QuantError(
            "keep_first_n/keep_last_n need blocks, but the model has no block container; set "
            "block_containers (names of nn.ModuleList/nn.Sequential modules holding the blocks)"
        )
    if keeps_blocks and policy.keep_first_n + policy.keep_last_n >= len(blocks):
        raise QuantError(
            f"keep_first_n={policy.keep_first_n} + keep_last_n={policy.keep_last_n} covers all {len(blocks)} blocks; "
            f"nothing would be quantized (valid: a sum below {len(blocks)})"
        )
    model_keeps = _model_keeps(model) if policy.model_defaults else ()
    modules = dict(model.named_modules())
    rows: list[LayerDecision] = []
    swaps: list[tuple[str, nn.Module]] = []
    index = 0
    for name, module in modules.items():
        if not name or not (_owns_parameters(module) or isinstance(module, QUANTIZED_TYPES)):
            continue
        parent = modules.get(name.rpartition(".")[0])
        reason = _reason(name, module, parent, policy, model_keeps, blocks)
        if reason is None:
            quantizer = policy.quantizer(name, index)
            reason = shape_problem(module, quantizer)
            if reason is None:
                index += 1
                swaps.append((name, QUANT_MODULES[type(module)].from_module(module, quantizer)))
                rows.append(_row(name, module, quantizer.describe_roles(), policy))
                continue
        rows.append(_row(name, module, None, policy, reason))
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, new)
    return QuantReport(policy=policy, rows=tuple(rows), blocks=blocks)


def _reason(name: str, module: nn.Module, parent: nn.Module | None, policy: Policy, model_keeps: tuple[str, ...],
            blocks: tuple[str, ...]) -> str | None:
    if isinstance(module, QUANTIZED_TYPES):
        return "already quantized (quant.apply ran before)"
    if type(module) not in QUANT_MODULES or isinstance(parent, nn.MultiheadAttention):
        return _not_gemm_reason(module, parent)
    if policy.format == NONE:
        return "policy format=none"
    type_name = type(module).__name__
    if type_name not in policy.include_types:
        return f"type {type_name} not in include_types"
    if type_name in policy.exclude_types:
        return f"type {type_name} in exclude_types"
    kept = _first_match(name, model_keeps)
    if kept is not None:
        return f"the model keeps {kept!r} in high precision (high_precision_modules)"
    if _first_match(name, policy.include) is None:
        return "matches no include pattern"
    excluded = _first_match(name, policy.exclude)
    if excluded is not None:
        return f"matches exclude pattern {excluded!r}"
    block = _block_reason(name, blocks, policy)
    if block is not None:
        return block
    return next((f"kept in high precision: {why}" for kept, why in policy.keep_high_precision if kept == name), None)


def _row(name: str, module: nn.Module, roles: dict[str, str] | None, policy: Policy, reason: str = "") -> LayerDecision:
    weight = getattr(module, "weight", None)
    params = [p for p in module.parameters(recurse=False)]
    shape = tuple(weight.shape) if isinstance(weight, nn.Parameter) else (tuple(params[0].shape) if params else ())
    roles = roles or {role: "-" for role in ROLES}
    quantized = reason == ""
    return LayerDecision(
        name=name,
        type=type(module).__name__,
        shape=shape,
        quantized=quantized,
        format=policy.format if quantized else "-",
        weight=roles["weight"],
        input=roles["input"],
        grad=roles["grad"],
        backward=policy.recipe.backward if quantized else "-",
        reason=reason,
        backend="emulated" if quantized else "-",
    )
