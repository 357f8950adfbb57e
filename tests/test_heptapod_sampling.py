"""Heptapod's fast sampler: the one-query 2D head (models/one_query_head.py) against the full head, the fast sampler
against the reference one (same tokens, same seed), and the work each of them does."""
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from arvision.generate.sample import SamplingConfig, sample_tokens
from test_heptapod import tiny


@pytest.mark.parametrize("kw", [dict(), dict(head_type="local"), dict(head_condition="prefix"),
                                dict(head_type="local", head_condition="prefix", head_depth=3),
                                dict(head_depth=3, class_tokens=2), dict(head_type="local", grid_size=6, head_depth=2),
                                dict(head_depth=3, qk_norm="layernorm"), dict(head_depth=2, layerscale=0.5),
                                dict(head_depth=3, qk_norm="affine", head_condition="prefix"),
                                dict(head_type="local", grid_size=7, head_depth=2, head_condition="prefix")])
def test_head_for_one_query_equals_the_full_head(kw):
    model = tiny(**kw).eval()
    with torch.no_grad():  # biases and norms away from their zero / one initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    M, N, D = 3, model.num_tokens, model.config.embed_dim
    states = torch.randn(M, N, D)
    for t in (0, 4, N // 2 + 1, N - 1):
        if model.config.head_condition == "prefix":
            mask = (torch.arange(N) <= t).expand(M, -1)
            full = model.forward_prediction_head(states, mask)[:, t]
            at = model.forward_prediction_head_at(states, t, mask)  # the same masked context
            shorter = model.forward_prediction_head_at(states[:, :t + 1], t, constants=model.head_constants())  # valid ones only
            torch.testing.assert_close(shorter, full, atol=1e-5, rtol=1e-5)
        else:
            full = model.forward_prediction_head(states[:, t])[:, t]
            at = model.forward_prediction_head_at(states[:, t], t, constants=model.head_constants())
        torch.testing.assert_close(at, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(head_type="local"), dict(head_condition="prefix"),
                                dict(head_type="local", head_condition="prefix"),
                                dict(head_type="none", pos_embed="rope"),
                                dict(token_type="continuous", latent_channels=3, class_tokens=2),
                                dict(token_type="continuous", latent_channels=3, head_condition="prefix", head_type="local"),
                                dict(head_type="local", grid_size=6)])
def test_fast_sampler_gives_the_reference_samples(kw):
    model = tiny(head_depth=2, **kw).eval()
    with torch.no_grad():  # away from the zero-initialised logits / AdaLN, so that tokens depend on z
        for p in model.parameters():  # (latents fed back through a larger perturbation grow to ~100)
            p.add_(torch.randn_like(p) * (0.1 if model.config.token_type == "discrete" else 0.02))
    labels = torch.tensor([0, 1, 3, 2])
    for cfg in (SamplingConfig(diffusion_steps=5), SamplingConfig(diffusion_steps=5, top_k=8, cfg_scale=1.5)):
        fast = sample_tokens(model, labels, cfg, seed=3, indices=[5, 6, 7, 8])
        reference = sample_tokens(model, labels, cfg, seed=3, indices=[5, 6, 7, 8], fast=False)
        if fast.dtype == torch.long:
            assert torch.equal(fast, reference)
        else:  # rounding differences pass through 9 diffusion samplers fed back as inputs
            torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("condition", ["state", "prefix"])
def test_fast_sampler_runs_the_last_head_block_for_one_query_and_block_0_queries_once(condition):
    model = tiny(head_depth=2, head_condition=condition).eval()
    rows = {"qkv0": [], "mlp_last": [], "norm": []}
    hooks = [model.head.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: rows["qkv0"].append(i[0].shape[-2])),
             model.head.blocks[-1].mlp.register_forward_hook(lambda m, i, o: rows["mlp_last"].append(i[0].shape[-2])),
             model.head.norm.register_forward_hook(lambda m, i, o: rows["norm"].append(i[0].shape[:-1]))]
    sample_tokens(model, torch.tensor([0, 1]), SamplingConfig(), seed=0)
    for h in hooks:
        h.remove()
    N = model.num_tokens
    assert rows["qkv0"][0] == N  # the queries, once per call
    contexts = [1] * N if condition == "state" else list(range(1, N + 1))  # then the context alone at each step
    assert rows["qkv0"][1:] == contexts
    assert rows["mlp_last"] == [1] * N and rows["norm"] == [(2,)] * N


