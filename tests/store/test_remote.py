"""Stores at fsspec URLs: memory://, and a real S3 API (moto's server on loopback).

Every remote store is compared byte for byte with the same build on local disk: every data file, and
the manifest less its timestamps. Queries must return the same table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_tasks import TINY

import gradindex
from gradindex import SearchError, ShardOwnershipError, StoreNotFoundError
from gradindex.cli import cli
from gradindex.store import StorageError, StoreLayout, StoreWriteError, create_store, store_path

MLP = f"{TINY}:mlp_task"
# 120 rows in 6 shards; a dense projection keeps these tests about storage, not featurization
OPTIONS = {"proj_dim": 16, "rows_per_shard": 20, "projection": "rademacher"}
BUILD_FLAGS = ["--proj-dim", "16", "--rows-per-shard", "20", "--projection", "rademacher"]
VOLATILE = {"created_at", "completed_at"}
BUCKET = "gradindex-test"


def snapshot(location) -> dict[str, bytes]:
    """Every file of a store (local or remote) by relative path; the manifest without its timestamps."""
    root = store_path(location)
    files = {}
    for item in root.rglob("*"):
        name = str(item.relative_to(root))
        if name.startswith("indexes") or not item.is_file():
            continue
        if name == "zarr.json":
            manifest = json.loads(item.read_bytes())["attributes"]["gradindex"]
            files[name] = json.dumps(
                {key: value for key, value in manifest.items() if key not in VOLATILE}, sort_keys=True
            ).encode()
        else:
            files[name] = item.read_bytes()
    return files


def assert_same_store(left, right) -> None:
    left_files, right_files = snapshot(left), snapshot(right)
    assert sorted(left_files) == sorted(right_files)
    assert [name for name in left_files if left_files[name] != right_files[name]] == []


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """The reference: the tiny store built on local disk, with the checkpoints every test builds from."""
    import tiny_tasks

    directory = tmp_path_factory.mktemp("reference")
    checkpoints = tiny_tasks.save_checkpoints(tiny_tasks.mlp, directory)
    store = gradindex.build(MLP, checkpoints, directory / "local.gradindex", progress=False, **OPTIONS)
    return store, checkpoints


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* variables point every client at it."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'gradindex[s3]')")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            patch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "FSSPEC_S3_ENDPOINT_URL"):
            patch.delenv(key, raising=False)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/{name}"


def _cli(*args: str):
    return CliRunner().invoke(cli, ["-q", *args])


def _query(store):
    return gradindex.query(store, samples=[0, 3, 7], k=5, progress=False)


# ---- memory:// ------------------------------------------------------------------------------------


def test_memory_store_equals_local(local_store):
    local, checkpoints = local_store
    url = f"memory://gradindex-{uuid.uuid4().hex[:8]}/mem.gradindex"
    remote = gradindex.build(MLP, checkpoints, url, progress=False, **OPTIONS)
    assert str(remote.path) == url and remote.complete
    assert_same_store(local.path, url)
    np.testing.assert_array_equal(gradindex.open_store(url).read_features(), local.read_features())
    assert _query(url).equals(_query(local.path))
    assert gradindex.self_influence(url, top=10).equals(gradindex.self_influence(local.path, top=10))
    # the raw zarr array reads through zarr's FsspecStore
    np.testing.assert_array_equal(gradindex.open_store(url).features_array[:], local.features_array[:])


def test_kron_pca_sides_travel_with_a_remote_store(local_store, tmp_path):
    """The default projection's pca side matrices live in the store (transforms/kron_sides): two workers of a remote
    build share one copy, and the remote store equals the local build byte for byte, queries included."""
    _, checkpoints = local_store
    kron = {"proj_dim": 64, "rows_per_shard": 20}
    local = gradindex.build(MLP, checkpoints, tmp_path / "kron.gradindex", progress=False, **kron)
    assert "kron_sides" in local.transforms()
    url = f"memory://gradindex-{uuid.uuid4().hex[:8]}/kron.gradindex"
    gradindex.build(MLP, checkpoints, url, shard=(0, 2), progress=False, **kron)
    remote = gradindex.build(MLP, checkpoints, url, shard=(1, 2), progress=False, **kron)
    assert remote.complete
    assert_same_store(local.path, url)
    assert _query(url).equals(_query(local.path))


def test_remote_claims_expire_and_name_their_owner(monkeypatch):
    url = f"memory://gradindex-{uuid.uuid4().hex[:8]}/claims.gradindex"
    store = create_store(
        url, StoreLayout(n_samples=40, dim=4, rows_per_shard=20, rows_per_chunk=20), {"fingerprint": 1}
    )
    claim = store.path / "_shards" / "000000.claim"
    # another machine claimed shard 0 a minute ago: it is owned
    claim.fs.pipe_file(
        claim.fs_path, json.dumps({"owner": "w", "host": "elsewhere", "pid": 1, "time": time.time() - 60}).encode()
    )
    with pytest.raises(ShardOwnershipError, match="pid 1 on elsewhere"):
        store.claim_shard(0, owner="me")
    # older than the claim timeout: taken over
    monkeypatch.setenv("GRADINDEX_CLAIM_TIMEOUT", "30")
    store.claim_shard(0, owner="me")
    assert json.loads(claim.read_bytes())["owner"] == "me"
    # a second claim of the same shard by another writer fails (exclusive create)
    other = gradindex.open_store(url)
    with pytest.raises(ShardOwnershipError, match="owned by writer me"):
        other.claim_shard(0, owner="them")
    store.release_shard(0)
    assert not claim.exists()


# ---- S3 (moto) ------------------------------------------------------------------------------------


def test_s3_build_query_verify_equal_local(s3, local_store):
    local, checkpoints = local_store
    url = _url("a.gradindex")
    built = _cli(
        "build",
        "--task",
        MLP,
        *(arg for c in checkpoints for arg in ("--checkpoint", c)),
        "-o",
        url,
        *BUILD_FLAGS,
        "--format",
        "json",
    )
    assert built.exit_code == 0, built.output
    assert json.loads(built.output)["store"] == url and json.loads(built.output)["complete"]
    assert_same_store(local.path, url)
    assert _query(url).equals(_query(local.path))
    verified = _cli("verify", url)
    assert verified.exit_code == 0 and "every shard matches its checksum" in verified.output, verified.output
    info = _cli("info", url, "--format", "json")
    assert info.exit_code == 0 and json.loads(info.output)["progress"] == "6/6 shards (120/120 rows)"
    # the endpoint as a storage option works too
    assert gradindex.info(url, storage_options={"endpoint_url": s3})["path"] == url
    # a damaged object is found by verify and refused by a query
    shard = store_path(url) / "features" / "c" / "2" / "0"
    shard.fs.pipe_file(shard.fs_path, b"\0" * len(shard.read_bytes()))
    damaged = _cli("verify", url)
    assert damaged.exit_code == 1 and "shard 2: features/c/2/0 fails its checksum" in damaged.output
    with pytest.raises(gradindex.CorruptStoreError, match="fails its checksum"):
        _query(url)


def test_s3_killed_build_resumes_to_the_same_bytes(s3, local_store, tmp_path):
    local, checkpoints = local_store
    url = _url("killed.gradindex")
    command = [
        sys.executable,
        "-c",
        "from gradindex.cli import main; main()",
        "-q",
        "build",
        "--task",
        MLP,
        "-o",
        url,
        *BUILD_FLAGS,
    ]
    for checkpoint in checkpoints:
        command += ["--checkpoint", checkpoint]
    # killed after writing the 3rd shard's data, before its record: its claim and data are left behind
    env = {**os.environ, "GRADINDEX_CRASH_AT": "shard-before-record:3", "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run(command, env=env, capture_output=True, timeout=240).returncode == 137
    stopped = gradindex.open_store(url)
    assert not stopped.complete and stopped.done_shards() == [0, 1]
    assert (stopped.path / "_shards" / "000002.claim").exists()  # the dead writer's claim (same host, dead pid)
    resumed = gradindex.build(MLP, checkpoints, url, resume=True, progress=False, **OPTIONS)
    assert resumed.complete
    assert not (resumed.path / "_shards").exists()
    assert_same_store(local.path, url)
    assert gradindex.verify(url) == []


def test_s3_sharded_workers_and_finalize_equal_one_process(s3, local_store):
    local, checkpoints = local_store
    url = _url("sharded.gradindex")
    common = [
        "build",
        "--task",
        MLP,
        *(arg for c in checkpoints for arg in ("--checkpoint", c)),
        "-o",
        url,
        *BUILD_FLAGS,
        "--format",
        "json",
    ]
    first = _cli(*common, "--shard", "0/2")
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["progress"] == "3/6 shards (60/120 rows)"
    second = _cli(*common, "--shard", "1/2")
    assert second.exit_code == 0, second.output
    finalized = _cli("build", "--finalize", "-o", url, "--format", "json")
    assert finalized.exit_code == 0 and json.loads(finalized.output)["complete"], finalized.output
    assert_same_store(local.path, url)


def test_s3_persisted_index_round_trips_with_its_checksum(s3, local_store, tmp_path, monkeypatch):
    import gradindex.search as indexes

    local, checkpoints = local_store
    monkeypatch.setenv("GRADINDEX_CACHE", str(tmp_path / "cache"))
    url = _url("indexed.gradindex")
    gradindex.build(MLP, checkpoints, url, progress=False, **OPTIONS)
    made = _cli("index", url, "--factory", "IVF2,Flat", "--name", "ivf", "--recall-queries", "10", "--format", "json")
    assert made.exit_code == 0, made.output
    meta = json.loads(made.output)
    remote_files = sorted(item.name for item in (store_path(url) / "indexes").iterdir())
    assert remote_files == sorted([meta["file"], "ivf.json"])
    assert [listed["name"] for listed in gradindex.info(url)["indexes"]] == ["ivf"]
    # read back in a fresh cache: the file comes from S3 and answers as an index built locally does
    monkeypatch.setenv("GRADINDEX_CACHE", str(tmp_path / "cache2"))
    indexes.clear_index_cache()
    queries = local.read_rows([0, 5, 9])
    remote_scores, remote_rows = indexes.search_index(url, queries, 5, "ivf")
    indexes.build_index(local, "IVF2,Flat", name="ivf", recall_queries=10, progress=False)
    local_scores, local_rows = indexes.search_index(local, queries, 5, "ivf")
    np.testing.assert_array_equal(remote_rows, local_rows)
    np.testing.assert_allclose(remote_scores, local_scores)
    # damage the index object on S3: a fresh reader refuses it by its sha256
    damaged = store_path(url) / "indexes" / meta["file"]
    data = bytearray(damaged.read_bytes())
    data[-8] ^= 0xFF
    damaged.fs.pipe_file(damaged.fs_path, bytes(data))
    monkeypatch.setenv("GRADINDEX_CACHE", str(tmp_path / "cache3"))
    indexes.clear_index_cache()
    with pytest.raises(SearchError, match="fails its checksum"):
        indexes.search_index(url, queries, 5, "ivf")
    indexes.drop_index(url, "ivf")
    assert not (store_path(url) / "indexes" / "ivf.json").exists()


def test_s3_errors_are_one_sentence(s3, local_store):
    _, checkpoints = local_store
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/a.gradindex"
    with pytest.raises(StoreWriteError, match=r"the bucket 'no-such-bucket-\w+' does not exist; create it"):
        gradindex.build(MLP, checkpoints, missing, progress=False, **OPTIONS)
    built = _cli("build", "--task", MLP, "--checkpoint", checkpoints[0], "-o", missing, *BUILD_FLAGS)
    assert built.exit_code == 1 and "does not exist; create it" in built.output and "Traceback" not in built.output
    with pytest.raises(StoreNotFoundError, match="no gradindex store at s3://"):
        gradindex.open_store(missing)
    queried = _cli("query", _url("absent.gradindex"), "--samples", "0")
    assert queried.exit_code == 1 and "no gradindex store at s3://" in queried.output


def test_unknown_protocol_and_missing_package_name_the_fix():
    with pytest.raises(StorageError, match="unknown storage protocol 'nosuch'"):
        gradindex.open_store("nosuch://bucket/a.gradindex")
    result = _cli("info", "nosuch://bucket/a.gradindex")
    assert result.exit_code == 1 and "unknown storage protocol 'nosuch'" in result.output
    bad = _cli("info", "memory://x/a.gradindex", "--storage-option", "novalue")
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match=r"pip install 'gradindex\[gcs\]'"):
            gradindex.open_store("gs://bucket/a.gradindex")


def test_file_urls_and_plain_paths_are_local(tmp_path):
    assert store_path(f"file://{tmp_path}/a.gradindex") == Path(tmp_path) / "a.gradindex"
    assert store_path("runs/a.gradindex") == Path("runs/a.gradindex")


def test_s3_store_searched_by_dask_workers_equals_one_process(s3, local_store):
    distributed = pytest.importorskip("distributed")
    from gradindex.search import DaskSearch

    local, checkpoints = local_store
    url = _url("dask.gradindex")
    gradindex.build(MLP, checkpoints, url, progress=False, **OPTIONS)
    queries = local.read_rows([1, 4, 50])
    expected_scores, expected_rows = gradindex.search_store(local, queries, 7)
    # worker processes read the store from S3 themselves (the AWS_* variables reach them)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
        DaskSearch(url, client) as search,
    ):
        assert len(search.parts) == 2
        scores, rows = search.search(queries, 7)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores)


def test_refused_credentials_are_one_sentence(local_store, monkeypatch):
    _, checkpoints = local_store
    url = f"memory://gradindex-{uuid.uuid4().hex[:8]}/refused.gradindex"
    fs = store_path(url).fs

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Access Denied")

    monkeypatch.setattr(fs, "pipe_file", refuse)
    with pytest.raises(StoreWriteError, match="permission denied .*check the credentials"):
        gradindex.build(MLP, checkpoints, url, progress=False, **OPTIONS)
    monkeypatch.setattr(fs, "exists", refuse)
    result = _cli("info", url)
    assert (
        result.exit_code == 1
        and f"reading {url} was refused" in result.output
        and "check the credentials" in result.output
    )


def test_a_bad_claim_timeout_names_the_variable_and_what_it_takes(monkeypatch):
    from gradindex.store import DEFAULT_CLAIM_TIMEOUT, claim_timeout

    monkeypatch.delenv("GRADINDEX_CLAIM_TIMEOUT", raising=False)
    assert claim_timeout() == DEFAULT_CLAIM_TIMEOUT
    monkeypatch.setenv("GRADINDEX_CLAIM_TIMEOUT", "90")
    assert claim_timeout() == 90.0
    monkeypatch.setenv("GRADINDEX_CLAIM_TIMEOUT", "soon")
    with pytest.raises(StorageError, match="GRADINDEX_CLAIM_TIMEOUT must be a number of seconds, got 'soon'"):
        claim_timeout()
    monkeypatch.setenv("GRADINDEX_CLAIM_TIMEOUT", "-5")
    with pytest.raises(StorageError, match="GRADINDEX_CLAIM_TIMEOUT must be positive, got '-5'"):
        claim_timeout()


def test_a_claim_timeout_that_is_not_positive_is_refused_before_any_work(tmp_path):
    out = tmp_path / "a.gradindex"
    with pytest.raises(ValueError, match="claim_timeout must be a positive number of seconds, got 0"):
        gradindex.build(MLP, [], out, claim_timeout=0, **OPTIONS)
    assert not out.exists()


@pytest.mark.parametrize("trouble", ["no credentials", "no endpoint"])
def test_missing_credentials_and_an_unreachable_endpoint_are_one_sentence(
    trouble, tmp_path, monkeypatch, mlp_checkpoints
):
    """botocore's own errors (NoCredentialsError, EndpointConnectionError) become a StorageError naming the fix."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    if trouble == "no endpoint":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    arguments = ["build", "--task", MLP, "--checkpoint", mlp_checkpoints[0], "-o", "s3://bucket/a.gradindex"]
    options = ["--storage-option", "endpoint_url=http://127.0.0.1:1", "--storage-option", "skip_instance_cache=true"]
    result = CliRunner().invoke(cli, [*arguments, *options])  # (fsspec would reuse another case's client)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    expected = (
        ("no usable credentials", "AWS_ACCESS_KEY_ID")
        if trouble == "no credentials"
        else ("the storage cannot be reached", "endpoint_url storage option")
    )
    assert all(words in result.output for words in expected), result.output
