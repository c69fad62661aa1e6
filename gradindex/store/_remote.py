"""Stores at an fsspec URL (``s3://``, ``gs://``, ``memory://``, ...): the object-store backend.

``store_path(location)`` turns what the user typed into the path a store is written at: a
``pathlib.Path`` for a local folder (or ``file://``), a ``RemotePath`` for any other fsspec URL. A
``RemotePath`` offers the few pathlib methods the store reads with (``/``, ``name``, ``parent``,
``exists``, ``read_bytes``, ``open``, ``rglob``...), so the store's reading code is one for both;
the writing steps in ``_atomic`` dispatch to the functions here.

Object stores differ from a local disk in what is atomic, and the store relies only on what is:

* a single PUT is atomic: an object is never seen half-written, so a file is written directly at
  its final key (no temporary name, no rename). The order stays as on disk: shard data first,
  its record after, the manifest last, so a killed build loses at most the shards in flight;
* exclusive create (shard claims, a transform's first copy) uses the filesystem's ``"xb"`` mode
  (S3: a conditional PUT with ``If-None-Match: *``; ``memory://`` and ``gs://`` have their own).
  Where a filesystem has no exclusive mode, the claim is written when absent and read back: two
  writers racing within one round trip could then both believe they won, and the later record
  wins (the shard's checksums keep a mixed result from being read as sound);
* a writer's liveness cannot be checked across machines: a claim names host, pid and time, and is
  taken over when its writer is a dead process on this host, or when it is older than the claim
  timeout (``GRADINDEX_CLAIM_TIMEOUT`` seconds, default 6 hours; ``build(claim_timeout=...)``).
  Taking over deletes the stale claim and creates a new one exclusively; two writers taking over
  the same stale claim at the same moment can both succeed (object stores have no atomic rename)
  and compute the same shard twice, the last record winning.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from gradindex.errors import StorageError, StoreWriteError
from gradindex.store.faults import crash_point, step

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT",
    "RemotePath",
    "claim_timeout",
    "is_remote",
    "parse_storage_options",
    "store_path",
]

DEFAULT_CLAIM_TIMEOUT = 6 * 3600.0
# protocols whose packages are extras of gradindex, for an install hint that names the extra
_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
# listing caches would hide what other writers (other processes, other machines) wrote since
_NO_LISTING_CACHE = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"}


def claim_timeout() -> float:
    """Seconds after which a remote shard claim counts as abandoned (``GRADINDEX_CLAIM_TIMEOUT``)."""
    value = os.environ.get("GRADINDEX_CLAIM_TIMEOUT")
    if not value:
        return DEFAULT_CLAIM_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise StorageError(f"GRADINDEX_CLAIM_TIMEOUT must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise StorageError(f"GRADINDEX_CLAIM_TIMEOUT must be positive, got {value!r}")
    return seconds


def parse_storage_options(items: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` into fsspec storage options; a VALUE that parses as JSON is taken as such
    (``anon=true``, ``client_kwargs={"region_name": "eu-west-1"}``), any other as a string."""
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StorageError(f"a storage option is KEY=VALUE (e.g. endpoint_url=http://localhost:9000), got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def _protocol(location: str) -> str | None:
    if "://" not in location:
        return None
    protocol = location.split("://", 1)[0]
    return protocol.split("::")[-1] if protocol else None


def is_remote(path: Any) -> bool:
    return isinstance(path, RemotePath)


def store_path(location: str | Path | RemotePath, storage_options: dict | None = None) -> Path | RemotePath:
    """The path a store lives at: ``Path`` for a local folder or ``file://`` URL, else a ``RemotePath``."""
    if isinstance(location, RemotePath):
        return location
    if isinstance(location, Path):
        return location
    location = os.fspath(location)
    protocol = _protocol(location)
    if protocol is None:
        return Path(location)
    if protocol in ("file", "local"):
        return Path(location.split("://", 1)[1])
    return RemotePath.from_url(location, storage_options or {})


class RemotePath:
    """A path in an fsspec filesystem, with the pathlib methods the store reads with.

    ``str()`` is the URL (``s3://bucket/runs/a.gradindex``); ``fs_path`` the filesystem's own path.
    """

    def __init__(self, fs: Any, fs_path: str, url: str, storage_options: dict | None = None):
        self.fs = fs
        self.fs_path = fs_path.rstrip("/") or "/"
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})

    @classmethod
    def from_url(cls, url: str, storage_options: dict) -> RemotePath:
        protocol = _protocol(url)
        try:
            import fsspec.core
        except ImportError:
            raise StorageError(
                f"{url} is a URL and fsspec is not installed; pip install fsspec (or 'gradindex[s3]') to use "
                f"{protocol}:// stores"
            ) from None
        options = dict(storage_options)
        if protocol in _NO_LISTING_CACHE:
            options.setdefault("use_listings_cache", False)
        try:
            fs, fs_path = fsspec.core.url_to_fs(url, **options)
        except ImportError as error:
            package, extra = _EXTRAS.get(protocol or "", (None, None))
            hint = (
                f"pip install 'gradindex[{extra}]' (or {package})"
                if package
                else f"install the fsspec package for {protocol}://"
            )
            raise StorageError(
                f"{url} needs a package that is not installed ({error}); {hint} to use {protocol}:// stores"
            ) from None
        except ValueError as error:
            if "Protocol not known" in str(error):
                raise StorageError(
                    f"{url}: unknown storage protocol {protocol!r}; use a local path or an fsspec URL such as s3://, "
                    "gs://, memory://"
                ) from None
            raise StorageError(f"{url} cannot be opened: {error}") from None
        except TypeError as error:
            raise StorageError(
                f"{url}: a storage option is not accepted by the {protocol}:// filesystem ({error})"
            ) from None
        return cls(fs, fs_path, url, options)

    # ---- pure path ----------------------------------------------------------------------------
    def _child(self, fs_path: str, url: str) -> RemotePath:
        return RemotePath(self.fs, fs_path, url, self.storage_options)

    def __truediv__(self, part: str | os.PathLike) -> RemotePath:
        part = str(part).strip("/")
        if not part:
            return self
        return self._child(f"{self.fs_path.rstrip('/')}/{part}", f"{self.url}/{part}")

    def joinpath(self, *parts: str) -> RemotePath:
        path = self
        for part in parts:
            path = path / part
        return path

    @property
    def name(self) -> str:
        return posixpath.basename(self.fs_path)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> RemotePath:
        fs_parent = posixpath.dirname(self.fs_path) or "/"
        url_parent = self.url.rsplit("/", 1)[0] if self.url.count("/") > 2 else self.url
        return self._child(fs_parent, url_parent)

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        base = other.fs_path.rstrip("/") + "/"
        if not self.fs_path.startswith(base):
            raise ValueError(f"{self} is not inside {other}")
        return PurePosixPath(self.fs_path[len(base) :])

    def resolve(self) -> RemotePath:
        return self

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.fs is self.fs and other.fs_path == self.fs_path

    def __hash__(self) -> int:
        return hash(self.fs_path)

    def __lt__(self, other: RemotePath) -> bool:
        return self.fs_path < other.fs_path

    # ---- reading ------------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether anything is at this path; refused credentials or an unreachable endpoint are a StorageError."""
        try:
            with _reading("reading", self):
                return bool(self.fs.exists(self.fs_path))
        except PermissionError as error:
            raise StorageError(
                f"reading {self} was refused ({error}); check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE, "
                "GOOGLE_APPLICATION_CREDENTIALS, --storage-option) and the bucket's policy"
            ) from None
        except OSError as error:
            raise StorageError(
                f"{self} cannot be reached ({error}); check the URL, the endpoint and the network"
            ) from None

    def is_dir(self) -> bool:
        with _reading("reading", self):
            return bool(self.fs.isdir(self.fs_path))

    def is_file(self) -> bool:
        with _reading("reading", self):
            return bool(self.fs.isfile(self.fs_path))

    def is_symlink(self) -> bool:
        return False

    def read_bytes(self) -> bytes:
        try:
            with _reading("reading", self):
                return self.fs.cat_file(self.fs_path)
        except IsADirectoryError:
            raise
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such file", str(self)) from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb") -> Any:
        with _reading("opening", self):
            return self.fs.open(self.fs_path, mode)

    def iterdir(self) -> Iterator[RemotePath]:
        try:
            with _reading("listing", self):
                entries = self.fs.ls(self.fs_path, detail=False)
        except FileNotFoundError:
            return
        for entry in sorted(entries):
            name = posixpath.basename(entry.rstrip("/"))
            if name:
                yield self / name

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        for item in self.iterdir():
            if fnmatch.fnmatchcase(item.name, pattern):
                yield item

    def rglob(self, pattern: str) -> Iterator[RemotePath]:
        """Files (and the folders that hold them) below this path whose name matches ``pattern``."""
        try:
            with _reading("listing", self):
                found = self.fs.find(self.fs_path, withdirs=True)
        except FileNotFoundError:
            return
        base = self.fs_path.rstrip("/") + "/"
        for entry in sorted(found):
            entry = entry.rstrip("/")
            if not entry.startswith(base):
                entry = "/" + entry.lstrip("/") if base.startswith("/") else entry.lstrip("/")
                if not entry.startswith(base):
                    continue
            item = self / entry[len(base) :]
            if fnmatch.fnmatchcase(item.name, pattern):
                yield item

    def zarr_store(self) -> Any:
        """A read-only ``zarr.storage.FsspecStore`` rooted here."""
        import zarr.storage

        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=True)


