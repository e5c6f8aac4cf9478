"""Data modules of the recipes: a built-in synthetic task, image folders (ImageNet) and local CIFAR."""

from .base import DatasetNotFoundError, EpochShuffleSampler, MixupDataModule, RecipeDataModule, SeededSamples
from .cifar import CIFARDataModule
from .folder import ImageFolderDataModule
from .synthetic import SameShapeDataset, SyntheticDataModule

__all__ = [
    "CIFARDataModule",
    "DatasetNotFoundError",
    "EpochShuffleSampler",
    "ImageFolderDataModule",
    "MixupDataModule",
    "RecipeDataModule",
    "SameShapeDataset",
    "SeededSamples",
    "SyntheticDataModule",
]
