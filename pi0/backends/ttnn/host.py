"""The host executor: runs each ttnn call through that op's own `golden_function` from the real ttnn package, on the
CPU, where no Tenstorrent card is present.

Why: every Tensix program (the firmware included) is compiled at run time by Tenstorrent's RISC-V compiler, which no
reachable registry ships, so no device op runs without a card; but ttnn attaches to almost every op its torch
reference. Around each reference the executor does what the device would: it checks the call against the real op's
signature (the nanobind overloads, or the Python signature), and stores every result in the device's number format:
bf16 results, bfloat8_b / bfloat4_b tensors packed and unpacked by ttnn itself (block floats need ttnn's host
context, which it builds on a mock single-chip cluster). In fp32 (`ttnn.float32` everywhere) nothing is rounded, and
the model's logic is checked exactly. What it does not reproduce: the device's accumulation order and its low-fidelity
multiply modes, and any speed.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ttnn

# A single Blackhole P150 as a cluster descriptor: ttnn's host-side packing of block floats asks the (mock) cluster for
# its tile sizes. Only set when no card is present and nobody set one; no device call is ever made through it.
_MOCK_CLUSTER = """\
arch:
  0: blackhole
chips:
  {}
chip_unique_ids:
  0: 4476187513037
ethernet_connections:
  []
ethernet_connections_to_remote_devices:
  []
chips_with_mmio:
  - 0: 0
harvesting:
  0:
    noc_translation: true
    harvest_mask: 0
    dram_harvesting_mask: 0
    eth_harvesting_mask: 288
    pcie_harvesting_mask: 2
    l2cpu_harvesting_mask: 0
chip_to_boardtype:
  0: p150
boards:
  -
    - board_id: 4476187513037
    - board_type: p150
    - chips:
        - 0
asic_locations:
  0: 0
"""


def use_mock_cluster() -> None:
    """Point ttnn's host context at a mock single-chip cluster (before its first use), so block floats pack; its
    driver's info lines (on stdout) are kept to errors unless TT_LOGGER_LEVEL says otherwise."""
    os.environ.setdefault("TT_LOGGER_LEVEL", "error")
    if "TT_METAL_MOCK_CLUSTER_DESC_PATH" in os.environ:
        return
    path = Path(tempfile.gettempdir()) / f"pi0-ttnn-mock-p150-{os.getuid()}.yaml"
    if not path.exists() or path.read_text() != _MOCK_CLUSTER:
        path.write_text(_MOCK_CLUSTER)
    os.environ["TT_METAL_MOCK_CLUSTER_DESC_PATH"] = str(path)


@dataclass
class HostTensor:
    """A tensor as a card would hold it, kept on the host: its values (already in its number format) and its ttnn
    dtype and layout."""

    value: torch.Tensor
    dtype: Any  # ttnn.DataType
    layout: Any  # ttnn.Layout

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def __repr__(self) -> str:
        return f"HostTensor({list(self.value.shape)}, {self.dtype}, {self.layout})"


def to_format(value: torch.Tensor, dtype: Any) -> torch.Tensor:
    """`value` as a tensor of ttnn `dtype` stores it: fp32 as is, bf16 rounded to nearest even (as ttnn.from_torch
    rounds), block floats packed into tiles and unpacked by ttnn itself (held as bf16, which holds them exactly)."""
    if dtype == ttnn.float32:
        return value.float()
    if dtype == ttnn.bfloat16:
        return value.to(torch.bfloat16)
    if dtype in (ttnn.bfloat8_b, ttnn.bfloat4_b):
        packed = ttnn.from_torch(value.float().contiguous(), dtype=dtype, layout=ttnn.TILE_LAYOUT)
        return ttnn.to_torch(packed).to(torch.bfloat16)
    if dtype in (ttnn.uint32, ttnn.int32):
        return value.to(torch.int64)
    raise ValueError(f"the host executor has no number format for {dtype}")


# -- the real ops' signatures ------------------------------------------------------------------------------------


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


@dataclass(frozen=True)
class Param:
    """One parameter of a real op's overload: its kind, whether it has a default, and what it takes."""

    name: str
    keyword_only: bool
    required: bool
    tensor: str  # "tensor", "tensors" (a sequence of tensors), "maybe" (tensor or scalar), "" (no tensor)


def _param(text: str, keyword_only: bool) -> Param:
    name, _, rest = text.partition(":")
    annotation, _, default = rest.partition("=")
    kinds = [k.strip() for k in _split_top(annotation.replace("|", ","))]
    tensor_like = ["Tensor" in k and "Sequence" not in k for k in kinds]
    if any("Sequence[" in k and "Tensor" in k for k in kinds):
        tensor = "tensors"
    elif tensor_like and all(t or k == "None" for t, k in zip(tensor_like, kinds)):
        tensor = "tensor"
    else:
        tensor = "maybe" if any(tensor_like) else ""
    return Param(name.strip(), keyword_only, not default.strip(), tensor)


