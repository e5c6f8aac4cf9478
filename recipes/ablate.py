"""Run every arm of an ablation and tabulate accuracy against cost.

    python -m recipes.ablate recipes/ablations/plug_and_play.yaml [--smoke | --profile cpu] [--out DIR] [--arms a,b]

An ablation YAML names a LightningCLI ``base`` config (relative to the YAML) and its ``arms``; each arm is that
config plus ``overrides`` (deep-merged: mappings merge, everything else replaces)::

    name: attention_type
    base: ../configs/synthetic_fastervit.yaml
    overrides: {model: {model: fastervit_mixer}}        # every arm
    smoke: {trainer: {max_epochs: 1, limit_train_batches: 2}}   # with --smoke, before the arm's own overrides
    benchmark: {batch_size: 64, warmup: 3, iters: 10}   # throughput measurement (smoke_benchmark with --smoke)
    arms:
      - name: swin
        overrides: {model: {model_kwargs: {mixer: swin}}}
      - name: swin_hat_warm
        warm_start: swin                      # start from the weights the `swin` arm ended with
        convert: {ct_size: 2, init: identity} # then hatplug.convert(model, **convert)
      - name: any_res
        eval_scales: [1.5, 2.0]               # also evaluate at 1.5x and 2x the training size: model rebuilt,
                                              # trained weights loaded, validation data drawn at that size

Besides the full form, an ablation may have reduced *profiles* (:data:`PROFILES`): ``smoke`` (tiny models
and data, seconds; what CI runs) and ``cpu`` (small models trained long enough to compare arms in a few minutes
on a laptop CPU; ``make demo`` runs the plug-and-play one). A profile ``P`` is the spec keys ``P`` (merged into
every arm) and ``P_benchmark``, and the arm key ``P_overrides``; ``--smoke`` is short for ``--profile smoke``.

Order of merging: base, ``overrides``, ``P`` (with ``--profile P``), the arm's ``overrides``, the arm's
``P_overrides`` (with ``--profile P``). Each arm's resolved config is written to ``DIR/arms/<arm>.yaml`` and run
exactly as ``python -m recipes fit --config DIR/arms/<arm>.yaml`` would; its logs, checkpoints, the
``config.yaml`` LightningCLI saved and the final weights (``model.pt``) go to ``DIR/runs/<arm>/``: the config's
loggers are kept, but ``trainer.default_root_dir`` and the ``save_dir`` of each logger that has one point there
(the arm's progress line names the settings replaced); with no logger configured, a CSV and a TensorBoard logger
write there, and ``logger: false`` is kept.

``DIR`` receives ``results.csv`` and ``results.md`` (one row per arm, plus ``<arm>@<size>`` rows for
``eval_scales``; columns :data:`recipes.report.COLUMNS`, with the ablation's name and profile in every row) and
``pareto.png`` (accuracy against inference throughput, one labelled point per row). Metrics are those of the
final weights on the whole validation split (whatever ``limit_val_batches`` limited during training);
parameters, GFLOPs (one image; a multiply-add counts 2 FLOPs, about twice the FLOPs papers report) and
throughput (images/s of inference and of a training step) are measured on this machine, on the device the arm
trained on. ``--arms`` into a folder with earlier results keeps the rows of the other arms of the same ablation
and profile, unless they warm-started from an arm that runs again (a log line says what was dropped and why).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jsonargparse
import lightning.pytorch as pl
import torch
import yaml

from .cli import check_config
from .cli import main as cli_main
from .measure import count_params, gflops, throughput
from .module import ImageClassifier
from .report import markdown_table, plot_pareto, read_csv, write_csv, write_markdown

__all__ = [
    "ABLATIONS",
    "PROFILES",
    "AblationResult",
    "Arm",
    "deep_merge",
    "default_out",
    "load_ablation",
    "main",
    "run_ablation",
]

ABLATIONS = Path(__file__).parent / "ablations"
"""The ablation YAMLs shipped with the recipes."""
PROFILES = ("smoke", "cpu")
"""Reduced forms an ablation YAML may define (see the module docstring)."""
DEFAULT_BENCHMARK = {"batch_size": 64, "warmup": 3, "iters": 10}
_SPEC_KEYS = {"name", "description", "base", "overrides", "benchmark", "arms"}
_SPEC_KEYS |= {key for p in PROFILES for key in (p, f"{p}_benchmark")}
_ARM_KEYS = {"name", "overrides", "convert", "warm_start", "eval_scales"} | {f"{p}_overrides" for p in PROFILES}


def deep_merge(base: dict, override: dict | None) -> dict:
    """A copy of ``base`` with ``override`` merged in: mappings merge recursively, other values replace.

    >>> deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2], "d": 3}})
    {'a': {'b': 1, 'c': [2], 'd': 3}}
    """
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class AblationResult:
    """What :func:`run_ablation` wrote: the result rows, the plotted ``(label, x, y)`` points, and the folder.

    ``rows`` are the rows of ``out/results.csv`` (numbers as numbers), ``points`` those of ``out/pareto.png``:

    >>> result = AblationResult(
    ...     rows=[dict(arm="swin", top1=0.5, infer_imgs_per_sec=120.0),
    ...           dict(arm="hat", top1=0.75, infer_imgs_per_sec=90.0)],
    ...     points=[("swin", 120.0, 0.5), ("hat", 90.0, 0.75)],
    ...     out=Path("runs/ablations/attention_type-smoke"),
    ... )
    >>> max(result.rows, key=lambda row: row["top1"])["arm"], (result.out / "results.csv").as_posix()
    ('hat', 'runs/ablations/attention_type-smoke/results.csv')
    """

    rows: list[dict]
    points: list[tuple[str, float, float]]
    out: Path


@dataclass
class Arm:
    """One resolved arm: its LightningCLI ``fit`` config and what the runner does around it.

    :func:`load_ablation` gives them, one per arm of the YAML (nothing is run or written):

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> spec, arms = load_ablation("plug_and_play", smoke=True, out=out)
    >>> arm = arms[2]
    >>> arm.name, arm.warm_start, arm.config["model"]["convert"], arm.eval_scales
    ('swin_hat_warm', 'swin', {'ct_size': 2, 'init': 'identity'}, [])
    >>> Path(arm.config["trainer"]["default_root_dir"]).relative_to(out).as_posix()
    'runs/swin_hat_warm'
    >>> arm.redirected[0]  # the base config's own output folder, replaced by the one above
    ('trainer.default_root_dir', 'runs/synthetic_timm')
    """

    name: str
    config: dict
    warm_start: str | None = None
    eval_scales: list[float] = field(default_factory=list)
    redirected: list[tuple[str, str]] = field(default_factory=list)
    """``(setting, its value)`` of the config's output folders that the runner pointed at ``DIR/runs/<arm>``
    instead (said when the arm runs)."""


def _run_dir(out: Path, arm: str) -> Path:
    return out / "runs" / arm


def _ablation_path(path: str | Path) -> Path:
    """``path`` itself, or for a bare name such as ``attention_type`` the YAML shipped in :data:`ABLATIONS`."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = ABLATIONS / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    available = sorted(p.stem for p in ABLATIONS.glob("*.yaml"))
    raise FileNotFoundError(f"no ablation YAML at {path}; give a path or one of the shipped ablations {available}")


