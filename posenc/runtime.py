"""Where and how a run computes: the device, the dtype (one autocast rule for training, evaluation, sampling
and the benchmarks) and whether torch.compile pays for itself."""
from contextlib import nullcontext

from posenc.config import ConfigError


def resolve_device(device: str) -> str:
    """auto -> cuda, else mps, else cpu; a named device is checked here, so a typo is one line."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"bad value {device!r} for config key 'device': expected auto, cpu, cuda, cuda:N or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[kind]
    index = torch.device(device).index
    if not available or (kind == "cuda" and index is not None and index >= torch.cuda.device_count()):
        raise ConfigError(f"device {device!r} is not available on this machine: use --device=auto or cpu")
    return device


def trim_freed_memory():
    """Hand the heap's free pages back to the system (glibc's malloc_trim). Attention in blocks of queries makes
    tensors of a new size at every block (each sees more keys); glibc keeps the freed ones on its heap as holes
    that later, larger blocks cannot reuse: explain.py at 32k tokens peaked at 3.1 GiB resident for ~0.6 GiB of
    live tensors. Measured alone on 2 cores (a RoPE model of the CPU scale, one document, explain.py at 32k):
    trimming after every 16 blocks of posenc.attention.probed_attention, 0.60 GiB in 43 s (0.63 GiB at 16k),
    against 3.1 GiB in 39 s untrimmed; glibc's mmap threshold fixed at 1 MiB instead gave 0.56 GiB in 85 s
    (each large tensor a fresh mmap). Not glibc (macOS, Windows, musl): nothing. True when glibc trimmed."""
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0) in (0, 1)
    except (OSError, AttributeError):
        return False


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX, ARM's BF16 extension), as Linux
    reports it. There bf16 autocast trains a small model ~1.25x faster; elsewhere bf16 is emulated and slower
    than fp32, so we never guess: no /proc/cpuinfo (macOS, Windows) means fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(dtype: str, device: str) -> tuple[str, str]:
    """(dtype, why): the one rule of every stage (training, evaluation, sampling, the benchmarks). auto ->
    bfloat16 where the device computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16, AMX or ARM's
    BF16), float32 elsewhere (emulated bf16 is slower than fp32). How a stage applies it is its own: training
    and evaluation autocast (fp32 weights, optimizer state and losses), sampling casts the weights once."""
    import torch
    if dtype != "auto":
        return dtype, "set explicitly"
    if device.startswith("cuda"):
        ok = torch.cuda.is_bf16_supported()
        return ("bfloat16", "auto: this GPU has bf16") if ok else ("float32", "auto: this GPU has no bf16")
    if device == "cpu":
        if cpu_has_native_bf16():
            return "bfloat16", "auto: this CPU computes bf16 natively"
        return "float32", "auto: this CPU has no native bf16 (emulated bf16 is slower than fp32)"
    return "float32", f"auto: float32 on {device}"


def autocast(device: str, dtype: str):
    """The mixed-precision context of a resolved dtype: autocast to it (the model keeps its losses and position
    tables in fp32), or nothing for float32."""
    import torch
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


COMPILE_MIN_STEPS = 500  # torch.compile costs ~45 s on 2 CPU cores and saves ~0.1 s a step at the CPU scale


def resolve_compile(compile, device: str, steps: int) -> tuple[bool, str]:
    """(compile, why). auto -> compile when the run is long enough to repay the compilation, on CUDA, or on a
    CPU with a C++ compiler (TorchInductor generates C++ there)."""
    import shutil
    if compile != "auto":
        return compile, "set explicitly"
    if steps < COMPILE_MIN_STEPS:
        return False, f"auto: {steps} steps are too few to repay compiling (from {COMPILE_MIN_STEPS})"
    if device.startswith("cuda"):
        return True, f"auto: {steps} steps repay compiling"
    if device == "cpu" and any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return True, f"auto: {steps} steps repay compiling, and a C++ compiler is here for TorchInductor"
    return False, f"auto: no torch.compile backend worth using on {device}"
