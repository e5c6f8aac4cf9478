"""Data modules of the recipes: the synthetic task's guarantees, real-data layouts and their errors."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from recipes.data import (
    CIFARDataModule,
    DatasetNotFoundError,
    EpochShuffleSampler,
    ImageFolderDataModule,
    SameShapeDataset,
    SyntheticDataModule,
)
from recipes.data.synthetic import _SPLITS


def _objects(ds: SameShapeDataset, index: int) -> list[tuple[tuple[int, int], int]]:
    """(cell, shape id) of every object of a sample, replaying the generator's draws."""
    rng = np.random.default_rng([ds.seed, _SPLITS[ds.split], index])
    cells = ds._place(rng)
    return list(zip(cells, ds.draw_shapes(rng, index % 2)))


def test_deterministic_and_split_disjoint():
    a, b = SameShapeDataset(8, 32, seed=3), SameShapeDataset(8, 32, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(8))
    val = SameShapeDataset(8, 32, seed=3, split="val")
    assert not any(torch.equal(a[i][0], val[i][0]) for i in range(8))
    assert not torch.equal(a[0][0], SameShapeDataset(8, 32, seed=4)[0][0])


@pytest.mark.parametrize("num_objects", [2, 3])
def test_labels_objects_and_cells(num_objects):
    ds = SameShapeDataset(200, 64, grid=4, num_objects=num_objects, min_cell_distance=2, seed=0)
    assert Counter(ds[i][1] for i in range(len(ds))) == {0: 100, 1: 100}
    for i in range(len(ds)):
        objects = _objects(ds, i)
        shapes = [s for _, s in objects]
        assert len(set(shapes)) == (num_objects - 1 if i % 2 else num_objects)
        cells = [c for c, _ in objects]
        for j, (r1, c1) in enumerate(cells):
            for r2, c2 in cells[j + 1 :]:
                assert max(abs(r1 - r2), abs(c1 - c2)) >= 2  # far apart: never in the same or adjacent cells


def test_each_window_alone_carries_no_label_information():
    """Shape and cell of any single object are distributed the same way whatever the label."""
    ds = SameShapeDataset(6000, 32, grid=4, num_shapes=4, seed=1)
    counts = {0: Counter(), 1: Counter()}
    for i in range(len(ds)):
        label = i % 2
        for cell, shape in _objects(ds, i):
            counts[label][("shape", shape)] += 1
            counts[label][("row", cell[0])] += 1
    for key in counts[0]:
        p0, p1 = counts[0][key] / 6000, counts[1][key] / 6000
        assert abs(p0 - p1) < 0.04, (key, p0, p1)


def test_objects_stay_inside_their_cells():
    ds = SameShapeDataset(20, 64, grid=4, noise=0.0, seed=0)
    for i in range(20):
        image, _ = ds.render(i)
        ink = image.sum(0) > 0
        cells = {c for c, _ in _objects(ds, i)}
        for r in range(4):
            for c in range(4):
                block = ink[16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)]
                assert block.any() == ((r, c) in cells)


def test_colour_by_shape_and_cache():
    ds = SameShapeDataset(4, 32, colour_by_shape=True, cache=True, noise=0.0)
    first = ds[1]
    assert ds[1] is first  # cached
    colours = {tuple(np.round(px, 3)) for px in ds.render(1)[0].reshape(3, -1).T if px.sum() > 0}
    assert len(colours) == 1  # label 1: both objects have the same shape, hence the same colour


def test_cache_with_loader_processes_is_filled_before_they_start():
    # loader processes end with every epoch, and the images they cached with them: the cache did nothing
    options = dict(image_size=32, train_samples=16, val_samples=8, batch_size=4, grid=4)
    cached = SyntheticDataModule(**options, num_workers=2, cache=True)
    cached.setup("fit")
    assert len(cached.train_set._cache) == 16 and len(cached.val_set._cache) == 8
    plain = SyntheticDataModule(**options)
    plain.setup("fit")
    for (a, y), (b, z) in zip(cached.train_dataloader(), plain.train_dataloader(), strict=True):
        assert torch.equal(a, b) and torch.equal(y, z)


