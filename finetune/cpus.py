"""How many CPUs this process may use: the cores it may run on, and the CPU time it is allowed.

A container started with `--cpus 2`, or a Kubernetes pod with a CPU limit of 2, still sees
every core of its host, and torch starts one thread per core: on a 64-core host, 64 threads
sharing 2 CPUs' worth of time, each throttled in turn while the others wait for it at every
operation's end. So the CPU time allowed by the process's cgroup (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`) bounds both torch's threads and the loaders' workers.
Measured on a 2-core machine in a cgroup allowed 1 CPU (BENCHMARKS.md, "Threads within a CPU
limit"): Lite0's feature pass ran 25-28 images/s with torch's 2 threads, 32-33 with 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores() -> int:
    """The cores this process may run on, no more than the CPU time its cgroup allows (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_limit()
    # (rounded down: never more threads than the time allowed; a limit of 1.9 gets 1, as Go's automaxprocs does)
    return max(1, min(cores, math.floor(quota))) if quota is not None else cores


def workers_within_cores(requested: int) -> int:
    """Loader processes asked for, at most one per usable core: more only wait for the CPU (and
    torch prints a multi-line warning about them)."""
    return min(requested, usable_cores())


def too_many_workers_note(requested: int | None) -> str | None:
    """What to tell a user whose --workers is more than this process's cores (None: nothing)."""
    cores = usable_cores()
    if requested is None or requested <= cores:
        return None
    return f"--workers {requested}: this process may use {cores} core{'s' if cores != 1 else ''}; using {cores} loader processes."


def cpu_limit(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """CPUs' worth of time this process's cgroup may use (the tightest limit along its path to the
    root), None where there is none or none can be read. `membership`: /proc/self/cgroup's text."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    limits = [limit for folder, files in limit_files(root, membership) for limit in [read_limit(folder, files)]
              if limit is not None]
    return min(limits) if limits else None


def limit_files(root: Path, membership: str) -> list[tuple[Path, tuple[str, ...]]]:
    """(folder, the files that hold its limit) for the process's cgroup and each one above it,
    in v2's hierarchy and in v1's cpu controller. Inside a container the path named may not
    exist under the container's mount, whose top is then the container's own cgroup: the
    folders that do not exist are left out."""
    found = []
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2
            bases, files = [root], ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1
            bases, files = [root / controllers, root / "cpu", root / "cpu,cpuacct"], ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        for base in bases:
            for folder in _up_to(base, path):
                if folder.is_dir() and (folder, files) not in found:
                    found.append((folder, files))
    return found


def _up_to(base: Path, path: str) -> list[Path]:
    parts = [p for p in path.split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def read_limit(folder: Path, files: tuple[str, ...]) -> float | None:
    """The limit in CPUs one cgroup folder sets; None for none ("max", -1) or one unreadable."""
    try:
        if files == ("cpu.max",):
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        else:
            quota, period = ((folder / name).read_text().strip() for name in files)
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None
