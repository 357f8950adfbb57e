"""Fine-tuning and classifier evaluation: the official LLRD / inverted-warmup numbers (nepa_spec.md §5.3) as the recipes and
the Trainer resolve them, Mixup/CutMix targets, the weight EMA, the head initialisation, an end-to-end
`arvision finetune` run and `arvision eval classify`."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

import arvision
from arvision.cli import main
from arvision.config import load_config
from arvision.data import eval_transform
from arvision.eval import EvalShard, evaluate_classifier
from arvision.objectives import ClassificationObjective, NepaObjective, soft_target_cross_entropy
from arvision.tasks.finetune import build_model, build_objective, prepare_classifier, train_transform
from arvision.train.distributed import DistEnv
from arvision.train.engine import Trainer
from arvision.train.optim import lr_at, set_lr

IN1K_TRAIN = 1_281_167


class SizedOnly(Dataset):
    """A dataset of ImageNet-1k's length that is never read (the Trainer's schedule depends on the length only)."""

    def __len__(self):
        return IN1K_TRAIN

    def __getitem__(self, i):
        raise AssertionError("not read")


def tiny(**kw):
    torch.manual_seed(0)
    return arvision.create_model("nepa_tiny_patch4_32", **{"depth": 2, **kw})


def make_trainer(task_cfg, objective, tmp_path, dataset=None):
    return Trainer(objective, dataset or SizedOnly(), task_cfg.train, tmp_path, DistEnv(), num_workers=0)


# ------------------------------------------------------------------------------- (a) official LLRD numbers
# (name of a parameter, peak lr from nepa_spec.md §5.3, warmup steps from §5.3 or None = by the rule)
B_EXPECTED = [("blocks.11.attn.qkv.weight", 6e-3, 1), ("blocks.10.mlp.fc1.weight", 3.9e-3, 8757),
              ("blocks.0.attn.qkv.weight", 5.25e-5, 24801), ("cls_token", 3.4e-5, 24878),
              ("head.weight", 1e-3, 1), ("norm.weight", 1e-3, 1), ("fc_norm.weight", 6e-3, 1)]
L_EXPECTED = [("blocks.22.attn.proj.weight", 3.0e-3, 9382), ("blocks.0.norm1.weight", 5.35e-6, 37480),
              ("cls_token", 4.0e-6, None), ("head.bias", 1e-3, 1), ("fc_norm.bias", 4e-3, 1)]


@pytest.mark.parametrize("size, preset, lr, llrd, warmup, expected", [
    ("b", "nepa_base_patch14_224", 6e-3, 0.65, 25_020, B_EXPECTED),
    ("l", "nepa_large_patch14_224", 4e-3, 0.75, 37_530, L_EXPECTED),
])
def test_in1k_finetune_recipe_llrd_groups(size, preset, lr, llrd, warmup, expected, tmp_path):
    cfg = load_config("finetune", f"nepa_{size}14_in1k_finetune")
    assert cfg.train.batch_size == 1024 and cfg.train.epochs == 100 and cfg.finetune.num_classes == 1000
    # the Trainer's own arithmetic on an ImageNet-sized dataset
    trainer = make_trainer(cfg, build_objective(cfg.finetune, tiny(num_classes=1000), 1000), tmp_path)
    assert trainer.sampler.steps_per_epoch == 1251 and trainer.total_steps == 125_100
    assert trainer.lr == pytest.approx(lr, rel=1e-12) and trainer.warmup == warmup
    assert trainer.accum * trainer.micro == 1024 and tuple(trainer.optimizer.defaults["betas"]) == (0.9, 0.999)

    with torch.device("meta"):
        model = arvision.create_model(preset, num_classes=1000, qk_norm="affine")
    prepare_classifier(model, 1000, cfg.finetune.global_pool, cfg.finetune.freeze_patch_embed)
    groups = build_objective(cfg.finetune, model, 1000).param_groups(trainer.lr, cfg.train.weight_decay,
                                                                      trainer.warmup)
    by_name = {n: g for g in groups for n in g["names"]}
    names = [n for n, _ in model.named_parameters()]
    assert sorted(by_name) == sorted(n for n in names if not n.startswith("patch_embed"))  # conv frozen, once each
    assert sum(len(g["names"]) for g in groups) == len(by_name)
    for name, peak, w in expected:
        g = by_name[name]
        f = g["lr_scale"]
        assert g["lr_base"] * f == pytest.approx(peak, rel=5e-3), name
        assert g["warmup_steps"] == (w if w is not None else max(1, warmup - round(warmup * f))), name
    depth = len(model.blocks)
    for i in range(depth):  # exponent L-1-i: the top block is not decayed
        assert by_name[f"blocks.{i}.norm1.weight"]["lr_scale"] == pytest.approx(llrd ** (depth - 1 - i), rel=1e-12)
    assert by_name["cls_token"]["lr_scale"] == pytest.approx(llrd ** depth, rel=1e-12)
    # weight decay on matrices, the classifier and the CLS token; none on biases, norms, LayerScale
    assert by_name["head.weight"]["weight_decay"] == by_name["cls_token"]["weight_decay"] == 0.05
    for name in ("head.bias", "norm.weight", "fc_norm.weight", "blocks.0.attn.q_norm.weight", "blocks.0.ls1.gamma",
                 "blocks.0.attn.qkv.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name


def official_multiplier(step, f, w, total):
    """nepa_spec.md §5.3 "llrd_cosine_warmup": f*step/w during warmup, then f * half-cosine, 0 from the last step."""
    if step < w:
        return f * step / w
    if step >= total:
        return 0.0
    return f * 0.5 * (1 + math.cos(math.pi * (step - w) / (total - w)))


def test_lr_at_follows_the_official_inverted_warmup_curve():
    T, W, lr, llrd = 125_100, 25_020, 6e-3, 0.65
    f0 = llrd ** 11  # block 0 of B
    block0 = dict(lr_base=lr, lr_scale=f0, warmup_steps=24_801)
    head = dict(lr_base=1e-3, lr_scale=1.0, warmup_steps=1)
    assert lr_at(0, block0, T) == 0.0 and lr_at(0, head, T) == 0.0
    assert lr_at(12_400, block0, T) == pytest.approx(lr * f0 * 12_400 / 24_801, rel=1e-12)
    assert lr_at(24_801, block0, T) == pytest.approx(lr * f0, rel=1e-12)  # the peak is reached late for deep layers
    assert lr_at(1, head, T) == pytest.approx(1e-3, rel=1e-12)  # ... and after one step for the head
    assert lr_at(T, head, T) == 0.0 and lr_at(T - 1, head, T) > 0
    for step in (0, 1, 5_000, 8_757, 24_801, 24_878, 60_000, 125_099):
        for g in (block0, head, dict(lr_base=lr, lr_scale=llrd, warmup_steps=8_757)):
            want = g["lr_base"] * official_multiplier(step, g["lr_scale"], g["warmup_steps"], T)
            assert lr_at(step, g, T) == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert W - round(W * llrd) == 8_757  # the per-group warmup rule of llrd_groups


def test_trainer_optimizer_applies_group_schedules(tmp_path):
    cfg = load_config("finetune", "nepa_b14_in1k_finetune")
    model = tiny(num_classes=1000)
    prepare_classifier(model, 1000)
    trainer = make_trainer(cfg, build_objective(cfg.finetune, model, 1000), tmp_path)
    set_lr(trainer.optimizer, 1, trainer.total_steps)
    lrs = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lrs[id(model.head.weight)] == pytest.approx(1e-3)  # head_lr, 1-step warmup
    assert lrs[id(model.blocks[1].attn.qkv.weight)] == pytest.approx(6e-3)  # top block of 2: undecayed, 1 step
    assert lrs[id(model.blocks[0].attn.qkv.weight)] == pytest.approx(6e-3 * 0.65 / (25_020 - 16_263))
    assert id(model.patch_embed.weight) not in lrs and id(model.cls_token) in lrs


@pytest.mark.parametrize("size, epochs, micro, warmup", [("b", 1600, 256, 12_480), ("l", 800, 128, 6_240)])
def test_in1k_pretrain_recipes(size, epochs, micro, warmup, tmp_path):
    cfg = load_config("pretrain", f"nepa_{size}14_in1k_pretrain")
    trainer = make_trainer(cfg, NepaObjective(tiny()), tmp_path)
    assert trainer.sampler.steps_per_epoch == 312 and trainer.total_steps == 312 * epochs
    assert trainer.warmup == warmup and trainer.micro == micro
    assert trainer.lr == pytest.approx(4.8e-3, rel=1e-12) and trainer.ema is not None
    assert tuple(cfg.train.betas) == (0.9, 0.95) and cfg.train.seed == 1337 and cfg.train.clip_grad == 1.0


def test_recipes_are_listed(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    for name, text in (("nepa_b14_in1k_finetune", "83.8"), ("nepa_l14_in1k_finetune", "85.3"),
                       ("nepa_b14_in1k_pretrain", "1600"), ("nepa_l14_in1k_pretrain", "800"),
                       ("cifar10_finetune", "CIFAR-10"), ("cifar10_pretrain", "CIFAR-10")):
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert text in line
    cfg = load_config("finetune", "nepa_l14_in1k_finetune")
    assert cfg.eval.crop_pct == 0.95 and cfg.finetune.drop_path_rate == 0.2 and cfg.finetune.llrd == 0.75
    cfg = load_config("finetune", "nepa_b14_in1k_finetune")
    assert cfg.eval.resize == 256 and cfg.finetune.drop_path_rate == 0.1 and cfg.train.ema_decay == 0.9999


# ---------------------------------------------------------------------------- (b) Mixup / CutMix targets
def mixed(objective, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    labels = torch.randperm(objective.num_classes, generator=g)[:batch]  # distinct labels
    torch.manual_seed(seed)
    images, targets = objective.mix(x.clone(), labels)
    return x, labels, images, targets


def test_smoothed_targets_have_the_official_values():
    plain = ClassificationObjective(torch.nn.Identity(), 1000, mixup=0, cutmix=0)
    _, labels, _, t = mixed(plain)
    on = t.gather(1, labels[:, None])
    assert torch.allclose(on, torch.full_like(on, 0.9001)) and torch.allclose(t.sum(1), torch.ones(8))
    assert torch.allclose(t.sort(1).values[:, :-1], torch.full((8, 999), 1e-4))

    obj = ClassificationObjective(torch.nn.Identity(), 1000)  # official: Mixup 0.8 / CutMix 1.0, smoothing 0.1
    for seed in range(4):
        _, labels, _, t = mixed(obj, seed=seed)
        assert torch.allclose(t.sum(1), torch.ones(8), atol=1e-6)
        lam = (t[0, labels[0]] - 1e-4) / (0.9001 - 1e-4)
        own = t.gather(1, labels[:, None])[:, 0]
        partner = t.gather(1, labels.flip(0)[:, None])[:, 0]
        assert torch.allclose(own, lam * 0.9001 + (1 - lam) * 1e-4, atol=1e-6)
        assert torch.allclose(partner, (1 - lam) * 0.9001 + lam * 1e-4, atol=1e-6)
        rest = torch.ones_like(t, dtype=torch.bool)
        rest[torch.arange(8), labels] = rest[torch.arange(8), labels.flip(0)] = False
        assert torch.allclose(t[rest], torch.full_like(t[rest], 1e-4))


def test_mixup_and_cutmix_images_match_their_targets():
    mix = ClassificationObjective(torch.nn.Identity(), 10, mixup=0.8, cutmix=0)
    x, labels, images, t = mixed(mix, seed=3)
    lam = float((t[0, labels[0]] - 0.01) / 0.9)
    assert 0 < lam < 1 and torch.allclose(images, lam * x + (1 - lam) * x.flip(0), atol=1e-5)

    cut = ClassificationObjective(torch.nn.Identity(), 10, mixup=0, cutmix=1.0)
    for seed in range(6):
        x, labels, images, t = mixed(cut, seed=seed)
        lam = float((t[0, labels[0]] - 0.01) / 0.9)
        own = (images == x).all(1).float().mean().item()  # share of pixels kept: lam, corrected for clipping
        assert torch.logical_or(images == x, images == x.flip(0)).all()
        assert own == pytest.approx(lam, abs=1e-6)


def test_mixing_is_reproducible_from_the_torch_rng_and_leaves_numpy_alone():
    obj = ClassificationObjective(torch.nn.Identity(), 10)
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    a, b = mixed(obj, seed=1), mixed(obj, seed=1)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert not torch.equal(mixed(obj, seed=2)[3], a[3])
    assert np.array_equal(np.random.get_state()[1], before)
    with pytest.raises(ValueError, match="even"):
        obj.mix(torch.zeros(3, 3, 32, 32), torch.arange(3))


def test_train_transform_crop_scale_and_posterize_at_full_magnitude():
    from timm.data.auto_augment import AugmentOp

    tf = train_transform(load_config("finetune", overrides=["data.crop_scale=[0.5, 1.0]"]).data, 32)
    assert tf.transforms[0].scale == (0.5, 1.0)
    ops = [op for t in tf.transforms for op in getattr(t, "ops", ()) if isinstance(op, AugmentOp)]
    post = next(op for op in ops if op.name == "PosterizeIncreasing")
    post.prob, post.magnitude, post.magnitude_std = 1.0, 10, 0  # asks for 0 bits: Pillow >= 13 raises for that
    img = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    assert not np.asarray(post(img)).any()  # black, as timm with Pillow < 13
    post.magnitude = 5  # 2 bits: 200 -> 192
    assert (np.asarray(post(img)) == 192).all()


def test_losses():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 10, generator=g), torch.randint(0, 10, (6,), generator=g)
    targets = torch.softmax(torch.randn(6, 10, generator=g), -1)
    ref = -(targets.double() * torch.log_softmax(logits.double(), -1)).sum(1).mean()
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(ref.item(), rel=1e-6)
    assert soft_target_cross_entropy(logits.bfloat16(), targets).dtype == torch.float32

    class Fixed(torch.nn.Module):  # returns the logits, whatever the images
        def forward(self, x, causal=None):
            return logits

    plain = ClassificationObjective(Fixed(), 10, mixup=0, cutmix=0, label_smoothing=0.1)
    loss, metrics = plain(torch.zeros(6, 3, 32, 32), labels)
    smooth = F.one_hot(labels, 10) * 0.9 + 0.01
    assert loss.item() == pytest.approx(soft_target_cross_entropy(logits, smooth).item(), rel=1e-6)
    assert metrics["top1"].item() == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())


# --------------------------------------------------------------------------------------- (c) weight EMA
def test_trainer_ema_update_after_one_step(tmp_path):
    cfg = load_config("finetune", overrides=["train.ema_decay=0.9", "train.batch_size=8", "train.max_steps=1",
                                             "train.precision=fp32", "train.ckpt_every=0", "train.log_every=1",
                                             # no warmup, so that step 0 runs at lr > 0
                                             "train.warmup_steps=0", "finetune.llrd_mode=standard", "train.lr=1e-2"])
    model = prepare_classifier(tiny(num_classes=3, depth=1), 3)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a zero head would give the blocks no gradient
    before = copy.deepcopy(model.state_dict())
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 3)
    trainer = make_trainer(cfg, build_objective(cfg.finetune, model, 3), tmp_path, data)
    trainer.fit()
    after, ema = model.state_dict(), trainer.ema.module.state_dict()
    assert (after["blocks.0.attn.qkv.weight"] - before["blocks.0.attn.qkv.weight"]).abs().max() > 1e-3
    for k, v in after.items():
        if v.is_floating_point():
            torch.testing.assert_close(ema[k], 0.9 * before[k] + 0.1 * v, rtol=0, atol=3e-7)


def test_ema_warmup_follows_timms_schedule_in_both_ema_kinds():
    """train.ema_warmup_power: the decay at step t is timm ModelEmaV3's warm-up (0 at step 1, then
    min(decay, 1 - t^-power)); the unsharded EMA (timm's) and the sharded one's update rule give the same weights."""
    from timm.utils import ModelEmaV3

    from arvision.train.ema import ReplicatedEma, ShardedEma, build_ema, decay_at

    reference = ModelEmaV3(torch.nn.Linear(2, 2), decay=0.999, use_warmup=True, warmup_power=0.75)
    for t in (1, 2, 10, 100, 5000, 10 ** 6):
        assert decay_at(t, 0.999, 0.75) == pytest.approx(reference.get_decay(t), abs=1e-15), t
    assert decay_at(100, 0.999, 0.0) == 0.999 and decay_at(10 ** 6, 0.999, 0.75) == 0.999
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    start = copy.deepcopy(model.state_dict())
    emas = [ReplicatedEma(model, 0.999, 0.75), ShardedEma(model, 0.999, 0.75), ReplicatedEma(model, 0.999)]
    targets = []
    for step in range(1, 51):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        targets.append(copy.deepcopy(model.state_dict()))
        for ema in emas:
            ema.update(model, step)
    warm, sharded, fixed = (e.state_dict() for e in emas)
    for k in warm:
        torch.testing.assert_close(sharded[k], warm[k], rtol=1e-6, atol=1e-6)
        expected = start[k].clone()  # the same recursion by hand
        for step, target in enumerate(targets, 1):
            d = decay_at(step, 0.999, 0.75)
            expected = d * expected + (1 - d) * target[k]
        torch.testing.assert_close(warm[k], expected, rtol=1e-5, atol=1e-6)
        # without warm-up the initial weights keep 0.999^50 = 95% of the average; with it, none
        torch.testing.assert_close(fixed[k], 0.999 ** 50 * start[k] + sum(0.001 * 0.999 ** (50 - s) * t[k]
                                   for s, t in enumerate(targets, 1)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ema_warmup_power must be >= 0"):
        build_ema(model, 0.999, False, -1.0)


def test_trainer_passes_the_step_to_the_ema_warmup(tmp_path):
    cfg = load_config("finetune", overrides=["train.ema_decay=0.999", "train.ema_warmup_power=0.75",
                                             "train.batch_size=8", "train.max_steps=1", "train.precision=fp32",
                                             "train.ckpt_every=0", "train.log_every=1", "train.warmup_steps=0",
                                             "finetune.llrd_mode=standard", "train.lr=1e-2"])
    model = prepare_classifier(tiny(num_classes=3, depth=1), 3)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 3)
    trainer = make_trainer(cfg, build_objective(cfg.finetune, model, 3), tmp_path, data)
    trainer.fit()
    after, ema = model.state_dict(), trainer.ema.module.state_dict()
    for k, v in after.items():  # step 1 of the warm-up copies the weights (a fixed 0.999 would keep the old ones)
        if v.is_floating_point():
            torch.testing.assert_close(ema[k], v, rtol=0, atol=0)


# ------------------------------------------------------------------------------ (d) classifier initialisation
def test_classifier_from_pretrain_checkpoint(tmp_path):
    pre = tiny(qk_norm="layernorm")  # no head; parameter-free QK-Norm, like the official base pretrain checkpoint
    arvision.save_model(pre, tmp_path / "pre")
    cfg = load_config("finetune", overrides=[f"model.init={tmp_path / 'pre'}", "model.args={qk_norm: affine}",
                                             "finetune.drop_path_rate=0.2"])
    model = prepare_classifier(build_model(cfg), 7, "avg", True)
    assert model.head.weight.shape == (7, 192)
    assert not model.head.weight.any() and not model.head.bias.any()
    assert torch.equal(model.fc_norm.weight, torch.ones(192)) and not model.fc_norm.bias.any()
    assert torch.equal(model.blocks[1].attn.q_norm.weight, torch.ones(64))
    assert model.config.causal is False and model.config.drop_path_rate == 0.2 and model.training
    for k, v in pre.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.patch_embed.weight.requires_grad and not model.patch_embed.bias.requires_grad
    assert model.cls_token.requires_grad and model.blocks[0].attn.qkv.weight.requires_grad

    # a checkpoint that already has this head keeps it
    torch.nn.init.normal_(model.head.weight)
    arvision.save_model(model, tmp_path / "cls")
    cfg = load_config("finetune", overrides=[f"model.init={tmp_path / 'cls'}"])
    again = prepare_classifier(build_model(cfg), 7)
    assert torch.equal(again.head.weight, model.head.weight)


# ----------------------------------------------------------------------------------- (e) end to end
def test_finetune_end_to_end(tmp_path):
    pre = tiny(embed_dim=64, num_heads=1)  # any architecture: the run takes it from the checkpoint
    arvision.save_model(pre, tmp_path / "pre")
    run = tmp_path / "run"
    main(["finetune", "--out", str(run), f"model.init={tmp_path / 'pre'}", "data.num_samples=640",
          "train.batch_size=64", "train.epochs=2", "train.ema_decay=0.9", "train.log_every=5", "train.ckpt_every=0",
          "eval.max_samples=64", "eval.batch_size=64", "data.num_workers=0", "train.blr=4e-3"])
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 20 and res["num_classes"] == 10 and res["val_images"] == 64
    for key in ("top1", "top5", "ema_top1", "ema_top5", "loss", "ema_loss"):
        assert 0 <= res["final"][key] and res["final"][key] == res["final"][key]
    assert res["final"]["top5"] >= res["final"]["top1"]
    assert res["best"]["metric"] == "ema_top1" and res["best"]["step"] in (10, 20)
    assert res["best"]["value"] == max(r["ema_top1"] for r in map(json.loads, (run / "metrics.jsonl").open())
                                       if r["split"] == "eval")
    assert (run / "best" / "model.safetensors").is_file() and (run / "best" / "ema.safetensors").is_file()
    last = load_file(run / "checkpoints" / "step_00000020" / "model.safetensors")
    init = pre.state_dict()
    assert torch.equal(last["patch_embed.weight"], init["patch_embed.weight"])
    assert torch.equal(last["patch_embed.bias"], init["patch_embed.bias"])
    assert not torch.equal(last["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    assert not torch.equal(last["cls_token"], init["cls_token"]) and last["head.weight"].any()


# -------------------------------------------------------------------------------------- (f) eval classify
def test_eval_classify_matches_a_manual_loop(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c in ("ant", "bee", "cat"):
        (root / "val" / c).mkdir(parents=True)
        for i in range(4):
            size = (40, 36) if i % 2 else (32, 32)  # also exercise the resize
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "val" / c / f"{i}.png")
    model = tiny(num_classes=3, depth=1, causal=False)
    torch.nn.init.normal_(model.head.weight)
    arvision.save_model(model, tmp_path / "ckpt")
    out = tmp_path / "eval.json"
    main(["eval", "classify", str(tmp_path / "ckpt"), "--data", str(root), "--num-workers", "0", "--batch-size", "5",
          "--resize", "36", "--out", str(out)])
    res = json.loads(out.read_text())

    tf, correct, nll, n = eval_transform(32, resize=36), 0, 0.0, 0
    model.eval()
    for label, c in enumerate(("ant", "bee", "cat")):
        for i in range(4):
            with torch.no_grad():
                logits = model(tf(Image.open(root / "val" / c / f"{i}.png").convert("RGB"))[None])
            correct += int(logits.argmax() == label)
            nll += F.cross_entropy(logits, torch.tensor([label])).item()
            n += 1
    assert res["n"] == n == 12 and 0 < correct < 12
    assert res["top1"] == pytest.approx(100 * correct / n) and res["top5"] == 100.0
    assert res["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert f"top-1 {100 * correct / n:.2f}%" in capsys.readouterr().out

    arvision.save_model(tiny(depth=1), tmp_path / "nohead")
    with pytest.raises(SystemExit):
        main(["eval", "classify", str(tmp_path / "nohead"), "--data", str(root)])
    assert "no classifier head" in capsys.readouterr().err


def test_eval_shards_count_every_sample_once():
    data = TensorDataset(torch.arange(10).float()[:, None], torch.arange(10))
    seen = []
    for rank in range(3):
        shard = EvalShard(data, rank, 3)
        assert len(shard) == 4
        items = [shard[j] for j in range(len(shard))]
        seen += [int(y) for _, y, w in items if w]
        assert sum(w == 0 for _, _, w in items) == (1 if rank > 0 else 0)
        assert all(int(x) == int(y) for x, y, _ in items)  # padding repeats a real (input, target) pair
    assert sorted(seen) == list(range(10))

    class Echo(torch.nn.Module):  # logits = one-hot of the input value: always right
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, causal=None):
            return F.one_hot(x[:, 0].long(), 10).float() * 10

    loader = torch.utils.data.DataLoader(EvalShard(data, 2, 3), batch_size=3)
    res = evaluate_classifier(Echo(), loader)
    assert res["n"] == 3 and res["top1"] == 100.0


def test_eval_shards_pad_dense_targets():
    masks = torch.arange(5)[:, None, None].expand(5, 4, 4).clone()  # a segmentation-like (H, W) target per image
    data = TensorDataset(torch.randn(5, 3, 4, 4), masks)
    batch = next(iter(torch.utils.data.DataLoader(EvalShard(data, 1, 2), batch_size=3)))
    images, targets, weight = batch
    assert targets.shape == (3, 4, 4) and weight.tolist() == [1, 1, 0]
    assert torch.equal(targets, masks[[1, 3, 0]]) and torch.equal(images[2], data[0][0])  # padded with sample 0
