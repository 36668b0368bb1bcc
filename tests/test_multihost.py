"""Two processes over loopback (jax.distributed on CPU) give a single process's numbers."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["-m", "experiments.quickstart", "--learner", "er", "--seeds", "4", "--set", "width=16",
        "--set", "near_future=2", "--no-plots", "--quiet", "--probe-per-class", "0"]
TIMING = {"wall_s_per_member", "memory_per_member_bytes"}  # differ by layout, not by result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int, **extra) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OCLJAX_")}
    return {**base, "PYTHONPATH": str(ROOT), "OCLJAX_CACHE_DIR": "",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def members(run: Path) -> list[dict]:
    summary = json.loads((run / "summary.json").read_text())
    return [{k: v for k, v in m.items() if k not in TIMING} for m in summary["members"]]


def evals(paths) -> list[dict]:
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["member"], r["step"]))


def test_two_processes_equal_one(tmp_path):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, *ARGS, "--out", str(tmp_path / "multi")], cwd=ROOT,
        env=env(2, OCLJAX_DISTRIBUTED="1", OCLJAX_COORDINATOR=f"127.0.0.1:{port}",
                OCLJAX_NUM_PROCESSES="2", OCLJAX_PROCESS_ID=str(k)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    single = subprocess.run([sys.executable, *ARGS, "--out", str(tmp_path / "single")],
                            cwd=ROOT, env=env(4), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = tmp_path / "multi"
    assert members(multi) == members(tmp_path / "single")
    # each process wrote the evaluation rows of the members on its own devices
    p0, p1 = multi / "eval.p0.jsonl", multi / "eval.p1.jsonl"
    assert {r["member"] for r in evals([p0])} == {0, 1}
    assert {r["member"] for r in evals([p1])} == {2, 3}
    assert evals([p0, p1]) == evals([tmp_path / "single" / "eval.jsonl"])
    config = json.loads((multi / "config.json").read_text())
    assert config["complete"] is True


def test_distributed_is_requested_by_env_or_a_multi_worker_tpu(monkeypatch):
    from ocljax.sweep import distributed

    for key in ("OCLJAX_DISTRIBUTED", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.requested()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2")  # a single-host TPU VM
    assert not distributed.requested()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")  # a pod slice
    assert distributed.requested()
    monkeypatch.setenv("OCLJAX_DISTRIBUTED", "0")
    assert not distributed.requested()
    monkeypatch.setenv("OCLJAX_DISTRIBUTED", "1")
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    assert distributed.requested()


@pytest.mark.slow  # ~1 min of real processes; run with `pytest -m slow`
def test_two_processes_killed_and_resumed_equal_one(tmp_path):
    """SIGKILL both processes after their second checkpoint, resume both: same numbers as one
    uninterrupted process (checkpoints on a file system both processes see)."""
    import time

    args = [*ARGS, "--learner", "er,finetune", "--set", "eval_every=5", "--chunk-blocks", "2",
            "--checkpoint-every", "0"]

    def launch(flag):
        port = free_port()
        return [subprocess.Popen(
            [sys.executable, *args, flag, str(tmp_path / "multi")], cwd=ROOT,
            env=env(2, OCLJAX_DISTRIBUTED="1", OCLJAX_COORDINATOR=f"127.0.0.1:{port}",
                    OCLJAX_NUM_PROCESSES="2", OCLJAX_PROCESS_ID=str(k)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]

    procs = launch("--out")
    ckpt = tmp_path / ".multi.ckpt" / "variant-0"
    t0 = time.time()
    while len([p for p in ckpt.glob("*") if p.name.isdigit()]) < 2:
        assert time.time() - t0 < 240 and all(p.poll() is None for p in procs), "no checkpoint"
        time.sleep(0.05)
    for p in procs:
        p.kill()
        p.wait()
    assert not (tmp_path / "multi").exists()
    procs = launch("--resume")
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "single")],
                            cwd=ROOT, env=env(4), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    assert members(tmp_path / "multi") == members(tmp_path / "single")
    assert not (tmp_path / ".multi.ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single"]
