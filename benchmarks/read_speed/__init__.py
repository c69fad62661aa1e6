"""What reading a store and starting the command line cost, beside what they are measured against.

python -m benchmarks.read_speed           # startup, a 100k x 1024 float16 store read, a CLI query of it
python -m benchmarks.read_speed --tiny    # seconds; what the test suite runs (results not saved)

Three comparisons, each side by side in one run on one machine:

* startup: ``gradindex --help`` (and ``info``, ``verify`` of the store) against ``python -c "import torch"``, wall
  time, best of 5;
* verified streaming read: every shard of a store read and checked (crc32c, what stores record since the manifest's
  ``read_check``; and sha256, how a store made before it is read) against a raw zarr read of the same array shard by
  shard (nothing checked) and against reading the files' bytes (``cat``);
* a CLI query: ``gradindex query STORE --samples 0-99 -k 10`` on the store of a real task (a linear model whose
  gradients are 1024 wide, projection none) against a plain faiss script over the same vectors (np.load, IndexFlatIP,
  search), CPU seconds of the work itself: each process does it twice and reports the second, so that imports and
  first-call set-up (startup) are left out.
"""

from benchmarks.read_speed._run import run

__all__ = ["run"]
