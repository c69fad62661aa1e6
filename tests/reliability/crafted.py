"""Crafted stores: the sweep behind ``test_crafted.py`` (and, bigger, ``benchmarks/reliability``).

A store is shared data; someone may hand over a folder (or an S3 prefix) made to reach outside itself or to
break its reader. Each case here copies a pristine store and crafts one thing, the way an attacker would (every
checksum and seal recomputed, so that only gradindex's own checks stand in the way):

* ``traversal``: a metadata field that names a file says ``../``, an absolute path, or a name with ``/``
  (index metas' ``file`` / ``ivfdata``, a transform record's ``file``, a shard record's keys);
* ``symlink``: a file or folder of the store is a link to a copy outside it (index file, lists, meta and folder,
  a shard file and folder, a transform and ``transforms/``, ``_shards/``, ``samples.parquet``, the manifest,
  a sample part);
* ``oversized``: a manifest, array metadata, transform record or ``.npy`` header declaring billions of rows or
  a huge shape (refused before anything that size is allocated: each case runs under an address-space limit);
* ``dtype``: a dtype the data does not have (layout, array metadata, transform, sample table);
* ``truncated`` and ``swapped``: files cut short, two shards', chunks', transforms', index files' or metas'
  files exchanged.

Every case then runs what users run, in a child process: ``open_store``, ``info``, ``verify``,
``list_indexes``, exact and index ``search_store``, ``self_influence``, the sample table, the CLI's ``info``,
``verify``, ``query --index`` and ``self-influence``, ``sweep_temporaries``, ``gradindex index --overwrite``,
``build_index`` and ``drop_index``. Each outcome must be a clean ``GradIndexError`` (CLI: exit 1, an
``Error:`` line on stderr, no traceback) or the pristine answer (which equals numpy brute force over the real
vectors), and the tree of victim files beside the store must hash the same before and after.

``sweep(work, small, checkpoints)`` returns the figures; ``cases()`` lists the cases by kind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from reliability import harness

K = 5
N_QUERIES = 3
META_SEAL = "meta_sha256"  # the key of an index meta's seal (docs/store-format.md)
BILLIONS = 3_000_000_000
# headroom above a child's address space at start: a case that allocates what a crafted header declares fails
ADDRESS_SPACE_HEADROOM = 3 << 30


# ---- reading and writing a store's metadata as an attacker would (checksums recomputed) -----------------------


def _manifest(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["gradindex"]


def _write_manifest(store: Path, manifest: dict) -> None:
    from gradindex.store import write_manifest

    write_manifest(store, manifest)  # sealed: the attacker recomputes the seal too


def _meta(store: Path, name: str) -> dict:
    return json.loads((store / "indexes" / f"{name}.json").read_text())


def _write_meta(store: Path, name: str, meta: dict, *, sealed: bool = True) -> None:
    from gradindex.utils import sha256_json

    body = {key: value for key, value in meta.items() if key != META_SEAL}
    if sealed:
        body[META_SEAL] = sha256_json(dict(body))
    (store / "indexes" / f"{name}.json").write_text(json.dumps(body, indent=1, sort_keys=True))


def _sha(path: Path) -> str:
    from gradindex.utils import sha256_file

    return sha256_file(path)


def _link(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def _relative(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


# ---- the cases ----------------------------------------------------------------------------------------------------
#
# A case is ``craft(store, victims)`` on a copy of the pristine complete or incomplete store; ``victims`` is a
# folder beside the store with copies of real files (victim.faiss, victim.ivfdata, victim.npy, shard, ...).


def _index_field(field: str, form: str) -> Callable[[Path, Path], None]:
    def craft(store: Path, victims: Path) -> None:
        name = "ivf" if field == "file" else "disk"
        meta = _meta(store, name)
        victim = victims / ("victim.faiss" if field == "file" else "victim.ivfdata")
        folder = store / "indexes"
        if form == "relative":
            meta[field] = _relative(victim, folder)
        elif form == "absolute":
            meta[field] = str(victim.resolve())
        else:  # a name with "/", inside the store
            (folder / "sub").mkdir(exist_ok=True)
            inside = folder / "sub" / meta[field]
            shutil.copyfile(folder / meta[field], inside)
            meta[field] = f"sub/{meta[field]}"
            victim = inside
        meta["sha256" if field == "file" else "ivfdata_sha256"] = _sha(victim)
        _write_meta(store, name, meta)

    return craft


def _unsealed_meta_naming_a_victim(store: Path, victims: Path) -> None:
    """The measured example: an index meta from before the seal, ``file`` outside, no sha256."""
    meta = _meta(store, "ivf")
    meta["file"] = _relative(victims / "victim.txt", store / "indexes")
    meta.pop("sha256")
    _write_meta(store, "ivf", meta, sealed=False)


def _transform_file(form: str) -> Callable[[Path, Path], None]:
    def craft(store: Path, victims: Path) -> None:
        manifest = _manifest(store)
        record = manifest["transforms"]["self_influence"]
        victim = victims / "victim.npy"
        if form == "relative":
            record["file"] = _relative(victim, store)
        elif form == "absolute":
            record["file"] = str(victim.resolve())
        elif form == "dotdot":
            record["file"] = "transforms/" + _relative(victim, store / "transforms")
        else:  # another name inside the store
            (store / "transforms" / "sub").mkdir()
            shutil.copyfile(victim, store / "transforms" / "sub" / "x.npy")
            record["file"] = "transforms/sub/x.npy"
        record["sha256"] = _sha(victim)
        _write_manifest(store, manifest)

    return craft


def _shard_key(form: str, *, incomplete: bool = False) -> Callable[[Path, Path], None]:
    def craft(store: Path, victims: Path) -> None:
        victim = victims / "shard"
        key = _relative(victim, store) if form == "relative" else str(victim.resolve())
        if form == "inside":
            key = "features/c/1/0"
        if incomplete:
            path = store / "_shards" / "000000.json"
            record = json.loads(path.read_text())
        else:
            manifest = _manifest(store)
            record = manifest["shards"][0]
        record["files"].pop("features/c/0/0")
        record["files"][key] = _sha(victim)
        if incomplete:
            path.write_text(json.dumps(record))
        else:
            _write_manifest(store, manifest)

    return craft


def _symlinked(relative: str, victim: str, *, reseal: Callable[[Path, Path, Path], None] | None = None):
    """``relative`` (a file or folder of the store) replaced by a link to ``victims/victim``; ``reseal`` then makes
    the metadata agree with the victim's bytes, as an attacker would."""

    def craft(store: Path, victims: Path) -> None:
        target = victims / victim
        path = store / relative.format(**_files(store))
        _link(path, target.resolve())
        if reseal is not None:
            reseal(store, victims, target)

    return craft


