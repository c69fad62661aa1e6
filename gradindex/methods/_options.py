"""Method options: what each method accepts, their defaults, which are fixed at build and which a query may change.

Every option a method records is part of the store's fingerprint (``fingerprint["method"]``). A query
may change the *query-side* ones (IF's damping and solver, TRAK's damping) without a rebuild; asking
for a different value of any other is an ``IncompatibleStoreError`` that names the option.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradindex.errors import ArgumentError, IncompatibleStoreError
from gradindex.utils import Setting

__all__ = [
    "CURVATURES",
    "METHOD_OPTIONS",
    "PRECONDITIONERS",
    "QUERY_TIME_OPTIONS",
    "SOLVERS",
    "OptionSpec",
    "option_owner",
    "query_overrides",
    "resolve_options",
]


@dataclass(frozen=True)
class OptionSpec:
    """One method option: its default, what it accepts (a ``Setting``: help, choices, bounds; strings from the command
    line are accepted), whether a query may change it, and whether it is recorded (performance knobs are not)."""

    default: Any
    accepts: Setting
    query_time: bool = False
    recorded: bool = True

    @property
    def help(self) -> str:
        return self.accepts.help

    def parse(self, name: str, value: Any) -> Any:
        """``value`` checked and converted (``"1e-3"`` -> 0.001); ``auto`` and ``none`` mean the default (None)."""
        if self.accepts.optional and isinstance(value, str) and value.lower() in ("auto", "none", ""):
            return None
        return self.accepts.check(name, value)


# the inverse-HVP solvers of influence functions, and the curvatures of if and arnoldi
SOLVERS: dict[str, str] = {
    "auto": "exact up to 4096 parameters, else cg",
    "exact": "a Cholesky factor of H + λI (small models)",
    "cg": "conjugate gradients on Hessian-vector products",
    "lissa": "LiSSA's stochastic recursion",
}
CURVATURES: dict[str, str] = {
    "hessian": "the Hessian of the training objective",
    "ggn": "the Gauss-Newton matrix (positive semi-definite; the default cross-entropy loss only)",
}

_HESSIAN = Setting(help="the curvature", choices=CURVATURES)
_HVP_BATCH = OptionSpec(
    256,
    Setting(help="training samples per Hessian-vector product batch", minimum=1, integer=True),
    query_time=True,
    recorded=False,
)

# how ``tracin`` may precondition its gradients (the module gradindex.methods._ekfac)
PRECONDITIONERS: dict[str, str] = {
    "none": "raw gradient dot products (TracIn-CP)",
    "kfac": "K-FAC: per-layer Kronecker factors of the projected gradients' Fisher, applied on the query side",
    "ekfac": "EK-FAC: K-FAC's eigenbasis with eigenvalues refit to the data (George et al. 2018), on the query side",
}

METHOD_OPTIONS: dict[str, dict[str, OptionSpec]] = {
    "tracin": {
        "precondition": OptionSpec(
            "none", Setting(help="curvature preconditioning of the projected gradients", choices=PRECONDITIONERS)
        ),
        "damping": OptionSpec(
            0.1,
            Setting(
                help="with precondition: λ relative to each layer block's mean eigenvalue, (H + λ·mean(Λ)·I)^-1",
                minimum=0,
            ),
            query_time=True,
        ),
        "precondition_side": OptionSpec(
            "query",
            Setting(
                help="where the curvature goes: query, (H + λ)^-1 on the query (any damping later, same store); both, "
                "(H + λ)^-1/2 on every vector with factors fit before the build (inner products and self-influence "
                "are influence; with --normalize, TrackStar's cosine)",
                choices=("query", "both"),
            ),
        ),
        "factor_samples": OptionSpec(
            4096,
            Setting(
                help="with precondition_side=both: training samples the factors are fit on (evenly spaced); with "
                "precondition_mix, also the most query samples",
                minimum=1,
                integer=True,
            ),
        ),
        "precondition_mix": OptionSpec(
            0.0,
            Setting(
                help="TrackStar's query-side curvature mixing (Chang et al. 2024, §A.1.3, as Bergson mixes): the "
                "factors are fit to λ·H_query + (1 − λ)·H_train, H_query from the task's test split (at most "
                "factor_samples evenly spaced samples); 0: the training curvature alone",
                minimum=0,
                maximum=1,
            ),
        ),
        "adam_normalize": OptionSpec(
            False,
            Setting(
                help="TrackStar's optimizer normalisation: divide every gradient entry by √v̂ + ε, v̂ the Adam second "
                "moment each checkpoint's optimizer state holds (a Trainer folder's optimizer.pt, or a torch.save "
                "file's 'optimizer' entry); with kron, each layer's v̂ by its rank-1 Adafactor factors",
                flag=True,
            ),
        ),
    },
    "gex": {
        "tau": OptionSpec(
            0.0,
            Setting(
                help="floor on the trained model's loss: φ_m = ℓ(θ_m) − max(ℓ(θ*), τ) (the paper's 0.05 suits "
                "losses well above it)",
                minimum=0,
            ),
        ),
    },
    "if": {
        "solver": OptionSpec("auto", Setting(help="the inverse-HVP solver", choices=SOLVERS), query_time=True),
        "damping": OptionSpec(0.001, Setting(help="λ in (H + λI)^-1", minimum=0), query_time=True),
        "hessian": OptionSpec("hessian", _HESSIAN, query_time=True),
        "cg_max_iter": OptionSpec(
            100, Setting(help="conjugate-gradient iterations at most", minimum=1, integer=True), query_time=True
        ),
        "cg_tol": OptionSpec(1e-6, Setting(help="stop when ||r|| <= cg_tol * ||b||", above=0), query_time=True),
        "lissa_depth": OptionSpec(
            1000, Setting(help="LiSSA recursion steps", minimum=1, integer=True), query_time=True
        ),
        "lissa_scale": OptionSpec(
            None,
            Setting(
                help="LiSSA scale (> the largest eigenvalue of H + λI)",
                above=0,
                optional=True,
                default_text="1.5x a power-iteration estimate",
            ),
            query_time=True,
        ),
        "lissa_repeats": OptionSpec(
            1, Setting(help="independent LiSSA runs averaged", minimum=1, integer=True), query_time=True
        ),
        "lissa_batch_size": OptionSpec(
            64, Setting(help="training samples per LiSSA Hessian estimate", minimum=1, integer=True), query_time=True
        ),
        "hvp_batch_size": _HVP_BATCH,
    },
    "arnoldi": {
        "rank": OptionSpec(20, Setting(help="eigenpairs kept (r)", minimum=1, integer=True)),
        "damping": OptionSpec(0.0, Setting(help="λ added to the kept eigenvalues: φ = (Λ + λ)^-1/2 Uᵀ∇ℓ", minimum=0)),
        "iterations": OptionSpec(
            None,
            Setting(
                help="Arnoldi iterations",
                minimum=1,
                integer=True,
                optional=True,
                default_text="max(2r, r + 20), at most the parameter count",
            ),
        ),
        "hessian": OptionSpec("hessian", _HESSIAN),
        "hvp_batch_size": _HVP_BATCH,
    },
    "trak": {
        "damping": OptionSpec(
            None,
            Setting(
                help="λ in (ΦᵀΦ + λI)^-1 (absolute)",
                minimum=0,
                optional=True,
                default_text="auto: 0.1 × the mean eigenvalue of each checkpoint's ΦᵀΦ",
            ),
            query_time=True,
        ),
        "out_to_loss": OptionSpec(
            True, Setting(help="weight training samples by 1 − p(correct class), averaged over checkpoints", flag=True)
        ),
    },
}

QUERY_TIME_OPTIONS = {
    method: tuple(name for name, spec in specs.items() if spec.query_time) for method, specs in METHOD_OPTIONS.items()
}


def option_owner(name: str) -> list[str]:
    """The methods that take an option of this name."""
    return [method for method, specs in METHOD_OPTIONS.items() if name in specs]


def _unknown(method: str, name: str) -> ValueError:
    owners = option_owner(name)
    known = ", ".join(METHOD_OPTIONS[method]) or "none"
    if owners:
        return ValueError(
            f"option {name} does not apply to method={method}; it belongs to method={' / '.join(owners)} (options "
            f"of {method}: {known})"
        )
    return ArgumentError("method_options", f"unknown option {name!r} for method={method}; its options are: {known}")


def resolve_options(method: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every option of ``method``, parsed and validated, defaults filled in (``None`` values mean default)."""
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_OPTIONS)}")
    specs = METHOD_OPTIONS[method]
    resolved = {name: spec.default for name, spec in specs.items()}
    for name, value in (given or {}).items():
        if name not in specs:
            raise _unknown(method, name)
        if value is not None:
            resolved[name] = specs[name].parse(name, value)
    return resolved