def test_bad_arguments():
    with pytest.raises(ValueError, match="cannot place 3 objects"):
        SameShapeDataset(4, 32, grid=2, num_objects=3, min_cell_distance=2)
    with pytest.raises(ValueError, match="num_shapes"):
        SameShapeDataset(4, 32, num_shapes=7)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        SyntheticDataModule(task="count")


def test_epoch_shuffle_is_a_function_of_seed_and_epoch():
    sampler = EpochShuffleSampler(range(50), seed=2)
    sampler.set_epoch(1)
    first = list(sampler)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(sampler) == first
    sampler.set_epoch(2)
    assert list(sampler) != first and sorted(sampler) == list(range(50))


def test_datamodule_loaders():
    dm = SyntheticDataModule(image_size=32, train_samples=20, val_samples=6, batch_size=4, grid=4)
    dm.setup("fit")
    assert dm.num_classes == 2
    assert len(dm.train_dataloader()) == 5 and len(dm.val_dataloader()) == 2


def test_missing_real_data_says_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match=r"image-net\.org.*data\.root"):
        _ = ImageFolderDataModule(tmp_path).num_classes
    # images directly in train/: the folder is there, the class folders are missing (it said "no image folder")
    _write_images(tmp_path, {"train": 2})
    with pytest.raises(DatasetNotFoundError, match=r"train has no class folders: .*train/<class>/\*\.JPEG"):
        _ = ImageFolderDataModule(tmp_path).num_classes
    # "~" in a root given in a YAML file is the home folder, as torchvision's ImageFolder takes it
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_images(tmp_path / "data" / "train", {"a": 1, "b": 1})
    assert ImageFolderDataModule("~/data").num_classes == 2
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python.*cs\.toronto\.edu.*tar -xzf"):
        CIFARDataModule(tmp_path, variant="cifar100").setup()
    with pytest.raises(ValueError, match="variant"):
        CIFARDataModule(tmp_path, variant="cifar1000")


def test_image_folder_with_mixup(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(4):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{k}.png")
    dm = ImageFolderDataModule(tmp_path, image_size=32, batch_size=4, mixup=0.8, cutmix=1.0)
    assert dm.num_classes == 3
    dm.setup("fit")
    images, target = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and target.shape == (4,)

    class _Trainer:
        training = True

    dm.trainer = _Trainer()
    mixed_images, soft = dm.on_after_batch_transfer((images, target), 0)
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
    _Trainer.training = False  # validation batches are never mixed
    assert dm.on_after_batch_transfer((images, target), 0)[1] is target
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, 32, 32)


def test_image_folder_val_labels_follow_train_classes(tmp_path):
    def write(split: str, classes: tuple[str, ...]) -> None:
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / "0.png")

    write("train", ("a", "b", "c"))
    write("val", ("a", "c"))  # val/ numbered alone would call "c" class 1
    dm = ImageFolderDataModule(tmp_path, image_size=8, batch_size=2, auto_augment=None)
    dm.setup("fit")
    labels = {Path(path).parent.name: target for path, target in dm.val_set.samples}
    assert labels == {"a": 0, "c": 2} == {c: dm.train_set.class_to_idx[c] for c in ("a", "c")}
    assert dm.val_set.targets == [0, 2] and dm.val_set.class_to_idx == dm.train_set.class_to_idx

    write("val", ("zebra",))
    with pytest.raises(DatasetNotFoundError, match=r"does not: \['zebra'\].*training classes"):
        dm.setup("fit")


def _write_images(root: Path, classes: dict[str, int], size=(8, 8)) -> None:
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            Image.fromarray(np.full((*size, 3), 40 * k, dtype=np.uint8)).save(root / cls / f"{k}.png")


