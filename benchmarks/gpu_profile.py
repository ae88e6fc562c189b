"""Where a `finetune train` run spends its time, profiled in-process (cProfile, main process).

    python3 benchmarks/gpu_profile.py OUT_DIR [--cudnn-benchmark] -- train ARGS...

Written for the GPU session of 2026-11-28, where `finetune train sample_data/shapes --arch
efficientnet_lite0 --finetune-epochs 2` took 70-105 s on an H200 against about 40 s on 2 CPU
cores (with cuDNN's autotuning on, as the tool then ran). --cudnn-benchmark turns it on again for a
comparison. Prints the wall time, the first CUDA call's cost, and the functions with the most
cumulative and own time; writes OUT_DIR/<label>.prof for pstats.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's finetune, as gpu_check does


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    own, train_args = args[:split], args[split + 1:]
    out = Path(own[0])
    bench = "--cudnn-benchmark" in own
    label = "bench" if bench else "nobench"
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    import torch
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    t_cuda = time.perf_counter() - t0

    import finetune.device as device_mod
    if bench:  # patched before the modules that import pick_device are loaded
        real_pick = device_mod.pick_device

        def pick_with_benchmark(name):
            device = real_pick(name)
            torch.backends.cudnn.benchmark = True
            return device
        device_mod.pick_device = pick_with_benchmark

    from finetune.cli import app
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    code = "an exception"
    try:
        app(args=train_args, prog_name="finetune")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:  # the profile so far is written whatever ended the run
        profiler.disable()
        report(profiler, out, label, code, time.perf_counter() - started, t_import, t_cuda, torch.backends.cudnn.benchmark)


def report(profiler, out: Path, label: str, code, wall: float, t_import: float, t_cuda: float, autotuning: bool) -> None:
    profiler.dump_stats(out / f"{label}.prof")
    print(f"## {label}: exit {code}, wall {wall:.1f} s, import torch {t_import:.1f} s, first CUDA call {t_cuda:.1f} s,"
          f" cudnn.benchmark at end {autotuning}", file=sys.stderr)
    for key, n in (("cumulative", 45), ("tottime", 25)):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(key).print_stats(n)
        lines = [ln for ln in text.getvalue().splitlines() if ln.strip()][-(n + 1):]
        print(f"## {label} by {key}", file=sys.stderr)
        print("\n".join(ln[:150] for ln in lines), file=sys.stderr)


if __name__ == "__main__":
    main()
