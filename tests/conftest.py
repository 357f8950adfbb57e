"""Test-session settings. The suite's models are tiny: on a 2-core machine one intra-op thread per process is
fastest, and the multi-process tests (2 gloo ranks) would otherwise oversubscribe the cores. Subprocesses inherit
the variables."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def vq_token_cache(tmp_path_factory):
    """A token cache of 24 synthetic images by a random-init vq_f4_32px (8 x 8 codes, 1024 entries); read-only: tests
    that damage a cache copy it first."""
    import torch

    import arvision
    from arvision.data.token_cache_writer import build_token_cache

    root = tmp_path_factory.mktemp("vq_cache")
    torch.manual_seed(0)
    tok = arvision.create_model("vq_f4_32px").eval()
    build_token_cache(tok, "synthetic", root / "cache", img_size=32, limit=24, num_workers=0, progress=False)
    return root / "cache"
