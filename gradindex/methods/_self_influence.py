"""Self-influence at query-time settings other than the build's (another damping or solver).

For an asymmetric method it is ⟨T φ(z), φ(z)⟩: the query transform applied to each training sample,
against that sample's stored row. TRAK needs no gradients for it (its stored rows and ΦᵀΦ suffice);
influence functions recompute ∇ℓ(z) and one inverse-Hessian-vector product per training sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from gradindex.errors import IncompatibleStoreError
from gradindex.methods._options import METHOD_OPTIONS, query_overrides, resolve_options

# torch and the methods' modules load only when a score must be computed: the stored column is read without them
if TYPE_CHECKING:
    from gradindex.methods._base import MethodFeaturizer
    from gradindex.store import GradientStore
    from gradindex.task import Task

__all__ = ["finish_store", "recompute_self_influence", "stored_self_influence"]


def finish_store(store: GradientStore) -> None:
    """What a method computes from the whole store once every shard is written (needs no model): TRAK's ΦᵀΦ, the
    factors of preconditioned TracIn."""
    from gradindex.methods._ekfac import finish_precondition
    from gradindex.methods._trak import finish_trak

    method = store.fingerprint.get("method", {})
    if method.get("name") == "trak":
        finish_trak(store, resolve_options("trak", _recorded(method))["damping"])
    if method.get("name") == "tracin" and method.get("precondition", "none") != "none":
        options = resolve_options("tracin", _recorded(method))
        if options["precondition_side"] == "query":  # (both: the factors came first and are in every row already)
            finish_precondition(store, options["precondition"], options["damping"])


def _recorded(method: dict) -> dict:
    return {key: value for key, value in method.items() if key not in ("name", "normalize")}


def stored_self_influence(store: GradientStore, asked: Mapping[str, Any] | None) -> np.ndarray | None:
    """Self-influence of every row of a complete store at the asked query-time settings, when the store alone
    gives it (the build's own settings, or TRAK at another damping); None when gradients must be recomputed.

    Asking for another value of a build-time option is an ``IncompatibleStoreError`` naming it.
    """
    method = store.fingerprint.get("method", {})
    name = method.get("name")
    asked = {key: value for key, value in (asked or {}).items() if value is not None}
    if name not in METHOD_OPTIONS:
        if asked:
            raise ValueError(
                f"store {store.path} was built with method={name}, which takes no options (got "
                f"{', '.join(sorted(asked))})"
            )
        return store.self_influence()[1]
    built = resolve_options(name, _recorded(method))
    overrides = query_overrides(name, built, asked, store.path)
    if all(built.get(key) == value for key, value in overrides.items()):
        return store.self_influence()[1]
    if name == "trak":
        from gradindex.methods._trak import trak_self_influence

        return trak_self_influence(store, overrides.get("damping", built["damping"]))
    if name == "tracin" and built["precondition"] != "none":
        from gradindex.methods._ekfac import precondition_self_influence

        if built["precondition_side"] == "both":
            raise IncompatibleStoreError(
                f"store {store.path} was built with precondition_side=both damping={built['damping']!r}, fixed in its "
                "vectors; ask without damping, or rebuild with precondition_side=query (any damping at query time)"
            )
        return precondition_self_influence(store, overrides.get("damping", built["damping"]))
    return None


def recompute_self_influence(
    store: GradientStore,
    featurizer: MethodFeaturizer,
    task: Task,
    *,
    batch_size: int = 256,
    bar: Any = None,
) -> np.ndarray:
    """``(N,)`` float32 self-influence of every row of a complete store under the featurizer's query settings."""
    import torch

    from gradindex.methods._base import row_dots
    from gradindex.methods._ekfac import Preconditioned, precondition_self_influence
    from gradindex.methods._trak import TrakFeaturizer, trak_self_influence
    from gradindex.task import iter_batches

    if isinstance(featurizer, TrakFeaturizer):
        return trak_self_influence(store, featurizer.query_settings["damping"])
    if isinstance(featurizer, Preconditioned) and not featurizer.symmetric:
        return precondition_self_influence(store, featurizer.query_settings["damping"])
    if featurizer.symmetric:
        return store.self_influence()[1]
    scores = np.empty(store.n_samples, dtype=np.float32)
    with torch.enable_grad():
        for first_row, block in store.iter_blocks():
            position = 0
            for batch in iter_batches(task.train, range(first_row, first_row + len(block)), batch_size, task.collate):
                transformed = featurizer.query_vectors(batch)
                stored = torch.from_numpy(
                    np.asarray(block[position : position + len(transformed)], dtype=np.float32)
                ).to(transformed.device)
                scores[first_row + position : first_row + position + len(transformed)] = (
                    row_dots(transformed, stored).cpu().numpy()
                )
                position += len(transformed)
                if bar is not None:
                    bar.update(len(transformed))
    return scores
