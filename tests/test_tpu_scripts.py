"""tpu/*.sh in --dry-run: the exact gcloud commands they would run, the remote shell they send
(executed here under ``sh`` on a fake worker), bad flags, and shellcheck when it is installed.

Nothing here reaches Google Cloud: every command goes through ``run`` in tpu/common.sh, which
only prints in dry-run mode.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = ["create", "setup", "copy", "launch", "logs", "stop", "pull", "watchdog"]
BASE = ["--name", "my-tpu", "--zone", "us-central2-b"]
TPU_ENV = ("OCLJAX_TPU_NAME", "OCLJAX_TPU_ZONE", "OCLJAX_TPU_PROJECT", "OCLJAX_TPU_TYPE",
           "OCLJAX_TPU_VERSION", "OCLJAX_TPU_REMOTE_DIR", "OCLJAX_TPU_DRY_RUN",
           "OCLJAX_TPU_SYNC_DIR", "OCLJAX_TPU_FAKE_STATE", "OCLJAX_TPU_FAKE_STATUS")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture(scope="module", autouse=True)
def no_real_gcloud(tmp_path_factory):
    """A ``gcloud`` first on PATH that fails: a command that escaped dry-run reaches no cloud."""
    bin_dir = tmp_path_factory.mktemp("fake-gcloud")
    (bin_dir / "gcloud").write_text("#!/bin/sh\necho 'real gcloud called' >&2\nexit 99\n")
    (bin_dir / "gcloud").chmod(0o755)
    FAKE_PATH[0] = f"{bin_dir}:{os.environ['PATH']}"


FAKE_PATH = [os.environ["PATH"]]


def script(name, *args, env=None, dry=True, stdin=subprocess.DEVNULL):
    """Run tpu/NAME.sh (``--dry-run`` first unless ``dry=False``); the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k not in TPU_ENV}
    full_env.update({"PATH": FAKE_PATH[0], **(env or {})})
    argv = ["bash", str(TPU / f"{name}.sh"), *(["--dry-run"] if dry else []), *args]
    return subprocess.run(argv, env=full_env, stdin=stdin, capture_output=True, text=True,
                          timeout=30)


def commands(proc):
    """The dry-run commands printed on stdout, each as its argv."""
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
    return [shlex.split(line[2:]) for line in lines]


