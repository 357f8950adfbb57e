"""`arvision demo CHECKPOINT`: a small Gradio page (`pip install 'arvision[demo]'`) for one checkpoint.

- A Heptapod generator: choose classes (their names from the run's token cache when it is found), temperature, top-k,
  seed and samples per class; sample a grid (one row per class, ``arvision.generate.outputs.class_grid``) and
  download it as a PNG.
- A NEPA backbone: upload an image, choose a query patch and the blocks; see the attention and next-embedding
  similarity maps of ``arvision visualize`` (``arvision.eval.visualize``).

The page only wires widgets to the plain functions below (``load_generator``, ``sample_grid``, ``nepa_maps``, ...),
which do the work and are tested without a browser.

    arvision demo runs/heptapod-<time>/checkpoints/step_00001500          # http://127.0.0.1:7860
    demo = build_demo("runs/.../step_00001500");  demo.launch()
"""
from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .generate import run_token_cache

INSTALL_HINT = "the demo needs Gradio: pip install 'arvision[demo]'"
FAMILIES = ("heptapod", "nepa_vit")
MAX_PER_CLASS = 16  # the page's slider; the functions take any count


@dataclass
class Generator:
    """What the sampling page needs: a Heptapod model, the tokenizer that decodes its tokens, the latent scale and the
    class names (the token cache's, else the indices)."""
    model: object
    tokenizer: object
    scale_factor: float = 1.0
    class_names: list = field(default_factory=list)


def import_gradio():
    """The gradio module, or one ImportError line saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing sent anywhere, also offline
    try:
        import gradio
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return gradio


def checkpoint_family(model) -> str:
    family = getattr(model, "family", None)
    if family not in FAMILIES:
        raise ValueError(f"arvision demo serves a Heptapod generator or a NEPA backbone; this checkpoint holds a "
                         f"{family} model")
    return family


def load_generator(checkpoint, token_cache=None, tokenizer=None, device: str = "cpu", ema: bool = False,
                   model=None) -> Generator:
    """A Heptapod checkpoint (``model``: the one already loaded from it) with its tokenizer: ``tokenizer`` (a path)
    when given, else the one kept in the token cache (``token_cache``, a path, else the run's, found as
    ``arvision sample`` finds it); class names from that cache."""
    from ..checkpoints import load_model, load_tokenizer
    from ..data.token_cache import TokenCache

    model = model if model is not None else load_model(checkpoint, family="heptapod", ema=ema)
    cache = TokenCache(token_cache) if token_cache else run_token_cache(checkpoint, required=tokenizer is None)
    if tokenizer:
        tok = load_tokenizer(tokenizer)
        scale = tok.scale_factor
    elif cache is not None:
        tok, scale = cache.load_tokenizer(), cache.scale_factor
    else:
        raise ValueError(f"no tokenizer found for {checkpoint}: pass --token-cache CACHE (the cache it was trained "
                         "on) or --tokenizer PATH")
    names = [str(n) for n in (cache.info.get("classes") if cache is not None else None) or []]
    if len(names) != model.config.num_classes:
        names = [str(i) for i in range(model.config.num_classes)]
    return Generator(model.to(device).eval(), tok.to(device).eval(), float(scale), names)


def class_choices(generator: Generator) -> list[tuple[str, int]]:
    """(label, class index) pairs for the class picker: the name, with the index in front where they differ."""
    return [(name if name == str(i) else f"{i}: {name}", i) for i, name in enumerate(generator.class_names)]


def sampling_config(model, temperature: float = 1.0, top_k: int = 0):
    """The page's temperature and top-k as a SamplingConfig: for codes the logit temperature and top-k; for
    continuous latents the diffusion sampler's temperature (top-k does not apply)."""
    from ..generate.sample import SamplingConfig

    if top_k < 0:
        raise ValueError(f"top-k must be 0 (off) or more, got {top_k}")
    if getattr(model.config, "token_type", "discrete") == "continuous":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return SamplingConfig(diffusion_temperature=float(temperature))
    return SamplingConfig(temperature=float(temperature), top_k=int(top_k))


