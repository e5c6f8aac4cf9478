"""A procedurally generated task that needs communication between far-apart windows: "same shape or not?".

The image is a ``grid x grid`` array of cells (make a cell one attention window). Two shapes are drawn in two
cells at least ``min_cell_distance`` cells apart (Chebyshev distance), each with its own random colour, size and
position inside its cell; the label is 1 when both have the same shape and 0 otherwise, half of each.

Why window-local evidence cannot solve it: the shape in either cell is uniform over ``num_shapes`` whatever
the label, so each window alone carries no information. A model whose features at a location depend on one
window only, followed by global average pooling and a linear head, computes ``g(A, i) + g(B, j)`` for shapes
``A``, ``B`` in cells ``i``, ``j``; no such sum can separate "same" from "different" (already for two shapes
it would need ``g(0)+g(0) > t``, ``g(1)+g(1) > t`` and ``g(0)+g(1) < t``, ``g(1)+g(0) < t``, which add up to a
contradiction). Such a model stays at chance; a model that lets windows talk can learn it.

Every sample is a pure function of ``(seed, split, index)``, so any size of data set at any resolution is
reproducible, and a validation set never overlaps the training set.

>>> ds = SameShapeDataset(8, image_size=64, seed=0)
>>> image, label = ds[3]
>>> image.shape, image.dtype, label
(torch.Size([3, 64, 64]), torch.float32, 1)
>>> torch.equal(ds[3][0], SameShapeDataset(8, image_size=64, seed=0)[3][0])
True
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import RecipeDataModule, check_int, check_seed

__all__ = ["SHAPES", "SameShapeDataset", "SyntheticDataModule"]

_SPLITS = {"train": 0, "val": 1}


def _disk(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x**2 + y**2 <= 1.0


def _square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x), np.abs(y)) <= 0.8


def _triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (y <= 0.7) & (np.abs(x) <= (y + 0.9) * 0.6)  # apex up (y grows downwards)


def _plus(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ((np.abs(x) <= 0.3) & (np.abs(y) <= 1.0)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 1.0))


def _ring(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r2 = x**2 + y**2
    return (r2 <= 1.0) & (r2 >= 0.36)


def _diamond(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(x) + np.abs(y) <= 1.0


SHAPES = {"disk": _disk, "square": _square, "triangle": _triangle, "plus": _plus, "ring": _ring, "diamond": _diamond}
"""Shape name -> indicator function on coordinates normalised by the shape's radius."""

_PALETTE = np.array(  # one colour per shape, for colour_by_shape
    [[1.0, 0.3, 0.3], [0.3, 1.0, 0.3], [0.3, 0.4, 1.0], [1.0, 1.0, 0.3], [1.0, 0.3, 1.0], [0.3, 1.0, 1.0]]
)


_MIN_CELL = 5  # a shape of radius up to 0.38 cell plus half a pixel of margin on both sides fits in 4.17 pixels
"""Pixels a grid cell needs at least, for a shape drawn in it to be told from the others."""


