"""``python -m recipes fit --config recipes/configs/<run>.yaml``: every experiment is a LightningCLI YAML.

The data module is chosen in the YAML (``data: class_path: recipes.data.SyntheticDataModule``) and gives the
model its number of classes. Runs log to CSV and TensorBoard unless the YAML names other loggers; the YAML that
ran is saved next to the logs as ``config.yaml`` (LightningCLI's ``SaveConfigCallback``), so
``python -m recipes fit --config <log dir>/config.yaml`` repeats a run and ``--ckpt_path <ckpt>`` resumes it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from .callbacks import PredictionWriter, RNGStateCheckpoint
from .module import ImageClassifier, weights_from_checkpoint

__all__ = ["DEFAULT_LOGGERS", "RecipeCLI", "check_config", "main"]

DEFAULT_LOGGERS = [
    {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "recipes"}},
    {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "recipes"}},
]


class RecipeCLI(LightningCLI):
    """LightningCLI with the data module's ``num_classes`` linked into the model.

    :func:`main` builds it with the recipes' defaults (seed, loggers, callbacks). A ``model.num_classes``
    that disagrees with the data module is an error, not silently replaced:

    >>> config = {
    ...     "data": {"class_path": "recipes.data.SyntheticDataModule",
    ...              "init_args": {"image_size": 32, "train_samples": 8, "val_samples": 4, "batch_size": 4}},
    ...     "model": {"model": "window_probe", "model_kwargs": {"img_size": 32, "dim": 8, "depth": 1},
    ...               "num_classes": 5},
    ...     "trainer": {"logger": False, "enable_progress_bar": False, "accelerator": "cpu"},
    ... }
    >>> main(config, run=False)
    Traceback (most recent call last):
    ...
    ValueError: model.num_classes is 5 in the config, but the data module has 2 classes (its num_classes is ...

    Example (on the command line, where it is normally used)::

        python -m recipes fit --config recipes/configs/synthetic_fastervit.yaml --trainer.max_epochs 5
        python -m recipes test --config runs/synthetic_fastervit/version_0/config.yaml \\
            --ckpt_path runs/synthetic_fastervit/version_0/checkpoints/last.ckpt
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """LightningCLI's, with ``--model.num_classes N`` taken off the command line first: the link makes
        jsonargparse answer it with "int | None is not callable" (it tries the link's type hint as a converter).
        Taken off, it is checked against the data module like a ``model.num_classes`` in a config file."""
        self._command_line_num_classes = None
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        argv = sys.argv[1:] if args is None else list(args)
        remaining, value = _pop_option(argv, "--model.num_classes")
        root = None
        if not any(a == "--print_config" or a.startswith("--print_config=") for a in argv):
            # --print_config prints during the parse: there the option is left to jsonargparse (printed as given)
            remaining, root = _pop_option(remaining, "--trainer.default_root_dir")
            if root is not None and not root.strip():
                parser.error("--trainer.default_root_dir needs a folder (or null for the working directory)")
        if remaining == argv:
            return super().parse_arguments(parser, args)
        if value is not None and value.strip().lower() not in ("null", "none"):
            try:
                self._command_line_num_classes = int(value)
            except ValueError:
                parser.error(f"--model.num_classes must be an integer, got {value!r} (or leave it out: the data "
                             "module's num_classes is linked into the model)")  # fmt: skip
        if args is None:  # as LightningCLI would parse sys.argv, without its warning about args and argv
            self.config = parser.parse_args(remaining)
        else:
            super().parse_arguments(parser, remaining)
        if root is not None:
            _move_run(self.config, root)

    def before_instantiate_classes(self) -> None:
        """With ``--ckpt_path <file>`` every weight comes from that checkpoint, so the model's warm-start file
        (``model.init_checkpoint``) is not read: it need not exist any more when a run is resumed, tested or
        used to predict. The config that is saved, and the model's hyper-parameters, keep its path."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        # only a checkpoint that is there: "last" / "best" / a missing file can leave Lightning starting from
        # scratch (it warns and trains when no last checkpoint exists yet), and then the warm start must happen
        self._weights_from_checkpoint = bool(ckpt_path and os.path.isfile(ckpt_path))
        from_command_line = getattr(self, "_command_line_num_classes", None)
        self._requested_num_classes = (
            (from_command_line, "on the command line", "drop --model.num_classes") if from_command_line is not None
            else (config.get("model.num_classes"), "in the config", "remove model.num_classes from the config")
        )  # fmt: skip

    def before_fit(self) -> None:
        """``--trainer.fast_dev_run`` is a smoke run that writes nothing; Lightning 2.6's ``ModelCheckpoint`` still
        writes ``last.ckpt`` at the end of training with ``save_last`` (into ``<root>/checkpoints/``, as there is
        no logger), which a later ``--ckpt_path last`` would then resume from. ``save_last`` is turned off for it."""
        if self.trainer.fast_dev_run:
            for callback in self.trainer.checkpoint_callbacks:
                callback.save_last = False

    def instantiate_classes(self) -> None:
        """LightningCLI's, then a check: the link overwrites a ``model.num_classes`` given in a config file with
        the data module's, which would silently train another classifier than the one asked for."""
        skip = getattr(self, "_weights_from_checkpoint", False)
        with weights_from_checkpoint() if skip else contextlib.nullcontext():  # the config keeps the path
            super().instantiate_classes()
        requested, where, fix = getattr(self, "_requested_num_classes", (None, "", ""))
        found = getattr(self.datamodule, "num_classes", None)
        if requested is not None and found is not None and requested != found:
            raise ValueError(
                f"model.num_classes is {requested} {where}, but the data module has {found} classes (its "
                f"num_classes is linked into the model): {fix}, or give data with {requested} classes"
            )


def _move_run(config: Namespace, root: str) -> None:
    """``--trainer.default_root_dir root`` on the command line: the run's folder moves, with the loggers that wrote
    into the old one (the configs name it twice, as ``trainer.default_root_dir`` and as each logger's ``save_dir``,
    and Lightning takes the checkpoints' folder and ``config.yaml``'s from the first logger, so setting only
    ``default_root_dir`` moved nothing). A logger writing elsewhere keeps its folder; without a
    ``default_root_dir`` in the config, those writing to the recipes' default ``runs`` move."""
    subcommand = config.get("subcommand")
    trainer = (config[subcommand] if subcommand else config).trainer
    before = trainer.default_root_dir
    trainer.default_root_dir = None if root.strip().lower() in ("", "null", "none") else root
    if trainer.default_root_dir is None:
        return
    old = os.path.normpath(str(before if before is not None else DEFAULT_LOGGERS[0]["init_args"]["save_dir"]))
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
        save_dir = None if init_args is None else init_args.get("save_dir")
        if save_dir is not None and os.path.normpath(str(save_dir)) == old:
            init_args.save_dir = trainer.default_root_dir


def _pop_option(argv: list[str], option: str) -> tuple[list[str], str | None]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (every occurrence), and the last value given.

    >>> _pop_option(["fit", "--model.num_classes", "3", "--trainer.max_epochs=2"], "--model.num_classes")
    (['fit', '--trainer.max_epochs=2'], '3')
    """
    remaining, value, i = [], None, 0
    while i < len(argv):
        if argv[i] == option:
            value = argv[i + 1] if i + 1 < len(argv) else ""
            i += 2
            continue
        if argv[i].startswith(option + "="):
            value = argv[i].split("=", 1)[1]
        else:
            remaining.append(argv[i])
        i += 1
    return remaining, value


def _cli_kwargs() -> dict:
    return dict(
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": DEFAULT_LOGGERS, "callbacks": [RNGStateCheckpoint(), PredictionWriter()]},
    )


def main(args: list[str] | dict | None = None, run: bool = True) -> RecipeCLI:
    """Run the recipes CLI (``args`` as on the command line, or a config dict; ``None`` reads ``sys.argv``).

    With ``run=False`` the data module, model and trainer are built and nothing runs (nothing is written):

    >>> cli = main({
    ...     "data": {"class_path": "recipes.data.SyntheticDataModule",
    ...              "init_args": {"image_size": 32, "train_samples": 8, "val_samples": 4, "batch_size": 4}},
    ...     "model": {"model": "window_probe", "model_kwargs": {"img_size": 32, "dim": 8, "depth": 1}},
    ...     "trainer": {"logger": False, "enable_progress_bar": False, "accelerator": "cpu", "max_epochs": 2},
    ... }, run=False)
    >>> type(cli.model).__name__, cli.model.num_classes, type(cli.datamodule).__name__, cli.trainer.max_epochs
    ('ImageClassifier', 2, 'SyntheticDataModule', 2)

    Example (a two-batch smoke run of the synthetic task)::

        python -m recipes fit --config recipes/configs/synthetic_fastervit.yaml --trainer.fast_dev_run 2
    """
    return RecipeCLI(ImageClassifier, pl.LightningDataModule, args=args, run=run, **_cli_kwargs())


class _ParseOnlyCLI(RecipeCLI):
    """The recipes CLI's parser and nothing else: no seeding, no classes built, no subcommand run."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def check_config(config: str | os.PathLike, subcommand: str = "fit") -> None:
    """Parse ``python -m recipes <subcommand> --config <config>`` as the CLI would, without building or running
    anything; ``ValueError`` with the parser's message for an option the CLI does not accept (a misspelt
    trainer option, an unknown top-level key, a data module argument that does not exist).

    >>> import pathlib, tempfile, yaml
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.yaml"
    >>> _ = path.write_text(yaml.safe_dump({"trainer": {"max_epoch": 3}}))
    >>> check_config(path)
    Traceback (most recent call last):
    ...
    ValueError: ...: Subcommand 'fit' does not accept option 'trainer.max_epoch'
    """
    from jsonargparse import ArgumentError

    try:
        with warnings.catch_warnings():  # args are passed on purpose (the caller's argv, e.g. Jupyter's, is not ours)
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            _ParseOnlyCLI(
                ImageClassifier,
                pl.LightningDataModule,
                args=[subcommand, "--config", str(config)],
                parser_kwargs={"exit_on_error": False},
                **_cli_kwargs(),
            )
    except ArgumentError as error:
        raise ValueError(f"{config}: {error}") from None
