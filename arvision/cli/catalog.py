"""`arvision convert`, `arvision models`, `arvision recipes`: checkpoints and the catalogue of presets and recipes.

    arvision convert SRC DST [--ema]        # any supported checkpoint -> arvision checkpoint
    arvision convert SRC DST --to official [--class-names a,b,c]   # NEPA ViT -> Hugging Face ViTNepa layout
    arvision hub push CHECKPOINT OWNER/NAME [--local DIR]          # weights + config + model card to the Hub
    arvision models [--family vq_tokenizer] # presets grouped by family, with parameter counts
    arvision recipes                        # the packaged recipe configs
"""
from __future__ import annotations


def cmd_convert(args) -> None:
    from ..checkpoints import convert

    if args.to == "official":
        return convert_to_official(args)
    if args.class_names:
        raise ValueError("--class-names applies to --to official (an arvision checkpoint keeps class indices)")
    path = convert(args.src, args.dst, ema=args.ema)
    print(f"wrote arvision checkpoint {path}")


def read_class_names(value: str) -> list[str]:
    """--class-names: a text file with one name a line, or a comma-separated list."""
    from pathlib import Path

    path = Path(value)
    names = path.read_text().splitlines() if path.is_file() else value.split(",")
    return [n.strip() for n in names if n.strip()]


def run_class_names(checkpoint: str) -> list[str]:
    """The class names of the data the checkpoint's run trained on (its config.yaml's data.source), or []."""
    from ..checkpoints.hub import find_run_directory
    from ..data.datasets import build_dataset
    from ..files import read_yaml

    run_dir = find_run_directory(checkpoint) if __import__("os").path.exists(checkpoint) else None
    source = ((read_yaml(run_dir / "config.yaml") or {}).get("data") or {}).get("source") if run_dir else None
    if not source:
        return []
    try:
        return [str(c) for c in getattr(build_dataset(source, "train", num_samples=1), "classes", [])]
    except (OSError, ValueError, ImportError):  # the data has moved or is not readable here: names unknown
        return []


def convert_to_official(args) -> None:
    from ..checkpoints import load_model
    from ..checkpoints.official_nepa import export_official

    model = load_model(args.src, family="nepa_vit", ema=args.ema)
    names = read_class_names(args.class_names) if args.class_names else run_class_names(args.src)
    if names and len(names) != model.config.num_classes:
        where = "--class-names" if args.class_names else "the run's training data"
        raise ValueError(f"{where} gives {len(names)} class names but the checkpoint has "
                         f"{model.config.num_classes} classes; pass --class-names with one name per class")
    export_official(model, args.dst, class_names=names or None)
    labels = "class names" if names else ("LABEL_i labels (pass --class-names)" if model.config.num_classes else
                                          "no classifier")
    print(f"wrote official ViTNepa checkpoint {args.dst} ({labels})")


def cmd_hub_push(args) -> None:
    from ..checkpoints.hub import push_to_hub, write_hub_folder

    datasets = [d for d in args.dataset.split(",") if d] if args.dataset is not None else None
    if args.local:
        path = write_hub_folder(args.checkpoint, args.local, args.license, datasets, repo_id=args.repo_id)
        print(f"wrote {path} (model card, weights, config); upload it later without --local")
        return
    if not args.repo_id:
        raise ValueError("arvision hub push needs REPO_ID (owner/name), or --local DIR to write the files only")
    url = push_to_hub(args.checkpoint, args.repo_id, args.license, datasets, private=args.private)
    print(f"pushed {args.checkpoint} to https://huggingface.co/{args.repo_id} ({url})")


def preset_summary(name: str) -> str:
    """A short description of a preset: its config's ``summary()`` when the family defines one, else the
    fields the preset sets."""
    from ..models import registry

    config = registry.model_config(name)
    if callable(getattr(config, "summary", None)):
        return config.summary()
    return " ".join(f"{k}={v}" for k, v in registry.preset_fields(name).items())


def preset_parameters(name: str) -> int:
    """Parameter count of a preset, built on the meta device (no memory, no init) when the family allows it."""
    import torch

    from ..models import count_parameters, create_model

    try:
        with torch.device("meta"):
            return count_parameters(create_model(name))
    except Exception:  # a constructor that computes with real tensors
        return count_parameters(create_model(name))


def cmd_models(args) -> None:
    from ..models import get_family, list_families, list_models

    families = [get_family(args.family).name] if args.family else list_families()
    for i, family in enumerate(families):
        names = list_models(family)
        if not names:
            continue
        desc = get_family(family).description
        print(("\n" if i else "") + f"{family}" + (f": {desc}" if desc else ""))
        for name in names:
            print(f"  {name:32s} {preset_parameters(name):>13,} params  {preset_summary(name)}")


def cmd_recipes(args) -> None:
    from importlib import resources

    for f in sorted(resources.files("arvision.configs").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            first = next((line for line in f.read_text().splitlines() if line.startswith("#")), "")
            print(f"{f.name[:-5]:34s} {first.lstrip('# ')}")


def register(sub) -> None:
    p = sub.add_parser("convert", help="write any supported checkpoint as an arvision checkpoint")
    p.add_argument("src", help="official NEPA directory, arvision checkpoint, or Hub id")
    p.add_argument("dst", help="output directory")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (official pytorch_model_ema.bin or "
                   "arvision ema.safetensors)")
    p.add_argument("--to", choices=("arvision", "official"), default="arvision",
                   help="arvision checkpoint (default) or, for a NEPA ViT, the official Hugging Face ViTNepa layout "
                   "(config.json + model.safetensors)")
    p.add_argument("--class-names", help="--to official: the classifier's label names (file with one a line, or "
                   "a,b,c); default: the class names of the run's training data when it can be read, else LABEL_i")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("hub", help="share a checkpoint on the Hugging Face Hub (model card, safetensors, config)")
    hub_sub = p.add_subparsers(dest="hub_command", required=True)
    p = hub_sub.add_parser("push", help="upload a checkpoint with a generated model card (needs .[hf] and a login)")
    p.add_argument("checkpoint", help="arvision checkpoint (e.g. runs/x/checkpoints/step_N or runs/x/best), official "
                   "NEPA directory or Hub id")
    p.add_argument("repo_id", nargs="?", help="Hub model repository, owner/name (created if missing)")
    p.add_argument("--local", metavar="DIR", help="write the files that would be uploaded into DIR; no network")
    p.add_argument("--license", default="apache-2.0", help="license in the card's metadata (default apache-2.0)")
    p.add_argument("--dataset", help="dataset ids for the card, comma-separated (default: the run's data folder "
                   "name; '' for none)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.set_defaults(func=cmd_hub_push)

    p = sub.add_parser("models", help="list registered model presets by family, with parameter counts")
    p.add_argument("--family", help="only this family (e.g. nepa_vit, vq_tokenizer)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("recipes", help="list packaged recipe configs")
    p.set_defaults(func=cmd_recipes)
