"""ImageNet-style image folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) with timm's transforms."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .base import DatasetNotFoundError, MixupDataModule, check_seed, with_safe_posterize

__all__ = ["ImageFolderDataModule"]


class ImageFolderDataModule(MixupDataModule):
    """Train/val loaders over an ImageNet-layout folder, with FasterViT's training augmentation by default.

    Training images get timm's ``RandomResizedCrop`` + flip + RandAugment (``auto_augment``; colour jitter
    instead when it is ``None``) + random erasing (``re_prob``); validation images are resized and centre-cropped
    with ``crop_pct``.
    Mixup/CutMix: see :class:`~recipes.data.base.MixupDataModule`. The defaults are FasterViT's recipe
    (RandAugment ``rand-m9-mstd0.5-inc1``, Mixup 0.8, CutMix 1.0, random erasing 0.25, crop_pct 0.875).

    Args:
        root: folder holding ``train/`` and ``val/``, one sub-folder per class in each (``~`` is the home folder).
            Hidden class folders (name starting with ``.``) are skipped with a log line, hidden files and folders
            inside the class folders without one. A class may be missing from ``val/`` or have no image there.
        image_size: training crop and evaluation size.
        batch_size: per-device batch size.
        num_workers: loader processes.
        auto_augment: timm auto-augment string, or ``None``.
        color_jitter: colour jitter strength; timm applies it only when ``auto_augment`` is ``None``.
        re_prob: random-erasing probability.
        crop_pct: evaluation centre-crop fraction.
        train_interpolation: interpolation of the training crops (``"random"`` mixes bilinear and bicubic).
        mixup, cutmix, mixup_prob, mixup_switch_prob: see :class:`~recipes.data.base.MixupDataModule`.
        seed: shuffling seed.

    >>> ImageFolderDataModule("/no/such/folder").num_classes  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    recipes.data.base.DatasetNotFoundError: no image folder at /no/such/folder/train: ...
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 0,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        re_prob: float = 0.25,
        crop_pct: float = 0.875,
        train_interpolation: str = "random",
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__(mixup, cutmix, mixup_prob, mixup_switch_prob)
        self.root, self.image_size = Path(root).expanduser(), image_size  # "~/data" as ImageFolder takes it
        check_seed(seed)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.auto_augment, self.color_jitter, self.re_prob = auto_augment, color_jitter, re_prob
        self.crop_pct, self.train_interpolation = crop_pct, train_interpolation
        self.train_set = self.val_set = None
        self._reported_hidden: set[str] = set()  # splits whose hidden folders were logged

    def _split_dir(self, split: str) -> Path:
        folder = self.root / split
        if folder.is_dir() and not _class_folders(folder)[0]:
            raise DatasetNotFoundError(
                f"{folder} has no class folders: put the images of each class in a sub-folder named after the class "
                f"({folder}/<class>/*.JPEG), in train/ and val/ alike; images directly in {split}/ have no label"
            )
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"no image folder at {folder}: expected {self.root}/train/<class>/*.JPEG and "
                f"{self.root}/val/<class>/*.JPEG (ImageNet-1k from https://image-net.org/download.php, with the "
                f"validation images sorted into class folders). Download it and pass data.root=<that folder>."
            )
        return folder

    def _classes(self, split: str) -> list[str]:
        """The class folders of ``split``, sorted; hidden folders (``.ipynb_checkpoints`` ...) are skipped, in
        train/ and val/ alike so that labels stay aligned, and logged once per split."""
        folder = self._split_dir(split)
        classes, hidden = _class_folders(folder)
        if hidden and split not in self._reported_hidden:
            self._reported_hidden.add(split)
            rank_zero_info(f"{folder}: skipping the hidden folder(s) {hidden}: a name starting with '.' is not a class")
        return classes

    def _train_classes(self) -> list[str]:
        """The training classes; at least two, checked here so that ``num_classes`` fails before a model or a
        metric is built for one class."""
        classes = self._classes("train")
        if len(classes) < 2:
            raise DatasetNotFoundError(
                f"{self.root / 'train'} has {len(classes)} class folder(s), {classes}: a classifier needs at least "
                "two (one sub-folder of images per class)"
            )
        return classes

    @property
    def num_classes(self) -> int:
        return len(self._train_classes())

    def setup(self, stage: str | None = None) -> None:
        train_tf = with_safe_posterize(create_transform(
            self.image_size, is_training=True, auto_augment=self.auto_augment, color_jitter=self.color_jitter,
            re_prob=self.re_prob, re_mode="pixel", interpolation=self.train_interpolation,
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        ))  # fmt: skip
        val_tf = create_transform(
            self.image_size, is_training=False, crop_pct=self.crop_pct, interpolation="bicubic",
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        )  # fmt: skip
        self._train_classes()
        self.train_set = _image_folder(self._split_dir("train"), train_tf)
        self._classes("val")  # says which hidden folders of val/ are skipped
        # an empty val/<class>/ is taken as a val/ without that class folder is: nothing of that class to score
        self.val_set = _labelled_like(_image_folder(self._split_dir("val"), val_tf, allow_empty=True), self.train_set)
        if not self.val_set.samples:
            raise DatasetNotFoundError(
                f"{self._split_dir('val')} has class folders but no image in any of them ({', '.join(IMG_EXTENSIONS)})"
            )