def _files(store: Path) -> dict[str, str]:
    """The names of the pristine indexes' files (``{ivf}``, ``{disk}``, ``{disk_lists}``) for ``relative``."""
    names = {}
    for name in ("ivf", "disk", "ivf2"):
        path = store / "indexes" / f"{name}.json"
        if path.is_file() and not path.is_symlink():
            meta = json.loads(path.read_text())
            names[name] = meta["file"]
            if meta.get("ivfdata"):
                names[f"{name}_lists"] = meta["ivfdata"]
    return names


def _reseal_index(name: str, key: str) -> Callable[[Path, Path, Path], None]:
    def reseal(store: Path, victims: Path, target: Path) -> None:
        meta = _meta(store, name)
        meta[key] = _sha(target)
        _write_meta(store, name, meta)

    return reseal


def _reseal_shard(store: Path, victims: Path, target: Path) -> None:
    manifest = _manifest(store)
    manifest["shards"][0]["files"]["features/c/0/0"] = _sha(target if target.is_file() else target / "0")
    _write_manifest(store, manifest)


def _reseal_transform(store: Path, victims: Path, target: Path) -> None:
    manifest = _manifest(store)
    manifest["transforms"]["self_influence"]["sha256"] = _sha(target)
    _write_manifest(store, manifest)


def _reseal_samples(store: Path, victims: Path, target: Path) -> None:
    manifest = _manifest(store)
    manifest["samples_sha256"] = _sha(target)
    _write_manifest(store, manifest)


