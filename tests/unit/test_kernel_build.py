"""Where the CPU kernels build and how concurrent or killed builds are kept apart
(worker/kernels/__init__.py: `build_folder`, `build_lock`)."""

from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker import kernels

HOLD_LOCK = """
import sys, time
from pathlib import Path
from worker.kernels import build_lock
with build_lock(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_each_checkout_builds_in_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = kernels.build_folder()
    other = kernels.build_folder(tmp_path / "another-checkout" / "csrc")
    assert here.parent == other.parent == tmp_path
    assert here.name.startswith(kernels.EXTENSION) and other.name.startswith(kernels.EXTENSION)
    assert here != other
    assert kernels.build_folder() == here  # stable for one checkout


def test_a_dead_builds_torch_lock_file_is_removed(tmp_path):
    (tmp_path / "lock").write_text("")  # what torch leaves when its builder is killed
    with kernels.build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def lock_is_free(folder: Path) -> bool:
    with (folder / "spindle-build.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@pytest.mark.timeout(60)
def test_the_build_lock_excludes_others_and_dies_with_its_holder(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        assert not lock_is_free(tmp_path)
        holder.send_signal(signal.SIGKILL)  # killed mid-build: no clean-up runs
        holder.wait(timeout=10)
        deadline = time.monotonic() + 5
        while not lock_is_free(tmp_path):
            assert time.monotonic() < deadline, "a dead holder's lock was never released"
            time.sleep(0.05)
    finally:
        holder.kill()
        holder.wait()
