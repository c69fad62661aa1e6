"""Durable, atomic file writes: temporary name, fsync, rename, fsync the directory.

Every byte gradindex writes into a store goes through the few functions here, so that:

* temporary files carry ``TMP_MARK`` plus the writer's pid and host, and a later writer removes
  only those whose writer is dead (never a live writer's file in flight);
* a failing disk (EIO, ENOSPC, ...) surfaces as one typed error, ``StoreWriteError``, with the
  temporary file removed and nothing half-written at a final path;
* fault-injection tests can fail any step or stop the process at a named point (``gradindex.store.faults``:
  ``inject_io_errors``, and ``crash_point`` driven by the environment variable ``GRADINDEX_CRASH_AT``).

These are the local backend. A path at an fsspec URL (``_remote.RemotePath``) goes to the object-store
backend in ``_remote`` instead (one PUT per file, exclusive PUT for claims), through the same steps
and crash points.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import gradindex.store._remote as _remote
from gradindex.errors import StoreWriteError
from gradindex.store._remote import is_remote
from gradindex.store.faults import crash_point, step
from gradindex.utils import HOST_TAG, pid_alive

__all__ = [
    "TMP_MARK",
    "AtomicFile",
    "create_exclusive",
    "forget",
    "fsync_dir",
    "hold",
    "in_use",
    "is_orphan",
    "make_dir",
    "move_file",
    "remove_file",
    "remove_tree",
    "rename_aside",
    "rename_into_place",
    "tmp_path",
    "write_bytes_atomic",
    "write_failure",
]

# Every temporary file gradindex writes carries this mark, so a resume can sweep orphans.
TMP_MARK = ".gi-tmp-"
# The temporary names (and claims) this process is using now: a sweep in this process leaves them alone.
_in_use: set[str] = set()
_lock = threading.Lock()


def tmp_path(path: Path, tag: str = "") -> Path:
    """A temporary sibling of ``path`` that names its writer (pid, host), for ``is_orphan``.

    The name counts as in use by this process until ``forget(name)``."""
    name = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{HOST_TAG}-{tag}{uuid.uuid4().hex[:16]}")
    with _lock:
        _in_use.add(str(name))
    return name


def forget(path: Path) -> None:
    """This process no longer uses ``path`` (a temporary name, or a claim it held)."""
    with _lock:
        _in_use.discard(str(path))


def hold(path: Path) -> None:
    """Mark ``path`` (e.g. a claim file) as in use by this process."""
    with _lock:
        _in_use.add(str(path))


def in_use(path: Path) -> bool:
    """Whether this process is using ``path`` now (a temporary name in flight, a claim it holds)."""
    with _lock:
        return str(path) in _in_use


def is_orphan(path: Path) -> bool:
    """A temporary file or folder nobody is writing: its writer is dead (on this host), or it is this
    process and gave the name up (an operation that failed and could not clean up). A live writer's
    temporary is never one; another host's is left alone."""
    _, mark, rest = path.name.partition(TMP_MARK)
    if not mark:
        return False
    pid, _, rest = rest.partition("-")
    host, _, _ = rest.partition("-")
    if not pid.isdigit() or len(host) != len(HOST_TAG):
        return True  # not one of ours in the current naming: nobody is writing it
    if host != HOST_TAG:
        return False
    if int(pid) == os.getpid():
        return not in_use(path)
    return not pid_alive(int(pid))


# what to do about a failed write, by errno (others: the disk itself)
_WRITE_FIXES = {
    errno.EROFS: "the file system is read-only: write the store on a writable one (another output), or remount it "
    "read-write and continue a build with resume=True",
    errno.EACCES: "permission denied: write where you may (another output), or change the folder's permissions and "
    "continue a build with resume=True",
    errno.EPERM: "not permitted: write where you may (another output), or change the folder's permissions and "
    "continue a build with resume=True",
    errno.ENOSPC: "no space is left: free some and run the command again (a build keeps its finished shards: "
    "continue it with resume=True)",
    errno.EDQUOT: "the disk quota is used up: free some and run the command again (a build keeps its finished shards: "
    "continue it with resume=True)",
}