def remote(argv):
    """The remote shell text of a printed ``gcloud ... ssh`` command."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    return argv[argv.index("--command") + 1]


SSH_ALL = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b",
           "--worker=all", "--command"]


def test_create_single_vm_and_pod_slice_commands():
    (cmd,) = commands(script("create", *BASE, "--type", "v4-8", "--spot"))
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone",
                   "us-central2-b", "--accelerator-type", "v4-8", "--version",
                   "tpu-ubuntu2204-base", "--spot"]
    # v5e-8 is gcloud's v5litepod-8, with its own runtime; --project and passthrough flags.
    (cmd,) = commands(script("create", *BASE, "--type=v5e-8", "--project", "my proj",
                             "--preemptible", "--", "--labels=team=ocl"))
    assert cmd[5:] == ["my-tpu", "--zone", "us-central2-b", "--project", "my proj",
                       "--accelerator-type", "v5litepod-8", "--version", "v2-alpha-tpuv5-lite",
                       "--preemptible", "--labels=team=ocl"]
    # Defaults from the environment; an explicit --version wins over the type's default.
    env = {"OCLJAX_TPU_NAME": "pod", "OCLJAX_TPU_ZONE": "z", "OCLJAX_TPU_TYPE": "v4-32"}
    (cmd,) = commands(script("create", "--version", "v2-alpha", env=env))
    assert cmd[4:] == ["create", "pod", "--zone", "z", "--accelerator-type", "v4-32",
                       "--version", "v2-alpha"]


def test_dry_run_from_the_environment_prints_the_same():
    env = {"OCLJAX_TPU_DRY_RUN": "1"}
    proc = script("create", *BASE, "--type", "v4-8", env=env, dry=False)
    assert commands(proc) == commands(script("create", *BASE, "--type", "v4-8"))


@pytest.mark.parametrize(("name", "args", "message"), [
    ("create", ["--name", "t", "--type", "v4-8"], "missing --zone (or set OCLJAX_TPU_ZONE)"),
    ("create", ["--zone", "z", "--type", "v4-8"], "missing --name (or set OCLJAX_TPU_NAME)"),
    ("create", [*BASE], "missing --type (or set OCLJAX_TPU_TYPE)"),
    ("create", [*BASE, "--type", "v9-8"], "no default runtime version for --type v9-8"),
    ("create", [*BASE, "--type", "v4-8", "--spot", "--preemptible"], "exclude each other"),
    ("create", [*BASE, "--zone"], "--zone needs a value"),
    ("create", [*BASE, "--type", "v4-8", "--bogus"], "unknown option --bogus"),
    ("create", ["--name", "My_TPU", "--zone", "z", "--type", "v4-8"], "--name My_TPU"),
    ("launch", [*BASE, "split_mnist"], "missing --out"),
    ("launch", [*BASE, "--out", "runs/x"], "missing EXPERIMENT"),
    ("launch", [*BASE, "--out", "/abs/run", "split_mnist"], "relative to the project"),
    ("launch", [*BASE, "--out", "runs/x", "split_mnist", "--out", "y"], "sets the run dir"),
    ("launch", [*BASE, "--out", "runs/x", "--env", "1X=2", "split_mnist"], "KEY=VALUE"),
    ("logs", [*BASE, "--out", "runs/x", "--worker", "first"], "--worker first"),
    ("launch", [*BASE, "--out", "runs/x", "split_mnist", "--dry-run"], "before EXPERIMENT"),
    ("watchdog", [*BASE, "--out", "runs/x", "split_mnist"], "missing --type"),
    ("watchdog", [*BASE, "--type", "v4-8", "split_mnist"], "missing --out"),
    ("watchdog", [*BASE, "--type", "v4-8", "--out", "runs/x"], "missing EXPERIMENT"),
])
def test_bad_flags_exit_2_with_one_message(name, args, message):
    proc = script(name, *args)
    assert proc.returncode == 2
    assert proc.stdout == ""  # nothing would have run
    assert f"{name}.sh: error: " in proc.stderr and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    proc = script(name, "--help", dry=False)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: tpu/")
    assert "--dry-run" in proc.stdout and "OCLJAX_TPU_NAME" in proc.stdout


def test_copy_packs_without_venv_runs_git_and_unpacks_on_all_workers():
    tar, scp, ssh = commands(script("copy", *BASE, "--exclude", "./data"))
    assert tar[:2] == ["tar", "czf"] and tar[3:5] == ["-C", str(ROOT)] and tar[-1] == "."
    excluded = {a.removeprefix("--exclude=") for a in tar if a.startswith("--exclude=")}
    assert {"./.venv", "./runs", "./.git", "__pycache__", "./data"} <= excluded
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2], "my-tpu:ocljax-src.tgz",
                   "--zone", "us-central2-b", "--worker=all"]
    assert ssh[:-1] == SSH_ALL
    assert remote(ssh) == ("mkdir -p ocljax; cd && cd ocljax || exit 1; "
                           "tar xzf ~/ocljax-src.tgz && rm -f ~/ocljax-src.tgz")


def test_setup_installs_jax_tpu_and_the_project_on_all_workers():
    (ssh,) = commands(script("setup", *BASE, "--remote-dir", "work/o cl", "--check"))
    assert ssh[:-1] == SSH_ALL
    text = remote(ssh)
    assert text.startswith("set -e; cd && cd 'work/o cl' || exit 1; test -f pyproject.toml")
    assert "python3 -m venv .venv" in text
    assert ".venv/bin/pip install -q 'jax[tpu]'; .venv/bin/pip install -q -e '.[tpu]'" in text
    assert "jax.device_count()" in text
    (ssh,) = commands(script("setup", *BASE, "--jax", "jax[tpu]==0.6.2", "--python", "python3.11"))
    assert "python3.11 -m venv" in remote(ssh) and "'jax[tpu]==0.6.2'" in remote(ssh)


def test_launch_runs_the_experiment_with_nohup_on_all_workers():
    (ssh,) = commands(script("launch", *BASE, "--out", "runs/smnist", "--env",
                             "OCLJAX_DATA_DIR=data", "split_mnist", "--data-dir", "data",
                             "--seeds", "64"))
    assert ssh[:-1] == SSH_ALL
    assert ("OCLJAX_DISTRIBUTED=1 OCLJAX_DATA_DIR=data nohup setsid .venv/bin/python -m "
            "experiments.split_mnist --data-dir data --seeds 64 --out runs/smnist "
            '>> "$L/worker-$W.log" 2>&1 < /dev/null &') in remote(ssh)
    assert "L=runs/smnist.logs" in remote(ssh)
    (ssh,) = commands(script("launch", *BASE, "--out", "runs/smnist", "--resume", "--",
                             "experiments.permuted_mnist", "--seeds", "8"))
    assert "-m experiments.permuted_mnist --seeds 8 --resume runs/smnist >>" in remote(ssh)
    assert "--out" not in remote(ssh)


def fake_worker(tmp_path, worker=3):
    """A home folder with the project and a venv whose python records its call, and a PATH
    whose curl fails (no metadata server) and whose hostname names worker ``worker``."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    venv = home / "ocljax" / ".venv" / "bin"
    venv.mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "curl").write_text("#!/bin/sh\nexit 7\n")
    (bin_dir / "hostname").write_text(f"#!/bin/sh\necho t1v-n-0123abcd-w-{worker}\n")
    (venv / "python").write_text('#!/bin/sh\necho "D=$OCLJAX_DISTRIBUTED $*" > called\n'
                                 "exec sleep 20\n")
    for f in (bin_dir / "curl", bin_dir / "hostname", venv / "python"):
        f.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return home / "ocljax", env


