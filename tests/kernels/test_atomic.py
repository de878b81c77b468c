"""kernels.atomic: a directory replaced by atomic_directory is swapped in one step where the system can exchange two
paths, and replaced all the same where it cannot (the kills themselves: tests/chaos, ``make test-chaos``)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import atomic
from kernels.atomic import atomic_directory, exchange

REPO = Path(__file__).resolve().parents[2]


def test_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from-a").write_text("a")
    (tmp_path / "b").mkdir()
    if not exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system cannot exchange two paths (renameat2 RENAME_EXCHANGE)")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from-a"]
    assert not any((tmp_path / "a").iterdir())


@pytest.mark.parametrize("can_exchange", [True, False], ids=["exchange", "two-renames"])
def test_atomic_directory_replaces_and_leaves_no_temporaries(tmp_path, monkeypatch, can_exchange):
    if not can_exchange:
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    target = tmp_path / "artefact"
    for version in ("old", "new"):
        with atomic_directory(target, marker="done") as tmp:
            (tmp / "data").write_text(version)
            (tmp / "done").write_text("")
    assert (target / "data").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["artefact"]  # the previous one and the temporaries are gone
    with pytest.raises(KeyboardInterrupt), atomic_directory(target, marker="done") as tmp:
        (tmp / "data").write_text("half")
        raise KeyboardInterrupt
    assert (target / "data").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["artefact"]


WRITER = """
import sys, time
from kernels.atomic import atomic_directory, atomic_file
with atomic_directory(sys.argv[1], marker="done") as tmp, atomic_file(sys.argv[2]) as tmp_file:
    (tmp / "done").write_text("")  # looks complete inside the temporary: the sweep must still take it
    tmp_file.write_text("half")
    print("writing", flush=True)
    time.sleep(600)
"""


def _writer(tmp_path, name: str) -> subprocess.Popen:
    """A process halfway through writing ``name`` (a directory) and ``name.txt`` (a file), until killed."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / name), str(tmp_path / f"{name}.txt")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_the_next_write_removes_the_temporaries_of_killed_writers_only(tmp_path):
    killed, running = _writer(tmp_path, "artefact"), _writer(tmp_path, "artefact")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    elsewhere = tmp_path / ".artefact.tmp-another-host-1-abc"  # a writer on another host of a shared file system
    elsewhere.mkdir()
    try:
        temporaries = sorted(p.name for p in tmp_path.iterdir())
        assert sum(f"-{killed.pid}-" in n for n in temporaries) == 2  # its directory and its file
        with atomic_directory(tmp_path / "artefact", marker="done") as tmp:
            (tmp / "done").write_text("")
        atomic.atomic_write_bytes(tmp_path / "artefact.txt", b"whole")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert not any(f"-{killed.pid}-" in n for n in left)
        assert sum(f"-{running.pid}-" in n for n in left) == 2 and elsewhere.name in left
        assert (tmp_path / "artefact" / "done").is_file() and (tmp_path / "artefact.txt").read_text() == "whole"
    finally:
        running.kill()
        running.wait()