def _check_spec(path: Path, spec: object) -> None:
    """The shape of an ablation YAML, checked before anything is merged (see the module docstring)."""

    def fail(problem: str) -> None:
        raise ValueError(f"{path}: {problem} (see python -m recipes.ablate --help and recipes/ablations/*.yaml)")

    if not isinstance(spec, dict):
        fail(f"an ablation is a mapping with keys {sorted(_SPEC_KEYS)}, got {type(spec).__name__}")
    for key in ("name", "base", "arms"):
        if key not in spec:
            fail(f"missing the required key {key!r}")
    if not isinstance(spec["name"], str) or not isinstance(spec["base"], str):
        fail("'name' and 'base' must be strings")
    if not (path.parent / spec["base"]).is_file():
        fail(f"base config {spec['base']!r} not found (looked for {path.parent / spec['base']})")
    for key in ("overrides", *PROFILES):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            fail(f"{key!r} must be a mapping of config overrides, got {spec[key]!r}")
    if not isinstance(spec["arms"], list) or not spec["arms"]:
        fail("'arms' must be a non-empty list of arms, each a mapping with a 'name'")
    for i, arm in enumerate(spec["arms"]):
        if not isinstance(arm, dict) or not isinstance(arm.get("name"), str):
            fail(f"arm {i} must be a mapping with a string 'name', got {arm!r}")
        for key in ("overrides", "convert", *(f"{p}_overrides" for p in PROFILES)):
            if arm.get(key) is not None and not isinstance(arm[key], dict):
                fail(f"arm {arm['name']!r}: {key!r} must be a mapping, got {arm[key]!r}")
        scales = arm.get("eval_scales", [])
        if not isinstance(scales, list) or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) for f in scales
        ):
            fail(f"arm {arm['name']!r}: 'eval_scales' must be a list of numbers, got {scales!r}")