def test_local_head_runs_only_the_queries_in_its_receptive_field():
    model = tiny(head_type="local", grid_size=7, head_depth=2).eval()  # window 3x3: z_{t,t} reads 2 rows/cols around t
    rows = []
    hook = model.head.blocks[0].mlp.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[-2]))
    for t, reach in ((0, 3 * 3), (24, 5 * 5), (48, 3 * 3), (9, 4 * 5)):  # corner, centre, corner, (1, 2): 4 rows x 5 cols
        model.forward_prediction_head_at(torch.randn(2, 32), t)
        assert rows[-1] == 1 + reach  # the state and the queries within reach
    hook.remove()


def test_sampling_a_model_sharded_with_fsdp2_uses_the_full_head(tmp_path):
    """Under FSDP2 (online evaluation of a sharded run) a head block's parameters exist only inside its own forward:
    the sampler must not read its layers directly."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = tiny(head_depth=2).eval()
    labels = torch.tensor([0, 1])
    expected = sample_tokens(model, labels, SamplingConfig(), seed=1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for unit in model.shard_units():
            fully_shard(unit)
        fully_shard(model)
        model.unshard()  # the root's own parameters, as Trainer.gathered() does
        assert torch.equal(sample_tokens(model, labels, SamplingConfig(), seed=1), expected)
    finally:
        dist.destroy_process_group()


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("head_depth", [2, 3])
def test_fast_head_computes_one_full_block_less_than_two_blocks_per_step(head_depth):
    """Per step the global head over h_t computes, beside block 0's MLP over every row and its middle blocks in
    full, only query t's part of the last block: its keys and values are not projected for every row (query t's key
    weights meet the normalised rows instead), which the reference computes. Fails if the last block projects
    every row's keys and values (16% of a block here) or if block 0 runs its attention projections for every row."""
    model = tiny(grid_size=4, embed_dim=64, head_depth=head_depth).eval()
    M, N, D = 2, model.num_tokens, model.config.embed_dim
    h, rows = torch.randn(M, D), torch.randn(M, N + 1, D)
    block = model.head.blocks[0]
    with torch.no_grad():
        constants = model.head_constants()
        fast = _flops(lambda: model.forward_prediction_head_at(h, 5, constants=constants))
        full_block = _flops(lambda: block(rows, None, False, None))
        mlp = _flops(lambda: block.mlp(block.norm2(rows)))
        reference = _flops(lambda: model.forward_prediction_head(h))
    assert reference >= head_depth * full_block
    assert fast <= mlp + (head_depth - 2) * full_block + 0.1 * full_block


def test_fast_sampler_gives_the_reference_samples_with_a_key_norm_and_layerscale():
    model = tiny(head_depth=3, qk_norm="affine", layerscale=0.5, grid_size=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    labels = torch.tensor([0, 1, 3])
    cfg = SamplingConfig(top_k=8)
    assert torch.equal(sample_tokens(model, labels, cfg, seed=2), sample_tokens(model, labels, cfg, seed=2, fast=False))


_PAGE_FAULTS = """
import resource, torch
from arvision.generate.sample import keep_freed_host_memory
def faults():  # what a sampling step does: activations allocated, written and freed (40 MiB: above any threshold
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # glibc would pick by itself, so mapped afresh)
    for _ in range(5):
        activations = torch.ones(10 << 20)
        del activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
faults()
before = faults()
applied = keep_freed_host_memory()
faults()
print(applied, before, faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_host_memory_stops_the_page_faults_of_reallocated_activations():
    """`arvision sample` keeps freed memory for reuse: the activations each step allocates again then reuse pages
    instead of faulting fresh ones in. Process-wide, so in a subprocess; a MALLOC_ variable set by the user wins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, env=env, check=True)
    applied, before, after = out.stdout.split()
    assert applied == "True" and int(before) > 1000 and int(after) < int(before) / 10
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, check=True,
                         env={**env, "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert out.stdout.split()[0] == "False"