def write_failure(doing: str, path: Path, error: OSError) -> StoreWriteError:
    """The one-sentence StoreWriteError for a failed local write: what failed, where, and what to do for its errno."""
    reason = error.strerror or str(error)
    code = f"[Errno {error.errno}] " if error.errno else ""
    fix = _WRITE_FIXES.get(
        error.errno, "check the device and run the command again (a build keeps its finished shards: resume=True)"
    )
    return StoreWriteError(f"{doing} {path} failed: {code}{reason}; {fix}", error.errno)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power cut.

    Platforms and filesystems that cannot fsync a directory are skipped; a real failure (EIO) raises.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        step("fsync-dir", path)
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def _write_durable(tmp: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a new temporary file and fsync it (each step a fault-injection point)."""
    step("open", tmp)
    with open(tmp, "wb") as handle:
        step("write", tmp)
        handle.write(data)
        handle.flush()
        step("fsync", tmp)
        os.fsync(handle.fileno())


def write_bytes_atomic(path: Path, data: bytes | memoryview, *, crash_site: str | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    Temporary name, write, fsync, rename, fsync the directory (``AtomicFile`` in one call). On an OSError the
    temporary file is removed and StoreWriteError raised; ``path`` is untouched. At a remote path one PUT (atomic by
    itself).
    """
    if is_remote(path):
        return _remote.put(path, data, crash_site=crash_site)
    file = AtomicFile(path)
    file.write(data)
    file.commit(crash_site=crash_site)


class AtomicFile:
    """A local file written in pieces under a temporary name, then put at ``path`` whole (``commit``): the steps of
    ``write_bytes_atomic`` spread over the time its bytes take to arrive, so a large file is on its way to the disk
    while it is still being made.

    The temporary file is a sibling of ``path``, or of ``near`` (a name in an existing folder of the same file system,
    where nothing new need be made: ``path``'s folder is then created only by ``commit``). Every failure is a
    StoreWriteError with the temporary file removed and ``path`` untouched; ``discard`` drops an unfinished file (a
    no-op once committed). One thread at a time.
    """

    def __init__(self, path: Path, near: Path | None = None):
        self.path = Path(path)
        self._folder_made = near is None
        if near is None:
            _make_folder_of(self.path)
        self.tmp = tmp_path(self.path if near is None else Path(near))
        self._handle = None
        self._done = False
        try:
            step("open", self.tmp)
            self._handle = open(self.tmp, "wb")  # noqa: SIM115 (kept open across writes; closed by commit or discard)
        except OSError as error:
            self.discard()
            raise write_failure("writing", self.path, error) from error

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` to the file."""
        if self._done or self._handle is None:
            raise ValueError(f"{self.path} is already committed or discarded; it takes no more bytes")
        try:
            step("write", self.tmp)
            self._handle.write(data)
        except OSError as error:
            self.discard()
            raise write_failure("writing", self.path, error) from error

    def read(self, offsets: Sequence[int], size: int) -> bytes:
        """The ``size`` bytes written at each of ``offsets``, one after another."""
        if self._done or self._handle is None:
            raise ValueError(f"{self.path} is already committed or discarded")
        self._handle.flush()
        pieces = []
        with open(self.tmp, "rb") as handle:
            for offset in offsets:
                handle.seek(offset)
                pieces.append(handle.read(size))
        return b"".join(pieces)

    def commit(self, *, crash_site: str | None = None) -> None:
        """fsync the file, rename it to ``path`` (after ``crash_point(crash_site)``), fsync the folder."""
        if self._done or self._handle is None:
            raise ValueError(f"{self.path} is already committed or discarded")
        try:
            handle, self._handle = self._handle, None
            with handle:
                handle.flush()
                step("fsync", self.tmp)
                os.fsync(handle.fileno())
            if crash_site:
                crash_point(crash_site)
            if not self._folder_made:
                _make_folder_of(self.path)
            step("rename", self.path)
            os.replace(self.tmp, self.path)
        except (OSError, StoreWriteError) as error:
            self.discard()
            if isinstance(error, StoreWriteError):
                raise
            raise write_failure("writing", self.path, error) from error
        finally:
            forget(self.tmp)
        self._done = True
        try:
            fsync_dir(self.path.parent)
        except OSError as error:
            raise write_failure("flushing the folder entry of", self.path, error) from error

    def discard(self) -> None:
        """Drop the unfinished file (nothing to do once committed or discarded)."""
        if self._done:
            return
        self._done = True
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.close()
            except OSError:
                pass
        _discard(self.tmp)
        forget(self.tmp)


def _make_folder_of(path: Path) -> None:
    try:
        step("mkdir", path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_failure("creating the folder of", path, error) from error


def _discard(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # a later sweep removes it (its writer will be dead by then)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists (then False); never visible half-written.

    The data is written to a temporary file first and hard-linked to ``path``: link(2) fails if the
    name exists, so exactly one of several racing writers succeeds, like O_EXCL. At a remote path an
    exclusive PUT (see ``_remote``).
    """
    if is_remote(path):
        return _remote.create_exclusive(path, data)
    path = Path(path)
    tmp = tmp_path(path)
    try:
        _write_durable(tmp, data)
        step("link", path)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            _discard(tmp)
    except OSError as error:
        _discard(tmp)
        raise write_failure("creating", path, error) from error
    finally:
        forget(tmp)
    try:
        fsync_dir(path.parent)
    except OSError as error:
        _discard(path)  # not durable: take it back rather than leave a file nobody will remove
        raise write_failure("flushing the folder entry of", path, error) from error
    return True


def remove_file(path: Path) -> bool:
    """Remove a file; False if it was not there."""
    if is_remote(path):
        return _remote.remove_file(path)
    try:
        step("unlink", path)
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise write_failure("removing", path, error) from error
    return True


def rename_aside(path: Path, tag: str = "") -> Path | None:
    """Atomically move ``path`` to a temporary name of this process (None if it was not there).

    At a remote path a copy and a delete: not atomic (see ``_remote``)."""
    aside = tmp_path(path, tag)
    if is_remote(path):
        return _remote.move(path, aside)
    try:
        step("rename", path)
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise write_failure("moving aside", path, error) from error
    return aside


def remove_tree(path: Path, *, crash_site: str | None = None) -> None:
    """Remove a folder and everything in it, file by file (a crash leaves a part, never a problem).

    Symlinks are removed, never followed: a link (``path`` itself or one inside it) to a folder elsewhere
    loses the link only, whatever it points at stays."""
    if is_remote(path):
        return _remote.remove_tree(path, crash_site=crash_site)
    if Path(path).is_symlink():
        remove_file(path)
        return
    if not path.exists():
        return
    for position, item in enumerate(sorted(path.rglob("*"), reverse=True)):
        if position == 1 and crash_site:
            crash_point(crash_site)
        try:
            step("unlink", item)
            if item.is_dir() and not item.is_symlink():
                os.rmdir(item)
            else:
                os.unlink(item)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise write_failure("removing", item, error) from error
    try:
        step("unlink", path)
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise write_failure("removing", path, error) from error


def make_dir(path: Path) -> None:
    """Create a folder (and its parents) if missing (object stores have no folders: nothing to do)."""
    if is_remote(path):
        return
    path = Path(path)
    if path.is_dir():
        return
    try:
        step("mkdir", path)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_failure("creating the folder", path, error) from error


def move_file(src: Path, dst: Path) -> bool:
    """Move a finished file to ``dst`` (replacing what is there); False if ``src`` was not there.

    Readers see the old ``dst`` or the new one whole; locally one rename, at a remote path a PUT of the bytes at
    ``dst`` and then the delete of ``src`` (a reader that misses ``src`` finds the same bytes at ``dst``)."""
    if is_remote(src):
        return _remote.move_file(src, dst)
    make_dir(Path(dst).parent)
    try:
        step("rename", dst)
        os.replace(src, dst)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise write_failure("moving into place", dst, error) from error
    try:
        fsync_dir(Path(dst).parent)
    except OSError as error:
        raise write_failure("flushing the folder entry of", dst, error) from error
    return True


def rename_into_place(src: Path, dst: Path) -> None:
    """Rename a finished temporary folder to its final name; FileExistsError if that name is taken."""
    try:
        step("rename", dst)
        os.rename(src, dst)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR) or isinstance(
            error, FileExistsError
        ):
            raise FileExistsError(error.errno, error.strerror, str(dst)) from error
        raise write_failure("renaming into place", dst, error) from error
    try:
        fsync_dir(dst.parent)
    except OSError as error:
        raise write_failure("flushing the folder entry of", dst, error) from error