# ---- what a storage client raises ------------------------------------------------------------------

# the errors of the clients behind fsspec (botocore, google-auth, azure, aiohttp), by class name: none is imported here
_CREDENTIAL_ERRORS = {
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError",
    "DefaultCredentialsError", "RefreshError", "ClientAuthenticationError",
}  # fmt: skip
_CONNECTION_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ConnectionError", "TimeoutError",
}  # fmt: skip
_CREDENTIALS_FIX = (
    "set credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://, "
    "GOOGLE_APPLICATION_CREDENTIALS for gs://) or pass them as storage_options"
)


def client_failure(doing: str, path: Any, error: BaseException) -> StorageError | None:
    """The one-sentence StorageError for a storage client's credential or connection error, else None."""
    names = {cls.__name__ for cls in type(error).__mro__}
    text = " ".join(str(error).split())[:200] or type(error).__name__
    if names & _CREDENTIAL_ERRORS:
        return StorageError(f"{doing} {path} failed: no usable credentials ({text}); {_CREDENTIALS_FIX}")
    if names & _CONNECTION_ERRORS:
        return StorageError(
            f"{doing} {path} failed: the storage cannot be reached ({text}); check the URL, the endpoint (the "
            "endpoint_url storage option) and the network, then run again (a build continues with resume=True)"
        )
    return None