def test_image_folder_reads_16_bit_images_and_skips_hidden_files(tmp_path):
    """A 16-bit greyscale PNG is scaled to 8 bits (Pillow's RGB conversion clipped it: almost all white); 32-bit
    integer or float images are refused with the file named; macOS AppleDouble files (``._<name>.png``, not
    images) are not taken as samples."""
    from recipes.data.folder import _load_image

    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I;16")
    rgb = np.asarray(_load_image(str(tmp_path / "ramp16.png")))
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert rgb.shape == (64, 64, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    # a 16-bit PGM (Pillow opens it as mode "I", scaled to 0..65535 from its maxval of 4095)
    (tmp_path / "ramp.pgm").write_bytes(b"P5\n3 1\n4095\n" + np.array([0, 2048, 4095], dtype=">u2").tobytes())
    grey = np.asarray(_load_image(str(tmp_path / "ramp.pgm")))[0, :, 0]
    assert grey.tolist() == [0, round(2048 / 4095 * 255), 255]
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(OSError, match=r"float\.tif: its pixels are 32-bit floats"):
        _load_image(str(tmp_path / "float.tif"))
    _write_images(tmp_path / "data" / "train", {"a": 2, "b": 2})
    _write_images(tmp_path / "data" / "val", {"a": 1, "b": 1})
    for split in ("train", "val"):
        (tmp_path / "data" / split / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    dm = ImageFolderDataModule(tmp_path / "data", image_size=8, batch_size=2, auto_augment=None, mixup=0, cutmix=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (4, 2)
    assert not any(Path(path).name.startswith(".") for path, _ in dm.train_set.samples + dm.val_set.samples)
    # nor the images in hidden folders inside a class folder (Mac network shares write .AppleDouble/ folders of
    # such files; they were taken as samples and training failed when it reached one), at any depth, while a
    # root that itself lies in a hidden folder is read as before
    for split in ("train", "val"):
        (tmp_path / "data" / split / "b" / ".AppleDouble").mkdir()
        (tmp_path / "data" / split / "b" / ".AppleDouble" / "0.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X")
        _write_images(tmp_path / "data" / split / "a" / "sub" / ".cache", {"x": 1})
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (4, 2)
    (tmp_path / "data").rename(tmp_path / ".hidden_root")
    dm = ImageFolderDataModule(tmp_path / ".hidden_root", image_size=8, batch_size=2, auto_augment=None, mixup=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (4, 2)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_a_bad_data_seed_is_refused_when_the_data_module_is_made(tmp_path, seed):
    """A negative seed failed only at the first training batch, inside NumPy, naming nothing."""
    for make in (
        lambda: SyntheticDataModule(image_size=32, train_samples=8, val_samples=4, batch_size=4, seed=seed),
        lambda: ImageFolderDataModule(tmp_path, image_size=8, batch_size=2, seed=seed),
        lambda: CIFARDataModule(tmp_path, batch_size=2, seed=seed),
    ):
        with pytest.raises(ValueError, match=r"data\.seed must be an integer >= 0"):
            make()


def test_image_folder_errors_name_the_folder_file_and_fix(tmp_path):
    _write_images(tmp_path / "train", {"a": 2, "b": 2})
    _write_images(tmp_path / "val", {"a": 1, "b": 1})
    (tmp_path / "train" / "c").mkdir()  # an empty class folder
    dm = ImageFolderDataModule(tmp_path, image_size=8, batch_size=2, auto_augment=None, mixup=0, cutmix=0)
    with pytest.raises(DatasetNotFoundError, match=r"(?s)train.*c\. Every training class folder needs at least one"):
        dm.setup("fit")
    (tmp_path / "train" / "c").rmdir()
    (tmp_path / "val" / "b" / "0.png").rename(tmp_path / "b0.png")  # an empty val/b/: as if val/ lacked b (was refused)
    dm.setup("fit")
    assert [t for _, t in dm.val_set.samples] == [0]
    (tmp_path / "val" / "a" / "0.png").rename(tmp_path / "a0.png")  # no validation image at all
    with pytest.raises(DatasetNotFoundError, match=r"val has class folders but no image in any of them"):
        dm.setup("fit")
    (tmp_path / "a0.png").rename(tmp_path / "val" / "a" / "0.png")
    (tmp_path / "b0.png").rename(tmp_path / "val" / "b" / "0.png")
    (tmp_path / "train" / "b" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # a corrupt file
    dm.setup("fit")
    index = [Path(p).name for p, _ in dm.train_set.samples].index("0.png", 2)
    with pytest.raises(OSError, match=r"cannot read the image .*b/0\.png.*replace or delete"):
        dm.train_set[index]
    for cls in ("b",):  # one class left: nothing to classify
        for f in (tmp_path / "train" / cls).iterdir():
            f.unlink()
        (tmp_path / "train" / cls).rmdir()
    with pytest.raises(DatasetNotFoundError, match=r"1 class folder\(s\), \['a'\].*at least two"):
        dm.setup("fit")


def test_train_loader_refuses_a_batch_that_never_fills_and_odd_mixup_batches(tmp_path):
    dm = SyntheticDataModule(image_size=32, train_samples=6, val_samples=6, batch_size=8, grid=4)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"6 samples, fewer than one batch of 8.*Lower data\.batch_size"):
        dm.train_dataloader()
    _write_images(tmp_path / "train", {"a": 3, "b": 3})
    _write_images(tmp_path / "val", {"a": 1, "b": 1})
    folder = ImageFolderDataModule(tmp_path, image_size=8, batch_size=3, auto_augment=None, mixup=0.8)
    folder.setup("fit")
    with pytest.raises(ValueError, match=r"even batch size, got data\.batch_size=3"):
        folder.train_dataloader()
    unmixed = ImageFolderDataModule(tmp_path, image_size=8, batch_size=3, auto_augment=None, mixup=0, cutmix=0)
    unmixed.setup("fit")
    assert len(unmixed.train_dataloader()) == 2


class _RandomPerSample(torch.utils.data.Dataset):
    """Each sample is a draw of the loader process's torch RNG: stands in for random augmentation."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(1)


class _Loaders:
    batch_size, num_workers, seed, trainer = 2, 2, 3, None


def test_loader_process_randomness_is_a_function_of_seed_and_epoch():
    """What a run resumed at epoch 1 sees (new loader, new processes) equals epoch 1 of the uninterrupted run."""
    from recipes.data.base import eval_loader, train_loader

    def epoch(loader, index):
        loader.sampler.set_epoch(index)  # what Lightning does before every epoch
        return torch.cat([batch.flatten() for batch in loader])

    uninterrupted = train_loader(_Loaders(), _RandomPerSample())
    first, second = epoch(uninterrupted, 0), epoch(uninterrupted, 1)
    assert not torch.equal(first, second)
    resumed = train_loader(_Loaders(), _RandomPerSample())
    torch.manual_seed(123)  # whatever the global RNG holds after a restore
    assert torch.equal(epoch(resumed, 1), second)
    late = train_loader(_Loaders(), _RandomPerSample())
    iterator = iter(late)  # Lightning makes the first iterator of a (resumed) fit before it calls set_epoch
    late.sampler.set_epoch(1)
    assert torch.equal(torch.cat([batch.flatten() for batch in iterator]), second)
    state = torch.get_rng_state()
    evaluation = eval_loader(_Loaders(), _RandomPerSample())
    assert len(torch.cat([b.flatten() for b in evaluation])) == 8
    assert torch.equal(torch.get_rng_state(), state)  # evaluating does not move the RNG that dropout uses


def test_augmentation_is_a_function_of_seed_epoch_and_sample(tmp_path):
    """timm's random crops, flips, RandAugment and erasing draw the same numbers for any num_workers and in a
    run resumed inside an epoch (whichever loader process gets the sample), and iterating with num_workers=0
    leaves the RNGs that dropout and Mixup use where they were."""
    import random

    from recipes.data.base import train_loader

    _write_images(tmp_path / "train", {"a": 6, "b": 6}, size=(20, 20))
    _write_images(tmp_path / "val", {"a": 1, "b": 1}, size=(20, 20))

    def epochs(num_workers: int, resume: dict | None = None, which=(0, 1)) -> list[torch.Tensor]:
        dm = ImageFolderDataModule(tmp_path, image_size=16, batch_size=2, num_workers=num_workers, re_prob=0.5)
        dm.setup("fit")
        loader = train_loader(dm, dm.train_set)
        if resume is not None:
            loader.resume(resume)
        out = []
        for epoch in which:
            loader.sampler.set_epoch(epoch)
            out.append(torch.cat([images for images, _ in loader]))
        return out

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first, second = epochs(0)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert first.shape == (12, 3, 16, 16) and not torch.equal(first, second)  # a new epoch, new draws
    workers = epochs(2)
    assert torch.equal(workers[0], first) and torch.equal(workers[1], second)
    (resumed,) = epochs(2, resume={"epoch": 1, "batches": 2}, which=(1,))  # 2 batches of epoch 1 were done
    assert torch.equal(resumed, second[4:])


def test_rng_checkpoint_carries_the_cuda_states_when_cuda_is_used(monkeypatch):
    """No GPU here: torch.cuda's RNG functions are replaced by a fake two-device state."""
    from recipes.callbacks import RNGStateCheckpoint

    devices = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    callback = RNGStateCheckpoint()
    state = callback.state_dict()
    callback.load_state_dict(state)
    assert [torch.equal(a, b) for a, b in zip(restored, devices)] == [True, True]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # e.g. testing a 2-GPU run's checkpoint on one
    restored.clear()
    with pytest.warns(UserWarning, match="RNG states of 2 CUDA devices, this process sees 1"):
        callback.load_state_dict(state)
    assert restored == []


def test_a_resume_point_applies_only_to_a_fit_resumed_from_a_checkpoint():
    """A validate/test run restores the data module's state too; its resume point must not cut the first epoch
    of a later fit from scratch."""
    from types import SimpleNamespace

    from recipes.data.base import train_loader

    def first_epoch(fn: str, ckpt_path: str | None) -> int:
        module = _Loaders()
        module.num_workers = 0
        module._pending_train_state = {"epoch": 0, "batches": 1}
        module.trainer = SimpleNamespace(world_size=1, state=SimpleNamespace(fn=fn), ckpt_path=ckpt_path)
        return sum(len(batch) for batch in train_loader(module, _RandomPerSample()))

    assert first_epoch("fit", "step=1.ckpt") == 6  # resumed: the first batch of 2 was trained on already
    assert first_epoch("fit", None) == first_epoch("validate", "step=1.ckpt") == 8


def test_distributed_evaluation_counts_each_sample_once():
    """Under DDP each process evaluates every world_size-th sample (Lightning's padding sampler counted repeats);
    with ``use_distributed_sampler=False`` the loader is left to the user, and a split too small to give every
    process a sample is refused (that process would run no step and the others would wait for it)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from torch.utils.data import TensorDataset

    from recipes.data.base import eval_loader

    def indices(n: int, rank: int, world: int = 2, use_sampler: bool = True, strategy=None) -> list[int]:
        module = _Loaders()
        module.num_workers = 0
        connector = SimpleNamespace(use_distributed_sampler=use_sampler)
        module.trainer = SimpleNamespace(world_size=world, global_rank=rank, _accelerator_connector=connector,
                                         strategy=strategy or DDPStrategy())  # fmt: skip
        return [i for (batch,) in eval_loader(module, TensorDataset(torch.arange(n))) for i in batch.tolist()]

    ranks = [indices(7, rank) for rank in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(7)) and [len(r) for r in ranks] == [4, 3]
    assert [len(indices(8, rank, world=3)) for rank in range(3)] == [3, 3, 2]
    assert indices(7, 1, use_sampler=False) == list(range(7))
    # FSDP gathers parameters in every forward: uneven batch counts would hang, so Lightning's sampler stays
    assert indices(7, 1, strategy=FSDPStrategy()) == list(range(7))
    with pytest.raises(ValueError, match="1 samples, fewer than the 2 processes"):
        indices(1, 0)


def test_randaugment_posterize_at_the_top_magnitude_does_not_end_training(tmp_path):
    """timm's increasing-level posterize keeps 0 bits at magnitude 10, which Pillow 13 refuses with a ValueError
    (rand-m9-mstd0.5 reaches 10 in about 2 % of draws): the recipes' transforms give the black image that older
    Pillow gave."""
    _write_images(tmp_path / "train", {"a": 2, "b": 2}, size=(16, 16))
    _write_images(tmp_path / "val", {"a": 1, "b": 1}, size=(16, 16))
    dm = ImageFolderDataModule(tmp_path, image_size=16, batch_size=2, mixup=0, cutmix=0)
    dm.setup("fit")
    ops = [op for step in dm.train_set.transform.transforms for op in getattr(step, "ops", ())]
    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    image = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    bits = posterize.level_fn(10, posterize.hparams)[0]
    assert bits == 0
    with pytest.raises(ValueError, match="bits"):  # what timm's op does with this Pillow
        ImageOps.posterize(image, bits)
    assert np.asarray(posterize.aug_fn(image, bits)).max() == 0
    assert np.array_equal(np.asarray(posterize.aug_fn(image, 2)), np.asarray(ImageOps.posterize(image, 2)))
    assert np.asarray(posterize.aug_fn(image, 8)).min() == 200


def test_the_smallest_allowed_cells_draw_every_sample():
    """At the least image size the check allows, every sample draws (cells of 4 px could not hold the largest
    shape with its margin: numpy's "high - low < 0" for some indices)."""
    from recipes.data.synthetic import _MIN_CELL, SameShapeDataset

    for grid in (4, 6):
        data = SameShapeDataset(64, image_size=_MIN_CELL * grid, grid=grid)
        assert all(data[i][0].shape[-1] == _MIN_CELL * grid for i in range(len(data)))


BAD_SYNTHETIC = [
    (
        dict(image_size=-1),
        r"image_size must be an integer >= 20 \(cells of at least 5 pixels on a 4x4 grid\), got -1",
    ),
    (dict(image_size=16, grid=4), r"image_size must be an integer >= 20 .*got 16"),
    (dict(train_samples=-5), r"train_samples must be an integer >= 1, got -5"),
    (dict(val_samples=0), r"val_samples must be an integer >= 1, got 0"),
    (dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    (dict(num_workers=-1), r"num_workers must be an integer >= 0, got -1"),
    (dict(grid=0), r"grid must be an integer >= 1, got 0"),
    (dict(num_objects=1), r"num_objects must be an integer >= 2, got 1"),
    (dict(grid=2, num_objects=5), r"num_objects must be at most 4 \(the cells of a 2x2 grid\), got 5"),
    (dict(min_cell_distance=0), r"min_cell_distance must be an integer >= 1, got 0"),
    (dict(distractors=-1), r"distractors must be an integer >= 0, got -1"),
    (dict(distractors=15), r"distractors must be in 0\.\.14 \(the cells of a 4x4 grid that 2 objects leave free\)"),
    (dict(noise=-1.0), r"noise must be >= 0 .*got -1\.0"),
]


@pytest.mark.parametrize(
    "kwargs, message", BAD_SYNTHETIC, ids=[",".join(f"{k}={v}" for k, v in kw.items()) for kw, _ in BAD_SYNTHETIC]
)
def test_synthetic_arguments_are_checked_when_the_data_module_is_made(kwargs, message):
    """Each bad value is named with its valid range in __init__ (the CLI's first step), not found later as a
    numpy / DataLoader error once training starts, or accepted (val_samples=0 trained with no validation)."""
    with pytest.raises(ValueError, match=message):
        SyntheticDataModule(**kwargs)


def test_hidden_folders_are_not_classes_in_train_or_val(tmp_path, monkeypatch):
    """A Jupyter .ipynb_checkpoints/ in train/ used to become class 0 and shift every label by one."""
    logged = []
    monkeypatch.setattr("recipes.data.folder.rank_zero_info", logged.append)
    _write_images(tmp_path / "train", {".ipynb_checkpoints": 1, "a": 2, "b": 2})
    _write_images(tmp_path / "val", {".ipynb_checkpoints": 1, "a": 1, "b": 1})
    dm = ImageFolderDataModule(tmp_path, image_size=8, batch_size=2, auto_augment=None, mixup=0, cutmix=0)
    assert dm.num_classes == 2
    dm.setup("fit")
    assert dm.train_set.class_to_idx == dm.val_set.class_to_idx == {"a": 0, "b": 1}
    assert {Path(p).parent.name: t for p, t in dm.val_set.samples} == {"a": 0, "b": 1}
    assert len(dm.train_set) == 4 and len(dm.val_set) == 2  # no image of the hidden folders
    assert [m.split(": ", 1)[0] for m in logged] == [str(tmp_path / "train"), str(tmp_path / "val")]  # once each
    assert all("skipping the hidden folder(s) ['.ipynb_checkpoints']" in m for m in logged)