def recorded_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that go into the fingerprint."""
    return {name: options[name] for name, spec in METHOD_OPTIONS[method].items() if spec.recorded}


def query_overrides(
    method: str, recorded: Mapping[str, Any], asked: Mapping[str, Any] | None, store_path: Any
) -> dict[str, Any]:
    """The query-time options a query asks to change; any other option must equal the store's.

    Raises ``IncompatibleStoreError`` when a build-time option differs from what the store recorded.
    """
    asked = {name: value for name, value in (asked or {}).items() if value is not None}
    if not asked:
        return {}
    if method not in METHOD_OPTIONS:
        raise IncompatibleStoreError(
            f"store {store_path} was built with method {method!r}, which this gradindex does not know; upgrade "
            "gradindex"
        )
    specs = METHOD_OPTIONS[method]
    if method == "tracin" and recorded.get("precondition", "none") == "none" and "damping" in asked:
        owners = " / ".join(owner for owner in option_owner("damping") if owner != "tracin")
        raise ValueError(
            f"damping applies to stores built with method={owners} or with precondition=kfac / ekfac; store "
            f"{store_path} was built with method=tracin"
        )
    overrides: dict[str, Any] = {}
    for name, value in asked.items():
        if name not in specs:
            if option_owner(name):
                owners = " / ".join(option_owner(name))
                raise ValueError(
                    f"{name} applies to stores built with method={owners}; store {store_path} was built with "
                    f"method={method}"
                )
            raise _unknown(method, name)
        parsed = specs[name].parse(name, value)
        if specs[name].query_time:
            overrides[name] = parsed
        elif name in recorded and recorded[name] != parsed:
            raise IncompatibleStoreError(
                f"store {store_path} was built with method={method} {name}={recorded[name]!r}; this query asks for "
                f"{name}={parsed!r}. Query with the store's settings or rebuild with overwrite=True and the new {name}."
            )
    return overrides
