"""One run per run folder (memagent_jax/run_lock.py): a second `train` / `demo` / `eval --out` on a
folder in use exits 2 naming the folder and the holder, and touches nothing; a lock left by a dead
process of this host is taken over with a warning."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memagent_jax.cli import main
from memagent_jax.run_lock import LOCK_FILE, RunFolderBusy, RunLock, run_folder_lock

_HOLDER = textwrap.dedent("""
    import sys, time
    from memagent_jax.run_lock import RunLock
    lock = RunLock(sys.argv[1], "memagent-jax train first.yaml")
    print("locked", flush=True)
    if sys.argv[2] == "die":
        import os
        os._exit(0)  # no release: the record stays behind, as after SIGKILL
    sys.stdin.read()  # hold until the test closes stdin
""")


def _holder(folder: Path, mode: str = "hold") -> subprocess.Popen:
    """A process that takes the lock of `folder` ("hold": until stdin closes; "die": exits at once
    without releasing it)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def held(tmp_path):
    """A run folder with a first run's files, locked by another live process."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = _holder(run)
    yield run, proc
    proc.stdin.close()
    proc.wait(timeout=30)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("command", ["train", "demo", "eval"])
def test_second_run_on_a_folder_in_use_exits_2_naming_folder_and_holder(held, command, capsys):
    run, proc = held
    before = _snapshot(run)
    argv = {"train": ["train", "memagent", f"trainer.out_dir={run}"],
            "demo": ["demo", "--out", str(run), "--config", "micro"],
            "eval": ["eval", "--model", str(run / "no-model"), "--tasks", "niah_single_1",
                     "--lengths", "1K", "--num-samples", "1", "--out", str(run)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert err.startswith(f"memagent-jax {command}: error: the run folder {run} is in use by another run")
    assert f"host {socket.gethostname()}, pid {proc.pid}, started " in err
    assert "`memagent-jax train first.yaml`" in err
    assert "another output folder" in err
    assert _snapshot(run) == before  # nothing the first run wrote is touched
    assert proc.poll() is None


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run, "die")
    proc.wait(timeout=30)
    left = json.loads((run / LOCK_FILE).read_text())
    assert left["pid"] == proc.pid
    with pytest.warns(UserWarning, match=rf"took over the lock left by a run that is no longer running "
                                         rf"\(host {socket.gethostname()}, pid {proc.pid}"):
        lock = RunLock(run, "second")
    record = json.loads((run / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["command"] == "second"
    lock.release()
    assert not (run / LOCK_FILE).exists()


def test_record_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "other-host", "pid": 1, "started": "then"}))
    with pytest.raises(RunFolderBusy, match=r"locked by a run on another host \(host other-host, pid 1") as e:
        RunLock(tmp_path)
    assert f"delete {tmp_path / LOCK_FILE}" in str(e.value)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "other-host"


def test_lock_is_released_after_the_run_even_on_error_and_taken_again(tmp_path):
    with pytest.raises(RuntimeError):
        with run_folder_lock(tmp_path / "a", "first") as lock:
            assert lock is not None and json.loads(lock.path.read_text())["command"] == "first"
            with pytest.raises(RunFolderBusy):  # the same folder twice, even in one process
                RunLock(tmp_path / "a")
            raise RuntimeError("the run failed")
    assert not (tmp_path / "a" / LOCK_FILE).exists()
    with run_folder_lock(tmp_path / "a", "second") as lock:
        assert json.loads(lock.path.read_text())["command"] == "second"
