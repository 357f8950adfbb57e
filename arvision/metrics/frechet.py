"""Fréchet distance between Gaussians fitted to features (FID, Heusel et al. 2017), feature statistics in float64,
and reference-statistics files (arvision's, ADM's reference batches, MAR's ``adm_in256_stats.npz``).

    mu, sigma = feature_statistics(features)            # (N, D) -> (D,), (D, D), float64, unbiased covariance
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)    # pytorch-fid / ADM evaluator computation
    save_stats("ref.npz", {"mu": mu, "sigma": sigma}, extractor="inception-2015-12-05")
    ref = load_npz("VIRTUAL_imagenet256_labeled.npz")   # dict of arrays: arr_0, mu, sigma, mu_s, sigma_s when present
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import scipy.linalg
import torch

from ..files import atomic_write

ArrayLike = Union[np.ndarray, torch.Tensor]
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
REF_FEATURES_KEY = "pool"  # the reference's pool features in a statistics file (optional)


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, eq. 6 of the TTUR paper).

    The same computation as pytorch-fid's ``calculate_frechet_distance`` and ADM's evaluator (Dougal Sutherland's
    stable version): ``scipy.linalg.sqrtm`` of S1 S2; if that is not finite (a near-singular product), eps * I is added
    to both covariances and the root recomputed; a small imaginary part from round-off (diagonal within 1e-3 of 0) is
    dropped, a larger one raises ValueError."""
    mu1, mu2 = np.atleast_1d(_np64(mu1)), np.atleast_1d(_np64(mu2))
    sigma1, sigma2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; both sets must come from the same feature extractor")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(S1 S2);"
                             " the covariances are not valid (too few samples for the feature dimension?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # scipy < 1.16 prints an error estimate warning; the caller checks finiteness
        warnings.simplefilter("ignore", RuntimeWarning)
        out = scipy.linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (np.cov(rowvar=False)) of (N, D) features, computed in float64."""
    f = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2 to estimate a covariance, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    xc = f - mu
    return mu.numpy(), (xc.T @ xc / (f.shape[0] - 1)).numpy()


# ------------------------------------------------------------------------------------------------ .npz files


def load_npz(path: Union[str, os.PathLike], keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Arrays of an .npz (no pickles). An uncompressed member (np.savez, as ADM writes its batches) is returned as a
    read-only memory map, so a 50k-image ``arr_0`` is not read into memory at once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give an .npz file (ADM reference batch / samples, or stats)")
    expected = ("expected an ADM-format .npz (arr_0: uint8 N x H x W x 3 images, as `arvision sample` writes) or "
                "reference statistics (mu, sigma)")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            kind = "a single .npy array" if f.read(6) == b"\x93NUMPY" else "not an .npz file (not a zip archive)"
        raise ValueError(f"{path} is {kind}; {expected}")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            out = {}
            for k in names if keys is None else [k for k in keys if k in names]:
                out[k] = _mmap_member(path, k)
                if out[k] is None:
                    out[k] = z[k]
            return out
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        pickled = "allow_pickle" in str(e) or "bject array" in str(e)
        reason = "it holds pickled Python objects, which are never loaded" if pickled else str(e).splitlines()[0]
        raise ValueError(f"{path} is not a readable .npz file ({reason}); {expected}") from None


def _mmap_member(path: Path, key: str) -> np.ndarray | None:
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            if dtype.hasobject:
                return None
            offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def save_stats(path: Union[str, os.PathLike], stats: Mapping[str, ArrayLike], extractor: str,
               features: Optional[ArrayLike] = None, **meta) -> Path:
    """Write reference statistics (``mu``, ``sigma`` and optionally ``mu_s``, ``sigma_s``) as an .npz, atomically,
    tagged with the extractor name (and e.g. the sample count) so they are never mixed with another network's.
    ``features``: the reference's pool features (n, D), stored as ``pool`` (float32) so that KID and precision /
    recall can later be computed from the file alone (50,000 x 2048 Inception features: 410 MB)."""
    path = Path(path)
    arrays = {k: _np64(v) for k, v in stats.items() if k in STATS_KEYS}
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError("reference statistics need at least 'mu' and 'sigma'")
    if features is not None:
        pool = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float32)
        if pool.ndim != 2 or pool.shape[1] != arrays["mu"].shape[0]:
            raise ValueError(f"reference features must be (n, {arrays['mu'].shape[0]}), got {pool.shape}")
        arrays[REF_FEATURES_KEY] = pool
    arrays["extractor"] = np.array(extractor)
    arrays.update({k: np.array(v) for k, v in meta.items() if v is not None})
    with atomic_write(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return path


def stats_extractor_tag(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The extractor a stats file was written with; None for files without a tag (ADM's and MAR's, which hold
    statistics of the standard TF Inception pool features)."""
    return str(arrays["extractor"]) if "extractor" in arrays else None