def overloads(op: Any) -> list[list[Param]]:
    """The real op's overloads as parameter lists: from its nanobind signatures, or its Python signature."""
    function = getattr(op, "function", op)
    nb = getattr(type(function).__call__, "__nb_signature__", None) or getattr(function, "__nb_signature__", None)
    if nb:
        result = []
        for text, *_ in nb:
            inner = text[text.index("(") + 1: text.rindex(") ->") if ") ->" in text else text.rindex(")")]
            params, keyword_only = [], False
            for part in _split_top(inner):
                if part == "self":
                    continue
                if part == "*":
                    keyword_only = True
                    continue
                params.append(_param(part, keyword_only))
            result.append(params)
        return result
    params = []
    for p in inspect.signature(function).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        required = p.default is inspect.Parameter.empty
        params.append(Param(p.name, p.kind == p.KEYWORD_ONLY, required, "maybe"))
    return [params]


def _fits(params: list[Param], args: tuple, kwargs: dict) -> str | None:
    """None if the call binds to this overload, else why not."""
    positional = [p for p in params if not p.keyword_only]
    if len(args) > len(positional):
        return f"{len(args)} positional arguments, at most {len(positional)}"
    by_name = {p.name: p for p in params}
    given = {p.name: a for p, a in zip(positional, args)}
    for key, value in kwargs.items():
        if key not in by_name:
            return f"no parameter {key!r}"
        if key in given:
            return f"{key!r} given twice"
        given[key] = value
    for p in params:
        if p.required and p.name not in given:
            return f"{p.name!r} missing"
        value = given.get(p.name)
        if value is None:
            continue
        if p.tensor == "tensor" and not isinstance(value, HostTensor):
            return f"{p.name!r} must be a tensor, got {type(value).__name__}"
        if p.tensor == "" and isinstance(value, HostTensor):
            return f"{p.name!r} takes no tensor"
        if p.tensor == "tensors" and not all(isinstance(v, HostTensor) for v in value):
            return f"{p.name!r} must be a sequence of tensors"
    return None


def check_call(name: str, op: Any, args: tuple, kwargs: dict, cache: dict[str, list[list[Param]]]) -> None:
    """Raise TypeError unless (args, kwargs) binds to one of the real op's overloads."""
    if name not in cache:
        cache[name] = overloads(op)
    reasons = [_fits(params, args, kwargs) for params in cache[name]]
    if all(r is not None for r in reasons):
        shown = "; ".join(f"overload {i}: {r}" for i, r in enumerate(reasons))
        raise TypeError(f"ttnn.{name} would refuse this call on a device ({shown})")


# -- the executor -------------------------------------------------------------------------------------------------


def _unwrap(value: Any) -> Any:
    if isinstance(value, HostTensor):
        return value.value
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    return value


def _out_dtype(args: tuple, kwargs: dict) -> Any:
    """The result's format: `dtype=`, else a format given positionally (typecast), else the first input's."""
    if kwargs.get("dtype") is not None:
        return kwargs["dtype"]
    for value in args:
        if isinstance(value, ttnn.DataType):
            return value
    for value in (*args, *kwargs.values()):
        if isinstance(value, HostTensor):
            return value.dtype
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], HostTensor):
            return value[0].dtype
    return ttnn.bfloat16


class HostExecutor:
    """ttnn as the model calls it (`tt.linear(x, w, bias=b)`, `tt.from_torch(...)`, `tt.bfloat16`), run on the host:
    each op's golden function, checked against the real op's signature, its result stored in the device's format
    (the `dtype=` asked for, else the first input's). `counts[stage]` counts the op calls per stage."""

    emulated = True
    device = None

    def __init__(self):
        use_mock_cluster()
        self._signatures: dict[str, list[list[Param]]] = {}
        self.counts: dict[str, Counter] = {}
        self.seconds: dict[str, float] = {}
        self.stage = "setup"

    def describe(self) -> str:
        return ("no Tenstorrent card: each ttnn op runs as its ttnn golden function on the host (emulation: the "
                "device's number formats, not its speed)")

    def __getattr__(self, name: str) -> Any:
        target = getattr(ttnn, name)
        if getattr(target, "golden_function", None) is None:
            return target  # dtypes, layouts, memory configs
        return lambda *args, **kwargs: self._run(name, target, args, kwargs)

    def from_torch(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> HostTensor:
        """ttnn.from_torch: the tensor placed in its format (and layout) as the device would hold it."""
        check_call("from_torch", ttnn.from_torch, (tensor, *args), kwargs, self._signatures)
        dtype = kwargs.get("dtype", args[0] if args else None)
        if dtype is None:
            raise TypeError("from_torch without dtype=: state every tensor's format")
        layout = kwargs.get("layout", ttnn.ROW_MAJOR_LAYOUT)
        return HostTensor(to_format(tensor.detach().cpu(), dtype), dtype, layout)

    def to_torch(self, tensor: HostTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        check_call("to_torch", ttnn.to_torch, (tensor, *args), kwargs, self._signatures)
        return tensor.value

    def _run(self, name: str, op: Any, args: tuple, kwargs: dict) -> Any:
        check_call(name, op, args, kwargs, self._signatures)
        start = time.perf_counter()
        out = op.golden_function(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        dtype = _out_dtype(args, kwargs)
        layout = kwargs.get("layout") or next((a.layout for a in args if isinstance(a, HostTensor)), ttnn.TILE_LAYOUT)
        if isinstance(out, (list, tuple)):
            out = type(out)(HostTensor(to_format(o, dtype), dtype, layout) for o in out)
        else:
            out = HostTensor(to_format(out, dtype), dtype, layout)
        self.counts.setdefault(self.stage, Counter())[name] += 1
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + time.perf_counter() - start
        return out
