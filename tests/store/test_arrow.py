"""Arrow arrays made from numpy and read back without pyarrow's pandas shim (which imports pandas, a quarter second
of a process's first build): the same arrays as pyarrow's own conversions, and a build that never imports pandas or
zarr."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from gradindex.store import arrow_of, numpy_of


@pytest.mark.parametrize(
    "values",
    [
        np.arange(-3, 7, dtype=np.int64),
        np.arange(5, dtype=np.uint8)[::2],
        np.linspace(-1, 1, 9, dtype=np.float32),
        np.array([1.5, -np.inf], dtype=np.float64),
        np.array([True, False, True, True, False, False, True, False, True]),
        np.array(["a", "", "bé", "longer text"]),
        ["x", "", "ÿz"],
        np.array([], dtype=np.int64),
    ],
)
def test_arrays_equal_pyarrows_own(values):
    made = arrow_of(values)
    expected = pa.array(values)
    assert made.type == expected.type and made.equals(expected)
    back = numpy_of(made)
    np.testing.assert_array_equal(back, expected.to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(numpy_of(pa.chunked_array([made, made])), np.concatenate([back, back]))


def test_a_typed_string_column_and_a_sliced_one():
    assert arrow_of([], pa.string()).equals(pa.array([], pa.string()))
    assert arrow_of(["1", "2"], pa.string()).equals(pa.array(["1", "2"], pa.string()))
    sliced = pa.array(np.arange(10, dtype=np.int32)).slice(3, 4)
    np.testing.assert_array_equal(numpy_of(sliced), np.arange(3, 7))
    with_nulls = pa.array([1, None, 3])
    assert numpy_of(with_nulls).tolist()[0] == 1 and np.isnan(numpy_of(with_nulls)[1])


def test_a_build_imports_neither_pandas_nor_zarr(tmp_path):
    """The first build of a process (and the verified read of its store) pays for what it imports (and, without
    bytecode caches, compiles): pandas
    (through pyarrow's shim), zarr (whose encoders a plain store does not need), the search room (a store without
    indexes has none to update) and the curvature code (plain TracIn) stay out of it."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import gradindex
        from torch.utils.data import TensorDataset
        task = gradindex.Task(
            model=lambda: torch.nn.Linear(4, 3),
            train=TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,))),
        )
        torch.save(task.model().state_dict(), {str(tmp_path / "c.pt")!r})
        store = gradindex.build(task, [{str(tmp_path / "c.pt")!r}], {str(tmp_path / "s.gradindex")!r}, proj_dim=8,
                                progress=False)
        assert store.complete and gradindex.open_store(store.path).read_features().shape == (40, store.dim)
        unused = ("pandas", "zarr", "gradindex.search._persisted", "gradindex.methods._ekfac")
        print(sorted(name for name in unused if name in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
