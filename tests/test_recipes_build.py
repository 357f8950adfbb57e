"""Every packaged recipe builds (issue 15, item 10): its task's own code makes the model, the objective and the Trainer
from the recipe (loading the YAML is not enough: the Trainer refused Heptapod-H's EMA under FSDP). On this CPU, in
one process: the data become the built-in synthetic sets or a tiny token cache, Hub downloads are off, and models
whose real size would not fit a test get fewer blocks; everything else (batch sizes, EMA, precision, distributed
strategy, schedule, objective) is the recipe's."""
from importlib import resources

import pytest
import torch
import yaml

import arvision
from arvision.config import load_config
from arvision.data.token_cache_writer import build_token_cache
from arvision.train import engine

RECIPES = sorted(p.name[:-5] for p in resources.files("arvision.configs").iterdir()
                 if p.name.endswith(".yaml") and "task" in (yaml.safe_load(p.read_text()) or {}))

# Only what this machine needs; "{cache:...}" is replaced by a token cache of that tokenizer.
OVERRIDES = {
    "pretrain": ["data.source=synthetic", "data.num_samples=4096", "model.args.depth=1", "model.init=null"],
    "finetune": ["data.source=synthetic", "model.args.depth=1", "model.init=null"],
    "tokenizer": ["data.source=synthetic"],
    "judge": ["data.source=synthetic-digits", "data.num_samples=256"],
    "segment": ["data.source=synthetic", "model.backbone_init=null", "model.backbone_args={depth: 2}"],
    "heptapod": ["model.args.depth=1", "model.args.head_depth=1", "model.args.diffloss_depth=1",
                 "train.batch_size=8", "train.micro_batch_size=null"],
}


class Built(Exception):
    """Raised in place of Trainer.fit: the recipe built."""


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_caches")
    out = {}
    for kind, preset in (("discrete", "vq_f4_32px"), ("continuous", "kl_f4_32px")):
        torch.manual_seed(0)
        tok = arvision.create_model(preset).eval()
        build_token_cache(tok, "synthetic", root / kind, img_size=32, limit=16, num_workers=0, progress=False)
        out[kind] = root / kind
    return out


def test_the_recipe_list_is_complete():
    assert len(RECIPES) >= 15 and "heptapod_h_in256" in RECIPES and "nepa_b14_in1k_pretrain" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_packaged_recipe_builds_its_objective_and_trainer(recipe, caches, tmp_path, monkeypatch):
    from importlib import import_module

    task = yaml.safe_load(resources.files("arvision.configs").joinpath(f"{recipe}.yaml").read_text())["task"]
    overrides = [*OVERRIDES[task], "data.num_workers=0"]
    if recipe == "heptapod_quickstart":  # a CPU-sized model already: fewer blocks would leave the embeddings the bulk
        overrides = [o for o in overrides if "depth" not in o]
    if task == "heptapod":
        preset = load_config(task, recipe).model.name
        kind = arvision.models.model_config(preset).token_type if "_vq" not in recipe else "discrete"
        overrides.append(f"data.source={caches[kind]}")
    cfg = load_config(task, recipe, overrides)
    built = {}

    def fit(self):
        built["trainer"] = self
        raise Built

    monkeypatch.setattr(engine.Trainer, "fit", fit)
    with pytest.raises(Built):
        import_module(f"arvision.tasks.{task}").run(cfg, out=str(tmp_path / "run"))
    trainer = built["trainer"]
    recipe_train = load_config(task, recipe).train
    assert trainer.cfg.ema_decay == recipe_train.ema_decay and (trainer.ema is not None) == (recipe_train.ema_decay > 0)
    assert trainer.cfg.distributed == recipe_train.distributed
    # FSDP would shard the model block by block (or stage by stage), not as one unit
    units = trainer.objective.shard_units()
    assert units and sum(p.numel() for u in units for p in u.parameters()) > 0.5 * sum(
        p.numel() for p in trainer.objective.model.parameters()), recipe
