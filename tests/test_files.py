"""Atomic files and directories, safe reads: allot/files.py."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from allot.exceptions import AllotError, ArtifactError
from allot.files import (
    MAX_JSON_BYTES,
    atomic_write,
    check_output,
    read_json,
    read_regular,
    staged_directory,
)

OWNED = {"a.txt", "b.txt", "c.txt"}.__contains__


def _write(directory: Path, **files: str) -> None:
    for name, text in files.items():
        atomic_write(directory / name, text.encode())


def _contents(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def test_a_staged_directory_replaces_the_old_one_whole(tmp_path) -> None:
    target = tmp_path / "out"
    with staged_directory(target, OWNED) as staging:
        _write(staging, **{"a.txt": "old", "b.txt": "old"})
    assert _contents(target) == {"a.txt": "old", "b.txt": "old"}
    with staged_directory(target, OWNED) as staging:
        _write(staging, **{"a.txt": "new", "c.txt": "new"})
        assert _contents(target) == {"a.txt": "old", "b.txt": "old"}  # untouched meanwhile
    assert _contents(target) == {"a.txt": "new", "c.txt": "new"}  # b.txt was stale: gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_an_interrupt_or_a_full_disk_leaves_the_old_directory(tmp_path, stop) -> None:
    target = tmp_path / "out"
    with staged_directory(target, OWNED) as staging:
        _write(staging, **{"a.txt": "old"})
    with (
        pytest.raises((KeyboardInterrupt, AllotError)) as caught,
        staged_directory(target, OWNED) as staging,
    ):
        _write(staging, **{"a.txt": "new", "b.txt": "new"})
        raise stop
    if isinstance(stop, OSError):
        assert "No space left on device" in str(caught.value)
        assert "left as it was" in str(caught.value)
    assert _contents(target) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _interrupting(function, count):
    """`function`, counting its calls in `count`, raising KeyboardInterrupt at call number
    `count["stop"]` instead of running."""

    def call(*args, **kwargs):
        count["calls"] += 1
        if count["calls"] == count["stop"]:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return call


def test_an_interrupt_at_any_file_operation_of_the_commit_leaves_old_or_new(
    tmp_path, monkeypatch
) -> None:
    """Every rename, exchange, fsync and removal of the swap is a point an interrupt can hit:
    stop at each in turn, with the atomic exchange and with the two-rename fallback. Afterwards
    (and after the tidying a next run does) the target holds the old files or the new ones."""
    import allot.files as files

    old, new = {"a.txt": "old", "b.txt": "old"}, {"a.txt": "new", "c.txt": "new"}
    for exchange in (True, False):
        step, finished = 0, False
        while not finished:
            target = tmp_path / f"out-{exchange}-{step}"
            with staged_directory(target, OWNED) as staging:
                _write(staging, **old)
            count = {"calls": 0, "stop": step + 1}

            with monkeypatch.context() as patch:
                try:
                    with staged_directory(target, OWNED) as staging:
                        _write(staging, **new)
                        # from here on, only the commit runs: count its file operations
                        for name in ("rename", "fsync", "unlink", "rmdir"):
                            patch.setattr(os, name, _interrupting(getattr(os, name), count))
                        patch.setattr(
                            files,
                            "_exchange",
                            _interrupting(
                                files._exchange if exchange else lambda a, b: False, count
                            ),
                        )
                    finished = True
                except KeyboardInterrupt:
                    pass
            with monkeypatch.context() as patch:
                patch.setattr(files, "_owner_alive", lambda path: False)  # as for a next run
                files._recover(target)
            assert _contents(target) in (old, new), (exchange, step)
            assert not finished or _contents(target) == new
            step += 1
        assert step >= 3  # the commit really was cut at several points


def test_what_a_killed_run_left_is_tidied_by_the_next(tmp_path) -> None:
    target = tmp_path / "out"
    with staged_directory(target, OWNED) as staging:
        _write(staging, **{"a.txt": "old"})
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    left = tmp_path / f".out.allot-new-{dead}-abcd1234"
    left.mkdir()
    (left / "a.txt").write_text("half")
    # the two-rename fallback killed between its renames: the old directory is aside
    target.rename(tmp_path / f".out.allot-old-{dead}-0")
    with staged_directory(target, OWNED) as staging:
        assert _contents(target) == {"a.txt": "old"}  # put back before anything else
        _write(staging, **{"a.txt": "new"})
    assert _contents(target) == {"a.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_checks_come_first_and_protect_the_users_files(tmp_path) -> None:
    weights = tmp_path / "model" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"float weights")
    for out, message in [
        (tmp_path / "model", "contains the input"),
        (tmp_path, "contains the input"),
        (weights, "contains the input"),
    ]:
        with pytest.raises(AllotError, match=message):
            check_output(out, OWNED, [weights])
    (tmp_path / "file").write_text("x")
    with pytest.raises(AllotError, match="is the current directory or holds it"):
        check_output(Path.cwd(), OWNED)
    with pytest.raises(AllotError, match="is the current directory or holds it"):
        check_output(Path.cwd().parent, OWNED)
    with pytest.raises(AllotError, match="is a file"):
        check_output(tmp_path / "file", OWNED)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("allot's")
    (mine / "notes.md").write_text("the user's")
    with (
        pytest.raises(AllotError, match=r"holds files allot does not write \(notes.md\)"),
        staged_directory(mine, OWNED),
    ):
        raise AssertionError("the check must come before the work")
    assert weights.read_bytes() == b"float weights"
    assert (mine / "notes.md").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine", "model"]


def test_a_symlink_at_the_output_is_replaced_not_followed(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    link = tmp_path / "out"
    link.symlink_to(elsewhere)
    with staged_directory(link, OWNED) as staging:
        _write(staging, **{"a.txt": "new"})
    assert not link.is_symlink() and _contents(link) == {"a.txt": "new"}
    assert _contents(elsewhere) == {"precious.txt": "keep me"}


def test_written_files_and_directories_get_ordinary_permissions(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        with staged_directory(tmp_path / "out", OWNED) as staging:
            _write(staging, **{"a.txt": "x"})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "a.txt").stat().st_mode) == 0o644


def test_special_and_oversize_files_are_refused_before_reading(tmp_path) -> None:
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with pytest.raises(AllotError, match="not a regular file"):
        read_json(fifo)
    with pytest.raises(AllotError, match="not a regular file"):
        read_regular(Path("/dev/zero"), 100)
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing is really written
    with pytest.raises(AllotError, match="more than the"):
        read_json(big)
    with pytest.raises(AllotError, match="cannot read"):
        read_json(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nests JSON too deeply"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"a": ', "not valid JSON"),
    ],
)
def test_bad_json_is_one_clear_error(tmp_path, content, message) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(AllotError, match=message):
        read_json(path)


def test_sigint_during_a_commit_waits_until_the_names_are_in_place(tmp_path, monkeypatch) -> None:
    """The two-rename fallback holds SIGINT back: a signal arriving between its renames is
    delivered after them, so the directory is new and whole when KeyboardInterrupt arrives."""
    import allot.files as files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    with staged_directory(target, OWNED) as staging:
        _write(staging, **{"a.txt": "old"})
    real_rename = os.rename

    def rename_then_signal(a, b):
        real_rename(a, b)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt), staged_directory(target, OWNED) as staging:
        _write(staging, **{"a.txt": "new"})
        monkeypatch.setattr(os, "rename", rename_then_signal)
    monkeypatch.setattr(os, "rename", real_rename)
    assert _contents(target) == {"a.txt": "new"}


def test_an_output_path_with_a_nul_character_is_refused_in_one_line(tmp_path) -> None:
    """Found by the slow fuzz suite: `--out '\\x00'` reached os.mkdir's ValueError."""
    staged = staged_directory(tmp_path / "a\x00b", lambda name: False, (), ArtifactError)
    with pytest.raises(ArtifactError, match="NUL character"), staged:
        pass
    assert list(tmp_path.iterdir()) == []
