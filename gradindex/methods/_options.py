"""Method options: what each method accepts, their defaults, which are fixed at build and which a query may change.

Every option a method records is part of the store's fingerprint (``fingerprint["method"]``). A query
may change the *query-side* ones (IF's damping and solver, TRAK's damping) without a rebuild; asking
for a different value of any other is an ``IncompatibleStoreError`` that names the option.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gradindex.errors import IncompatibleStoreError
from gradindex.utils import check_choice, check_flag, check_non_negative, check_positive, check_positive_int

__all__ = [
    "CURVATURES",
    "METHOD_OPTIONS",
    "QUERY_TIME_OPTIONS",
    "SOLVERS",
    "OptionSpec",
    "option_owner",
    "query_overrides",
    "resolve_options",
]


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``parse``, with None, "auto", "none" and "" meaning the default (None)."""

    def wrapped(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.lower() in ("auto", "none", "")):
            return None
        return parse(value)

    return wrapped


def _checked(check: Callable[..., Any], name: str, *args: Any) -> Callable[[Any], Any]:
    """The parser of one option: the one argument checker (``gradindex.utils``) with the option's name."""
    return functools.partial(check, name, *args) if not args else lambda value: check(name, value, *args)


@dataclass(frozen=True)
class OptionSpec:
    """One method option: its default, its parser (strings from the command line are accepted),
    whether a query may change it, and whether it is recorded (performance knobs are not)."""

    default: Any
    parse: Callable[[Any], Any]
    query_time: bool = False
    recorded: bool = True
    help: str = ""


# the inverse-HVP solvers of influence functions, and the curvatures of if and arnoldi
SOLVERS = ("auto", "exact", "cg", "lissa")
CURVATURES = ("hessian", "ggn")

_HESSIAN_HELP = "curvature: the Hessian, or the Gauss-Newton matrix (default cross-entropy loss only)"
_HVP_BATCH = OptionSpec(
    256,
    _checked(check_positive_int, "hvp_batch_size"),
    query_time=True,
    recorded=False,
    help="training samples per Hessian-vector product batch",
)

METHOD_OPTIONS: dict[str, dict[str, OptionSpec]] = {
    "tracin": {},
    "gex": {
        "tau": OptionSpec(
            0.05,
            _checked(check_non_negative, "tau"),
            help="floor on the trained model's loss: φ_m = ℓ(θ_m) − max(ℓ(θ*), τ)",
        ),
    },
    "if": {
        "solver": OptionSpec(
            "auto",
            _checked(check_choice, "solver", SOLVERS),
            query_time=True,
            help="exact (small models), cg, lissa; auto = exact up to 4096 parameters, else cg",
        ),
        "damping": OptionSpec(0.001, _checked(check_non_negative, "damping"), query_time=True, help="λ in (H + λI)^-1"),
        "hessian": OptionSpec(
            "hessian", _checked(check_choice, "hessian", CURVATURES), query_time=True, help=_HESSIAN_HELP
        ),
        "cg_max_iter": OptionSpec(
            100,
            _checked(check_positive_int, "cg_max_iter"),
            query_time=True,
            help="conjugate-gradient iterations at most",
        ),
        "cg_tol": OptionSpec(
            1e-6, _checked(check_positive, "cg_tol"), query_time=True, help="stop when ||r|| <= cg_tol * ||b||"
        ),
        "lissa_depth": OptionSpec(
            1000, _checked(check_positive_int, "lissa_depth"), query_time=True, help="LiSSA recursion steps"
        ),
        "lissa_scale": OptionSpec(
            None,
            _optional(_checked(check_positive, "lissa_scale")),
            query_time=True,
            help="LiSSA scale (> largest eigenvalue of H + λI); auto: 1.5x a power-iteration estimate",
        ),
        "lissa_repeats": OptionSpec(
            1, _checked(check_positive_int, "lissa_repeats"), query_time=True, help="independent LiSSA runs averaged"
        ),
        "lissa_batch_size": OptionSpec(
            64,
            _checked(check_positive_int, "lissa_batch_size"),
            query_time=True,
            help="training samples per LiSSA Hessian estimate",
        ),
        "hvp_batch_size": _HVP_BATCH,
    },
    "arnoldi": {
        "rank": OptionSpec(20, _checked(check_positive_int, "rank"), help="eigenpairs kept (r)"),
        "damping": OptionSpec(
            0.0, _checked(check_non_negative, "damping"), help="λ added to the kept eigenvalues: φ = (Λ + λ)^-1/2 Uᵀ∇ℓ"
        ),
        "iterations": OptionSpec(
            None,
            _optional(_checked(check_positive_int, "iterations")),
            help="Arnoldi iterations (default max(2r, r + 20), at most the parameter count)",
        ),
        "hessian": OptionSpec("hessian", _checked(check_choice, "hessian", CURVATURES), help=_HESSIAN_HELP),
        "hvp_batch_size": _HVP_BATCH,
    },
    "trak": {
        "damping": OptionSpec(
            0.01, _checked(check_non_negative, "damping"), query_time=True, help="λ in (ΦᵀΦ + λI)^-1"
        ),
        "out_to_loss": OptionSpec(
            True,
            _checked(check_flag, "out_to_loss"),
            help="weight training samples by 1 − p(correct class), averaged over checkpoints",
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
            f"option {name} does not apply to --method {method}; it belongs to --method {' / '.join(owners)} (options "
            f"of {method}: {known})"
        )
    return ValueError(f"unknown option {name!r} for --method {method}; its options are: {known}")


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
            resolved[name] = specs[name].parse(value)
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
    overrides: dict[str, Any] = {}
    for name, value in asked.items():
        if name not in specs:
            if option_owner(name):
                owners = " / ".join(option_owner(name))
                raise ValueError(
                    f"{name} applies to stores built with --method {owners}; store {store_path} was built with "
                    f"--method {method}"
                )
            raise _unknown(method, name)
        parsed = specs[name].parse(value)
        if specs[name].query_time:
            overrides[name] = parsed
        elif name in recorded and recorded[name] != parsed:
            raise IncompatibleStoreError(
                f"store {store_path} was built with --method {method} {name}={recorded[name]!r}; this query asks for "
                f"{name}={parsed!r}. Query with the store's settings or rebuild with --overwrite and the new {name}."
            )
    return overrides