class SameShapeDataset(Dataset):
    """Objects in far-apart grid cells; label 1 if two of them have the same shape (see the module docstring).

    Args:
        num_samples: length of the data set; labels alternate, so it is balanced.
        image_size: side of the square RGB image, at least 5 pixels per cell (``5 * grid``).
        grid: cells per side; a cell is ``image_size / grid`` pixels.
        num_shapes: how many shapes of :data:`SHAPES` are used (``num_objects``..6).
        num_objects: objects per image. Label 1: exactly two share a shape, the others are all different;
            label 0: all different. With 2 objects this is "same or different".
        min_cell_distance: least Chebyshev distance between two objects' cells (2 leaves a cell between them).
        distractors: thin random line segments drawn in free cells; they never decide the label.
        noise: std of the Gaussian pixel noise.
        colour_by_shape: give every shape its own fixed colour instead of a random one. Shape identity is then
            readable from pixels by a linear map, so a short training run measures communication between windows
            rather than shape recognition.
        cache: keep every rendered image in memory (``4 * 3 * image_size**2`` bytes each) instead of drawing
            it again every epoch (with loader processes, :class:`SyntheticDataModule` renders them all in
            ``setup``, since the processes and their memory end with every epoch).
        seed: data set seed.
        split: ``"train"`` or ``"val"``: the two draw from disjoint random streams.

    Items are ``(image, label)`` with the image a float tensor ``(3, image_size, image_size)`` normalised to
    roughly zero mean and unit range, and ``label`` an int.

    >>> kwargs = dict(image_size=32, grid=4, num_objects=3, num_shapes=4, colour_by_shape=True)
    >>> ds = SameShapeDataset(4, **kwargs)  # three objects: label 1 when two of them share a shape
    >>> [ds[i][1] for i in range(len(ds))]
    [0, 1, 0, 1]
    >>> image, label = ds[1]
    >>> image.shape, image.dtype
    (torch.Size([3, 32, 32]), torch.float32)
    >>> torch.equal(ds[1][0], SameShapeDataset(4, split="val", **kwargs)[1][0])  # another split: other images
    False
    """

    num_classes = 2

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        grid: int = 4,
        num_shapes: int = 6,
        num_objects: int = 2,
        min_cell_distance: int = 2,
        distractors: int = 0,
        noise: float = 0.05,
        colour_by_shape: bool = False,
        cache: bool = False,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        check_int("num_samples", num_samples, 0)
        check_int("grid", grid, 1)
        check_int("num_objects", num_objects, 2)
        check_int("min_cell_distance", min_cell_distance, 1)
        check_int(
            "image_size", image_size, _MIN_CELL * grid, f"cells of at least {_MIN_CELL} pixels on a {grid}x{grid} grid"
        )
        if not max(2, num_objects) <= num_shapes <= len(SHAPES):
            raise ValueError(f"num_shapes must be in {max(2, num_objects)}..{len(SHAPES)}, got {num_shapes}")
        if num_objects > grid * grid:
            raise ValueError(
                f"num_objects must be at most {grid * grid} (the cells of a {grid}x{grid} grid), got {num_objects}"
            )
        check_int("distractors", distractors, 0)
        if distractors > grid * grid - num_objects:
            raise ValueError(
                f"distractors must be in 0..{grid * grid - num_objects} (the cells of a {grid}x{grid} grid that "
                f"{num_objects} objects leave free), got {distractors}"
            )
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0 (the std of the pixel noise), got {noise!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        self.num_samples, self.image_size, self.grid = num_samples, image_size, grid
        self.num_shapes, self.num_objects, self.min_cell_distance = num_shapes, num_objects, min_cell_distance
        self.distractors, self.noise, self.colour_by_shape = distractors, noise, colour_by_shape
        self.seed, self.split = seed, split
        self._cache: dict[int, tuple[Tensor, int]] | None = {} if cache else None
        self.shapes = list(SHAPES.values())[:num_shapes]
        self._place(np.random.default_rng(0))  # fails early if the objects cannot be placed
        ax = np.arange(image_size, dtype=np.float32) + 0.5  # pixel centres
        self._y, self._x = np.meshgrid(ax, ax, indexing="ij")

    def __len__(self) -> int:
        return self.num_samples

    def _place(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        """``num_objects`` cells, pairwise at least ``min_cell_distance`` apart (greedy over a random order)."""
        for _ in range(100):
            chosen: list[tuple[int, int]] = []
            for k in rng.permutation(self.grid * self.grid):
                cell = (int(k) // self.grid, int(k) % self.grid)
                if all(max(abs(cell[0] - r), abs(cell[1] - c)) >= self.min_cell_distance for r, c in chosen):
                    chosen.append(cell)
                    if len(chosen) == self.num_objects:
                        return chosen
        raise ValueError(
            f"cannot place {self.num_objects} objects {self.min_cell_distance} cells apart on a "
            f"{self.grid}x{self.grid} grid; use a larger grid or a smaller min_cell_distance"
        )

    def _cell_slices(self, cell: tuple[int, int]) -> tuple[slice, slice, float]:
        size = self.image_size / self.grid
        rows = slice(round(cell[0] * size), round((cell[0] + 1) * size))
        cols = slice(round(cell[1] * size), round((cell[1] + 1) * size))
        return rows, cols, size

    def _draw_shape(self, image: np.ndarray, rng: np.random.Generator, cell: tuple[int, int], shape_id: int) -> None:
        rows, cols, size = self._cell_slices(cell)
        radius = size * rng.uniform(0.25, 0.38)
        margin = radius + 0.5
        cy = rows.start + rng.uniform(margin, size - margin)
        cx = cols.start + rng.uniform(margin, size - margin)
        mask = self.shapes[shape_id]((self._x[rows, cols] - cx) / radius, (self._y[rows, cols] - cy) / radius)
        colour = _PALETTE[shape_id] if self.colour_by_shape else rng.uniform(0.45, 1.0, size=3)
        image[:, rows, cols] += mask * colour.astype(np.float32)[:, None, None]

    def _draw_line(self, image: np.ndarray, rng: np.random.Generator, cell: tuple[int, int]) -> None:
        rows, cols, size = self._cell_slices(cell)
        (y0, y1), (x0, x1) = rng.uniform(0.1, 0.9, 2) * size, rng.uniform(0.1, 0.9, 2) * size
        t = np.linspace(0.0, 1.0, int(2 * size))
        ys = np.clip((rows.start + y0 + t * (y1 - y0)).astype(int), rows.start, rows.stop - 1)
        xs = np.clip((cols.start + x0 + t * (x1 - x0)).astype(int), cols.start, cols.stop - 1)
        image[:, ys, xs] = rng.uniform(0.45, 1.0, size=3).astype(np.float32)[:, None]

    def draw_shapes(self, rng: np.random.Generator, label: int) -> list[int]:
        """Shape ids of the objects: all different (label 0) or exactly one repeated pair (label 1)."""
        if not label:
            return [int(s) for s in rng.choice(self.num_shapes, self.num_objects, replace=False)]
        twin, *others = rng.choice(self.num_shapes, self.num_objects - 1, replace=False)
        shapes = [int(twin), int(twin), *(int(s) for s in others)]
        rng.shuffle(shapes)
        return shapes

    def render(self, index: int) -> tuple[np.ndarray, int]:
        """The image ``(3, H, W)`` in ``[0, 1]`` plus noise, and the label, of sample ``index``."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        label = index % 2
        image = np.zeros((3, self.image_size, self.image_size), dtype=np.float32)
        cells = self._place(rng)
        for cell, shape_id in zip(cells, self.draw_shapes(rng, label)):
            self._draw_shape(image, rng, cell, shape_id)
        if self.distractors:
            free = [(r, c) for r in range(self.grid) for c in range(self.grid) if (r, c) not in cells]
            for k in rng.choice(len(free), size=self.distractors, replace=False):
                self._draw_line(image, rng, free[k])
        image += rng.normal(0.0, self.noise, size=image.shape).astype(np.float32)
        return image, label

    def fill_cache(self) -> None:
        """Render every image now (with ``cache=True``; nothing to do without). Loader processes restart every
        epoch and their caches go with them, so a data set used with ``num_workers > 0`` is filled up front."""
        if self._cache is not None:
            for index in range(len(self)):
                self[index]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image, label = self.render(index)
        item = (torch.from_numpy((image - 0.25) / 0.5), label)
        if self._cache is not None:
            self._cache[index] = item
        return item


class SyntheticDataModule(RecipeDataModule):
    """Train/val loaders of a synthetic task (``"same_shape"``: :class:`SameShapeDataset`).

    Args:
        task: the task; its label set gives :attr:`num_classes`.
        image_size: side of the images (train and val).
        train_samples, val_samples: split sizes (at least 1 each).
        batch_size: per-device batch size.
        num_workers: loader processes (0: load in the main process).
        grid, num_shapes, num_objects, min_cell_distance, distractors, noise, colour_by_shape, cache: the
            task's options, see :class:`SameShapeDataset`.
        seed: data set seed (independent of the training seed).

    >>> dm = SyntheticDataModule(image_size=32, train_samples=16, val_samples=8, batch_size=4, grid=4)
    >>> dm.setup("fit")
    >>> images, labels = next(iter(dm.train_dataloader()))
    >>> images.shape, dm.num_classes
    (torch.Size([4, 3, 32, 32]), 2)
    """

    TASKS = {"same_shape": SameShapeDataset}

    def __init__(
        self,
        task: str = "same_shape",
        image_size: int = 64,
        train_samples: int = 2048,
        val_samples: int = 512,
        batch_size: int = 64,
        num_workers: int = 0,
        grid: int = 4,
        num_shapes: int = 6,
        num_objects: int = 2,
        min_cell_distance: int = 2,
        distractors: int = 0,
        noise: float = 0.05,
        colour_by_shape: bool = False,
        cache: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if task not in self.TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; choose one of {sorted(self.TASKS)}")
        check_int("train_samples", train_samples, 1)
        check_int("val_samples", val_samples, 1)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        self.task, self.image_size = task, image_size
        self.train_samples, self.val_samples = train_samples, val_samples
        check_seed(seed)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.task_kwargs = dict(
            grid=grid,
            num_shapes=num_shapes,
            num_objects=num_objects,
            min_cell_distance=min_cell_distance,
            distractors=distractors,
            noise=noise,
            colour_by_shape=colour_by_shape,
            cache=cache,
        )
        self._dataset("val", 0)  # the task's own checks (grid, image_size, distractors ...), before any training
        self.train_set = self.val_set = None

    @property
    def num_classes(self) -> int:
        return self.TASKS[self.task].num_classes

    def _dataset(self, split: str, num_samples: int) -> Dataset:
        return self.TASKS[self.task](
            num_samples, image_size=self.image_size, seed=self.seed, split=split, **self.task_kwargs
        )

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._dataset("train", self.train_samples)
        self.val_set = self._dataset("val", self.val_samples)
        if self.num_workers > 0:  # with cache=True: the loader processes inherit every rendered image
            self.train_set.fill_cache()
            self.val_set.fill_cache()
