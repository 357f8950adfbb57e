"""Test-session settings. The suite's models are tiny: on a 2-core machine one intra-op thread per process is
fastest, and the multi-process tests (2 gloo ranks) would otherwise oversubscribe the cores. Subprocesses inherit
the variables."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
