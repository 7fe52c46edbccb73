"""What the machine pi0 runs on can do, probed once per process: which device to run on and which dtype is fast there.

`dtype="auto"` is bf16 where torch runs bf16 GEMMs natively (CUDA devices with bf16; CPUs with
avx512_bf16 / AMX / ARM bf16, where oneDNN's bf16 kernels beat fp32) and fp32 elsewhere (an AVX2-only
CPU runs bf16 GEMMs ~6x slower than fp32). On a CPU the answer comes from the instruction-set flags the
kernel reports (/proc/cpuinfo: avx512_bf16, amx_bf16, ARM's bf16) together with oneDNN's own bf16 check;
where no flags can be read, from timing small bf16 and fp32 GEMMs (~0.1 s once). Never from CPU model
names. `PI0_NATIVE_BF16=0|1` overrides the probe.

`dtype="int8"` (CPU, engine): int8 weights (per output channel, made at load) and int8 activations (per
token, at each product), with the "auto" float dtype between them; `compute_dtype` says which.

fp16 is refused: Gemma's residual stream and MLP outputs exceed fp16's range (65504) with real weights,
and an fp16 pi0.5 silently produces garbage (it is known to score 0% on LIBERO).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F

NATIVE_BF16_MIN_SPEEDUP = 1.0  # timing fallback: bf16 counts as native where its GEMM is no slower than fp32
# (native bf16 runs 2-6x faster than fp32 here, emulated bf16 5-8x slower: the threshold sits between)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86; ARM reports "bf16" among its Features
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
DTYPE_CHOICES = ("auto", "bfloat16", "float32", "int8", "fp8")
FP8_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when torch sees a GPU, else cpu; anything else as torch spells it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here (torch {torch.__version__}); "
                         "use --device cpu")
    return d


def _cpu_flags() -> set[str] | None:
    """The CPU's instruction-set flags as the kernel reports them (Linux), or None."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):
            return set(line.split(":", 1)[1].split())
    return None


# oneDNN's int8 instruction sets, best first: (name, the /proc/cpuinfo flag, ONEDNN_MAX_CPU_ISA values that allow it)
_INT8_ISAS = (("AMX", "amx_int8", ("AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512_AMX_2")),
              ("AVX-512 VNNI", "avx512_vnni", ("AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16",
                                               "AVX10_1_512")),
              ("AVX-VNNI", "avx_vnni", ("AVX2_VNNI", "AVX2_VNNI_2")))


def int8_isa() -> tuple[str | None, bool]:
    """(the CPU's best int8 instruction set, whether it has an int8 dot product: VNNI or AMX), from the kernel's
    flags, held to ONEDNN_MAX_CPU_ISA when that is set (a cap to AVX2 takes the dot products away). None where no
    flags can be read."""
    flags = _cpu_flags()
    if flags is None:
        return None, False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    for i, (name, flag, allowed) in enumerate(_INT8_ISAS):
        # a cap allows this set if it names it or a better one
        ok_cap = not cap or cap == "ALL" or any(cap in a for _, _, a in _INT8_ISAS[: i + 1]) or cap in allowed
        if flag in flags and ok_cap:
            return name, True
    return ("AVX2" if "avx2" in flags else "no AVX2"), False


def _gemm_rates(m: int = 128, k: int = 1024, n: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """Best-of-`repeats` GFLOP/s of an fp32 and a bf16 GEMM, measured alternately (so that a busy spell
    on the machine hits both)."""
    ops = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k).to(dt), torch.randn(n, k).to(dt)
        F.linear(a, b)  # first call: kernel selection, packing caches
        ops[dt] = (a, b)
    best = {dt: float("inf") for dt in ops}
    for _ in range(repeats):
        for dt, (a, b) in ops.items():
            t = time.perf_counter()
            F.linear(a, b)
            best[dt] = min(best[dt], time.perf_counter() - t)
    return tuple(2 * m * k * n / best[dt] / 1e9 for dt in (torch.float32, torch.bfloat16))


def native_bf16(device_type: str) -> tuple[bool, str]:
    """(does torch run bf16 GEMMs natively on this device type, why we think so): PI0_NATIVE_BF16=0|1 if set, else
    the probe. Any other value of PI0_NATIVE_BF16 is an error."""
    forced = os.environ.get("PI0_NATIVE_BF16", "")
    if forced in ("0", "1"):
        return forced == "1", f"PI0_NATIVE_BF16={forced}"
    if forced:
        raise ValueError(f"PI0_NATIVE_BF16 is {forced!r}: set it to 0 (fp32 for dtype auto) or 1 (bf16), or unset it "
                         "to let pi0 probe the machine")
    return probe_bf16(device_type)