@contextlib.contextmanager
def _reading(doing: str, path: Any) -> Iterator[None]:
    """Turn a client's credential or connection error while reading into a StorageError; others pass."""
    try:
        yield
    except Exception as error:
        mapped = client_failure(doing, path, error)
        if mapped is None:
            raise
        raise mapped from error


# ---- writing (called by ``_atomic`` for remote paths) -----------------------------------------------


def _fail(doing: str, path: RemotePath, error: Exception) -> Exception:
    """The one-sentence error for a failed remote write: credentials, connection, bucket missing, permission, other."""
    mapped = client_failure(doing, path, error)
    if mapped is not None:
        return mapped
    text = str(error) or type(error).__name__
    code = getattr(error, "errno", None)
    if isinstance(error, FileNotFoundError) and "bucket" in text.lower():
        bucket = path.fs_path.lstrip("/").split("/", 1)[0]
        return StoreWriteError(
            f"{doing} {path} failed: the bucket {bucket!r} does not exist; create it (or fix the URL) and run the "
            "command again",
            code,
        )
    if isinstance(error, PermissionError):
        return StoreWriteError(
            f"{doing} {path} failed: permission denied ({text}); check the credentials (AWS_ACCESS_KEY_ID / "
            "AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, storage_options) and the bucket's policy, then run again "
            "(a build continues with resume=True)",
            code,
        )
    return StoreWriteError(
        f"{doing} {path} failed: {text}; finished shards are kept, so fix the storage and continue with "
        "`gradindex build ... --resume`",
        code,
    )


