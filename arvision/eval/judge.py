"""Scoring class-conditional samples with a *judge*: a classifier trained on real images of the generator's classes.

Two numbers, both in the judge's feature space and never called FID: **sample accuracy** (the fraction of samples
the judge assigns to the class they were generated for; arvision.metrics.sample_accuracy) and **FD-<judge>** (the
Frechet distance between the samples' and held-out real images' pooled features). Report the judge's own accuracy
on the real images beside them: a sample cannot be judged more reliably than the judge.

    judge = load_judge("runs/q/judge/checkpoints/step_00000150")
    score = score_npz("runs/q/samples.npz", judge, "synthetic-digits", num_ref=1000)     # final, from a file
    online = OnlineScore(judge, "synthetic-digits", num_ref=500)                         # cached reference stats
    online(images_uint8_nhwc, labels)                                                    # {"sample_accuracy", "fd"}
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

import torch
from torchvision import transforms as T

from ..data import build_dataset, fixed_subset, is_synthetic
from ..metrics import feature_statistics, frechet_distance, sample_accuracy, save_stats
from ..metrics.extractors import ClassifierExtractor, FeatureExtractor
from ..metrics.frechet import stats_extractor_tag
from .generative import evaluate_generative

IMG_BATCH = 200


def load_judge(path: Union[str, Path], name: str | None = None) -> ClassifierExtractor:
    """A classifier checkpoint (any arvision family with a head: ``timm_classifier``, a fine-tuned NEPA model)."""
    return ClassifierExtractor(path, name=name).eval()


def real_images(source, split: str, num: int, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` held-out real images (a fixed random subset of ``split``) as uint8 NCHW, with their labels."""
    ds = build_dataset(source, split, transform=T.PILToTensor(), img_size=img_size,
                       num_samples=num if is_synthetic(source) else None)
    ds = fixed_subset(ds, num)
    pairs = [ds[i] for i in range(len(ds))]
    return torch.stack([p[0] for p in pairs]), torch.as_tensor([p[1] for p in pairs])


@torch.no_grad()
def judge_features(judge: FeatureExtractor, images: torch.Tensor) -> dict[str, torch.Tensor]:
    parts = [judge.features(images[s:s + IMG_BATCH]) for s in range(0, len(images), IMG_BATCH)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def judge_accuracy(judge: ClassifierExtractor, source, split: str = "val", num: int = 1000, img_size: int = 32) -> float:
    """The judge's accuracy on ``num`` held-out real images, through the same path the samples take."""
    images, labels = real_images(source, split, num, img_size)
    return sample_accuracy(judge_features(judge, images)["logits"], labels)


class OnlineScore:
    """``score(images uint8 NHWC, labels) -> {"fd", and for a classifier "sample_accuracy" (%)}`` against reference
    statistics computed once: the cheap evaluation during training (MAR's --online_eval). ``extractor``: a judge
    (sample accuracy and FD-<judge>) or any feature extractor, e.g. the FID Inception (FD-1k on a folder).
    ``reference``: a dataset / image folder (``num`` images of its ``split``) or a statistics ``.npz`` of this
    extractor (``arvision eval fid --save-ref-stats``, ADM's). ``stats_file``: where the folder's statistics are
    kept, so a resumed run does not extract them again."""

    def __init__(self, extractor: FeatureExtractor, reference, num: int = 500, split: str = "val", img_size: int = 32,
                 stats_file: Optional[Path] = None):
        self.extractor = extractor
        self.mu, self.sigma = reference_statistics(extractor, reference, num, split, img_size, stats_file)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        feats = judge_features(self.extractor, images.permute(0, 3, 1, 2).contiguous())
        mu, sigma = feature_statistics(feats["pool"])
        out = {"fd": float(frechet_distance(mu, sigma, self.mu, self.sigma))}
        if isinstance(self.extractor, ClassifierExtractor):
            out["sample_accuracy"] = 100 * sample_accuracy(feats["logits"], labels)
        return out


def reference_statistics(extractor: FeatureExtractor, reference, num: int, split: str, img_size: int,
                         stats_file: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of ``extractor``'s pooled features of the reference: read from a statistics .npz, from
    ``stats_file`` when it holds the same reference, or extracted from ``num`` real images (and kept there)."""
    meta = dict(reference=str(reference), num=num, split=split, img_size=img_size)
    if str(reference).endswith(".npz"):
        arrays = dict(np.load(reference, allow_pickle=False))
        tag = stats_extractor_tag(arrays)
        if "mu" not in arrays or not ((tag is None and extractor.standard) or tag == extractor.stats_tag):
            raise ValueError(f"{reference} holds no statistics of {extractor.name} (extractor {tag or 'standard'}); "
                             "make them with arvision eval fid --save-ref-stats and the same extractor")
        return arrays["mu"], arrays["sigma"]
    if stats_file is not None and Path(stats_file).is_file():
        arrays = dict(np.load(stats_file, allow_pickle=False))
        if stats_extractor_tag(arrays) == extractor.stats_tag and all(str(arrays.get(k)) == str(v)
                                                                        for k, v in meta.items()):
            return arrays["mu"], arrays["sigma"]
    images, _ = real_images(reference, split, num, img_size)
    mu, sigma = feature_statistics(judge_features(extractor, images)["pool"])
    if stats_file is not None:
        save_stats(stats_file, {"mu": mu, "sigma": sigma}, extractor.stats_tag, **meta)
    return mu, sigma


def score_npz(npz, judge: ClassifierExtractor, source, num_ref: int = 1000, split: str = "val") -> dict:
    """Sample accuracy, FD (and IS, precision / recall) in the judge's features of an ADM .npz with labels in
    ``arr_1``, against ``num_ref`` held-out real images of ``source``."""
    res = evaluate_generative(npz, source, extractor=judge, num_ref=num_ref, ref_split=split, batch_size=IMG_BATCH,
                              num_workers=0, progress=False, device="cpu")
    if "sample_accuracy" not in res:
        raise ValueError(f"{npz} carries no class labels (arr_1) or the judge has no classifier head")
    fd_name = judge.metric_name("FID")
    return dict(sample_accuracy=res["sample_accuracy"], fd=res[fd_name], fd_name=fd_name,
                num_samples=res["num_samples"], num_ref=res["num_ref"],
                **{k: v for k, v in res.items() if k.startswith(("IS", "precision", "recall"))})
