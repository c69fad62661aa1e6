"""The one containment check (``gradindex.store.contained_path``): a name a store's metadata gives stays inside the
store, by its spelling and, on a local disk, with symlinks followed."""

from __future__ import annotations

import re

import pytest

from gradindex import CorruptStoreError, SearchError
from gradindex.store import check_file_name, contained_path, is_inside, store_path


@pytest.mark.parametrize("name", ["a.npy", "transforms/a.npy", "features/c/0/0", "x..y"])
def test_relative_names_inside_are_accepted(tmp_path, name):
    assert contained_path(tmp_path, name, what="file") == tmp_path / name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../victim.txt", "an empty, '.' or '..' part"),
        ("transforms/../../victim.txt", "an empty, '.' or '..' part"),
        ("a//b", "an empty, '.' or '..' part"),
        ("./a", "an empty, '.' or '..' part"),
        ("/etc/passwd", "absolute path"),
        ("", "not a file name"),
        (None, "not a file name"),
        (3, "not a file name"),
        ("a\0b", "NUL"),
        ("a\\..\\b", "backslash"),
    ],
)
def test_traversal_is_refused_by_its_spelling(tmp_path, name, problem):
    with pytest.raises(CorruptStoreError, match=f"{re.escape(problem)}.*rebuild the store with overwrite=True"):
        contained_path(tmp_path, name, what="file")


def test_plain_names_and_patterns(tmp_path):
    pattern = re.compile(r"ivf\.[0-9a-f]{12}\.faiss")
    assert check_file_name("ivf.0123456789ab.faiss", what="f", where=tmp_path, pattern=pattern)
    with pytest.raises(SearchError, match="not a plain file name; drop it"):
        check_file_name("sub/ivf.faiss", what="f", where=tmp_path, plain=True, error=SearchError, fix="drop it")
    with pytest.raises(CorruptStoreError, match=r"not a name of the form ivf.<token>.faiss"):
        check_file_name("victim.txt", what="f", where=tmp_path, pattern=pattern, form="ivf.<token>.faiss")


def test_symlinks_out_of_the_root_are_refused_and_inside_ones_kept(tmp_path):
    root, outside = tmp_path / "s.gradindex", tmp_path / "victims"
    (root / "features").mkdir(parents=True)
    outside.mkdir()
    (outside / "victim.txt").write_text("x")
    (root / "features" / "out").symlink_to(outside / "victim.txt")
    (root / "linked-folder").symlink_to(outside)
    (root / "features" / "real").write_text("y")
    (root / "features" / "in").symlink_to(root / "features" / "real")
    for name in ("features/out", "linked-folder/victim.txt", "linked-folder/not-yet-there"):
        with pytest.raises(CorruptStoreError, match="is a link to .*victims.*, outside it"):
            contained_path(root, name, what="file")
    assert contained_path(root, "features/in", what="file") == root / "features" / "in"
    # a root reached through a link is fine: both sides are resolved
    (tmp_path / "alias").symlink_to(root)
    assert is_inside(tmp_path / "alias", tmp_path / "alias" / "features" / "real")


def test_names_at_a_url_are_checked_without_resolving():
    root = store_path("memory://crafted/s.gradindex")
    assert str(contained_path(root, "transforms/a.npy", what="file")).endswith("s.gradindex/transforms/a.npy")
    with pytest.raises(CorruptStoreError, match="'..' part"):
        contained_path(root, "../other/a.npy", what="file")
    assert is_inside(root, root / "anything")  # no links at a URL


def test_removing_a_tree_never_follows_a_link(tmp_path):
    from gradindex.store import StoreLayout, create_store

    outside = tmp_path / "victims"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    store = create_store(
        tmp_path / "s.gradindex", StoreLayout(n_samples=4, dim=2, rows_per_shard=2, rows_per_chunk=2), {}
    )
    build_files = tmp_path / "s.gradindex" / "_shards"
    build_files.rmdir()
    build_files.symlink_to(outside)
    store.manifest["state"] = "complete"  # the build folder of a complete store goes on a sweep: the link only
    store.sweep_temporaries()
    assert not build_files.exists() and not build_files.is_symlink()
    assert (outside / "keep.txt").read_text() == "keep"