def _array_meta(store: Path, name: str, change: Callable[[dict], None]) -> None:
    """Rewrite ``name/zarr.json`` and put its sha256 in the manifest."""
    from gradindex.utils import sha256_bytes

    path = store / name / "zarr.json"
    meta = json.loads(path.read_text())
    change(meta)
    data = json.dumps(meta, indent=2).encode()
    path.write_bytes(data)
    manifest = _manifest(store)
    manifest["arrays"][name] = sha256_bytes(data)
    _write_manifest(store, manifest)


def _billions_of_rows(store: Path, victims: Path) -> None:
    """n_samples = 3e9 in one shard: a manifest, array metadata and shard record all agreeing."""
    manifest = _manifest(store)
    layout = manifest["layout"]
    layout.update(n_samples=BILLIONS, rows_per_shard=BILLIONS)
    record = manifest["shards"][0]
    record["rows"] = [0, BILLIONS]
    manifest["shards"] = [record]
    manifest["nonfinite"] = {"skipped": [], "zeroed": []}
    _write_manifest(store, manifest)
    for name in ("features", "self_influence"):

        def change(meta: dict, name: str = name) -> None:
            meta["shape"][0] = BILLIONS
            meta["chunk_grid"]["configuration"]["chunk_shape"][0] = BILLIONS

        _array_meta(store, name, change)


def _billions_of_shards(store: Path, victims: Path) -> None:
    manifest = _manifest(store)
    manifest["layout"].update(n_samples=BILLIONS, rows_per_shard=1, rows_per_chunk=1)
    _write_manifest(store, manifest)


def _huge_dim(store: Path, victims: Path) -> None:
    manifest = _manifest(store)
    manifest["layout"]["dim"] = 1_000_000_000
    _write_manifest(store, manifest)

    def change(meta: dict) -> None:
        meta["shape"][1] = 1_000_000_000
        meta["chunk_grid"]["configuration"]["chunk_shape"][1] = 1_000_000_000
        meta["codecs"][0]["configuration"]["chunk_shape"][1] = 1_000_000_000

    _array_meta(store, "features", change)


def _huge_chunks(store: Path, victims: Path) -> None:
    def change(meta: dict) -> None:
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = BILLIONS

    _array_meta(store, "features", change)


def _npy_with_header(path: Path, descr: str, shape: tuple, payload: bytes) -> None:
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": descr, "fortran_order": False, "shape": shape})
        handle.write(payload)


def _transform_shape(record_shape: list[int] | None, header_shape: tuple) -> Callable[[Path, Path], None]:
    """The self-influence transform's ``.npy`` header declaring ``header_shape`` over 64 bytes; its record says
    ``record_shape`` (None: the store's rows, as the pristine record)."""

    def craft(store: Path, victims: Path) -> None:
        path = store / "transforms" / "self_influence.npy"
        _npy_with_header(path, "<f4", header_shape, b"\0" * 64)
        manifest = _manifest(store)
        record = manifest["transforms"]["self_influence"]
        record.update(shape=record["shape"] if record_shape is None else record_shape, sha256=_sha(path))
        _write_manifest(store, manifest)

    return craft


def _huge_index_ntotal(store: Path, victims: Path) -> None:
    meta = _meta(store, "ivf")
    meta["ntotal"] = 10**12
    _write_meta(store, "ivf", meta)


def _nonfinite_out_of_range(store: Path, victims: Path) -> None:
    manifest = _manifest(store)
    manifest["nonfinite"]["skipped"] = [10**12]
    _write_manifest(store, manifest)


def _layout_dtype(dtype: str, *, array_too: bool) -> Callable[[Path, Path], None]:
    def craft(store: Path, victims: Path) -> None:
        manifest = _manifest(store)
        manifest["layout"]["dtype"] = dtype
        _write_manifest(store, manifest)
        if array_too:
            _array_meta(store, "features", lambda meta: meta.update(data_type=dtype))

    return craft


def _array_dtype(dtype: str) -> Callable[[Path, Path], None]:
    return lambda store, victims: _array_meta(store, "features", lambda meta: meta.update(data_type=dtype))


