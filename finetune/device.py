"""Device choice and the numeric precision that is fast and safe on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .cpus import usable_cores
from .errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str) -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU. An explicit choice that is absent is an error.
    cuDNN's autotuning (`cudnn.benchmark`) stays off, torch's default: a run meets many shapes
    (feature batches, views, heads' checks, the last batch of each loader, BatchNorm folding's
    checks), each timed anew, and on an H200 it doubled a small run's time (BENCHMARKS.md)."""
    name = name.lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise UsageError(f"unknown --device '{name}'; use one of {', '.join(DEVICES)}.")
    cuda = torch.cuda.is_available()
    mps = mps_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name.startswith("cuda") and not cuda:
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu (or auto).")
    if name.startswith("cuda:"):
        index = name.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has GPUs cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    if name == "mps" and not mps:
        raise UsageError("--device mps: Apple MPS is not available here; use --device cpu (or auto).")
    return torch.device(name)


@contextlib.contextmanager
def threads_within_usable_cores(cores: int | None = None):
    """Within the block, torch's threads no more than the cores this process may use (cpus.py: a
    container's CPU limit, which torch does not see; `cores` where the caller has it already);
    fewer, as OMP_NUM_THREADS or torchrun set, are left as they are. After it, the caller's number
    again (the library's callers keep theirs)."""
    before, cores = torch.get_num_threads(), cores or usable_cores()
    if before > cores:
        torch.set_num_threads(cores)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def torch_as_training_needs():
    """Within the block, what training assumes of torch's process-wide state, whatever the caller
    had set: gradients on (not inference mode: a caller inside a predict() loop had it on), float32
    as the default dtype; torch's and Python's random streams are the caller's again after it (the
    run seeds them for itself)."""
    import random

    python_stream, torch_stream, seed = random.getstate(), torch.get_rng_state(), torch.initial_seed()
    # (CUDA's streams where it runs already; where it does not, torch.manual_seed queued the caller's
    # seed for it, which the run's seeds replace: that seed is queued again after)
    cuda_streams = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    mps_stream = torch.mps.get_rng_state() if mps_available() else None
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        torch.set_default_dtype(dtype)
        random.setstate(python_stream)
        torch.set_rng_state(torch_stream)
        if cuda_streams is not None:
            torch.cuda.set_rng_state_all(cuda_streams)
        elif torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        if mps_stream is not None:
            torch.mps.set_rng_state(mps_stream)


def mps_available() -> bool:
    """Whether an Apple GPU (MPS) is usable here."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware computes it (Ampere GPUs on, AVX512-BF16/AMX CPUs), fp16 on older
    CUDA GPUs, fp32 on other CPUs."""
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_has_bf16(device) else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def _cuda_has_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16: compute capability 8 (Ampere) on, or ROCm. Not
    torch.cuda.is_bf16_supported(): it also says yes where bf16 is only emulated (a T4, a V100),
    where fp16 with loss scaling is the fast choice (and older torch versions cannot be told not to)."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16, so that bf16 is faster than fp32 on it."""
    cpu = getattr(torch, "cpu", None)
    return native_bf16(_mkldnn_takes_bf16(), _asks(cpu, "_is_avx512_bf16_supported"), _asks(cpu, "_is_amx_tile_supported"))


def native_bf16(mkldnn_takes_bf16: bool, avx512_bf16: bool, amx: bool) -> bool:
    """oneDNN takes bf16 on every x86 CPU with AVX-512, but only those with AVX512-BF16 or AMX
    compute it: on the others (Skylake to Ice Lake Xeons, common in clouds, and some laptops)
    it is emulated, and Lite0's feature pass ran at 0.6x its fp32 pace (BENCHMARKS.md, "bf16
    only where the CPU computes it"). ARM CPUs (torch reports neither there) run fp32: bf16 was
    not measured faster on any."""
    return mkldnn_takes_bf16 and (avx512_bf16 or amx)


def _mkldnn_takes_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _asks(module, name: str) -> bool:
    """module.name() where torch has that check; False where it has not (fp32 is never the slow choice)."""
    check = getattr(module, name, None)
    try:
        return bool(check()) if check is not None else False
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 arithmetic done in fp32 within the block, the settings restored as they were after.
    CUDA runs fp32 convolutions in TF32 by default (10 bits of mantissa): its rounding alone told
    BatchNorm folded from unfolded apart, beyond fold.TOLERANCE, in an emulation on Lite0, so the
    checks of fold.py run here. (Through torch's newer per-backend setting where it has one:
    reading the older flag raises where a program has set the newer one.)"""
    conv = getattr(torch.backends.cudnn, "conv", None)
    conv_before = conv.fp32_precision if conv is not None else torch.backends.cudnn.allow_tf32
    matmul_before = torch.get_float32_matmul_precision()
    _set_conv_precision(conv, "ieee" if conv is not None else False)
    if matmul_before != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        _set_conv_precision(conv, conv_before)
        if matmul_before != "highest":
            torch.set_float32_matmul_precision(matmul_before)


def _set_conv_precision(conv, value) -> None:
    if conv is not None:
        conv.fp32_precision = value
    else:
        torch.backends.cudnn.allow_tf32 = value


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_model_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NCHW from the loaders -> float 0..1 on the device, channels_last (faster convs)."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


# On CPUs, inference is faster in small batches whose activations stay in cache:
# EfficientNet-Lite0 at 288 px, bf16, 2 cores of an AMD EPYC ran 110-126 images/s in
# batches of 4-16 against 86-94 at 32 and 58-63 at 128 (BENCHMARKS.md). What fits in cache
# is a number of pixels, so smaller images go in proportionally larger chunks (at 64 px,
# chunks of 8 were slower than batches of 32). fp32 activations take twice bf16's bytes, and
# there half the chunk was the faster: 1.07-1.24x on a Xeon, its instruction set native or
# capped at AVX2 (BENCHMARKS.md, "Chunks in fp32"). GPUs want large batches: no chunking there.
CPU_CHUNK_PIXELS = 8 * 288 * 288
FP32_CHUNK_PIXELS = CPU_CHUNK_PIXELS // 2


def chunk_pixels(amp: torch.dtype | None) -> int:
    """Pixels a CPU computes at a time in this precision (None: fp32)."""
    return CPU_CHUNK_PIXELS if amp in (torch.bfloat16, torch.float16) else FP32_CHUNK_PIXELS


def forward_in_chunks(fn, x: torch.Tensor, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    """fn(x) for inference, computed about chunk_pixels(amp) pixels at a time on the CPU
    (`amp`: the precision autocast runs it in, None for fp32)."""
    chunk = max(1, chunk_pixels(amp) // (x.shape[-1] * x.shape[-2]))
    if device.type != "cpu" or len(x) <= chunk:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(chunk)])


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's kernels run after the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