def on_worker(text, env):
    return subprocess.run(["sh", "-c", text], env=env, capture_output=True, text=True,
                          timeout=20)


def wait_for(path):
    for _ in range(100):
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def test_remote_launch_and_status_on_a_fake_worker(tmp_path):
    project, env = fake_worker(tmp_path)
    (_, status_ssh, *_) = commands(script(
        "watchdog", *BASE, "--type", "v4-8", "--out", "runs/r 1", "--no-sync", "split_mnist"))
    status = remote(status_ssh)
    (launch_ssh,) = commands(script("launch", *BASE, "--out", "runs/r 1", "split_mnist",
                                    "--set", "note=it's"))
    assert on_worker(status, env).stdout == "ocljax-status worker=3 stopped\n"
    first = on_worker(remote(launch_ssh), env)
    assert first.returncode == 0 and "worker 3: started pid" in first.stdout
    logs = project / "runs" / "r 1.logs"
    pid = int(wait_for(logs / "worker-3.pid"))
    try:
        called = wait_for(project / "called")
        assert called == "D=1 -m experiments.split_mnist --set note=it's --out runs/r 1\n"
        assert on_worker(status, env).stdout == "ocljax-status worker=3 running\n"
        second = on_worker(remote(launch_ssh), env)  # refuses a second copy of the run
        assert second.returncode == 1 and "already running" in second.stderr
        log = (logs / "worker-3.log").read_text()
        assert log.startswith("=== ") and "--out 'runs/r 1'" in log
    finally:
        os.kill(pid, 9)
    for _ in range(100):  # the killed process disappears once reaped by init
        if on_worker(status, env).stdout.endswith("stopped\n"):
            break
        time.sleep(0.02)
    assert on_worker(status, env).stdout == "ocljax-status worker=3 stopped\n"
    run_dir = project / "runs" / "r 1"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"complete": false, "members": []}')
    assert on_worker(status, env).stdout.endswith(" stopped\n")
    (run_dir / "summary.json").write_text('{"members": [{"complete": true}], "complete": true}')
    assert on_worker(status, env).stdout == "ocljax-status worker=3 complete\n"
    (project / ".venv" / "bin" / "python").unlink()
    assert on_worker(status, env).stdout == "ocljax-status absent\n"