def _profile(smoke: bool, profile: str | None) -> str | None:
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {list(PROFILES)} (or none for the full form)")
    if smoke and profile not in (None, "smoke"):
        raise ValueError(f"smoke=True is short for profile='smoke'; it cannot be combined with profile={profile!r}")
    return "smoke" if smoke else profile


def default_out(spec: dict, profile: str | None = None) -> Path:
    """Where an ablation's results go unless told: ``runs/ablations/<name>[-<profile>]``.

    >>> default_out({"name": "attention_type"}).as_posix()
    'runs/ablations/attention_type'
    >>> default_out({"name": "attention_type"}, profile="smoke").as_posix()
    'runs/ablations/attention_type-smoke'
    """
    return Path("runs") / "ablations" / (spec["name"] + (f"-{profile}" if profile else ""))


def load_ablation(
    path: str | Path, smoke: bool = False, out: str | Path | None = None, profile: str | None = None
) -> tuple[dict, list[Arm]]:
    """Read an ablation YAML and resolve every arm's config (see the module docstring).

    ``profile`` picks a reduced form (:data:`PROFILES`); ``smoke=True`` is short for ``profile="smoke"``. A
    profile the YAML does not define is an error, not a silent full-size run. Arms' runs go under ``out``,
    by default :func:`default_out` of the ablation.

    >>> spec, arms = load_ablation(ABLATIONS / "attention_type.yaml", smoke=True)
    >>> [a.name for a in arms]
    ['window_only', 'swin', 'twins', 'edgevit', 'hat']
    >>> arms[1].config["model"]["model_kwargs"]["mixer"]
    'swin'
    """
    path, profile = _ablation_path(path), _profile(smoke, profile)
    spec = _load_yaml(path)
    _check_spec(path, spec)
    out = Path(out) if out is not None else default_out(spec, profile)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {out} is a file: pass a folder for --out (it is made if missing)")
    unknown = {k for k in spec if not k.startswith("x-")} - _SPEC_KEYS  # x-*: free keys, e.g. for YAML anchors
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(_SPEC_KEYS)} (or x-*)")
    if profile is not None and profile not in spec:
        defined = [p for p in PROFILES if p in spec]
        raise ValueError(f"{path} has no {profile!r} profile (it defines {defined}); add a {profile!r} key or pick one")
    for key in ("benchmark", *(f"{p}_benchmark" for p in PROFILES)):
        _check_benchmark(path, key, spec.get(key))
    base = _load_yaml(path.parent / spec["base"])
    common = deep_merge(base, spec.get("overrides"))
    if profile is not None:
        common = deep_merge(common, spec[profile])
    names = [a["name"] for a in spec["arms"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: arm names must be unique, got {names}")
    arms = []
    for entry in spec["arms"]:
        unknown = set(entry) - _ARM_KEYS
        if unknown:
            raise ValueError(f"{path}: arm {entry['name']!r} has unknown keys {sorted(unknown)}")
        if any(f <= 0 for f in entry.get("eval_scales", [])):
            raise ValueError(f"{path}: arm {entry['name']!r} has a non-positive eval scale")
        config = deep_merge(common, entry.get("overrides"))
        if profile is not None:
            config = deep_merge(config, entry.get(f"{profile}_overrides"))
        run_dir = _run_dir(out, entry["name"])
        trainer = config.setdefault("trainer", {})
        redirected = []
        root = trainer.get("default_root_dir")
        if root is not None and Path(root) != run_dir:
            redirected.append(("trainer.default_root_dir", str(root)))
        trainer["default_root_dir"] = str(run_dir)
        trainer["logger"], moved = _arm_loggers(trainer.get("logger"), run_dir)
        redirected += moved
        callbacks = trainer.get("callbacks")
        # LightningCLI takes one callback as a mapping, and null for none
        callbacks = trainer["callbacks"] = (
            [] if callbacks is None else [callbacks] if isinstance(callbacks, dict) else list(callbacks)
        )
        redirected += _arm_checkpoint_dirs(callbacks, run_dir)
        if trainer["logger"] is False:
            _check_no_logger_callbacks(path, entry["name"], callbacks)
        has_bar = any("ProgressBar" in str(c.get("class_path", "")) for c in callbacks if isinstance(c, dict))
        if trainer.get("enable_progress_bar", True) and not has_bar:  # the bar says which arm and epoch is running
            label = f"{spec['name']}: {entry['name']}"
            callbacks.append({"class_path": "recipes.callbacks.LabelledProgressBar", "init_args": {"label": label}})
        model = config.setdefault("model", {})
        if "convert" in entry:  # null: no conversion, also where the base config has one
            model["convert"] = None if entry["convert"] is None else dict(entry["convert"])
        warm = entry.get("warm_start")
        if warm is not None:
            if warm not in names or names.index(warm) >= names.index(entry["name"]):
                raise ValueError(f"{path}: arm {entry['name']!r} warm-starts from {warm!r}; it must be an earlier arm")
            model["init_checkpoint"] = str(_run_dir(out, warm) / "model.pt")
        arms.append(Arm(entry["name"], config, warm, [float(f) for f in entry.get("eval_scales", [])], redirected))
    return spec, arms


def _load_yaml(path: Path) -> object:
    """A YAML file read as the recipes CLI reads its configs (jsonargparse's loader: ``1e-3`` is a float, a date
    stays a string), so that a spec means the same here and on the command line."""
    return jsonargparse.get_loader("yaml")(path.read_text())


def _arm_checkpoint_dirs(callbacks: list, run_dir: Path) -> list[tuple[str, str]]:
    """Point each ``ModelCheckpoint`` callback that names its own ``dirpath`` into ``run_dir`` (a relative path under
    it, an absolute one to ``run_dir/checkpoints``), in place, so that arms do not write their checkpoints into one
    folder (Lightning then numbers them ``last-v1.ckpt`` ...); returns the settings replaced. Without a ``dirpath``
    Lightning puts them under the arm's logger folder already."""
    moved = []
    for i, callback in enumerate(callbacks):
        if not isinstance(callback, dict) or not str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            continue
        args = callback.get("init_args") or {}
        dirpath = args.get("dirpath")
        if dirpath is None:
            continue
        new = run_dir / ("checkpoints" if Path(dirpath).is_absolute() else dirpath)
        if Path(dirpath) != new:
            callbacks[i] = {**callback, "init_args": {**args, "dirpath": str(new)}}  # a copy: arms share the base
            moved.append((f"trainer.callbacks[{i}].init_args.dirpath", str(dirpath)))
    return moved


def _arm_loggers(logger: object, run_dir: Path) -> tuple[object, list[tuple[str, str]]]:
    """An arm's ``trainer.logger`` and the ``save_dir`` settings it replaced: the config's loggers are kept
    (``logger: false`` / ``true`` too), each that takes a ``save_dir`` writes into ``run_dir``, so that arms do
    not write into one folder; with no logger configured, a CSV and a TensorBoard logger in ``run_dir``."""
    if logger is None:
        return [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": ""}},
            {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir), "name": "tb"},
            },
        ], []
    if isinstance(logger, bool):
        return logger, []
    entries, replaced = [], []
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
            init_args = dict(entry.get("init_args") or {})
            if "save_dir" in init_args or _takes_save_dir(entry["class_path"]):
                previous = init_args.get("save_dir")
                if previous is not None and Path(str(previous)) != run_dir:
                    replaced.append((f"{entry['class_path'].rpartition('.')[2]}.save_dir", str(previous)))
                entry = {**entry, "init_args": {**init_args, "save_dir": str(run_dir)}}
        entries.append(entry)
    return (entries if isinstance(logger, list) else entries[0]), replaced