def _transform_dtype(record_dtype: str, dtype: str) -> Callable[[Path, Path], None]:
    """The self-influence transform holding one value per row of ``dtype``; its record says ``record_dtype``."""

    def craft(store: Path, victims: Path) -> None:
        path = store / "transforms" / "self_influence.npy"
        manifest = _manifest(store)
        values = np.zeros(manifest["layout"]["n_samples"], dtype=dtype)
        np.save(path, values, allow_pickle=False)
        manifest["transforms"]["self_influence"].update(dtype=record_dtype, shape=list(values.shape), sha256=_sha(path))
        _write_manifest(store, manifest)

    return craft


def _samples_with_string_rows(store: Path, victims: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = store / "samples.parquet"
    table = pq.read_table(path)
    rows = pa.array([str(row) for row in table.column("row").to_pylist()])
    pq.write_table(table.set_column(table.column_names.index("row"), "row", rows), path)
    _reseal_samples(store, victims, path)


def _shuffled_samples_outside(store: Path, victims: Path) -> None:
    """samples.parquet a link to a copy outside whose rows map to other sample ids (its sha256 recorded)."""
    _link(store / "samples.parquet", (victims / "samples.parquet").resolve())
    _reseal_samples(store, victims, victims / "samples.parquet")


def _truncated(relative: str) -> Callable[[Path, Path], None]:
    def craft(store: Path, victims: Path) -> None:
        path = store / relative.format(**_files(store))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return craft


def _swapped(first: str, second: str) -> Callable[[Path, Path], None]:
    def craft(store: Path, victims: Path) -> None:
        names = _files(store)
        one, two = store / first.format(**names), store / second.format(**names)
        aside = one.with_name(one.name + ".swap")
        os.rename(one, aside)
        os.rename(two, one)
        os.rename(aside, two)

    return craft


def _cases() -> dict[str, tuple[str, str, Callable[[Path, Path], None]]]:
    """``{case: (kind, which store, craft)}``."""
    cases: dict[str, tuple[str, str, Callable[[Path, Path], None]]] = {}

    def add(kind: str, name: str, craft: Callable[[Path, Path], None], store: str = "complete") -> None:
        cases[f"{kind}: {name}"] = (kind, store, craft)

    for field in ("file", "ivfdata"):
        for form in ("relative", "absolute", "slash"):
            add("traversal", f"index meta {field} {form}", _index_field(field, form))
    add("traversal", "unsealed index meta, file outside, no sha256", _unsealed_meta_naming_a_victim)
    for form in ("relative", "absolute", "dotdot", "slash"):
        add("traversal", f"transform record file {form}", _transform_file(form))
    for form in ("relative", "absolute", "inside"):
        add("traversal", f"shard record key {form}", _shard_key(form))
    for form in ("relative", "absolute"):
        add("traversal", f"shard record key {form} (being built)", _shard_key(form, incomplete=True), "incomplete")

    add("symlink", "index file", _symlinked("indexes/{ivf}", "victim.faiss", reseal=_reseal_index("ivf", "sha256")))
    add(
        "symlink",
        "index lists",
        _symlinked("indexes/{disk_lists}", "victim.ivfdata", reseal=_reseal_index("disk", "ivfdata_sha256")),
    )
    add("symlink", "index meta", _symlinked("indexes/ivf.json", "ivf.json"))
    add("symlink", "index folder", _symlinked("indexes", "indexes"))
    add("symlink", "shard file", _symlinked("features/c/0/0", "shard", reseal=_reseal_shard))
    add("symlink", "shard folder", _symlinked("features/c/0", "shard-folder", reseal=_reseal_shard))
    add(
        "symlink",
        "transform file",
        _symlinked("transforms/self_influence.npy", "victim.npy", reseal=_reseal_transform),
    )
    add("symlink", "transforms folder", _symlinked("transforms", "transforms"))
    add("symlink", "build folder of a complete store", _symlinked("_shards", "build"))
    add("symlink", "samples.parquet", _shuffled_samples_outside)
    add("symlink", "manifest", _symlinked("zarr.json", "zarr.json"))
    add("symlink", "array metadata", _symlinked("features/zarr.json", "features-zarr.json"))
    add("symlink", "build folder (being built)", _symlinked("_shards", "build"), "incomplete")
    add("symlink", "sample part (being built)", _symlinked("_shards/000000.parquet", "part.parquet"), "incomplete")
    add("symlink", "shard file (being built)", _symlinked("features/c/0/0", "shard"), "incomplete")

    add("oversized", "3e9 rows in one shard", _billions_of_rows)
    add("oversized", "3e9 shards", _billions_of_shards)
    add("oversized", "dimension 1e9", _huge_dim)
    add("oversized", "array chunk of 3e9 rows", _huge_chunks)
    add("oversized", "transform record and header of 3e9 rows", _transform_shape([BILLIONS], (BILLIONS,)))
    add("oversized", "transform header of 3e9 x 3e9", _transform_shape(None, (BILLIONS, BILLIONS)))
    add("oversized", "index ntotal 1e12", _huge_index_ntotal)
    add("oversized", "non-finite row 1e12", _nonfinite_out_of_range)

    add("dtype", "layout float64", _layout_dtype("float64", array_too=False))
    add("dtype", "layout and array float32 over float16 bytes", _layout_dtype("float32", array_too=True))
    add("dtype", "array metadata float64", _array_dtype("float64"))
    add("dtype", "array metadata int8", _array_dtype("int8"))
    add("dtype", "transform of strings", _transform_dtype("<U4", "<U4"))
    add("dtype", "transform float64 recorded as float32", _transform_dtype("float32", "float64"))
    add("dtype", "sample table rows as strings", _samples_with_string_rows)

    for what, relative in (
        ("shard file", "features/c/1/0"),
        ("self-influence chunk", "self_influence/c/2"),
        ("samples.parquet", "samples.parquet"),
        ("index file", "indexes/{ivf}"),
        ("index lists", "indexes/{disk_lists}"),
        ("index meta", "indexes/ivf.json"),
        ("transform", "transforms/self_influence.npy"),
        ("manifest", "zarr.json"),
        ("array metadata", "features/zarr.json"),
    ):
        add("truncated", what, _truncated(relative))
    add("truncated", "sample part (being built)", _truncated("_shards/000001.parquet"), "incomplete")
    add("truncated", "shard record (being built)", _truncated("_shards/000001.json"), "incomplete")

    add("swapped", "two shards' files", _swapped("features/c/1/0", "features/c/2/0"))
    add("swapped", "two self-influence chunks", _swapped("self_influence/c/1", "self_influence/c/2"))
    add("swapped", "two transforms", _swapped("transforms/self_influence.npy", "transforms/extra.npy"))
    add("swapped", "two index files", _swapped("indexes/{ivf}", "indexes/{ivf2}"))
    add("swapped", "two index metas", _swapped("indexes/ivf.json", "indexes/ivf2.json"))
    add(
        "swapped",
        "two sample parts (being built)",
        _swapped("_shards/000000.parquet", "_shards/000001.parquet"),
        "incomplete",
    )
    add("swapped", "two shards' files (being built)", _swapped("features/c/0/0", "features/c/1/0"), "incomplete")
    return cases


CASES = _cases()


def cases() -> dict[str, list[str]]:
    """The case names by kind."""
    kinds: dict[str, list[str]] = {}
    for name, (kind, _, _) in CASES.items():
        kinds.setdefault(kind, []).append(name)
    return kinds


# ---- what users run ------------------------------------------------------------------------------------------------


def _queries(dim: int) -> np.ndarray:
    return np.random.default_rng(11).standard_normal((N_QUERIES, dim)).astype(np.float32)


def _answer(result: tuple) -> list:
    return [np.round(np.asarray(part, dtype=np.float64), 3).tolist() for part in result]


def _table(table: Any) -> list:
    return [[row.get(key) for key in sorted(row)] for row in table.to_pylist()]


def _operations(store: str, which: str, dim: int) -> list[tuple[str, Callable[[], Any], bool]]:
    """``(name, call, compared)``: what users run on a store, in order (the ones that change it last). A compared
    call's answer must equal the pristine store's; the others' may be anything but a crash."""
    import gradindex

    queries = _queries(dim)
    if which == "incomplete":
        return [
            ("open_store", lambda: gradindex.open_store(store).complete, False),
            ("info", lambda: gradindex.info(store), False),
            ("verify", lambda: gradindex.verify(store), False),
            ("search_store", lambda: _answer(gradindex.search_store(store, queries, K, allow_incomplete=True)), True),
            ("self_influence", lambda: _table(gradindex.self_influence(store, allow_incomplete=True)), True),
            ("samples", lambda: _table(gradindex.open_store(store).samples(allow_incomplete=True)), True),
            ("cli info", lambda: _cli("info", store), False),
            ("cli verify", lambda: _cli("verify", store), False),
            ("cli self-influence", lambda: _cli("self-influence", store, "--allow-incomplete", "--top", "20"), True),
            ("sweep_temporaries", lambda: gradindex.open_store(store).sweep_temporaries(), False),
        ]
    index = lambda name: _answer(gradindex.search_store(store, queries, K, index=name))  # noqa: E731
    return [
        ("open_store", lambda: gradindex.open_store(store).complete, False),
        ("info", lambda: gradindex.info(store), False),
        ("verify", lambda: gradindex.verify(store), False),
        ("list_indexes", lambda: gradindex.list_indexes(store), False),
        ("search_store", lambda: _answer(gradindex.search_store(store, queries, K)), True),
        ("search_store index=ivf", lambda: index("ivf"), True),
        ("search_store index=disk", lambda: index("disk"), True),
        ("self_influence", lambda: _table(gradindex.self_influence(store)), True),
        ("samples", lambda: _table(gradindex.open_store(store).samples()), True),
        ("cli info", lambda: _cli("info", store), False),
        ("cli verify", lambda: _cli("verify", store), False),
        ("cli query --index", lambda: _cli("query", store, "--samples", "0-2", "-k", "5", "--index", "ivf"), True),
        ("cli self-influence", lambda: _cli("self-influence", store, "--top", "20"), True),
        ("sweep_temporaries", lambda: gradindex.open_store(store).sweep_temporaries(), False),
        (
            "cli index --overwrite",
            lambda: _cli("index", store, "--factory", "IVF4,Flat", "--name", "ivf", "--overwrite"),
            False,
        ),
        (
            "build_index overwrite",
            lambda: gradindex.build_index(
                store, "IVF4,Flat", name="disk", on_disk=True, overwrite=True, progress=False
            ),
            False,
        ),
        ("search_store index=ivf, rebuilt", lambda: index("ivf"), True),
        ("search_store index=disk, rebuilt", lambda: index("disk"), True),
        ("drop_index", lambda: [gradindex.drop_index(store, name) for name in ("ivf", "disk", "ivf2")], False),
    ]


class _CliError(Exception):
    """A CLI call that exited 1 cleanly (its one-line message)."""


class _CliCrash(Exception):
    """A CLI call that crashed or did not fail cleanly."""


def _cli(*args: str) -> str:
    """Run ``gradindex ARGS`` in this process; its stdout when it exits 0, _CliError when it fails cleanly (exit 1,
    an ``Error:`` line last on stderr, no traceback; ``verify`` lists the damage above it), else _CliCrash."""
    from click.testing import CliRunner

    from gradindex.cli import cli

    result = CliRunner().invoke(cli, list(args))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.exit_code == 0:
        return result.stdout
    clean = (
        result.exit_code == 1
        and "Traceback" not in result.output
        and lines
        and lines[-1].startswith("Error: ")
        and (len(lines) == 1 or args[0] == "verify")
        and isinstance(result.exception, SystemExit)
    )
    if clean:
        raise _CliError(lines[-1])
    detail = "".join(traceback.format_exception(result.exception)) if result.exception else result.output
    raise _CliCrash(f"exit {result.exit_code}: {detail[-1500:]}")


def _observe(store: Path, which: str, dim: int, reference: dict | None) -> dict[str, tuple[str, Any]]:
    """Each operation's outcome: ``("ok", answer)``, ``("error", message)`` or ``("crash", what)``; with a
    ``reference``, a compared answer unlike it is ``("wrong", answer)``."""
    from gradindex import GradIndexError
    from gradindex.search import clear_index_cache

    clear_index_cache()  # nothing loaded from another copy may answer for this one
    outcomes: dict[str, tuple[str, Any]] = {}
    for name, call, compared in _operations(str(store), which, dim):
        try:
            answer = json.loads(json.dumps(call(), default=str))
        except (GradIndexError, _CliError) as error:
            outcomes[name] = ("error", f"{type(error).__name__}: {error}")
            continue
        except BaseException as error:  # a crash is what this sweep looks for: MemoryError included
            if isinstance(error, KeyboardInterrupt):
                raise
            outcomes[name] = ("crash", f"{type(error).__name__}: {error}"[-1500:])
            continue
        if compared and reference is not None and answer != reference[name][1]:
            outcomes[name] = ("wrong", str(answer)[:300])
        else:
            outcomes[name] = ("ok", answer if compared else None)
    return outcomes


# ---- the pristine stores and the victims ----------------------------------------------------------------------


def prepare(work: Path, small: Path) -> dict:
    """The pristine complete store (the small store with three indexes and two transforms), a store being built
    (the first half of its shards), the victims (copies of real files, outside both) and the pristine answers."""
    import pyarrow.parquet as pq

    import gradindex
    from gradindex.store import create_store

    work = Path(work)
    complete = work / "pristine" / "complete.gradindex"
    shutil.copytree(small, complete)
    gradindex.build_index(complete, "IVF4,Flat", name="ivf", progress=False)
    gradindex.build_index(complete, "IVF4,Flat", name="ivf2", seed=1, progress=False)
    gradindex.build_index(complete, "IVF4,Flat", name="disk", on_disk=True, progress=False)
    opened = gradindex.open_store(complete)
    _, scores = opened.self_influence()
    opened.write_transform("self_influence", scores.astype(np.float32))
    opened.write_transform("extra", np.random.default_rng(1).standard_normal(opened.n_samples).astype(np.float32))

    incomplete = work / "pristine" / "incomplete.gradindex"
    building = create_store(incomplete, opened.layout, opened.fingerprint)
    for shard in range(max(2, opened.n_shards // 2)):
        harness.write_shard(building, shard, opened.read_shard(shard), owner="crafted")

    victims = work / "pristine" / "victims"
    victims.mkdir()
    (victims / "victim.txt").write_text("a file outside the store: it must never change\n")
    files = _files(complete)
    shutil.copyfile(complete / "indexes" / files["ivf2"], victims / "victim.faiss")
    shutil.copyfile(complete / "indexes" / files["disk_lists"], victims / "victim.ivfdata")
    np.save(victims / "victim.npy", np.arange(opened.n_samples, dtype=np.float32), allow_pickle=False)
    shutil.copyfile(complete / "features" / "c" / "1" / "0", victims / "shard")
    (victims / "shard-folder").mkdir()
    shutil.copyfile(complete / "features" / "c" / "1" / "0", victims / "shard-folder" / "0")
    shutil.copytree(complete / "indexes", victims / "indexes")
    shutil.copyfile(complete / "indexes" / "ivf.json", victims / "ivf.json")
    shutil.copytree(complete / "transforms", victims / "transforms")
    shutil.copytree(incomplete / "_shards", victims / "build")
    shutil.copyfile(incomplete / "_shards" / "000001.parquet", victims / "part.parquet")
    shutil.copyfile(complete / "zarr.json", victims / "zarr.json")
    shutil.copyfile(complete / "features" / "zarr.json", victims / "features-zarr.json")
    table = pq.read_table(complete / "samples.parquet")
    shuffled = table.set_column(
        table.column_names.index("sample_id"),
        "sample_id",
        table.column("sample_id").take(np.roll(np.arange(table.num_rows), 1)),
    )
    pq.write_table(shuffled, victims / "samples.parquet")

    # the pristine answers, and the exact search checked against numpy brute force over the real vectors
    vectors = opened.read_features().astype(np.float32)
    queries = _queries(opened.dim)
    found_scores, found_rows = gradindex.search_store(complete, queries, K)
    brute = queries @ vectors.T
    expected_rows = np.argsort(-brute, axis=1, kind="stable")[:, :K]
    assert np.array_equal(found_rows, expected_rows), "exact search differs from brute force on the pristine store"
    assert np.allclose(found_scores, np.take_along_axis(brute, expected_rows, axis=1), rtol=1e-4, atol=1e-4)
    references = {}
    for which, path in (("complete", complete), ("incomplete", incomplete)):
        copy = work / "pristine" / f"answers-{which}.gradindex"  # the operations end by dropping the indexes
        shutil.copytree(path, copy)
        references[which] = _observe(copy, which, opened.dim, None)
        shutil.rmtree(copy)
        broken = {  # verify of a store being built names its unwritten shards (the CLI exits 1)
            name: outcome
            for name, outcome in references[which].items()
            if outcome[0] != "ok" and not (name == "cli verify" and which == "incomplete")
        }
        assert not broken, f"the pristine {which} store does not answer: {broken}"
    return {
        "complete": str(complete),
        "incomplete": str(incomplete),
        "victims": str(victims),
        "dim": opened.dim,
        "references": references,
    }


# ---- one case in a child process, the sweep --------------------------------------------------------------------


def _limit_address_space() -> None:
    """Let this process map only ADDRESS_SPACE_HEADROOM more than it has: an allocation of what a crafted header
    declares then fails (a MemoryError, counted as a crash) instead of being overcommitted."""
    try:
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return
    limit = size + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _child_case(name: str, prepared: dict, folder: str, result_path: str) -> None:
    harness.child_setup()
    _kind, which, craft = CASES[name]
    folder = Path(folder)
    store = folder / "s.gradindex"
    victims = folder / "victims"
    shutil.copytree(prepared[which], store, symlinks=True)
    shutil.copytree(prepared["victims"], victims, symlinks=True)
    craft(store, victims)
    before = harness.tree_hash(victims)
    _limit_address_space()
    outcomes = _observe(store, which, prepared["dim"], prepared["references"][which])
    result = {"outcomes": outcomes, "victims touched": harness.tree_hash(victims) != before}
    Path(result_path).write_text(json.dumps(result, default=str))
    os._exit(0)


def sweep(work: Path, small: Path, *, names: list[str] | None = None) -> dict:
    """Run every case (or ``names``) on copies of the pristine stores made from ``small`` (a complete store of a
    ``rel_tasks`` task with a recorded task spec and at least 4 shards, e.g. ``harness.SMALL``; a bigger one makes a
    bigger sweep); returns the figures, the outcomes by kind, and the findings (crashes, wrong answers, victims
    touched, children that died)."""
    work = Path(work)
    prepared = prepare(work, small)
    figures: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    findings = []
    for number, name in enumerate(names or list(CASES)):
        kind = CASES[name][0]
        folder = work / f"case-{number}"
        folder.mkdir()
        result_path = folder / "result.json"
        code, _ = harness.run_child(_child_case, name, prepared, str(folder), str(result_path))
        counts = by_kind.setdefault(kind, Counter())
        figures["cases"] += 1
        counts["cases"] += 1
        if code != 0 or not result_path.exists():
            figures["children died"] += 1
            findings.append({"case": name, "problem": f"the child exited {code}"})
            continue
        result = json.loads(result_path.read_text())
        outcomes = result["outcomes"]
        for outcome, _ in outcomes.values():
            figures[f"operations {outcome}"] += 1
        figures["operations"] += len(outcomes)
        bad = {op: value for op, value in outcomes.items() if value[0] in ("crash", "wrong")}
        refused = any(value[0] == "error" for value in outcomes.values())
        figures["victims touched"] += result["victims touched"]
        outcome = (
            "crash" if bad else "victims touched" if result["victims touched"] else "refused" if refused else "harmless"
        )
        figures[f"cases {outcome}"] += 1
        counts[outcome] += 1
        if bad or result["victims touched"]:
            findings.append({"case": name, "victims touched": result["victims touched"], "operations": bad})
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "figures": dict(figures),
        "by_kind": {kind: dict(counts) for kind, counts in by_kind.items()},
        "findings": findings,
    }
