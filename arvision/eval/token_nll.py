"""Held-out next-token likelihood of a Heptapod generator: the teacher-forced cross-entropy of the prediction sampling
draws from, z_{t,t}, on the token grids of a cache the generator did not train on (e.g. the test split).

    arvision tokenizer encode --tokenizer TOK --data /data/cifar10 --split test --no-flip --out cache/c10_test
    arvision eval nll runs/heptapod/checkpoints/step_00004000 --data cache/c10_test --ema

Every head type (global, local, none = the next-token baseline) is scored on the same quantity, -log p(x_t | x_<t, y)
in nats per token, so the number compares generators at equal steps or wall clock without sampling, as a language
model's validation loss does; FID (`arvision eval fid`) measures the samples. Discrete codes only: for continuous
latents the diffusion loss is a bound that depends on its noise draws, not a likelihood.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..data.datasets import fixed_subset_indices
from ..data.token_cache import TokenCache
from ..objectives.heptapod import HeptapodLossConfig, HeptapodObjective


def check_cache_fits(model, cache: TokenCache, trained_on: Optional[TokenCache] = None) -> None:
    """One-line errors for a cache the generator cannot be scored on: continuous tokens, another grid, codebook or
    class count, or codes from another tokenizer than the one of the generator's training cache (when known)."""
    info, cfg = cache.info, model.config
    if info["token_type"] != "discrete" or cfg.token_type != "discrete":
        raise ValueError(f"eval nll scores discrete codes; {cache.path} holds {info['token_type']} tokens and the "
                         f"generator models {cfg.token_type} ones (for latents use `arvision eval fid` on samples)")
    stored = cfg.to_dict()
    bad = {k: (stored.get(k), v) for k, v in cache.generator_fields().items() if stored.get(k) != v}
    if bad:
        raise ValueError(f"{cache.path} does not fit the generator: {bad} (generator, cache); encode the held-out "
                         "images with the tokenizer of the generator's training cache")
    if trained_on is not None:
        mine, theirs = trained_on.info.get("tokenizer_sha256"), info.get("tokenizer_sha256")
        if mine and theirs and mine != theirs:
            raise ValueError(f"{cache.path} was encoded with another tokenizer than the generator's training cache "
                             f"{trained_on.path} (tokenizer weights differ): its codes mean other things; encode the "
                             f"held-out images with --tokenizer {trained_on.path / 'tokenizer'}")


@torch.no_grad()
def held_out_nll(model, cache: TokenCache, num: Optional[int] = None, batch_size: int = 64,
                 loss_config: Optional[HeptapodLossConfig] = None) -> dict:
    """Mean -log p(x_t | x_<t, y) over ``num`` grids of ``cache`` (a fixed subset, seed 0; all by default) and every
    position t, with its value per grid row (nats). The unflipped copy of each image is scored. Continuous latents
    give the diffusion loss of ``loss_config`` instead (a bound that depends on its noise draws, not a likelihood)."""
    indices = fixed_subset_indices(len(cache), num) if num else range(len(cache))
    rows = np.sort(cache.index[np.asarray(list(indices))])  # sorted: memory-mapped reads in file order
    tokens = torch.from_numpy(np.asarray(cache.tokens[rows, 0]))  # (n, N) codes or (n, N, 2C) posteriors, unflipped
    if cache.token_type == "discrete":
        tokens = tokens.long()
    else:  # the posterior mean, scaled as the generator saw it
        tokens = tokens[..., : tokens.shape[-1] // 2].float() * cache.scale_factor
    labels = torch.from_numpy(np.asarray(cache.labels[rows]).astype(np.int64))
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    objective = HeptapodObjective(model, loss_config or HeptapodLossConfig(target_set="next", timesteps_per_image=0))
    total = torch.zeros(tokens.shape[1], dtype=torch.float64)
    for start in range(0, len(tokens), batch_size):
        x, y = tokens[start:start + batch_size].to(device), labels[start:start + batch_size].to(device)
        total += objective.next_loss_by_position(x, y, chunk=len(x)).double().cpu() * len(x)
    model.train(was)
    per_position = total / len(tokens)
    nll = float(per_position.mean())
    G = model.config.grid_size
    return {"nll": nll, "bits_per_token": nll / math.log(2), "perplexity": math.exp(nll),
            "by_row": per_position.view(G, G).mean(1).tolist(), "num_grids": len(tokens)}
