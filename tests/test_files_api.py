"""The file API beyond the conformance suite: what the host does with a sandbox that lies.

The conformance checks (``file_api_*``, ``file_tree_roundtrip``, ``file_download_hostile_tree``)
hold every provider to the contract with an honest helper. Here the helper itself is
replaced (the local provider's ``python`` is a script that prints a crafted stream), as a
sandbox whose user controls its own Python could do: the host must still write nothing
outside the chosen directory, create no link leading out, leave no half-written files, and
hold a bounded amount of memory.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import sandbay
from sandbay import (
    LocalConfig,
    ProtocolError,
    SandboxError,
    SandboxFileExistsError,
    SandboxSpec,
)
from sandbay._fileops import link_stays_inside, split_relative

pytestmark = pytest.mark.anyio

ROOT = {"path": ".", "type": "dir", "size": 0, "mode": 0o755, "mtime": 0}


def rec(**fields: Any) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def file_rec(path: str, data: bytes, **extra: Any) -> bytes:
    header = rec(path=path, type="file", size=len(data), mode=0o644, mtime=0, **extra)
    return header + data + b"."


END = rec(end=True)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Path]:
    """A directory holding the download's destination and, beside it, a canary."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "canary.txt").write_bytes(b"untouched")
    yield tmp_path
    assert (tmp_path / "outside" / "canary.txt").read_bytes() == b"untouched"
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["canary.txt"]


def lying_python(tmp_path: Path, stream: bytes, *, then: str = "") -> LocalConfig:
    """A local provider whose sandbox Python prints ``stream``, whatever it is asked, then
    runs the shell command ``then``."""
    payload = tmp_path / "payload.bin"
    payload.write_bytes(stream)
    script = tmp_path / "python3"
    script.write_text(f"#!/bin/sh\ncat {payload}\n{then}\n")
    script.chmod(0o755)
    return LocalConfig(isolate=False, python=str(script))