def sample_grid(generator: Generator, classes: Sequence[int], num_per_class: int = 4, temperature: float = 1.0,
                top_k: int = 0, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """uint8 (H, W, 3): ``num_per_class`` samples of each class, one row per class in index order, named on the
    left (``class_grid``); the same arguments give the same grid (every sample's randomness comes from the seed and
    its index)."""
    from ..generate.outputs import class_grid, class_labels, generate_images

    classes = sorted({int(c) for c in classes})
    num_classes = generator.model.config.num_classes
    if not classes:
        raise ValueError("choose at least one class")
    if not all(0 <= c < num_classes for c in classes):
        raise ValueError(f"classes must be in 0..{num_classes - 1}, got {classes}")
    if int(num_per_class) < 1:
        raise ValueError(f"samples per class must be at least 1, got {num_per_class}")
    cfg = sampling_config(generator.model, temperature, top_k)
    labels = class_labels(classes, int(num_per_class), int(seed))
    images = generate_images(generator.model, generator.tokenizer, labels, cfg, batch_size=batch_size,
                             seed=int(seed), scale_factor=generator.scale_factor, progress=False)
    return class_grid(images, labels, per_row=int(num_per_class), labelled=True, class_names=generator.class_names)


def grid_file(canvas: np.ndarray, directory, classes: Sequence[int], num_per_class: int, temperature: float,
              top_k: int, seed: int) -> Path:
    """The grid as a PNG in ``directory``, named after the settings that drew it
    (``samples_c0-3-7_n4_t1_k0_seed0.png``), so grids of other settings never overwrite it."""
    from ..generate.outputs import save_image

    name = (f"samples_c{'-'.join(str(c) for c in sorted({int(c) for c in classes}))}_n{int(num_per_class)}"
            f"_t{float(temperature):g}_k{int(top_k)}_seed{int(seed)}.png")
    return save_image(canvas, Path(directory) / name)


@dataclass
class NepaMaps:
    """One image's maps for one query patch (G x G each) and the ``arvision visualize`` figure of them."""
    query: tuple
    attention: np.ndarray
    similarity: np.ndarray
    figure: Path


def nepa_maps(model, image_path, out_dir, query: Union[str, tuple] = "center", layers: str = "all",
              head_reduce: str = "mean") -> NepaMaps:
    """The attention of the query patch to every patch and the softmax similarity of its next-embedding prediction
    to every patch embedding, for the image at ``image_path`` (resized to the model's size), with the figure that
    ``arvision visualize`` draws (written to ``out_dir``)."""
    from ..eval.visualize import load_images, parse_queries, query_maps, save_query_grid

    if not image_path:
        raise ValueError("upload an image first")
    images = load_images([image_path], model.config.img_size)
    q = parse_queries(query, model.grid_size)[0]
    (attention,), (similarity,) = query_maps(model, images, [q], layers, head_reduce)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / f"maps_{Path(image_path).stem}_q{q[0]}-{q[1]}.png"
    save_query_grid(figure, images[0], [(q, attention[0], similarity[0])], model.config.patch_size)
    return NepaMaps(q, attention[0], similarity[0], figure)


def build_demo(checkpoint, token_cache=None, tokenizer=None, device: str = "cpu", ema: bool = False,
               workdir=None):
    """The gr.Blocks page for ``checkpoint`` (a Heptapod generator or a NEPA backbone). Files the page offers
    (grid PNGs, map figures) are written under ``workdir`` (a new temporary folder by default)."""
    from ..checkpoints import load_model

    gr = import_gradio()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="arvision-demo-"))
    model = load_model(checkpoint, ema=ema)
    if checkpoint_family(model) == "heptapod":
        generator = load_generator(checkpoint, token_cache, tokenizer, device, ema, model=model)
        return _generator_page(gr, generator, checkpoint, workdir)
    return _nepa_page(gr, model.to(device).eval(), checkpoint, workdir)


def _one_line(gr, error: Exception):
    from . import error_line
    return gr.Error(error_line(error))