def test_pull_packs_run_logs_and_hidden_partials(tmp_path):
    project, env = fake_worker(tmp_path)
    sync = tmp_path / "sync"
    ssh, mkdir, scp, mv, untar = commands(script(
        "pull", *BASE, "--out", "runs/r1", env={"OCLJAX_TPU_SYNC_DIR": str(sync)}))
    archive = sync / "my-tpu" / "r1.tgz"
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone"]
    assert "--worker=0" in ssh
    assert mkdir == ["mkdir", "-p", str(archive.parent)]
    assert scp[5:7] == ["my-tpu:ocljax/.tpu-sync.tgz", f"{archive}.part"] and "--worker=0" in scp
    assert mv == ["mv", "-f", f"{archive}.part", str(archive)]
    assert untar[-2:] == ["-C", str(ROOT)]
    nothing = on_worker(remote(ssh), env)
    assert nothing.returncode == 3 and "nothing to pull yet" in nothing.stderr
    for rel in ("runs/r1/summary.json", "runs/r1.logs/worker-0.log",
                "runs/.r1.abc123/eval.jsonl", "runs/r10/summary.json"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(rel)
    assert on_worker(remote(ssh), env).returncode == 0
    with tarfile.open(project / ".tpu-sync.tgz") as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert names == {"runs/r1/summary.json", "runs/r1.logs/worker-0.log",
                     "runs/.r1.abc123/eval.jsonl"}
    # Unpacking here leaves the hidden partial out.
    dest = tmp_path / "local"
    dest.mkdir()
    argv = [a if a != str(archive) else str(project / ".tpu-sync.tgz") for a in untar[:-1]]
    subprocess.run([*argv, str(dest)], check=True)
    found = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert found == {"runs/r1/summary.json", "runs/r1.logs/worker-0.log"}


def test_logs_and_stop():
    (ssh,) = commands(script("logs", *BASE, "--out", "runs/x"))
    assert ssh[:-1] == SSH_ALL
    assert remote(ssh) == "cd && cd ocljax || exit 1; tail -v -n 50 runs/x.logs/worker-*.log"
    (ssh,) = commands(script("logs", *BASE, "--out", "runs/x", "--worker", "2", "--lines", "5",
                             "--follow"))
    assert "--worker=2" in ssh and remote(ssh).endswith("tail -v -n 5 -F runs/x.logs/worker-*.log")
    (delete,) = commands(script("stop", *BASE, "--yes"))
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone",
                      "us-central2-b", "--quiet"]
    # Without a terminal and without --yes it refuses (a real run: no --dry-run, no gcloud).
    proc = script("stop", *BASE, dry=False)
    assert proc.returncode == 2 and "pass --yes" in proc.stderr and proc.stdout == ""


WATCH = [*BASE, "--type", "v4-32", "--spot", "--out", "runs/smnist", "split_mnist",
         "--data-dir", "data", "--seeds", "64"]


def watchdog(state, status="running", *extra, sync_dir=None):
    env = {"OCLJAX_TPU_FAKE_STATE": state, "OCLJAX_TPU_FAKE_STATUS": status}
    if sync_dir is not None:
        env["OCLJAX_TPU_SYNC_DIR"] = str(sync_dir)
    return commands(script("watchdog", *extra, *WATCH, env=env))


def kinds(cmds):
    """A short name per command: gcloud subcommand (+ what an ssh does), or the program."""
    out = []
    for argv in cmds:
        if argv[0] != "gcloud":
            out.append(argv[0])
        elif argv[4] != "ssh":
            out.append(argv[4])
        else:
            text = remote(argv)
            out.append("ssh:" + next(k for k in ("ocljax-status", "pip install", "nohup",
                                                 "ocljax-src", ".tpu-sync") if k in text))
    return out


