"""Config: overrides into free-form maps filled by a recipe, unknown-key errors, live attribute access, save/load,
the typed configs (TrainConfig, objective, loss and model configs), and the config keys error messages name."""
import copy
import dataclasses
import pickle
from pathlib import Path

import pytest
import yaml

from arvision import create_model
from arvision.config import Config, load_config, merge, save_config, _flatten


def test_override_into_a_map_the_recipe_filled():
    cfg = load_config("finetune", "nepa_b14_in1k_finetune", ["model.args.rope_rescale=null"])
    assert cfg.model.args == {"qk_norm": "affine", "rope_rescale": None}  # the recipe's key kept, the new one added
    assert cfg.model.name == "nepa_base_patch14_224"
    # any depth, and a sub-key of a sub-map created by an earlier override
    cfg = load_config("finetune", "nepa_b14_in1k_finetune", ["model.args.a.b=1", "model.args.a.c=2"])
    assert cfg.model.args["a"] == {"b": 1, "c": 2}
    # the recipe filling model.args must not leak into the next load (no aliasing of the defaults)
    assert load_config("finetune").model.args == {}
    with pytest.raises(ValueError, match="not a map"):
        load_config("finetune", overrides=["model.args.a=1", "model.args.a.b=2"])


def test_recipe_file_fills_free_form_maps_at_any_depth(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  args: {depth: 2, extra: {x: 1}}\n")
    cfg = load_config("finetune", str(recipe), ["model.args.extra.y=2", "model.args.depth=3"])
    assert cfg.model.args == {"depth": 3, "extra": {"x": 1, "y": 2}}


def test_unknown_keys_still_error_with_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'model\.argz\.x'.*did you mean model\.args"):
        load_config("finetune", "nepa_b14_in1k_finetune", ["model.argz.x=1"])
    with pytest.raises(ValueError, match="did you mean train.epochs"):
        load_config("finetune", "nepa_b14_in1k_finetune", ["train.epoch=3"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune:\n  llrdd: 0.5\n")
    with pytest.raises(ValueError, match="finetune.llrd"):
        load_config("finetune", str(recipe))
    with pytest.raises(ValueError, match="expects float"):
        load_config("finetune", overrides=["train.blr=fast"])


def test_attribute_reads_are_live_and_writes_persist():
    cfg = load_config("finetune")
    cfg.train.lr = 3
    assert cfg["train"]["lr"] == 3 and cfg.train.lr == 3
    train = cfg.train
    train.epochs = 7
    assert cfg["train"]["epochs"] == 7
    cfg["data"]["num_workers"] = 0
    assert cfg.data.num_workers == 0
    cfg.model.args = {"depth": 2}  # a plain dict assigned later is wrapped, so attribute access keeps working
    cfg.model.args.heads = 4
    assert cfg["model"]["args"] == {"depth": 2, "heads": 4} and isinstance(cfg["model"]["args"], Config)
    with pytest.raises(AttributeError, match="no key"):
        cfg.train.nope
    with pytest.raises(AttributeError, match="Config method"):
        cfg.train.items = 1
    merge(cfg, {"train": {"epochs": 9}}, _flatten(load_config("finetune").to_dict()))
    assert cfg.train.epochs == 9


def test_to_dict_copy_pickle_and_yaml():
    cfg = load_config("finetune", overrides=["model.args.depth=2"])
    plain = cfg.to_dict()
    assert type(plain) is dict and type(plain["train"]) is dict and type(plain["model"]["args"]) is dict
    plain["train"]["lr"] = 5
    assert cfg.train.lr is None  # to_dict is a copy
    clone = copy.deepcopy(cfg)
    clone.train.lr = 1
    assert cfg.train.lr is None and isinstance(clone.train, Config)
    restored = pickle.loads(pickle.dumps(cfg))
    assert restored == cfg and isinstance(restored.train, Config)
    assert yaml.safe_load(yaml.safe_dump(dict(cfg))) == cfg.to_dict()  # safe_dump takes Config nodes


def test_save_config_round_trip(tmp_path):
    cfg = load_config("finetune", "nepa_b14_in1k_finetune", ["model.args.rope_rescale=null", "train.epochs=2"])
    cfg.train.lr = 3.0e-4
    save_config(cfg, tmp_path / "config.yaml")
    assert list(tmp_path.iterdir()) == [tmp_path / "config.yaml"]  # no temp file left behind
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg.to_dict()
    # the saved file is itself a valid recipe that reproduces the config
    again = load_config("finetune", str(tmp_path / "config.yaml"))
    assert again == cfg


def test_every_packaged_recipe_loads_under_its_task():
    from importlib import resources

    import yaml

    from arvision.config import load_config

    recipes = [f for f in resources.files("arvision.configs").iterdir() if f.name.endswith(".yaml")]
    checked = 0
    for f in recipes:
        task = (yaml.safe_load(f.read_text()) or {}).get("task")
        if task:  # recipes name their task; the defaults are the task files themselves
            load_config(task, f.name[:-5])
            checked += 1
    assert checked >= 10


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config("pretrain", overrides=["train.epochs=3", "train.blr=1e-3", "model.args.depth=2",
                                             "train.betas=[0.9, 0.99]"])
    assert cfg.train.epochs == 3 and cfg.train.blr == 1e-3 and cfg.model.args == {"depth": 2}
    assert cfg.train.betas == [0.9, 0.99]
    with pytest.raises(ValueError, match="did you mean train.epochs"):
        load_config("pretrain", overrides=["train.epoch=3"])
    with pytest.raises(ValueError, match="expects int"):
        load_config("pretrain", overrides=["train.epochs=many"])
    with pytest.raises(ValueError, match="key=value"):
        load_config("pretrain", overrides=["train.epochs"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  batch_size: 64\n  warmpu_ratio: 0.1\n")
    with pytest.raises(ValueError, match="warmup_ratio"):
        load_config("pretrain", str(recipe))
    with pytest.raises(FileNotFoundError):
        load_config("pretrain", str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------------ one typed mechanism: TrainConfig (issue 19)
TASKS = ("pretrain", "finetune", "tokenizer", "heptapod", "segment")


def _yaml_train_block(task: str) -> dict:
    from importlib import resources

    return yaml.safe_load(resources.files("arvision.configs").joinpath(f"{task}.yaml").read_text())["train"] or {}


def test_every_task_train_section_is_train_config_defaults_with_its_yaml_differences():
    from dataclasses import asdict, fields

    from arvision.train import TrainConfig

    defaults = asdict(TrainConfig())
    for task in TASKS:
        block = _yaml_train_block(task)
        same = sorted(k for k, v in block.items() if v == defaults.get(k) and type(v) is type(defaults[k]))
        assert not same, f"{task}.yaml repeats TrainConfig's defaults for {same}"
        train = load_config(task).to_dict()["train"]
        assert train == {**defaults, **block}, task
        assert list(train) == [f.name for f in fields(TrainConfig)], task  # every key, printed and saved in one order


def test_unknown_train_key_is_one_line_with_a_suggestion(tmp_path):
    from arvision.train import TrainConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  warmup_ration: 0.1\n")
    errors = []
    for load in (lambda: load_config("pretrain", str(recipe)),
                 lambda: load_config("segment", overrides=["train.warmup_ration=0.1"]),
                 lambda: TrainConfig.from_dict({"warmup_ration": 0.1})):
        with pytest.raises(ValueError) as caught:
            load()
        errors.append(str(caught.value))
    assert errors[0] == errors[1]
    assert errors[0].startswith("unknown config key 'train.warmup_ration'; did you mean train.warmup_ratio, ")
    assert errors[2].startswith("unknown config keys ['warmup_ration'] for TrainConfig; did you mean warmup_ratio, ")
    assert not any("\n" in e for e in errors)


def test_train_values_are_checked_against_the_field_types():
    from arvision.train import TrainConfig

    # a field whose default is null is still typed: max_steps is an int
    with pytest.raises(ValueError, match=r"^config key 'train.max_steps' expects int or null, got 'many'$"):
        load_config("pretrain", overrides=["train.max_steps=many"])
    with pytest.raises(ValueError, match=r"^TrainConfig key 'compile' expects bool, got 'yes'$"):
        TrainConfig.from_dict({"compile": "yes"})
    # the dataclass's own checks run when the config is loaded (before, an unknown precision passed --print-config)
    with pytest.raises(ValueError, match=r"^train.precision must be one of bf16, fp32, got 'fp16'$"):
        load_config("finetune", overrides=["train.precision=fp16"])
    cfg = TrainConfig.from_dict({"blr": 1, "betas": (0.9, 0.99)})
    assert type(cfg.blr) is float and cfg.betas == [0.9, 0.99]


def test_the_trainer_takes_a_train_config_and_fills_a_mapping_from_its_defaults(tmp_path):
    import arvision
    from arvision.data.synthetic import SyntheticShapes
    from arvision.data.transforms import pretrain_transform
    from arvision.objectives import NepaObjective
    from arvision.train import TrainConfig, Trainer
    from arvision.train.distributed import DistEnv

    data = SyntheticShapes(num_samples=16, split="train", transform=pretrain_transform(32))
    build = lambda cfg: Trainer(NepaObjective(arvision.create_model("nepa_tiny_patch4_32", depth=1)), data, cfg,
                                tmp_path, DistEnv(), num_workers=0)
    given = TrainConfig(max_steps=3, batch_size=8, lr=1e-3)
    assert build(given).cfg is given
    partial = build({"max_steps": 3, "batch_size": 8})  # a mapping: what it leaves out takes TrainConfig's defaults
    assert partial.cfg == TrainConfig(max_steps=3, batch_size=8) and partial.lr == 1e-3 * 8 / 256
    with pytest.raises(ValueError, match="did you mean batch_size"):
        build({"batch_sise": 8})


# ------------------------------------------------------------------ each objective has its own typed config
def test_objective_configs_are_typed_and_built_from_the_task_sections():
    import torch

    from arvision.objectives import ClassificationConfig, ClassificationObjective, NepaLossConfig
    from arvision.objectives.segmentation import SegmentationConfig
    from arvision.objectives.tokenizer import TokenizerLossConfig
    from arvision.tasks.finetune import build_objective
    from arvision.typed_config import ConfigDict

    for cls, section in ((NepaLossConfig, "pretrain.objective"), (ClassificationConfig, "finetune.finetune"),
                         (SegmentationConfig, "segment.segment"), (TokenizerLossConfig, "tokenizer.objective")):
        task, key = section.split(".")
        assert issubclass(cls, ConfigDict), cls
        cfg = cls.from_section(load_config(task)[key])
        assert all(getattr(cfg, k) == v for k, v in load_config(task)[key].items() if hasattr(cfg, k)), cls
        # every field can be set from the command line: the task's YAML names it (else key=value is "unknown key")
        missing = {f.name for f in dataclasses.fields(cls)} - set(load_config(task)[key])
        assert not missing, f"{section} lacks {sorted(missing)} of {cls.__name__}"
    ft = load_config("finetune", overrides=["finetune.mixup_switch_prob=0.25", "finetune.llrd=0.5"]).finetune
    objective = build_objective(ft, torch.nn.Identity(), 10)
    assert objective.config == ClassificationConfig(mixup_switch_prob=0.25, llrd=0.5)
    assert objective.mixup.switch_prob == 0.25
    # keyword changes are checked like a config file: one line, the closest field
    with pytest.raises(ValueError, match=r"^unknown config keys \['mixpu'\] for ClassificationConfig; did you mean "
                                         r"mixup"):
        ClassificationObjective(torch.nn.Identity(), 10, mixpu=0)
    with pytest.raises(ValueError, match=r"^ClassificationConfig key 'cutmix' expects float, got 'lots'$"):
        ClassificationConfig.from_dict({"cutmix": "lots"})
    with pytest.raises(ValueError, match=r"^finetune.mixup_mode must be one of batch, pair, elem, got 'pairs'$"):
        build_objective(load_config("finetune", overrides=["finetune.mixup_mode=pairs"]).finetune,
                        torch.nn.Identity(), 10)


def test_loss_configs_check_their_values_in_one_line():
    from arvision.objectives.heptapod import HeptapodLossConfig
    from arvision.objectives.tokenizer import TokenizerLossConfig

    with pytest.raises(ValueError, match=r"^unknown config keys \['target_sets'\] for HeptapodLossConfig; did you mean "
                                         r"target_set"):
        HeptapodLossConfig.from_dict({"target_sets": "next"})
    for make, message in ((lambda: HeptapodLossConfig(ce_chunk=0), "objective.ce_chunk must be >= 1, got 0"),
                          (lambda: HeptapodLossConfig(label_dropout=1.0), "objective.label_dropout must be in [0, 1)"),
                          (lambda: TokenizerLossConfig(disc_weight=-1.0), "objective.disc_weight must be >= 0"),
                          (lambda: HeptapodLossConfig.from_dict({"ce_chunk": "big"}),
                           "HeptapodLossConfig key 'ce_chunk' expects int, got 'big'")):
        with pytest.raises(ValueError) as caught:
            make()
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_model_configs_share_the_mechanism_suggestions_and_type_checks():
    from arvision.models import model_config
    from arvision.models.registry import ConfigDict as ReExported
    from arvision.models.vit import NepaConfig
    from arvision.typed_config import ConfigDict

    assert ReExported is ConfigDict and issubclass(NepaConfig, ConfigDict)
    with pytest.raises(ValueError, match=r"^unknown config keys \['depht'\] for NepaConfig; did you mean depth\?$"):
        NepaConfig.from_dict({"depht": 2})
    with pytest.raises(ValueError, match=r"^NepaConfig key 'depth' expects int, got 'deep'$"):
        model_config("nepa_tiny_patch4_32", depth="deep")
    assert type(model_config("nepa_tiny_patch4_32", drop_path_rate=0).drop_path_rate) is float


# ------------------------------------------------------------------------------ config keys in messages

def test_tokenizer_errors_name_the_objective_keys():
    from arvision.objectives.tokenizer import TokenizerLossConfig, TokenizerObjective
    with pytest.raises(ValueError, match=r"objective\.restart_after"):
        TokenizerObjective(create_model("kl_f4_32px", ch=32), TokenizerLossConfig(restart_after=5))
    with pytest.raises(ValueError, match=r"objective\.recon"):
        TokenizerLossConfig(recon="l3")


def test_config_keys_named_in_error_messages_exist():
    """Every `section.key` an error message names (a raise's string literals) is a key of some task's config."""
    import ast
    import re

    from arvision.config import _flatten, default_config
    keys = set()
    for task in ("pretrain", "finetune", "tokenizer", "heptapod", "segment"):
        keys |= set(_flatten(default_config(task)))
    sections = sorted({k.split(".")[0] for k in keys} | {"loss", "optim", "trainer", "training"})
    pattern = re.compile(r"(?<![\w.(])(" + "|".join(sections) + r")\.[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*")
    known = lambda k: any(k == x or x.startswith(k + ".") or k.startswith(x + ".") for x in keys)
    bad = []
    for path in (Path(__file__).resolve().parents[1] / "arvision").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for s in ast.walk(node.exc):
                    if isinstance(s, ast.Constant) and isinstance(s.value, str):
                        bad += [f"{path.name}: {m.group(0)}" for m in pattern.finditer(s.value)
                                if not known(m.group(0))]
    assert not bad, bad