def _generator_page(gr, generator: Generator, checkpoint, workdir: Path):
    from . import KNOWN_ERRORS

    choices = class_choices(generator)

    def on_sample(classes, num_per_class, temperature, top_k, seed):
        try:
            canvas = sample_grid(generator, classes or [], int(num_per_class), float(temperature), int(top_k),
                                 int(seed))
            path = grid_file(canvas, workdir, classes, int(num_per_class), float(temperature), int(top_k), int(seed))
        except KNOWN_ERRORS as e:
            raise _one_line(gr, e) from e
        return canvas, str(path)

    with gr.Blocks(title="arvision demo: Heptapod") as demo:
        cfg = generator.model.config
        gr.Markdown(f"## arvision · Heptapod generator\n`{checkpoint}` · {cfg.num_classes} classes, "
                    f"{cfg.grid_size}x{cfg.grid_size} {cfg.token_type} tokens")
        with gr.Row():
            with gr.Column(scale=1):
                classes = gr.CheckboxGroup(choices=choices, value=[i for _, i in choices], label="classes")
                num_per_class = gr.Slider(1, MAX_PER_CLASS, value=4, step=1, label="samples per class")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature")
                top_k = gr.Slider(0, max(getattr(cfg, "codebook_size", 0), 1), value=0, step=1,
                                  label="top-k (0: off)", visible=cfg.token_type == "discrete")
                seed = gr.Number(value=0, precision=0, label="seed")
                button = gr.Button("sample", variant="primary")
            with gr.Column(scale=2):
                grid = gr.Image(label="samples: one row per class", type="numpy", format="png", interactive=False,
                                image_mode="RGB")  # png: gradio's default webp would blur the samples
                download = gr.File(label="download the grid (PNG)")
        button.click(on_sample, [classes, num_per_class, temperature, top_k, seed], [grid, download])
    return demo


def _nepa_page(gr, model, checkpoint, workdir: Path):
    from . import KNOWN_ERRORS

    grid_size = model.grid_size

    def on_maps(image_path, row, col, layers, head_reduce):
        try:
            maps = nepa_maps(model, image_path, workdir, (int(row), int(col)), layers or "all", head_reduce)
        except KNOWN_ERRORS as e:
            raise _one_line(gr, e) from e
        return str(maps.figure)

    with gr.Blocks(title="arvision demo: NEPA") as demo:
        gr.Markdown(f"## arvision · NEPA backbone\n`{checkpoint}` · {model.config.img_size} px images, "
                    f"{grid_size}x{grid_size} patches. The query patch's attention (averaged over the chosen blocks) "
                    "and where its next-embedding prediction points among the patch embeddings.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="image", type="filepath")
                row = gr.Slider(0, grid_size - 1, value=grid_size // 2, step=1, label="query row")
                col = gr.Slider(0, grid_size - 1, value=grid_size // 2, step=1, label="query column")
                layers = gr.Textbox(value="all", label="blocks (all | last | middle | 0,5,-1 | -4:)")
                head_reduce = gr.Radio(["mean", "max"], value="mean", label="heads")
                button = gr.Button("show maps", variant="primary")
            with gr.Column(scale=2):
                figure = gr.Image(label="query · attention · next-embedding similarity", type="filepath",
                                  interactive=False, show_label=False)  # the figure titles its own panels
        button.click(on_maps, [image, row, col, layers, head_reduce], [figure])
    return demo


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def cmd_demo(args) -> None:
    import_gradio()  # before loading anything: a missing package is the first thing to say
    demo = build_demo(args.checkpoint, args.token_cache, args.tokenizer, args.device or "cpu", args.ema)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


def register(sub) -> None:
    def boolean(text):
        try:
            return parse_bool(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    p = sub.add_parser("demo", help="a Gradio page: sample a Heptapod generator, or see a NEPA backbone's maps "
                       "(pip install 'arvision[demo]')")
    p.add_argument("checkpoint", help="a Heptapod generator or NEPA checkpoint")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--share", type=boolean, nargs="?", const=True, default=False,
                   help="a public gradio.live link (needs a network); default false")
    p.add_argument("--token-cache", help="the generator's token cache (default: the run's): its tokenizer and "
                   "class names")
    p.add_argument("--tokenizer", help="the tokenizer to decode with (default: the token cache's)")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.set_defaults(func=cmd_demo)
