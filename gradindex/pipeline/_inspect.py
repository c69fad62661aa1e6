"""Looking at a store: its manifest, progress, indexes and projection plan (``info``), and every checksum re-checked
(``verify``)."""

from __future__ import annotations

from pathlib import Path

from gradindex.search import list_indexes
from gradindex.store import GradientStore, as_store

__all__ = ["info", "plan_rows", "verify"]


def info(store: GradientStore | str | Path, *, storage_options: dict | None = None) -> dict:
    """The store's manifest, build progress and persisted indexes, as a dict.

    Args:
        store: the store: a path, an fsspec URL or an opened ``GradientStore``.
        storage_options: options of the fsspec filesystem of a store URL.

    Returns:
        The manifest (format, fingerprint, layout, checkpoints, task, ...) with ``path``, ``progress``,
        ``indexes`` (each persisted index's meta: factory, recall, nprobe, stale) and, for a kron store,
        ``projection_plan``: one row per parameter saying which path its per-sample gradient took and how it is
        projected (``plan_rows``).
    """
    store = as_store(store, storage_options)
    details = store.describe()
    details["indexes"] = list_indexes(store)
    plan = ((details.get("fingerprint") or {}).get("projection") or {}).get("plan")
    if isinstance(plan, list):
        details["projection_plan"] = plan_rows(plan)
    return details


def plan_rows(plan: list[dict]) -> list[dict]:
    """A kron plan (the manifest's ``projection.plan``, or ``KronGradients.plan_dict()`` before a build) as one row per
    parameter.

    Args:
        plan: the plan's entries: factored groups, then the unfactored parameters' entry.

    Returns:
        Rows ``{"param", "path", "group", "type", "projection", "why"}``: ``path`` is ``factored`` (from the layer's
        hooked inputs and output gradients, never forming the gradient; a small layer's is formed and projected
        flat), ``norm`` (a LayerNorm, from its hooks), ``module`` (a vjp of its own module's call) or ``vmap`` (a
        whole-model vmap); ``group`` is the module (a tied weight: its first), ``type`` the group's kind (linear,
        hf_conv1d, conv, embedding, tied, or rest), ``projection`` how the group is projected (e.g. ``12x8 of 97x32
        (pca)``, ``flat pca 40 of 3104``, ``exact``), ``why`` the reason recorded. A plan recorded before paths were
        recorded shows ``?`` for them.
    """
    rows = []
    for entry in plan:
        if "module" in entry:
            uses = entry.get("uses")
            group_type = entry.get("type", "?")
            if uses:
                group_type += " (" + " + ".join(f"{name} {kind}" for name, kind in uses) + ")"
            for param in entry.get("params", []):
                rows.append(
                    {
                        "param": param,
                        "path": entry.get("path", "?"),
                        "group": entry["module"],
                        "type": group_type,
                        "projection": _layer_projection(entry),
                        "why": entry.get("why", "?"),
                    }
                )
        elif "params" in entry:
            kind, dim, numel = entry.get("type", "?"), entry.get("dim", "?"), entry.get("numel", "?")
            projection = "exact" if kind == "identity" else f"{kind} {dim} of {numel} (all unfactored together)"
            groups = entry.get("groups") or [{"path": "?", "module": "?", "params": entry["params"], "why": "?"}]
            for group in groups:
                for param in group.get("params", []):
                    rows.append(
                        {
                            "param": param,
                            "path": group.get("path", "?"),
                            "group": group.get("module") or "(the model)",
                            "type": "rest",
                            "projection": projection,
                            "why": group.get("why", "?"),
                        }
                    )
    return rows


def _layer_projection(entry: dict) -> str:
    size = f"{entry.get('in', '?')}x{entry.get('out', '?')}"
    if entry.get("flat"):
        return f"flat pca {entry['flat']} of {entry.get('in', 0) * entry.get('out', 0)}"
    if entry.get("k_in") == entry.get("in") and entry.get("k_out") == entry.get("out"):
        return f"exact ({size})"
    return f"{entry.get('k_in', '?')}x{entry.get('k_out', '?')} of {size} ({entry.get('sides', 'gaussian')})"


def verify(store: GradientStore | str | Path, *, storage_options: dict | None = None) -> list[str]:
    """Re-hash every file of the store against its recorded checksum.

    Args:
        store: the store: a path, an fsspec URL or an opened ``GradientStore``.
        storage_options: options of the fsspec filesystem of a store URL.

    Returns:
        The problems found, one sentence each naming the shard or file (empty when the store is sound).
    """
    return as_store(store, storage_options).verify()
