"""Reading a compiled program's optimized HLO text (`compiled.as_text()`): the collectives one
device runs, and the bytes and FLOPs of every top-level operation, named by the code it came from.

The compiler's `cost_analysis()` gives one total per program; this module splits it. Each
top-level instruction (in the entry computation, and in while-loop bodies times their trip
counts) is charged the bytes of its operands and of its result, each in its tiled layout
(`T(8,128)` pads the two minor dimensions, as the chip stores them), the way XLA's cost analysis
charges a fusion. FLOPs are counted for the matrix multiplications inside fusions (2 x output
elements x contracted size). Each instruction carries the `op_name` of the JAX operation it was
made from (`jit(train_step)/transpose(jvp(CLIPCAER))/image_encoder/.../attn/q/dot_general`), which
`caer_jax.plan --breakdown` groups by model part.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4}
_ITEMSIZE.update({"u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8})
# One array of a shape: dtype, dims, and the layout in braces (minor-to-major and tiling), if any.
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\([1-9]\d*\)")
_TILE = re.compile(r"T\(([\d,]+)\)(?:\((\d+),(\d+)\))?")
# An instruction: `%name = SHAPE opcode(operands), attributes`. SHAPE is an array or a tuple.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
# A computation's header starts its line (instructions are indented) and opens its body.
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPERAND = re.compile(r"%([\w.\-]+)")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->")
_WINDOW = re.compile(r"window=\{size=([\dx]+)(?:[^}]*?lhs_dilate=([\dx]+))?")
# Instructions that move no data of their own (views, tuples, and the halves of async pairs whose
# other half is charged).
_FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
}


def _shape_bytes(shape_text: str, tiled: bool = True, hbm_only: bool = False) -> int:
    """Bytes of the arrays in a shape (a tuple's summed); with `tiled`, each array padded to
    its layout's tiles (the minor dimensions of `T(8,128)`; bf16's `(2,1)` packs row pairs);
    with `hbm_only`, only the arrays in the default memory space (a layout's `S(n)` names
    another: on-chip memory such as v4's CMEM, or scalar memory)."""
    total = 0
    for dtype, dims_text, layout in _ARRAY.findall(shape_text):
        if hbm_only and on_chip(layout or ""):
            continue
        dims = [int(d) for d in dims_text.split(",") if d]
        itemsize = _ITEMSIZE.get(dtype, 4)
        tile = _TILE.search(layout or "") if tiled else None
        if tile and dims:
            sizes = [int(t) for t in tile.group(1).split(",")]
            if tile.group(2):  # sub-word packing: (2,1) stores two rows per 32-bit word row
                sizes[0] *= int(tile.group(2))
            order = [int(d) for d in layout.strip("{}").split(":")[0].split(",") if d]
            physical = [dims[d] for d in reversed(order)] if len(order) == len(dims) else dims
            for i, t in enumerate(reversed(sizes)):
                if i < len(physical):
                    j = len(physical) - 1 - i
                    physical[j] = -(-physical[j] // t) * t
            dims = physical
        total += itemsize * math.prod(dims)
    return total


def on_chip(shape_text: str) -> bool:
    """Whether an array of this shape (or an element of this tuple) is in an on-chip memory
    space: its layout names one (`S(n)`, n > 0)."""
    return bool(_MEMORY_SPACE.search(shape_text))


def tuple_elements(shape_text: str) -> list[str]:
    """The top-level elements of a tuple shape "(a, (b, c), d)"; [shape] for an array."""
    shape_text = shape_text.strip()
    if not shape_text.startswith("("):
        return [shape_text]
    elements, depth, start = [], 0, 1
    for i, char in enumerate(shape_text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if (char == "," and depth == 1) or depth == 0:
            elements.append(shape_text[start:i])
            start = i + 1
        if depth == 0:
            break
    return elements


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    shape: str
    operands: list[str]
    op_name: str
    calls: str | None
    line: str

    @property
    def custom_call_target(self) -> str | None:
        found = _CUSTOM_CALL_TARGET.search(self.line)
        return found.group(1) if found else None

    @property
    def branches(self) -> list[str]:
        """The branch computations of a conditional."""
        found = _BRANCHES.search(self.line)
        return _OPERAND.findall(found.group(1)) if found else []


@dataclasses.dataclass
class Module:
    """The computations of an HLO module: name -> instructions, and which one is the entry."""

    computations: dict[str, list[Instruction]]
    entry: str | None

    @classmethod
    def parse(cls, hlo_text: str) -> Module:
        computations: dict[str, list[Instruction]] = {}
        entry, current = None, None
        for line in hlo_text.splitlines():
            header = _COMPUTATION.match(line)
            if header:
                current = header.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
                continue
            match = _INSTRUCTION.match(line)
            if not (match and current):
                continue
            name, shape, opcode, rest = match.groups()
            # Operands end where the call's parenthesis closes (attributes follow it).
            depth, end = 1, len(rest)
            for i, char in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(char, 0)
                if depth == 0:
                    end = i
                    break
            op_name = _OP_NAME.search(line)
            calls = _CALLS.search(line) or _BODY.search(line)
            computations[current].append(
                Instruction(
                    name,
                    opcode,
                    shape,
                    _OPERAND.findall(rest[:end]),
                    op_name.group(1) if op_name else "",
                    calls.group(1) if calls else None,
                    line,
                )
            )
        return cls(computations, entry)

    def executed(self, computation: str | None = None, times: int = 1) -> list:
        """(instruction, times it runs per call) of every top-level instruction of
        `computation` (the entry by default): with those of while bodies (times their known
        trip count) and called computations; of a conditional, the instructions of each branch
        as a list of such lists (one of them runs)."""
        out: list = []
        for inst in self.computations.get(computation or self.entry or "", []):
            out.append((inst, times))
            if inst.opcode == "while" and inst.calls:
                trips = _TRIP_COUNT.search(inst.line)
                out += self.executed(inst.calls, times * (int(trips.group(1)) if trips else 1))
            elif inst.opcode == "call" and inst.calls:
                out += self.executed(inst.calls, times)
            elif inst.opcode == "conditional":
                out.append([self.executed(b, times) for b in inst.branches])
        return out


def collectives(hlo_text: str) -> dict:
    """{kind: {"count", "bytes"}} of the collectives one device runs per call of the compiled
    program `hlo_text` (its as_text()).

    Bytes are those of each op's result (the gathered array of an all-gather, the shard of a
    reduce-scatter), as logical elements times itemsize; the result of an asynchronous *-start
    op (but all-reduce-start) is the tuple (operands, results, contexts...), of which the results
    count. Ops inside a while loop (gradient accumulation's scan) count once per iteration where
    the compiler recorded the trip count.
    """
    totals = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for inst, times in _costliest_path(Module.parse(hlo_text).executed(), _shape_bytes_of):
        kind = inst.opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        shape = inst.shape
        if inst.opcode.endswith("-start") and kind != "all-reduce":
            shape = tuple_elements(shape)[1]
        totals[kind]["count"] += times
        totals[kind]["bytes"] += times * _shape_bytes(shape, tiled=False)
    return {kind: value for kind, value in totals.items() if value["count"]}


def _shape_bytes_of(inst: Instruction) -> int:
    return _shape_bytes(inst.shape)


def _costliest_path(executed: list, cost) -> list[tuple[Instruction, int]]:
    """`executed` with each conditional replaced by its branch of the highest summed `cost`
    (XLA's cost analysis charges a conditional its costliest branch)."""
    out = []
    for item in executed:
        if isinstance(item, list):
            branches = [_costliest_path(b, cost) for b in item]
            if branches:
                out += max(branches, key=lambda b: sum(cost(i) * t for i, t in b))
        else:
            out.append(item)
    return out


def _dims(shape_text: str) -> list[int]:
    array = _ARRAY.search(shape_text)
    return [int(d) for d in array.group(2).split(",") if d] if array else []


def _convolution_contraction(op: Instruction, shapes: dict[str, str]) -> int:
    """Input elements one output element of a convolution sums over: the kernel's input
    features times the window's taps that can meet real input. The TPU compiler writes matmuls
    as convolutions whose windows only batch (a window over a size-1 dimension padded around it,
    or one dilated by its own size): such a window meets one input element per output."""
    labels = _DIM_LABELS.search(op.line)
    lhs = _dims(shapes.get(op.operands[0], ""))
    kernel = _dims(shapes.get(op.operands[1], ""))
    if not (labels and len(lhs) == len(labels.group(1)) and len(kernel) == len(labels.group(2))):
        return 0
    lhs_labels, kernel_labels = labels.groups()
    contracted = math.prod(
        s for s, label in zip(kernel, kernel_labels, strict=True) if label == "i"
    )
    window = _WINDOW.search(op.line)
    if window:
        sizes = [int(x) for x in window.group(1).split("x")]
        dilate = [int(x) for x in (window.group(2) or "").split("x") if x] or [1] * len(sizes)
        for k, (size, d) in enumerate(zip(sizes, dilate, strict=True)):
            extent = (lhs[lhs_labels.index(str(k))] - 1) * d + 1  # the dilated input's length
            contracted *= -(-min(size, extent) // d)
    return contracted


def _matmul_flops(module: Module, inst: Instruction, shapes: dict[str, str]) -> float:
    """2 x output elements x contracted elements of the dots and convolutions in `inst` (itself,
    or the computation a fusion calls). A convolution contracts its kernel's input features and
    window (the TPU compiler writes matmuls as 1x1 convolutions, batched ones with groups)."""
    ops = [inst]
    if inst.opcode == "fusion" and inst.calls:
        ops = module.computations.get(inst.calls, [])
    flops = 0.0
    for op in ops:
        if op.opcode not in ("dot", "convolution") or len(op.operands) < 2:
            continue
        out = math.prod(_dims(op.shape))
        if op.opcode == "dot":
            contracting = _CONTRACTING.search(op.line)
            lhs = _dims(shapes.get(op.operands[0], ""))
            if not (contracting and lhs):
                continue
            contracted = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
        else:
            contracted = _convolution_contraction(op, shapes)
        flops += 2.0 * out * contracted
    return flops


@dataclasses.dataclass(frozen=True)
class OpCost:
    name: str
    opcode: str
    op_name: str
    times: int
    bytes: int  # per call of the program, times included
    flops: float
    hbm_bytes: int  # those of `bytes` in HBM (not in on-chip memory spaces)


def op_costs(hlo_text: str) -> list[OpCost]:
    """Bytes (operands + result, tiled) and matmul FLOPs of every top-level instruction."""
    module = Module.parse(hlo_text)
    shapes = {i.name: i.shape for insts in module.computations.values() for i in insts}

    def size(inst: Instruction, hbm_only: bool = False) -> int:
        if inst.opcode in _FREE or inst.opcode in ("while", "call", "conditional"):
            return 0
        if inst.opcode.endswith("-done"):
            return 0  # its -start is charged
        if inst.opcode.endswith("-start"):
            # (operands, results, context): a copy or slice reads what it writes
            operands, results = tuple_elements(inst.shape)[:2]
            if not hbm_only:
                return 2 * _shape_bytes(results)
            if inst.opcode == "slice-start":  # reads its slice of the operand the tuple holds whole
                read = 0 if on_chip(operands) else _shape_bytes(results)
            else:
                read = _shape_bytes(operands, hbm_only=True)
            return read + _shape_bytes(results, hbm_only=True)
        return _shape_bytes(inst.shape, hbm_only=hbm_only) + sum(
            _shape_bytes(shapes.get(o, ""), hbm_only=hbm_only) for o in inst.operands
        )

    costs = []
    for inst, times in _costliest_path(module.executed(), size):
        if inst.opcode in _FREE or inst.opcode in ("while", "call", "conditional"):
            continue
        costs.append(
            OpCost(
                inst.name,
                inst.opcode,
                inst.op_name,
                times,
                size(inst) * times,
                _matmul_flops(module, inst, shapes) * times,
                size(inst, hbm_only=True) * times,
            )
        )
    return costs
