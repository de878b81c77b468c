"""kernels.atomic: a directory replaced by atomic_directory is swapped in one step where the system can exchange two
paths, and replaced all the same where it cannot (the kills themselves: tests/chaos, ``make test-chaos``)."""

from __future__ import annotations

import pytest

from kernels import atomic
from kernels.atomic import atomic_directory, exchange


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
