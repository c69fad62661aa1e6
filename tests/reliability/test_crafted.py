"""Issue 14, a hostile world: a store someone shared cannot reach outside itself, and a crafted or damaged store
gives a clean error, never a crash or a silently different answer.

Every case of ``crafted.py`` (path traversal in each metadata field naming a file, symlinks out of the store,
oversized declared shapes, wrong dtypes, truncated and swapped files) runs what users run, through the Python API
and the CLI, in a child process with a bounded address space. The victims, copies of real files beside the store,
are hashed before and after each case."""

from __future__ import annotations

from reliability import crafted, harness

KINDS = ("traversal", "symlink", "oversized", "dtype", "truncated", "swapped")


def test_crafted_stores_stay_inside_themselves_and_fail_cleanly(env, capsys):
    result = crafted.sweep(env.fresh("crafted"), env.small)
    figures = result["figures"]
    harness.report(
        capsys,
        harness.summary(
            "crafted stores",
            figures,
            [
                "cases",
                "cases refused",
                "cases harmless",
                "cases crash",
                "victims touched",
                "children died",
                "operations",
                "operations error",
                "operations ok",
                "operations crash",
                "operations wrong",
            ],
        ),
    )
    by_kind = [
        harness.summary(f"  {kind}", result["by_kind"].get(kind, {}), ["cases", "refused", "harmless", "crash"])
        for kind in KINDS
    ]
    harness.report(capsys, "\n".join(by_kind))
    assert result["findings"] == []
    assert set(result["by_kind"]) == set(KINDS)
    assert figures["cases"] == len(crafted.CASES)
    assert figures.get("operations crash", 0) == figures.get("operations wrong", 0) == 0
    assert figures.get("victims touched", 0) == figures.get("children died", 0) == 0
