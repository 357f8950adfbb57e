"""What generic code asks of a model family is a property of the family (or of the task), dispatched through the
registry, never a family name written into a command: which families `arvision sample` draws from, which recipe a
task runs when no data is given."""
import argparse

import numpy as np
import pytest

import arvision
from arvision.cli import main
from arvision.models import registry
from arvision.models.heptapod import Heptapod, HeptapodConfig


class ToyGenerator(Heptapod):
    """Another generator family: the sampler's interface, inherited."""


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(registry._FAMILIES, "toy_generator",
                        registry.Family("toy_generator", ToyGenerator, HeptapodConfig))
    monkeypatch.setattr(ToyGenerator, "family", "toy_generator", raising=False)
    return "toy_generator"


def test_the_generator_families_are_those_with_the_sampler_interface(toy_family):
    assert "heptapod" in registry.generator_families() and toy_family in registry.generator_families()
    assert not registry.get_family("nepa_vit").generates and not registry.get_family("vq_tokenizer").generates


def test_sample_takes_any_generator_family_and_names_them_all_when_refusing(toy_family, vq_token_cache, tmp_path,
                                                                            capsys):
    toy = ToyGenerator(arvision.models.model_config("heptapod_tiny", depth=1, head_depth=1))
    ckpt = arvision.save_model(toy, tmp_path / "toy")
    main(["sample", str(ckpt), "--out", str(tmp_path / "s"), "--num-per-class", "1", "--classes", "2",
          "--tokenizer", str(vq_token_cache / "tokenizer"), "--device", "cpu"])
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (1, 32, 32, 3)
    nepa = arvision.save_model(arvision.create_model("nepa_tiny_patch4_32"), tmp_path / "nepa")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["sample", str(nepa), "--out", str(tmp_path / "d")])
    msg = capsys.readouterr().err.strip()
    assert "\n" not in msg and "is a nepa_vit checkpoint, not heptapod or toy_generator" in msg


def _train_args(*argv):
    from arvision.cli.train import _add_train_args

    p = argparse.ArgumentParser()
    _add_train_args(p)
    return p.parse_args(list(argv))


def test_the_recipe_run_without_data_is_the_tasks_own(monkeypatch):
    from arvision.cli.train import _train_config
    from arvision.config import load_config
    from arvision.tasks import pretrain

    assert _train_config("heptapod", _train_args()) == load_config("heptapod", "heptapod_quickstart")
    assert _train_config("pretrain", _train_args()) == load_config("pretrain")
    monkeypatch.setattr(pretrain, "RECIPE_WITHOUT_DATA", "cifar10_pretrain", raising=False)
    assert _train_config("pretrain", _train_args()) == load_config("pretrain", "cifar10_pretrain")
    given = _train_config("pretrain", _train_args("--data", "synthetic"))  # data given: the task's defaults
    assert given == load_config("pretrain", None, ["data.source=synthetic"])


def test_the_backbone_family_is_the_tasks_not_the_generic_builders(tmp_path):
    from arvision.config import load_config
    from arvision.tasks import finetune, pretrain
    from arvision.tasks.common import build_backbone

    assert pretrain.MODEL_FAMILIES == finetune.MODEL_FAMILIES == ("nepa_vit",)
    cfg = load_config("pretrain")
    assert build_backbone(cfg.model, ("nepa_vit",)).family == "nepa_vit"
    seg = arvision.save_model(arvision.create_model("upernet_nepa_tiny_patch4_32"), tmp_path / "seg")
    cfg = load_config("pretrain", None, [f"model.init={seg}"])
    assert build_backbone(cfg.model, ("segmentor",)).family == "segmentor"  # the task's families, whichever they are
    with pytest.raises(ValueError, match="is a segmentor checkpoint, not nepa_vit"):
        build_backbone(cfg.model, pretrain.MODEL_FAMILIES)
    with pytest.raises(ValueError, match="is a nepa_vit preset, not heptapod"):
        build_backbone(load_config("pretrain").model, ("heptapod",))


def test_training_command_hub_tags_and_consumers_come_from_the_family(monkeypatch, tmp_path):
    """The hub card's training command and tags and the wrong-family error's list of commands are the family's
    (registered with it / hooks on its class), not tables keyed by family names in checkpoints/."""
    from arvision.checkpoints.hub import training_command
    from arvision.checkpoints.loading import _check_family

    nepa = registry.get_family("nepa_vit")
    assert nepa.training_command(arvision.models.model_config("nepa_tiny_patch4_32")) == "pretrain"
    assert nepa.training_command(arvision.models.model_config("nepa_tiny_patch4_32", num_classes=10)) == "finetune"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    monkeypatch.setitem(registry._FAMILIES, "toy_generator",
                        registry.Family("toy_generator", ToyGenerator, HeptapodConfig,
                                        train_command="toy train", used_by="`arvision toy`"))
    assert training_command(run, "toy_generator", None) == "arvision toy train --config config.yaml"
    assert arvision.create_model("nepa_tiny_patch4_32").hub_tags() == ["nepa", "image-feature-extraction"]
    with pytest.raises(ValueError) as err:
        _check_family("ckpt", "toy_generator", "nepa_vit")
    assert err.value.command_line_message.endswith("toy_generator checkpoints go to `arvision toy`")