def test_watchdog_recreates_a_preempted_tpu_and_resumes(tmp_path):
    (tmp_path / "my-tpu").mkdir()
    (tmp_path / "my-tpu" / "smnist.tgz").write_bytes(b"")  # a pulled state to push back
    cmds = watchdog("PREEMPTED", sync_dir=tmp_path)
    assert kinds(cmds) == ["describe", "delete", "create", "tar", "scp", "ssh:ocljax-src",
                           "ssh:pip install", "scp", "ssh:.tpu-sync", "ssh:nohup"]
    assert cmds[0][4:] == ["describe", "my-tpu", "--zone", "us-central2-b",
                           "--format=value(state)"]
    assert cmds[1][-1] == "--quiet"
    assert cmds[2][4:] == ["create", "my-tpu", "--zone", "us-central2-b", "--accelerator-type",
                           "v4-32", "--version", "tpu-ubuntu2204-base", "--spot"]
    assert cmds[7][5:7] == [str(tmp_path / "my-tpu" / "smnist.tgz"),
                            "my-tpu:ocljax/.tpu-sync.tgz"]
    assert cmds[-1][:-1] == SSH_ALL
    assert ("OCLJAX_DISTRIBUTED=1 nohup setsid .venv/bin/python -m experiments.split_mnist "
            "--data-dir data --seeds 64 --resume runs/smnist >>") in remote(cmds[-1])


def test_watchdog_missing_tpu_is_created_and_start_launches_fresh(tmp_path):
    cmds = watchdog("MISSING", sync_dir=tmp_path)  # nothing pulled: nothing pushed
    assert kinds(cmds) == ["describe", "create", "tar", "scp", "ssh:ocljax-src",
                           "ssh:pip install", "ssh:nohup"]
    assert "--resume runs/smnist" in remote(cmds[-1])
    cmds = watchdog("MISSING", "running", "--start", sync_dir=tmp_path)
    assert "--out runs/smnist" in remote(cmds[-1]) and "--resume" not in remote(cmds[-1])


def test_watchdog_on_a_ready_tpu(tmp_path):
    # Running: pull the run's state, nothing else.
    cmds = watchdog("READY", "running", sync_dir=tmp_path)
    assert kinds(cmds) == ["describe", "ssh:ocljax-status", "ssh:.tpu-sync", "mkdir", "scp",
                           "mv"]
    assert "--worker=all" in cmds[1] and "--worker=0" in cmds[2] and "--worker=0" in cmds[4]
    # Stopped (crashed or restarted in place): relaunch with --resume only.
    assert kinds(watchdog("READY", "stopped", sync_dir=tmp_path)) == [
        "describe", "ssh:ocljax-status", "ssh:nohup"]
    # Workers without the project or venv: copy + setup first.
    assert kinds(watchdog("READY", "absent", "--no-sync")) == [
        "describe", "ssh:ocljax-status", "tar", "scp", "ssh:ocljax-src", "ssh:pip install",
        "ssh:nohup"]
    # Complete: last pull, unpack here, delete when asked, exit 0.
    cmds = watchdog("READY", "complete", "--delete-when-done", sync_dir=tmp_path)
    assert kinds(cmds) == ["describe", "ssh:ocljax-status", "ssh:.tpu-sync", "mkdir", "scp",
                           "mv", "tar", "delete"]
    assert cmds[-2][-2:] == ["-C", str(ROOT)] and cmds[-1][-1] == "--quiet"
    # Transitional states: wait.
    assert kinds(watchdog("CREATING")) == ["describe"]


def test_watchdog_refuses_bad_experiment_arguments_before_touching_the_tpu():
    proc = script("watchdog", *BASE, "--type", "v4-8", "--out", "runs/x", "split_mnist",
                  "--resume", "runs/x", env={"OCLJAX_TPU_FAKE_STATE": "MISSING"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--resume among the experiment's arguments" in proc.stderr


def test_watchdog_restart_limit_and_fake_state_guard():
    env = {"OCLJAX_TPU_FAKE_STATE": "READY", "OCLJAX_TPU_FAKE_STATUS": "stopped"}
    proc = script("watchdog", "--max-restarts", "0", "--no-sync", *WATCH, env=env)
    assert proc.returncode == 1 and "giving up: 0 restarts" in proc.stderr
    assert "nohup" not in proc.stdout
    proc = script("watchdog", *WATCH, env={"OCLJAX_TPU_FAKE_STATE": "PREEMPTED"}, dry=False)
    assert proc.returncode == 2 and "only work with --dry-run" in proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    files = [str(TPU / f"{name}.sh") for name in [*SCRIPTS, "common"]]
    proc = subprocess.run(["shellcheck", "-x", *files], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
