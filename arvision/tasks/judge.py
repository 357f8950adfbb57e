"""The judge recipe: a classifier of real images (a ``timm_classifier`` preset) trained from scratch by the one
Trainer with plain cross-entropy, then its top-1 on held-out real images, measured through the same path the samples
it will score take (``arvision.eval.judge``). It scores class-conditional samples (sample accuracy, FD-<name>) and,
trained with another seed, gives a tokenizer a perceptual loss without VGG weights (``objective.perceptual_net``).

    arvision judge train                                                    # the built-in digits, about a minute
    arvision judge train --config cifar10_judge --data /data/cifar10 --out judge
    arvision eval fid samples.npz /data/cifar10 --ref-split test --extractor judge/checkpoints/step_00002000
"""
from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

from ..data import build_dataset, is_synthetic
from ..data.transforms import NEPA_MEAN, NEPA_STD, center_crop_arr
from ..eval.judge import judge_accuracy, load_judge
from ..files import write_json
from ..models import create_model
from ..models.registry import check_preset
from ..objectives.classification import ClassificationConfig, ClassificationObjective
from ..train.checkpoint import latest_checkpoint
from ..train.distributed import barrier
from ..train.engine import Trainer
from ..train.logging import log
from .common import fit_and_time, prepare_run, resume_run, seed_everything

MODEL_FAMILIES = ("timm_classifier",)


class CentreCrop:
    """PIL image -> the ADM centre crop at ``size`` (``center_crop_arr``; an image of that size is left as it is)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.size == (self.size, self.size) else center_crop_arr(image, self.size)


def judge_transform(img_size: int, crop_padding: int = 0, hflip: float = 0.0) -> T.Compose:
    """Training images for a judge: centre crop, optional padded random crop and flip, then normalised as
    ``ClassifierExtractor`` normalises the images it scores (to [-1, 1]), so the judge sees the pixels it will judge."""
    steps = [CentreCrop(img_size)]
    if crop_padding > 0:
        steps.append(T.RandomCrop(img_size, padding=crop_padding))
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(NEPA_MEAN, NEPA_STD)])


def run(cfg, out=None, resume=False) -> dict:
    env, run_dir = prepare_run(cfg, "judge", out, resume)
    seed_everything(cfg.train.seed)
    d, e = cfg.data, cfg.eval
    images = build_dataset(d.source, "train", judge_transform(d.img_size, d.crop_padding, d.hflip),
                           img_size=d.img_size, num_samples=d.num_samples if is_synthetic(d.source) else None)
    num_classes = len(getattr(images, "classes", []))
    if num_classes < 2:
        raise ValueError(f"{d.source} has {num_classes} class folders; a judge needs labelled images of at least 2 "
                         "classes (train/<class>/*.png)")
    model = create_model(check_preset(cfg.model.name, MODEL_FAMILIES), num_classes=num_classes,
                         img_size=d.img_size, **dict(cfg.model.args or {}))
    log.info(f"judge {cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"{len(images)} training images of {num_classes} classes from {d.source}")
    objective = ClassificationObjective(model, num_classes, ClassificationConfig(mixup=0.0, cutmix=0.0,
                                                                                 label_smoothing=0.0))
    trainer = Trainer(objective, images, cfg.train, run_dir, env, num_workers=d.num_workers, preset=cfg.model.name)
    done = resume_run(trainer, run_dir, resume)
    if done is not None:
        return done
    results = {**fit_and_time(trainer, run_dir), "data": str(d.source), "num_classes": num_classes}
    barrier()
    if env.is_main:
        checkpoint = latest_checkpoint(run_dir)
        n = e.num_images or len(build_dataset(d.source, e.split, img_size=d.img_size))
        top1 = judge_accuracy(load_judge(checkpoint), d.source, e.split, n, d.img_size)
        results.update(checkpoint=str(checkpoint), top1=100 * top1, eval_split=e.split, eval_images=n)
        write_json(run_dir / "results.json", results)
        log.info(f"judge: top-1 {100 * top1:.1f}% on {n} held-out {e.split} images; score samples with "
                 f"arvision eval fid SAMPLES REF --extractor {checkpoint}")
    barrier()
    return results

