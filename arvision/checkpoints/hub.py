"""Share a checkpoint the way the field does: a Hugging Face Hub model repository (or the same files in a folder).

The folder holds the arvision checkpoint (``model.safetensors``, ``ema.safetensors`` when the checkpoint has one,
``arvision.json``), the training run's ``config.yaml`` and ``results.json`` when the checkpoint lies in a run
directory, and a model card (``README.md``: YAML metadata that ``huggingface_hub`` parses, the training command
and the run's metrics). ``arvision.load_model`` reads the folder, or the Hub id once pushed.

    write_hub_folder("runs/ft/best", "out/")                     # offline: the files only
    push_to_hub("runs/ft/best", "me/nepa-tiny-digits")            # huggingface_hub.upload_folder
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..files import read_json, read_yaml
from ..models.registry import family_of, get_family
from ..models.tokenizers import TOKENIZER_FAMILIES
from .arvision_format import EMA_FILE, META_FILE, PathLike, read_weights_file, save_model
from .loading import load_model, matching_preset

RUN_FILES = ("config.yaml", "results.json")


def _import_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("arvision hub needs huggingface_hub: pip install 'arvision[hf]'") from None
    return huggingface_hub


def find_run_directory(checkpoint: PathLike) -> Optional[Path]:
    """The training run a checkpoint belongs to: the nearest folder above it holding ``config.yaml``."""
    path = Path(checkpoint).resolve()
    return next((p for p in (path, *path.parents) if (p / "config.yaml").is_file()), None)


def training_command(run_dir: Optional[Path], family: str, config) -> Optional[str]:
    """The command that trained the run: the one recorded in ``run.json``, else the task's command given the
    run's saved config (which reproduces it), or None without a run directory."""
    if run_dir is None:
        return None
    if (run_dir / "run.json").is_file():
        argv = (read_json(run_dir / "run.json") or {}).get("command")
        if argv:
            return " ".join(argv) if isinstance(argv, list) else str(argv)
    return f"arvision {get_family(family).training_command(config)} --config config.yaml"


def flat_metrics(results: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a results.json (nested keys joined with '/')."""
    out: dict[str, float] = {}
    if isinstance(results, dict):
        for key, value in results.items():
            out.update(flat_metrics(value, f"{prefix}{key}/"))
    elif isinstance(results, (int, float)) and not isinstance(results, bool):
        out[prefix.rstrip("/")] = results
    return out


def _dataset_id(source: Any) -> Optional[str]:
    """A Hub-style dataset name for the card's metadata: the data folder's name (``/data/cifar10`` -> cifar10) or a
    Hub id; None for the built-in synthetic sets."""
    if not isinstance(source, str) or not source or source.startswith("synthetic"):
        return None
    return source if (source.count("/") == 1 and not Path(source).exists()) else Path(source).name


def model_card(model, run_dir: Optional[Path], license: str = "apache-2.0", datasets: Optional[list[str]] = None,
               extra_tags: tuple[str, ...] = ()):
    """A ``huggingface_hub.ModelCard``: metadata (library_name arvision, license, tags, datasets, the run's
    metrics under ``arvision_results``) and a body with the loading code, the training command and a metrics table."""
    hub = _import_hub()
    family = family_of(model)
    run_cfg = (read_yaml(run_dir / "config.yaml") or {}) if run_dir else {}
    results = read_json(run_dir / "results.json") if run_dir and (run_dir / "results.json").is_file() else {}
    metrics = flat_metrics(results)
    if datasets is None:
        found = _dataset_id((run_cfg.get("data") or {}).get("source"))
        datasets = [found] if found else []
    tags = ["arvision", family, *extra_tags, *getattr(model, "hub_tags", lambda: [])()]
    data = hub.ModelCardData(library_name="arvision", license=license, tags=tags, datasets=datasets or None,
                             arvision_results=metrics or None)
    command = training_command(run_dir, family, model.config)
    preset = matching_preset(model.config, family)
    loader = "load_tokenizer" if family in TOKENIZER_FAMILIES else "load_model"
    lines = [f"# {preset or family}", "",
             f"An arvision `{family}` checkpoint" + (f" (preset `{preset}`)" if preset else "") + ".", "",
             "```python", "import arvision", f'model = arvision.{loader}("REPO_ID")', "```", ""]
    if command:
        lines += ["## Training", "", "```bash", command, "```", "",
                  "`config.yaml` is the run's resolved config.", ""]
    if metrics:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
        lines.append("")
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return hub.ModelCard(content)


def write_hub_folder(checkpoint: PathLike, directory: PathLike, license: str = "apache-2.0",
                     datasets: Optional[list[str]] = None, repo_id: Optional[str] = None) -> Path:
    """Write what ``push_to_hub`` uploads into ``directory`` (atomically): the checkpoint in the arvision format, the
    run's config.yaml / results.json and README.md (the model card)."""
    model = load_model(checkpoint)
    source = Path(checkpoint)
    ema = read_weights_file(source / EMA_FILE) if (source / EMA_FILE).is_file() else None
    run_dir = find_run_directory(checkpoint) if source.exists() else None
    card = model_card(model, run_dir, license=license, datasets=datasets)
    card.text = card.text.replace("REPO_ID", repo_id or "OWNER/NAME")

    def extra(tmp: Path) -> None:
        for name in RUN_FILES:
            if run_dir is not None and (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)
        card.save(tmp / "README.md")

    return save_model(model, directory, ema_state_dict=ema, preset=matching_preset(model.config, family_of(model)),
                      extra_files=extra)


def push_to_hub(checkpoint: PathLike, repo_id: str, license: str = "apache-2.0",
                datasets: Optional[list[str]] = None, private: bool = False, token: Optional[str] = None) -> str:
    """Create (or reuse) the Hub model repository ``repo_id`` and upload the folder ``write_hub_folder`` writes;
    returns the commit URL."""
    hub = _import_hub()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_hub_folder(checkpoint, Path(tmp) / "repo", license, datasets, repo_id=repo_id)
        try:
            hub.create_repo(repo_id, private=private, exist_ok=True, token=token)
            info = hub.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                                     commit_message=f"arvision {META_FILE} checkpoint")
        except Exception as e:  # network, authentication, permissions: one line
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OSError(f"pushing to the Hugging Face Hub repository {repo_id} failed ({msg}); log in with "
                          "`huggingface-cli login` (or set HF_TOKEN) and check the network, or write the files "
                          "with --local DIR") from None
    return str(getattr(info, "commit_url", info))
