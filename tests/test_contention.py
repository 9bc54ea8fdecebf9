"""Other load is judged against the cores the run uses, not against every CPU of the host."""

from __future__ import annotations

from types import SimpleNamespace

import psutil

from quantcheck.cost import contention
from quantcheck.cost.contention import OtherLoad


def test_disturbed_is_judged_against_the_cores_the_run_uses(monkeypatch) -> None:
    """A 64-CPU host whose run may use two cores: half a core taken by others is a quarter of what the model runs on,
    which stalls its threads at every barrier, though it is under 1 % of the host (the old threshold, 6.4 cores)."""
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 64)
    monkeypatch.setattr(contention.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert contention.cores_in_use() <= 2
    assert OtherLoad(0.5).fields("cpu") == {"other_cpu_load": 0.5, "disturbed": True}
    assert OtherLoad(0.1).fields("cpu")["disturbed"] is False  # 5 % of two cores: under the 10 % share
    assert OtherLoad(0.5).fields("cuda:0")["disturbed"] is False  # host load is judged on CPU only


def test_only_the_cpus_the_run_may_use_are_read(monkeypatch) -> None:
    """What others took is read from the CPUs in the process's affinity: work on the host's other CPUs does not
    count."""
    per_cpu = [
        SimpleNamespace(user=100.0 * (cpu + 1), nice=0.0, system=1.0, irq=0.0, softirq=0.0, steal=0.5)
        for cpu in range(4)
    ]
    monkeypatch.setattr(psutil, "cpu_times", lambda percpu=False: per_cpu if percpu else None)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 4)
    monkeypatch.setattr(contention.os, "sched_getaffinity", lambda pid: {1, 2}, raising=False)
    assert contention._machine_cpu_seconds() == (200.0 + 1.5) + (300.0 + 1.5)


def test_load_on_cpus_the_run_leaves_idle_does_not_disturb_it(monkeypatch) -> None:
    """16 CPUs allowed, 4 threads computing: a background job on one of the 12 idle CPUs leaves the model alone (it was
    flagged when others' load over all 16 was compared with 10 % of the 4); load beyond the idle ones plus 10 % is
    not."""
    monkeypatch.setattr(contention, "_cpus_allowed", lambda: 16)
    monkeypatch.setattr(contention, "cores_in_use", lambda: 4)
    assert contention.disturbance_limit() == 12 + 0.4
    assert OtherLoad(1.0).fields("cpu")["disturbed"] is False
    assert OtherLoad(12.5).fields("cpu")["disturbed"] is True