_LOGGER_CALLBACKS = ("LearningRateMonitor", "DeviceStatsMonitor")
"""Lightning callbacks that refuse a trainer without a logger."""


def _check_no_logger_callbacks(path: Path, arm: str, callbacks: list) -> None:
    """``ValueError`` for an arm with ``logger: false`` whose callbacks need a logger (Lightning would refuse it
    only when that arm starts training, after the arms before it)."""
    needy = [
        name
        for name in (str(c.get("class_path", "")).rpartition(".")[2] for c in callbacks if isinstance(c, dict))
        if name in _LOGGER_CALLBACKS
    ]
    if needy:
        raise ValueError(
            f"{path}: arm {arm!r} sets trainer.logger: false, but its callbacks {needy} need a logger; give the arm "
            "trainer.callbacks without them in its overrides (a list replaces the base config's), or keep a logger"
        )


def _takes_save_dir(class_path: str) -> bool:
    """Whether the logger class at ``class_path`` (or a bare name from ``lightning.pytorch.loggers``) has a
    ``save_dir`` argument; False for a class that cannot be imported (the config check names it)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "lightning.pytorch.loggers"), name)
        return "save_dir" in inspect.signature(cls).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def _amp_dtype(trainer: pl.Trainer) -> torch.dtype | None:
    precision = str(trainer.precision)
    if "mixed" not in precision:
        return None
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16


def _measure(model: torch.nn.Module, size: int, bench: dict, trainer: pl.Trainer) -> dict:
    device = trainer.strategy.root_device
    amp = _amp_dtype(trainer)
    kwargs = dict(batch_size=bench["batch_size"], warmup=bench["warmup"], iters=bench["iters"], device=device)
    return {
        "params": count_params(model),
        "gflops": gflops(model, size, device=device),
        "train_imgs_per_sec": throughput(model, size, train=True, amp_dtype=amp, **kwargs),
        "infer_imgs_per_sec": throughput(model, size, train=False, amp_dtype=amp, **kwargs),
    }


def _metrics(results: list[dict]) -> dict:
    metrics = results[0] if results else {}
    return {"top1": metrics.get("val/top1"), "top5": metrics.get("val/top5"), "loss": metrics.get("val/loss")}


def _build(
    arm: Arm, size: int | None = None, init_checkpoint: str | Path | None = None
) -> tuple[pl.LightningDataModule, ImageClassifier]:
    """The arm's data module and model (at ``size`` x ``size`` if given), the model initialised from
    ``init_checkpoint`` (None: its own init; the arm's configured ``init_checkpoint`` is replaced by this one)."""
    model_cfg = copy.deepcopy(arm.config["model"])
    data_cfg = arm.config["data"]
    data_args = dict(data_cfg.get("init_args", {}))
    if size is not None:
        model_kwargs = dict(model_cfg.get("model_kwargs") or {})
        model_kwargs.pop("resolution", None)  # FasterViT's own name for img_size
        model_cfg["model_kwargs"] = {**model_kwargs, "img_size": size}
        data_args["image_size"] = size
    model_cfg["init_checkpoint"] = init_checkpoint  # the caller's choice: a warm start, trained weights or none
    module_name, _, cls_name = data_cfg["class_path"].rpartition(".")
    data_cls = getattr(importlib.import_module(module_name), cls_name)
    datamodule = data_cls(**data_args)
    return datamodule, ImageClassifier(**{**model_cfg, "num_classes": datamodule.num_classes})


def check_arms(arms: Sequence[Arm]) -> None:
    """Check every arm before any arm trains, so that a mistake in the last arm fails in seconds, not after the
    first arms have run: its config is parsed as ``python -m recipes fit`` would (a misspelt trainer option or
    top-level key), its data module and model are built, and for each ``eval_scales`` size the model is built
    at that size and must take the weights of the model built at the training size. An arm's
    ``init_checkpoint`` must exist and fit its model, and a warm start must fit: the arm's model must take the
    weights of the model its source arm builds."""
    built: dict[str, dict] = {}  # each arm's freshly built weights, what a later arm's warm start will load
    for arm in arms:
        with tempfile.TemporaryDirectory() as tmp:
            config = copy.deepcopy(arm.config)
            config.setdefault("model", {})["init_checkpoint"] = None  # a warm start's file does not exist yet
            path = Path(tmp) / f"{arm.name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            try:
                check_config(path)
            except ValueError as error:
                message = str(error).split(": ", 1)[-1]
                raise ValueError(f"arm {arm.name!r}: {message}; fix its options in the ablation YAML") from None
        with tempfile.TemporaryDirectory() as tmp:
            init = arm.config.get("model", {}).get("init_checkpoint")
            if arm.warm_start in built:  # the source arm's model.pt will hold weights shaped as these
                init = Path(tmp) / "model.pt"
                torch.save(built[arm.warm_start], init)
            try:
                datamodule, module = _build(arm, init_checkpoint=init)
            except Exception as error:
                cause = f"warm start from arm {arm.warm_start!r}: " if arm.warm_start is not None else ""
                raise ValueError(f"arm {arm.name!r} cannot be built ({cause}{type(error).__name__}: {error}); fix "
                                 "its options in the ablation YAML") from error  # fmt: skip
        trained = built[arm.name] = module.model.state_dict()
        for scale in arm.eval_scales:
            size = round(datamodule.image_size * scale)
            try:
                _build(arm, size)[1].model.load_state_dict(trained, strict=True)
            except Exception as error:
                detail = " ".join(str(error).split())[:300]
                raise ValueError(
                    f"arm {arm.name!r}: eval scale {scale} ({size} px) cannot be evaluated: the model built for "
                    f"{size} px does not take the weights of the one trained at {datamodule.image_size} px "
                    f"({type(error).__name__}: {detail}). Drop that scale, or pick one where the architecture "
                    "stays the same (with FasterViT: no stage gains or loses carrier tokens)"
                ) from error


def _validate(arm: Arm, module: ImageClassifier, datamodule: pl.LightningDataModule) -> tuple[dict, pl.Trainer]:
    """The metrics of ``module`` on the whole validation split, and the trainer that computed them: a trainer of
    its own on one device, so that the training-time ``limit_val_batches`` (a few batches, or 0 to skip
    validation while training) does not decide which images the result rows are measured on."""
    trainer_cfg = arm.config["trainer"]
    trainer = pl.Trainer(
        accelerator=trainer_cfg.get("accelerator", "auto"),
        devices=1,
        precision=trainer_cfg.get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=trainer_cfg.get("enable_progress_bar", True),
        limit_val_batches=1.0,
        default_root_dir=trainer_cfg["default_root_dir"],
    )
    return _metrics(trainer.validate(module, datamodule=datamodule, verbose=False)), trainer


def _evaluate_at(arm: Arm, cli, size: int, bench: dict) -> dict:
    """Rebuild the arm's model for ``size`` x ``size`` inputs, load the trained weights, validate and measure."""
    start = time.perf_counter()
    datamodule, module = _build(arm, size)
    module.model.load_state_dict(cli.model.model.state_dict(), strict=True)
    metrics, trainer = _validate(arm, module, datamodule)
    row = {"arm": f"{arm.name}@{size}", **metrics}
    row.update(_measure(module.model, size, bench, trainer))
    row["wall_time_s"] = time.perf_counter() - start
    row["resolution"] = size
    return row


def run_arm(arm: Arm, out: Path, bench: dict) -> list[dict]:
    """Train and validate one arm with the recipes CLI, measure it, and return its result rows."""
    return list(_arm_rows(arm, out, bench))


def _arm_rows(arm: Arm, out: Path, bench: dict) -> Iterator[dict]:
    """:func:`run_arm`'s rows, each as soon as it is measured (so that a trained arm's row is kept even if
    one of its eval scales then fails)."""
    start = time.perf_counter()
    config_path = out / "arms" / f"{arm.name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(arm.config, sort_keys=False))
    with warnings.catch_warnings():  # args are passed on purpose: the runner's own argv is not LightningCLI's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = cli_main(["fit", "--config", str(config_path)])
    metrics = _validate(arm, cli.model, cli.datamodule)[0]
    _run_dir(out, arm.name).mkdir(parents=True, exist_ok=True)  # with `logger: false` nothing may have made it
    torch.save(cli.model.model.state_dict(), _run_dir(out, arm.name) / "model.pt")
    size = cli.datamodule.image_size
    row = {"arm": arm.name, **metrics, **_measure(cli.model.model, size, bench, cli.trainer)}
    row["wall_time_s"] = time.perf_counter() - start
    row["resolution"] = size
    yield row
    for f in arm.eval_scales:
        yield _evaluate_at(arm, cli, round(size * f), bench)


def _select(
    path: str | Path, out: str | Path | None, arms: Sequence[str] | None, profile: str | None
) -> tuple[dict, list[Arm], list[Arm]]:
    """The ablation's spec, all its arms (in the YAML's order), and the arms to run: those in ``arms`` (all if
    None) and the arms they warm-start from. ``ValueError`` for an arm the YAML does not have."""
    spec, every = load_ablation(path, out=out, profile=profile)
    resolved = every
    if arms is not None:
        names = [a.name for a in every]
        missing = set(arms) - set(names)
        if missing:
            raise ValueError(f"{path}: no arms named {sorted(missing)}; it has {names}")
        needed = set(arms) | {a.warm_start for a in every if a.name in arms and a.warm_start}
        resolved = [a for a in every if a.name in needed]
    return spec, every, resolved


def _check_benchmark(path: Path, key: str, settings) -> None:
    """A named error for a throughput setting that would be ignored (an unknown key: the default was measured
    instead) or give a rate of 0 or nothing (``iters`` or ``batch_size`` below 1, a negative ``warmup``)."""
    if settings is None:
        return
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: {key} must be a mapping with keys {sorted(DEFAULT_BENCHMARK)}, got {settings!r}")
    unknown = set(settings) - set(DEFAULT_BENCHMARK)
    if unknown:
        raise ValueError(f"{path}: {key} has unknown keys {sorted(unknown)}; expected {sorted(DEFAULT_BENCHMARK)}")
    for name, value in settings.items():
        least = 0 if name == "warmup" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{path}: {key}.{name} must be an integer >= {least}, got {value!r}")


def run_ablation(
    path: str | Path,
    smoke: bool = False,
    out: str | Path | None = None,
    arms: Sequence[str] | None = None,
    profile: str | None = None,
    check: bool = True,
) -> AblationResult:
    """Run the arms of the ablation at ``path`` (all, or those named in ``arms``) and write the results.

    ``profile`` / ``smoke`` pick a reduced form as in :func:`load_ablation`. Every arm is checked first
    (:func:`check_arms`; ``check=False`` skips that, for a caller that has just done it). Results are rewritten
    after every row, so an interrupted ablation keeps what finished.

    Example (about 20 s on one CPU core)::

        result = run_ablation("recipes/ablations/attention_type.yaml", smoke=True, out="/tmp/attention")
        [row["arm"] for row in result.rows]  # ['window_only', 'swin', 'twins', 'edgevit', 'hat']

    Arm names are checked before anything is trained or written:

    >>> run_ablation("attention_type", smoke=True, arms=["hta"])
    Traceback (most recent call last):
    ...
    ValueError: attention_type: no arms named ['hta']; it has ['window_only', 'swin', 'twins', 'edgevit', 'hat']
    """
    profile = _profile(smoke, profile)
    spec, every, resolved = _select(path, out, arms, profile)
    order = {a.name: i for i, a in enumerate(every)}  # rows are tabulated in the YAML's arm order
    form = profile or "full"
    out = Path(out) if out is not None else default_out(spec, profile)
    bench = {**DEFAULT_BENCHMARK, **(spec.get(f"{profile}_benchmark" if profile else "benchmark") or {})}
    title = spec["name"] + (f" ({profile})" if profile else "")
    if check:
        check_arms(resolved)
    rows: list[dict] = []
    points: list[tuple[str, float, float]] = []
    out.mkdir(parents=True, exist_ok=True)
    if arms is not None:  # --arms: the other arms' rows of an earlier run of this ablation and form stay
        kept, dropped = _kept_rows(out / "results.csv", spec["name"], form, every, {a.name for a in resolved})
        if kept:
            names = sorted({_arm_of(r) for r in kept})
            print(f"[ablate] {title}: keeping the results of {names} from {out / 'results.csv'}", flush=True)
        if dropped:
            reasons = "; ".join(f"{labels} ({why})" for why, labels in dropped.items())
            print(f"[ablate] {title}: not keeping these rows of {out / 'results.csv'}: {reasons}", flush=True)
        rows += kept
    for i, arm in enumerate(resolved, 1):
        print(f"[ablate] {title}: arm {i}/{len(resolved)}: {arm.name}{_redirect_note(arm, out)}", flush=True)
        for row in _arm_rows(arm, out, bench):
            rows.append({**row, "ablation": spec["name"], "profile": form})
            rows.sort(key=lambda r: order.get(_arm_of(r), len(order)))
            write_csv(rows, out / "results.csv")
            write_markdown(rows, out / "results.md", title=title, notes=spec.get("description", ""))
            points = plot_pareto(rows, out / "pareto.png", title=title)
    print(f"[ablate] {title}: results in {out}", flush=True)
    return AblationResult(rows, points, out)


def _redirect_note(arm: Arm, out: Path) -> str:
    """`` (outputs in DIR/runs/<arm>, replacing <value> of <settings>)`` when the arm's config named other
    output folders, else empty."""
    if not arm.redirected:
        return ""
    settings: dict[str, list[str]] = {}
    for setting, value in arm.redirected:
        settings.setdefault(value, []).append(setting)
    replaced = "; ".join(f"{value} of {', '.join(names)}" for value, names in settings.items())
    return f" (outputs in {_run_dir(out, arm.name)}, replacing {replaced})"


def _arm_of(row: dict) -> str:
    return str(row["arm"]).split("@")[0]  # "<arm>@<size>" rows belong to <arm>


def _number(text: str) -> int | float | str:
    """A CSV cell as written by :func:`write_csv`: ints stay ints (parameter counts), other numbers floats."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


_TEXT_COLUMNS = {"arm", "ablation", "profile"}
"""Columns of ``results.csv`` read back as text; every other column holds numbers."""


def _earlier_rows(path: Path, rerun: set[str]) -> list[dict]:
    """Rows of ``results.csv`` from an earlier run into the same folder, for arms not run again now (numbers
    as numbers again), so that ``--arms`` adds to the results instead of replacing them."""
    if not path.is_file():
        return []
    rows = []
    for row in read_csv(path):
        if _arm_of(row) in rerun:
            continue
        parsed = {}
        for key, value in row.items():
            parsed[key] = value if key in _TEXT_COLUMNS else _number(value)
        rows.append(parsed)
    return rows


def _kept_rows(
    path: Path, ablation: str, form: str, arms: Sequence[Arm], rerun: set[str]
) -> tuple[list[dict], dict[str, list[str]]]:
    """The rows of an earlier ``results.csv`` that ``--arms`` keeps, and the others by why they were dropped.

    Kept: rows of the same ablation and form (the ``profile`` column: ``smoke``, ``cpu``, or ``full`` for the
    full form), of an arm the YAML still has (an ``<arm>@<size>`` row: a size its ``eval_scales`` still give),
    not run again now, and not warm-started (directly or through other arms) from an arm that runs again, whose
    weights are about to change."""
    by_name = {a.name: a for a in arms}
    stale: dict[str, str] = {}  # arm -> the re-run arm its warm start goes back to
    for arm in arms:  # the YAML's order: a warm-start source comes before the arms that start from it
        source = arm.warm_start
        if source is not None and arm.name not in rerun and (source in rerun or source in stale):
            stale[arm.name] = stale.get(source, source)
    kept, dropped = [], {}
    for row in _earlier_rows(path, rerun):
        arm, label = _arm_of(row), str(row["arm"])
        if not row.get("ablation") or not row.get("profile"):
            why = "no ablation / profile recorded: written by an older runner; run them again to keep them"
        elif row["ablation"] != ablation:
            why = f"results of the ablation {row['ablation']!r}, not {ablation!r}"
        elif row["profile"] != form:
            why = f"results of the {row['profile']!r} form, not {form!r}"
        elif arm not in by_name:
            why = f"arms that {ablation!r} no longer has"
        elif label != arm and not _size_in_yaml(by_name[arm], label):
            why = "eval sizes that the arm's eval_scales no longer give"
        elif arm in stale:
            why = f"warm-started from {stale[arm]!r}, which runs again: add them to --arms to run them again too"
        else:
            kept.append(row)
            continue
        dropped.setdefault(why, []).append(label)
    return kept, dropped


def _size_in_yaml(arm: Arm, label: str) -> bool:
    """Whether ``<arm>@<size>`` is a row the arm's ``eval_scales`` give (True if its training size is not in
    the YAML, as then it is only known once its data module is built)."""
    size = (arm.config.get("data") or {}).get("init_args", {}).get("image_size")
    if not isinstance(size, int):
        return True
    return label.split("@", 1)[1] in {str(round(size * f)) for f in arm.eval_scales}


def main(argv: Sequence[str] | None = None) -> AblationResult:
    """``python -m recipes.ablate``: check every arm, run the ablation, print the results table, and return
    the :class:`AblationResult` (``argv`` as on the command line; ``None`` reads ``sys.argv``). A bad YAML,
    path, profile or arm name ends the program with one line and exit status 2, before anything trains.

    Example (shell; the first takes about 20 s on one CPU core; ``--arms`` adds rows to an earlier run's results)::

        python -m recipes.ablate recipes/ablations/attention_type.yaml --smoke --out runs/x
        python -m recipes.ablate attention_type --smoke --out runs/x --arms swin,hat
        python -m recipes.ablate plug_and_play --profile cpu
        python -m recipes.ablate --help
    """
    parser = argparse.ArgumentParser(
        prog="python -m recipes.ablate", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )  # a misspelt option is an error, not a guess (--smok ran the smoke form)
    parser.add_argument(
        "ablation", help="an ablation YAML, e.g. recipes/ablations/attention_type.yaml, or a shipped one's name"
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--smoke", action="store_true", help="tiny models and data, for CI (= --profile smoke)")
    form.add_argument("--profile", choices=PROFILES, default=None, help="a reduced form defined in the YAML")
    parser.add_argument("--out", default=None, help="output folder (default runs/ablations/<name>[-<profile>])")
    parser.add_argument("--arms", default=None, help="comma-separated subset of arms (warm-start sources are added)")
    args = parser.parse_args(argv)
    arms = None if args.arms is None else [a for a in args.arms.split(",") if a]
    if arms == []:
        parser.error("--arms is empty; name at least one arm, or leave --arms out to run them all")
    try:  # a bad YAML, path, profile, arm name or arm option: one line and exit status 2, as for a bad option
        check_arms(_select(args.ablation, args.out, arms, _profile(args.smoke, args.profile))[2])
    except (ValueError, FileNotFoundError, yaml.YAMLError) as error:
        parser.error(str(error))
    result = run_ablation(args.ablation, smoke=args.smoke, out=args.out, arms=arms, profile=args.profile, check=False)
    print(markdown_table(result.rows), flush=True)
    return result


if __name__ == "__main__":
    main()