@functools.cache
def probe_bf16(device_type: str) -> tuple[bool, str]:
    """What the device itself says (once per process): CPU flags and oneDNN's check, or timed GEMMs."""
    if device_type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"{torch.cuda.get_device_name()} {'has' if ok else 'has no'} native bf16"
    if device_type != "cpu":
        return False, f"no bf16 probe for {device_type}"
    cap = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if flags is not None:
        have = sorted(f for f in flags if f in _BF16_FLAGS or f == "bf16")
        onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if have and onednn:
            return True, f"CPU ({cap}) has {', '.join(have)} and oneDNN runs bf16"
        return False, f"CPU ({cap}) has no native bf16 ({'no avx512_bf16 / amx_bf16 / bf16 flag' if not have else 'oneDNN refuses bf16'})"
    try:
        f32, b16 = _gemm_rates()
    except RuntimeError as e:  # a torch build without bf16 CPU kernels
        return False, f"bf16 GEMM failed here ({e})"
    ok = b16 >= NATIVE_BF16_MIN_SPEEDUP * f32
    return ok, f"CPU ({cap}) bf16 GEMM {b16:.0f} GFLOP/s vs fp32 {f32:.0f} GFLOP/s"


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> tuple[torch.dtype, str]:
    """The dtype to compute in and a one-line reason. "auto": bf16 where it is native, fp32 otherwise."""
    dev = resolve_device(device)
    if isinstance(dtype, str):
        if dtype == "auto":
            ok, why = native_bf16(dev.type)
            chosen = torch.bfloat16 if ok else torch.float32
            return chosen, f"dtype auto -> {_name(chosen)} on {dev.type} ({why})"
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        dtype = _DTYPES[dtype]
    if dtype == torch.float16:
        raise ValueError("float16 is not supported: Gemma's activations exceed fp16's range (65504) with real "
                         "weights, which gives wrong actions without an error. Use bfloat16 (or auto) or float32.")
    if dtype == torch.int8:
        if dev.type != "cpu":
            raise ValueError(f"int8 runs on CPUs (dynamic W8A8 through oneDNN / torch._int_mm); on {dev.type} use "
                             "bfloat16 or auto")
        compute, why = resolve_dtype("auto", dev)
        return dtype, f"dtype int8 -> int8 weights and activations, {_name(compute)} between them ({why})"
    if dtype == torch.float8_e4m3fn:
        cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
        if cap is None or cap < FP8_CAPABILITY:
            where = f"{dev.type} has none" if cap is None else f"{torch.cuda.get_device_name(dev)} is {cap[0]}.{cap[1]}"
            raise ValueError(f"fp8 runs on GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                             f"Blackwell); {where}. Use bfloat16 or auto (int8 on a CPU)")
        return dtype, "dtype fp8 -> e4m3 weights (a scale per output channel) and activations (a scale per token), " \
                      "bf16 between them"
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported: choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype == torch.bfloat16:  # asked for: PI0_NATIVE_BF16 only colours the note (the probe where it is unusable)
        forced = os.environ.get("PI0_NATIVE_BF16", "")
        ok, why = native_bf16(dev.type) if forced in ("", "0", "1") else probe_bf16(dev.type)
        if not ok:
            return dtype, f"dtype bfloat16 as asked, but this {dev.type} has no native bf16 ({why}): expect it to be slow here"
    return dtype, f"dtype {_name(dtype)} as asked"


def compute_dtype(dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """The float dtype a model of (resolved) `dtype` computes in: itself, for int8 the "auto" float dtype, for fp8
    bf16."""
    if dtype == torch.float8_e4m3fn:
        return torch.bfloat16
    return resolve_dtype("auto", device)[0] if dtype == torch.int8 else dtype


def describe_machine() -> str:
    """The machine by its model, as the project's records name it: "2-core AMD EPYC (family 25 model 1), AVX2, no
    native bf16", the CPU from the kernel's report (cores this process may use), a CUDA GPU by its name."""
    model, family, number = "CPU", None, None
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and model == "CPU":
                model = value
            elif key == "cpu family" and family is None:
                family = value
            elif key == "model" and number is None:
                number = value
    except OSError:
        import platform

        model = platform.processor() or platform.machine() or "CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    flags = _cpu_flags() or set()
    isa = next((name for name, flag in (("AMX", "amx_bf16"), ("AVX-512", "avx512f"), ("AVX2", "avx2"))
                if flag in flags), torch.backends.cpu.get_cpu_capability())
    cpu = f"{cores}-core {model}" + (f" (family {family} model {number})" if family and number else "")
    bf16 = "native bf16" if probe_bf16("cpu")[0] else "no native bf16"
    gpu = f"; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {isa}, {bf16}{gpu}"


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """What a report must say of how it was made: the command, the versions and the machine."""
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("pi0", "numpy", "metaworld", "mujoco"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {"command": " ".join(["pi0", *(sys.argv[1:] if argv is None else argv)]), "versions": versions,
            "machine": describe_machine()}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_gpu_gib(device: torch.device) -> float | None:
    """The most GPU memory torch has allocated on `device` so far, or None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _mallopt(param: int, value: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextlib.contextmanager
def weights_allocation() -> Iterator[None]:
    """glibc's allocator tuned for building a model, then for running it. glibc raises its mmap threshold (up
    to 32 MiB) each time a large block is freed; while weights are made, freed transients (an Orbax leaf, a
    staging buffer, a weight before packing) would then put later weights on the heap, in holes that are never
    returned (+0.6 GiB resident at full size, measured): so inside, a fixed 1 MiB threshold keeps every large
    tensor in its own mapping. After: a 32 MiB threshold and 64 MiB trim threshold (where glibc's own
    adjustment ends), so per-call activations are reused from the heap, not page-faulted in afresh from a new
    mapping at every call (the 1 MiB threshold left on: bf16 W1 4.2 s -> 5.5 s, measured)."""
    _mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _mallopt(_M_TRIM_THRESHOLD, 64 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