def _load_image(path: str) -> Image.Image:
    """An RGB PIL image, with the file named when it cannot be read.

    8-bit images are converted to RGB as torchvision's loader does. 16-bit greyscale images (PNG, TIFF: Pillow's
    ``I;16`` modes) are scaled to 8 bits first (65535 -> 255), which Pillow's own conversion does not do: it clips
    every value above 255, so such images came out almost entirely white. Images of 32-bit integers or floats have
    no fixed white level and are refused with the file named.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except (OSError, ValueError, SyntaxError) as error:  # PIL: truncated / corrupt / not an image
        raise OSError(f"cannot read the image {path} ({error}); replace or delete that file") from error
    sixteen_bit = image.mode in ("I;16", "I;16B", "I;16L", "I;16N") or (image.mode == "I" and image.format == "PPM")
    if sixteen_bit:  # Pillow opens a 16-bit PGM as "I", scaled to 0..65535 whatever its maxval
        wide = np.asarray(image).astype(np.uint32)  # the byte order is Pillow's to read
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    elif image.mode.startswith("I;16"):  # signed 16-bit: no black level to map to 0
        raise OSError(
            f"cannot read the image {path}: its pixels are signed 16-bit integers (Pillow mode {image.mode!r}); "
            "save it with unsigned 8 or 16 bits per channel"
        )
    elif image.mode in ("I", "F"):
        raise OSError(
            f"cannot read the image {path}: its pixels are 32-bit {'integers' if image.mode == 'I' else 'floats'} "
            f"(Pillow mode {image.mode!r}), which have no fixed white level; save it with 8 or 16 bits per channel"
        )
    return image.convert("RGB")


def _class_folders(folder: Path) -> tuple[list[str], list[str]]:
    """The sub-folders of ``folder`` that are classes and those skipped as hidden (name starting with '.', such as
    Jupyter's ``.ipynb_checkpoints``, which would otherwise become class 0 and shift every label), both sorted."""
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    return [n for n in names if not n.startswith(".")], [n for n in names if n.startswith(".")]


class _ClassFolders(ImageFolder):
    """torchvision's ImageFolder whose classes are :func:`_class_folders` (hidden folders skipped)."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's file list less hidden files and whatever lies in hidden folders inside the class folders:
        macOS writes an AppleDouble ``._<name>.jpg`` beside every file it copies to a non-Mac disk (Mac network
        shares a ``.AppleDouble/`` folder of them), which has an image extension but is not an image."""
        if is_valid_file is None:
            exts = tuple(extensions or IMG_EXTENSIONS)
            prefix = os.path.join(os.path.expanduser(os.fspath(directory)), "")  # as torchvision joins the paths

            def is_valid_file(path: str) -> bool:
                # only the part below the split folder counts: the root may itself lie in a hidden folder
                inside = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, prefix)
                return path.lower().endswith(exts) and not any(part.startswith(".") for part in inside.split(os.sep))

        return ImageFolder.make_dataset(directory, class_to_idx, None, is_valid_file, allow_empty)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = _class_folders(Path(directory))[0]
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}


def _image_folder(folder: Path, transform, allow_empty: bool = False) -> ImageFolder:
    try:
        return _ClassFolders(folder, transform=transform, loader=_load_image, allow_empty=allow_empty)
    except FileNotFoundError as error:  # a class folder without a single image file
        raise DatasetNotFoundError(
            f"{folder}: {str(error).rstrip('. ')}. Every training class folder needs at least one image "
            f"({', '.join(IMG_EXTENSIONS)}); add images or remove the empty folders."
        ) from error


def _labelled_like(val: ImageFolder, train: ImageFolder) -> ImageFolder:
    """``val`` with the labels of ``train``'s class folders. ImageFolder numbers the class folders of each split
    on its own, so a val/ with fewer classes than train/ would otherwise score its images against the wrong
    labels; a val/ class that train/ does not have cannot be scored at all and is refused."""
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        raise DatasetNotFoundError(
            f"{val.root} has class folders that {train.root} does not: {unknown}. The validation classes must be "
            "training classes (the same folder names); remove or rename those folders."
        )
    if val.class_to_idx != {c: train.class_to_idx[c] for c in val.classes}:
        remap = {val.class_to_idx[c]: train.class_to_idx[c] for c in val.classes}
        val.samples = [(path, remap[target]) for path, target in val.samples]
        val.imgs, val.targets = val.samples, [target for _, target in val.samples]
        val.classes, val.class_to_idx = list(train.classes), dict(train.class_to_idx)
    return val
