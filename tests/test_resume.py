"""Kill a run mid-way, resume it, get the uninterrupted run's numbers bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["-m", "experiments.quickstart", "--learner", "er,finetune", "--seeds", "2",
        "--set", "width=16", "--set", "eval_every=5", "--chunk-blocks", "2",
        "--checkpoint-every", "0", "--no-plots", "--probe-per-class", "20"]


def cli(*extra, wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *ARGS, *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err
    return proc


def numbers(run_dir: Path):
    summary = json.loads((run_dir / "summary.json").read_text())
    drop = {"wall_s_per_member"}  # timing differs between runs, nothing else may
    return summary["complete"], [{k: v for k, v in m.items() if k not in drop}
                                 for m in summary["members"]]


def wait_for_checkpoint(proc, root: Path, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [p for p in root.glob("variant-0/*") if p.name.isdigit()]
        if len(steps) >= 2:
            return
        if proc.poll() is not None:
            pytest.fail("the run ended before it wrote a checkpoint:\n" + proc.stderr.read())
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    code, _, err = cli("--out", str(out))
    assert code == 0, err
    return numbers(out)


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGKILL, marks=pytest.mark.slow),
                                 signal.SIGTERM])
def test_killed_run_resumes_bit_identically(tmp_path, reference, sig):
    out = tmp_path / "run"
    root = tmp_path / ".run.ckpt"
    proc = cli("--out", str(out), wait=False)
    wait_for_checkpoint(proc, root)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        assert "checkpoint of the one running were saved" in proc.stderr.read()
        complete, _ = numbers(out)  # a partial summary marked incomplete
        assert complete is False
    else:
        assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert root.is_dir()
    # starting again without --resume is refused and touches nothing
    code, _, err = cli("--out", str(out))
    assert code == 2 and "--resume" in err
    code, _, err = cli("--resume", str(out))
    assert code == 0, err
    assert numbers(out) == reference
    assert not root.exists()  # checkpoints are removed once the run is complete
    code, _, err = cli("--resume", str(out))
    assert code == 2 and "already complete" in err
