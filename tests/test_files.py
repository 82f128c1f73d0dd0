"""Atomic files and folders (cm3.core.files): readers see the old version or the new one, never a part, and a
killed writer leaves nothing a later run would trust."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cm3.core import files
from cm3.core.files import atomic_folder, atomic_write, read_json, recover_folder, write_json


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_takes_bytes_text_json_or_a_writer(tmp_path):
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(tmp_path / "b.txt", "text")
    write_json(tmp_path / "c.json", {"b": 1, "a": [2]})
    atomic_write(tmp_path / "d.npy", lambda staged: staged.write_text(staged.suffix))  # the staging name keeps it
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" and (tmp_path / "b.txt").read_text() == "text"
    assert read_json(tmp_path / "c.json") == {"a": [2], "b": 1}
    assert (tmp_path / "d.npy").read_text() == ".npy"
    assert hidden(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"step": 1})

    def half_then_fail(staged: Path) -> None:
        staged.write_text('{"step": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert read_json(target) == {"step": 1} and hidden(tmp_path) == []


def test_atomic_folder_replaces_the_whole_folder_and_an_error_keeps_the_old(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_folder(target) as staging:
        (staging / "weights").write_text("old")
        (staging / "sub").mkdir()
        (staging / "sub" / "marker").write_text("old")
    with atomic_folder(target) as staging:
        assert (target / "weights").read_text() == "old"  # the old folder is untouched while the new one is built
        (staging / "weights").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["weights"] and (target / "weights").read_text() == "new"
    with pytest.raises(ValueError):
        with atomic_folder(target) as staging:
            (staging / "weights").write_text("partial")
            raise ValueError("bad input half way")
    assert (target / "weights").read_text() == "new" and hidden(tmp_path) == []


def test_the_target_names_a_whole_folder_after_every_step_of_a_replacement(tmp_path, monkeypatch):
    target = tmp_path / "tokenizer"

    def save(version: int) -> None:
        with atomic_folder(target) as staging:
            (staging / "a").write_text(str(version))
            (staging / "b").write_text(str(version))

    def state() -> str:
        if not target.exists():
            return "missing"
        a, b = (target / "a").read_text(), (target / "b").read_text()
        return a if a == b else "mixed"

    save(0)
    states: list[str] = []
    real_replace, real_exchange = os.replace, files._exchange

    def replace(source, destination):
        real_replace(source, destination)
        states.append(state())

    def exchange(a, b):
        swapped = real_exchange(a, b)
        states.append(state())
        return swapped

    monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.setattr(files, "_exchange", exchange)
    save(1)
    monkeypatch.undo()
    probe = [tmp_path / "probe-a", tmp_path / "probe-b"]
    for folder in probe:
        folder.mkdir()
    if files._exchange(*probe):  # renameat2(RENAME_EXCHANGE): Linux on ext4, xfs, btrfs, tmpfs, ...
        assert states == ["1"]  # one step, from the whole old folder to the whole new one
    else:  # elsewhere: a moment without the folder, never a mix of two
        assert states == ["missing", "1"]
    assert state() == "1"


KILLED_WRITER = """
import os, signal, sys
from cm3.core.files import atomic_folder
with atomic_folder(sys.argv[1]) as staging:
    (staging / "weights").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_leaves_the_old_folder_and_a_leftover_the_next_write_removes(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_folder(target) as staging:
        (staging / "weights").write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], capture_output=True)
    assert proc.returncode == -9
    assert (target / "weights").read_text() == "old"
    assert [name.split("-")[0] for name in hidden(tmp_path)] == [".ckpt.staging"]  # hidden: nothing reads it
    with atomic_folder(target) as staging:
        (staging / "weights").write_text("new")
    assert (target / "weights").read_text() == "new" and hidden(tmp_path) == []


def test_without_an_atomic_exchange_a_crash_between_the_renames_is_undone(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    with atomic_folder(target) as staging:
        (staging / "weights").write_text("old")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def crash_on_the_second_rename(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError("killed between the two renames")
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", crash_on_the_second_rename)
    with pytest.raises(OSError):
        with atomic_folder(target) as staging:
            (staging / "weights").write_text("new")
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert not target.exists() and [n.split("-")[0] for n in hidden(tmp_path)] == [".ckpt.old"]
    recover_folder(target)
    assert (target / "weights").read_text() == "old" and hidden(tmp_path) == []
    with atomic_folder(target) as staging:  # the fallback path itself replaces the folder
        (staging / "weights").write_text("new")
    assert (target / "weights").read_text() == "new" and hidden(tmp_path) == []


def test_write_json_sorts_keys_so_equal_payloads_are_equal_files(tmp_path):
    write_json(tmp_path / "x.json", {"b": 1, "a": 2})
    write_json(tmp_path / "y.json", {"a": 2, "b": 1})
    assert (tmp_path / "x.json").read_bytes() == (tmp_path / "y.json").read_bytes()
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2, "b": 1}
