"""Small helpers every stage shares, each defined once: hashing, argument checks, settings, processes, progress,
memory, packages whose names load on first use.

Nothing here imports torch, FAISS or Zarr.
"""

from gradindex.utils._checks import (
    check_choice,
    check_flag,
    check_fraction,
    check_int_at_least,
    check_non_negative,
    check_non_negative_int,
    check_number,
    check_positive,
    check_positive_int,
)
from gradindex.utils._hashing import Crc32cCheck, crc32c_bytes, is_crc32c, sha256_bytes, sha256_file, sha256_json
from gradindex.utils._lazy import lazy_exports
from gradindex.utils._memory import available_memory, check_fits, default_memory_budget, format_bytes, page_array
from gradindex.utils._processes import HOST_TAG, pid_alive
from gradindex.utils._progress import progress_bar, progress_enabled, track
from gradindex.utils._settings import Setting, check_settings, setting, setting_of, settings_of

__all__ = [
    "HOST_TAG",
    "Crc32cCheck",
    "Setting",
    "available_memory",
    "check_choice",
    "check_fits",
    "check_flag",
    "check_fraction",
    "check_int_at_least",
    "check_non_negative",
    "check_non_negative_int",
    "check_number",
    "check_positive",
    "check_positive_int",
    "check_settings",
    "crc32c_bytes",
    "default_memory_budget",
    "format_bytes",
    "is_crc32c",
    "lazy_exports",
    "page_array",
    "pid_alive",
    "progress_bar",
    "progress_enabled",
    "setting",
    "setting_of",
    "settings_of",
    "sha256_bytes",
    "sha256_file",
    "sha256_json",
    "track",
]