def _guarded(doing: str, path: RemotePath):
    """Turn what an fsspec filesystem raises into StoreWriteError (OSErrors and the errors of its client)."""

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except (StoreWriteError, StorageError):
            raise
        except (OSError, RuntimeError, ValueError) as error:
            raise _fail(doing, path, error) from error
        except Exception as error:  # a client's own errors (botocore's credential and connection errors)
            mapped = client_failure(doing, path, error)
            if mapped is None:
                raise
            raise mapped from error

    return guard()


def put(path: RemotePath, data: bytes | memoryview, *, crash_site: str | None = None) -> None:
    """One PUT at the final key: readers see the old object or the whole new one."""
    if crash_site:
        crash_point(crash_site)  # as locally: killed here, the object never appears
    with _guarded("writing", path):
        step("put", path)
        path.fs.pipe_file(path.fs_path, bytes(data))


def create_exclusive(path: RemotePath, data: bytes) -> bool:
    """Create the object unless it exists (then False): the filesystem's exclusive mode, where it has one."""
    with _guarded("creating", path):
        step("put-exclusive", path)
        try:
            with path.fs.open(path.fs_path, "xb") as handle:
                handle.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError, TypeError):
            pass  # no exclusive mode: write when absent and read back (the race is documented above)
        if path.fs.exists(path.fs_path):
            return False
        path.fs.pipe_file(path.fs_path, data)
        try:
            return path.fs.cat_file(path.fs_path) == data
        except FileNotFoundError:
            return False


def remove_file(path: RemotePath) -> bool:
    with _guarded("removing", path):
        step("unlink", path)
        try:
            path.fs.rm_file(path.fs_path)
        except FileNotFoundError:
            return False
    return True


def move(path: RemotePath, aside: RemotePath) -> RemotePath | None:
    """Copy to ``aside`` and delete: None if ``path`` was not there."""
    with _guarded("moving aside", path):
        step("rename", path)
        try:
            path.fs.copy(path.fs_path, aside.fs_path)
        except FileNotFoundError:
            return None
        try:
            path.fs.rm_file(path.fs_path)
        except FileNotFoundError:
            pass
    return aside


def move_file(src: RemotePath, dst: RemotePath) -> bool:
    """PUT ``src``'s bytes at ``dst``, then delete ``src``: False if ``src`` was not there."""
    with _guarded("moving into place", dst):
        try:
            data = src.fs.cat_file(src.fs_path)
        except FileNotFoundError:
            return False
        step("put", dst)
        dst.fs.pipe_file(dst.fs_path, data)
        step("unlink", src)
        try:
            src.fs.rm_file(src.fs_path)
        except FileNotFoundError:
            pass
    return True


def remove_tree(path: RemotePath, *, crash_site: str | None = None) -> None:
    """Delete every object under ``path``, one by one (a crash leaves a part, never a problem)."""
    with _guarded("removing", path):
        try:
            objects = sorted(path.fs.find(path.fs_path), reverse=True)
        except FileNotFoundError:
            return
        for position, item in enumerate(objects):
            if position == 1 and crash_site:
                crash_point(crash_site)
            step("unlink", path)
            try:
                path.fs.rm_file(item)
            except FileNotFoundError:
                pass
        try:  # filesystems with real folders (memory://) keep empty ones
            if path.fs.exists(path.fs_path):
                path.fs.rm(path.fs_path, recursive=True)
        except FileNotFoundError:
            pass