def assert_contained(top: Path, dest: Path) -> None:
    """Nothing below top but dest's tree and the canary; no link below dest leads out;
    no temporary file left behind."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            assert ".sandbay-download" not in name, f"left behind: {path}"
            inside = path == dest or dest in path.parents
            assert inside or path.name in {"outside", "canary.txt", "payload.bin", "python3"}, path
            if path.is_symlink():
                lands = path.resolve()
                assert lands == dest.resolve() or dest.resolve() in lands.parents, path


async def download(config: LocalConfig, dest: Path) -> None:
    async with sandbay.open_sandbox(config, SandboxSpec()) as sb:
        await sb.download("tree", dest)


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param(file_rec("../escape.txt", b"x"), id="dot-dot"),
        pytest.param(file_rec("/tmp/escape.txt", b"x"), id="absolute"),
        pytest.param(file_rec("a/../../escape.txt", b"x"), id="dot-dot-inside"),
        pytest.param(file_rec("a//b", b"x"), id="empty-component"),
        pytest.param(file_rec("./a", b"x"), id="dot"),
        pytest.param(rec(path="../up", type="dir", size=0, mode=0o755, mtime=0), id="dir-up"),
        pytest.param(
            rec(path="../l", type="symlink", size=0, mode=0o777, mtime=0, target="x"),
            id="link-up",
        ),
    ],
)
async def test_names_leaving_the_copy_are_refused(
    box: Path, tmp_path: Path, entries: bytes
) -> None:
    dest = box / "dest"
    config = lying_python(tmp_path, rec(**ROOT) + file_rec("ok.txt", b"ok") + entries + END)
    with pytest.raises(ProtocolError, match="leave the directory"):
        await download(config, dest)
    assert (dest / "ok.txt").read_bytes() == b"ok"
    assert_contained(box, dest)


async def test_links_leading_out_are_not_created_and_never_written_through(
    box: Path, tmp_path: Path
) -> None:
    dest = box / "dest"
    dest.mkdir()
    # Already in the destination: a link out (yours, or left by an earlier download).
    (dest / "mine").symlink_to(box / "outside")

    def link(path: str, target: str) -> bytes:
        return rec(path=path, type="symlink", size=0, mode=0o777, mtime=0, target=target)

    stream = (
        rec(**ROOT)
        + rec(path="d", type="dir", size=0, mode=0o755, mtime=0)
        + rec(path="d/e", type="dir", size=0, mode=0o755, mtime=0)
        + link("abs", str(box / "outside"))
        + link("up", "../outside")
        + link("d/e/l1", "..")  # stays inside: it climbs to d
        + link("l2", "d/e/l1/../../..")  # would leave through l1: refused
        + link("inside", "d/e")
        + file_rec("mine", b"replaces the link")  # the link is replaced, not followed
        + END
    )
    await download(lying_python(tmp_path, stream), dest)
    assert not (dest / "abs").is_symlink()
    assert not (dest / "up").is_symlink()
    assert not (dest / "l2").is_symlink()
    assert os.readlink(dest / "d/e/l1") == ".."
    assert os.readlink(dest / "inside") == "d/e"
    assert not (dest / "mine").is_symlink()
    assert (dest / "mine").read_bytes() == b"replaces the link"
    assert_contained(box, dest)


async def test_entries_through_a_link_are_refused(box: Path, tmp_path: Path) -> None:
    dest = box / "dest"
    dest.mkdir()
    (dest / "mine").symlink_to(box / "outside")
    stream = rec(**ROOT) + file_rec("mine/canary.txt", b"overwritten") + END
    with pytest.raises(NotADirectoryError, match="link is never followed"):
        await download(lying_python(tmp_path, stream), dest)
    (dest / "mine").unlink()  # the only link out: the one that was there before
    assert_contained(box, dest)


async def test_link_created_by_the_tree_is_not_followed_by_later_entries(
    box: Path, tmp_path: Path
) -> None:
    dest = box / "dest"
    stream = (
        rec(**ROOT)
        + rec(path="sub", type="dir", size=0, mode=0o755, mtime=0)
        + rec(path="l", type="symlink", size=0, mode=0o777, mtime=0, target="sub")
        + file_rec("l/x", b"through the link")
        + END
    )
    with pytest.raises(NotADirectoryError):
        await download(lying_python(tmp_path, stream), dest)
    assert not (dest / "sub" / "x").exists()
    assert_contained(box, dest)


@pytest.mark.parametrize(
    ("stream", "error", "match"),
    [
        pytest.param(
            rec(**ROOT) + b'{"path": "' + b"a" * 100_000, ProtocolError, "over-long", id="long"
        ),
        pytest.param(rec(**ROOT) + b"[1, 2]\n", ProtocolError, "not a record", id="not-a-record"),
        pytest.param(
            rec(**ROOT) + rec(path="x", type="file", size=-1, mode=0, mtime=0),
            ProtocolError,
            "malformed",
            id="negative-size",
        ),
        pytest.param(
            rec(**ROOT) + rec(path="x", type="file", size=10**9, mode=0o644, mtime=0) + b"short",
            SandboxError,
            "file helper failed",
            id="truncated-small",
        ),
        pytest.param(
            rec(**ROOT) + rec(path="x", type="file", size=10**12, mode=0o644, mtime=0) + b"a" * 3,
            SandboxError,
            "file helper failed",
            id="truncated-huge",
        ),
        pytest.param(
            rec(**ROOT) + file_rec("x", b"data")[:-1] + b"?",
            ProtocolError,
            "after a file",
            id="bad-status",
        ),
        pytest.param(
            rec(**ROOT)
            + file_rec("x", b"data")[:-1]
            + b"!"
            + rec(error="EACCES", path="/x", message="Permission denied"),
            sandbay.SandboxPermissionError,
            "Permission denied",
            id="failed-file",
        ),
        pytest.param(rec(**ROOT), SandboxError, "file helper failed", id="no-end"),
    ],
)
async def test_malformed_streams_raise_and_leave_no_partial_files(
    box: Path, tmp_path: Path, stream: bytes, error: type[Exception], match: str
) -> None:
    dest = box / "dest"
    with pytest.raises(error, match=match):
        await download(lying_python(tmp_path, stream), dest)
    assert not (dest / "x").exists()
    assert_contained(box, dest)


async def test_other_entries_are_skipped_and_named_in_a_warning(
    box: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = box / "dest"
    stream = (
        rec(**ROOT)
        + rec(path="fifo", type="other", size=0, mode=0o644, mtime=0)
        + rec(path="out", type="symlink", size=0, mode=0o777, mtime=0, target="/etc")
        + END
    )
    with caplog.at_level("WARNING", logger="sandbay"):
        await download(lying_python(tmp_path, stream), dest)
    assert sorted(os.listdir(dest)) == []
    assert "skipped 2 entries" in caplog.text and "'fifo'" in caplog.text
    assert_contained(box, dest)


async def test_download_modes_are_made_safe(box: Path, tmp_path: Path) -> None:
    dest = box / "dest"
    stream = (
        rec(**ROOT)
        + rec(path="ro", type="dir", size=0, mode=0o555, mtime=0)
        + rec(path="ro/suid", type="file", size=1, mode=0o6777, mtime=0)
        + b"x."
        + END
    )
    await download(lying_python(tmp_path, stream), dest)
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o755  # yours to write and remove
    assert stat.S_IMODE((dest / "ro" / "suid").stat().st_mode) == 0o755


async def test_a_sandbox_without_python_gets_a_clear_error(tmp_path: Path) -> None:
    config = LocalConfig(isolate=False, python=str(tmp_path / "no-such-python"))
    async with sandbay.open_sandbox(config) as sb:
        with pytest.raises(SandboxError, match="is not there"):
            await sb.list_dir(".")


async def test_make_dir_over_a_file_is_a_file_exists_error() -> None:
    async with sandbay.open_sandbox(LocalConfig(isolate=False)) as sb:
        await sb.write_file("f", b"x")
        with pytest.raises(FileExistsError):
            await sb.make_dir("f")
        with pytest.raises(SandboxFileExistsError):
            await sb.make_dir(".", exist_ok=False)


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // 2**20):
            f.write(os.urandom(2**20))


async def test_trees_stream_with_bounded_memory(tmp_path: Path) -> None:
    size = 48 * 2**20
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", size)
    async with sandbay.open_sandbox(LocalConfig(isolate=False)) as sb:
        tracemalloc.start()
        try:
            await sb.upload(src, "tree")
            _, up_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            await sb.download("tree", tmp_path / "back")
            _, down_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (tmp_path / "back" / "big.bin").stat().st_size == size
    assert up_peak < 8 * 2**20, f"upload held {up_peak} bytes at once"
    assert down_peak < 8 * 2**20, f"download held {down_peak} bytes at once"


def test_link_policy() -> None:
    inside = [
        (["l"], "x"),
        (["l"], "./x/y"),
        (["d", "l"], "../x"),
        (["d", "e", "l"], "../../x"),
        (["l"], "."),
    ]
    outside = [
        (["l"], "/etc"),
        (["l"], ".."),
        (["d", "l"], "../.."),
        (["l"], "d/../.."),
        (["l"], "d/.."),  # a ".." after a name could climb out of a link named d
        (["l"], ""),
    ]
    for parts, target in inside:
        assert link_stays_inside(parts, target), (parts, target)
    for parts, target in outside:
        assert not link_stays_inside(parts, target), (parts, target)


def test_relative_names_are_checked() -> None:
    assert split_relative("a/b c/d") == ["a", "b c", "d"]
    for bad in ("", "/a", "a/", "a/../b", "..", ".", "a//b", "a/./b", "a\0b"):
        with pytest.raises(ProtocolError):
            split_relative(bad)


def test_helper_runs_on_the_oldest_supported_python() -> None:
    # The helper is sent as source: it must parse with Python 3.10's grammar.
    from sandbay._fileops import HELPER

    ast.parse(HELPER, feature_version=(3, 10))


async def test_a_cancelled_download_leaves_no_partial_file(box: Path, tmp_path: Path) -> None:
    dest = box / "dest"
    size = 8 * 2**20  # past SMALL_FILE: streamed into a temporary file as it comes
    stream = rec(**ROOT) + rec(path="big", type="file", size=size, mode=0o644, mtime=0)
    # The helper sends a quarter of the file, then stalls.
    config = lying_python(tmp_path, stream + b"a" * (2 * 2**20), then="exec sleep 60")
    async with sandbay.open_sandbox(config, SandboxSpec()) as sb:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sb.download, "tree", dest)
                await anyio.to_thread.run_sync(wait_for_partial, dest)
                scope.cancel()
    assert not (dest / "big").exists()
    assert_contained(box, dest)


def wait_for_partial(dest: Path) -> None:
    """Return once the download's temporary file holds all the bytes sent (the event)."""
    deadline = time.monotonic() + 30
    while not any(
        p.name.endswith(".sandbay-download") and p.stat().st_size == 2 * 2**20
        for p in (dest.iterdir() if dest.is_dir() else [])
    ):
        assert time.monotonic() < deadline, "the partial file never appeared"
        time.sleep(0.01)
