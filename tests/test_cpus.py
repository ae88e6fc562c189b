"""The CPUs a process may use: its cores, bounded by its cgroup's CPU limit (cpus.py)."""

from __future__ import annotations

import pytest
import torch

from finetune import cpus, device


def cgroup(root, path: str, **files: str) -> None:
    folder = root / path
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1) if name.startswith("cpu_") else folder / name).write_text(text)


@pytest.mark.parametrize("cpu_max, expected", [("200000 100000\n", 2.0), ("150000 100000\n", 1.5), ("max 100000\n", None)])
def test_a_v2_cgroup_limit_is_read_in_cpus(tmp_path, cpu_max, expected):
    cgroup(tmp_path, "", cpu_max=cpu_max)
    assert cpus.cpu_limit(tmp_path, "0::/\n") == expected


def test_the_tightest_limit_on_the_path_to_the_root_counts(tmp_path):
    # a pod limited to 3 CPUs, one of its containers to 1.5
    cgroup(tmp_path, "", cpu_max="max 100000")
    cgroup(tmp_path, "kubepods/pod1", cpu_max="300000 100000")
    cgroup(tmp_path, "kubepods/pod1/box", cpu_max="150000 100000")
    assert cpus.cpu_limit(tmp_path, "0::/kubepods/pod1/box\n") == 1.5
    assert cpus.cpu_limit(tmp_path, "0::/kubepods/pod1\n") == 3.0


def test_a_v1_cfs_quota_is_read_even_where_the_named_path_is_the_hosts(tmp_path):
    # in a container the mount's top is the container's own cgroup; the path named is the host's
    (tmp_path / "cpu,cpuacct").mkdir()
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cpus.cpu_limit(tmp_path, membership) == 1.0


@pytest.mark.parametrize("membership", ["4:cpu,cpuacct:/\n", "0::/\n", "garbage\n", ""])
def test_no_limit_where_none_is_set_or_none_can_be_read(tmp_path, membership):
    (tmp_path / "cpu,cpuacct").mkdir()
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu.max").write_text("not numbers\n")
    assert cpus.cpu_limit(tmp_path, membership) is None


def test_usable_cores_are_bounded_by_the_limit(monkeypatch):
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(cpus, "cpu_limit", lambda: 2.5)
    assert cpus.usable_cores() == 2
    monkeypatch.setattr(cpus, "cpu_limit", lambda: 0.5)
    assert cpus.usable_cores() == 1
    monkeypatch.setattr(cpus, "cpu_limit", lambda: None)
    assert cpus.usable_cores() == 64


def test_torchs_threads_come_down_to_the_cpu_limit_while_the_library_works_then_back(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(device, "usable_cores", lambda: 1)
        with device.threads_within_usable_cores():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 4  # (a library's caller keeps its own setting)
        torch.set_num_threads(1)  # fewer than the cores (OMP_NUM_THREADS, torchrun): left as set
        monkeypatch.setattr(device, "usable_cores", lambda: 2)
        with device.threads_within_usable_cores():
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
