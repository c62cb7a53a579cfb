"""CIFAR-10 in torchvision's on-disk layout (``cifar-10-batches-py``), read without md5 checks
so that small fixtures in the same format work too.

Two ways to feed the training loop:

- :class:`ResidentLoader` (the recipes' default, ``data.loader: resident``): the training images
  decoded once into one uint8 tensor on the training device; each epoch's order, crops and flips
  drawn from (seed, epoch) and applied to a whole batch at once with one gather. No per-image
  Python, no worker processes; each process of a multi-process run takes its own shard.
- a torch ``DataLoader`` over :class:`CifarBatches` with torchvision transforms per image
  (``data.loader: workers``), the common PyTorch way.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"


def ensure_cifar10(data_dir, download: bool) -> Path:
    """The ``cifar-10-batches-py`` folder under ``data_dir``, downloaded when missing and allowed."""
    folder = Path(data_dir) / FOLDER
    if all((folder / f).is_file() for f in TRAIN_FILES + TEST_FILES):
        return folder
    why = "download disabled (--download false)"
    if download:
        created = not Path(data_dir).exists()
        try:
            from torchvision.datasets.utils import download_and_extract_archive
            download_and_extract_archive(URL, str(data_dir), md5=MD5)
            return folder
        except Exception as e:  # no network, proxy, disk full...
            why = f"download failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            if created:  # a failed start leaves no empty data folder behind
                shutil.rmtree(data_dir, ignore_errors=True)
    missing = [f for f in TRAIN_FILES + TEST_FILES if not (folder / f).is_file()]
    raise FileNotFoundError(
        f"data_dir: CIFAR-10 not found in {folder} (missing {missing}) and {why}. Put the python "
        f"version of CIFAR-10 ({URL}, extracted) there, or point --data-dir at a folder that "
        f"contains {FOLDER}/.")


class CifarBatches(Dataset):
    """Images as uint8 CHW tensors and int labels, from CIFAR python pickles."""

    def __init__(self, folder: Path, train: bool, transform=None):
        # random augmentation drawn per (seed, epoch, image): a resumed run, any number of
        # data-loader workers and any process see the same crops and flips (set by the recipe)
        self.seed, self.epoch = None, 0
        images, labels = [], []
        for name in TRAIN_FILES if train else TEST_FILES:
            path = Path(folder) / name
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                lab = list(batch[b"labels"])
            except Exception as e:
                raise ValueError(f"data_dir: {path} is not a readable CIFAR-10 batch: {e}") from e
            if len(lab) != len(data):
                raise ValueError(f"data_dir: {path} has {len(data)} images but {len(lab)} labels")
            images.append(data)
            labels.extend(lab)
        self.images = torch.from_numpy(np.concatenate(images))
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.transform is None:
            return x, self.labels[i]
        if self.seed is None:
            return self.transform(x), self.labels[i]
        with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_033 + int(i))
                              % (2 ** 63))
            return self.transform(x), self.labels[i]


def seed_augmentation(dataset, seed: int, epoch: int):
    """Draw ``dataset``'s augmentation from (seed, epoch, image index) (through Subsets)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    dataset.seed, dataset.epoch = seed, epoch


PAD = 4  # random crop: pad 4 pixels (zeros, as torchvision's RandomCrop), crop back to 32


def epoch_draws(n: int, seed: int, epoch: int, pad: int = PAD):
    """The random choices of one epoch over ``n`` training images, from (seed, epoch) alone:
    the order (a permutation) and, for the image at each position of it, the crop offsets
    ``dy, dx`` in ``[0, 2 * pad]`` and whether it is flipped. Drawn on the CPU, so they are the
    same on every device, process count and torch build; a resumed run redraws them exactly."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    flips = torch.randint(0, 2, (n,), generator=g).bool()
    return order, offsets[0], offsets[1], flips


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
              flip: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Batched random crop and horizontal flip of uint8 NCHW images: image ``b`` of the result is
    ``zero_pad(images[b], pad)[:, dy_b : dy_b + H, dx_b : dx_b + W]``, mirrored left-right where
    ``flip_b``; one gather, on the images' device."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=images.device)  # B x H
    cols = torch.arange(w, device=images.device).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # B x W
    return padded[torch.arange(b, device=images.device)[:, None, None, None],
                  torch.arange(c, device=images.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class ResidentLoader:
    """Training batches from images resident on ``device``.

    ``images`` (uint8 N x 3 x 32 x 32) and ``labels`` are copied to ``device`` once. Epoch
    ``e`` (set with :meth:`set_epoch`) visits the permutation of :func:`epoch_draws`; process
    ``rank`` of ``world`` takes every ``world``-th position of it, so the shards are disjoint and
    every process takes the same number of steps (``len(self)``; the last incomplete round of
    batches is dropped). Each batch is cropped (zero padding ``pad``) and flipped
    (:func:`crop_flip`) and scaled to float [0, 1], all on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 device=None, rank: int = 0, world: int = 1, augment: bool = True,
                 pad: int = PAD):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.to(device, torch.uint8)
        self.labels = labels.to(device, torch.long)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.augment, self.epoch, self.pad = augment, 0, pad

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels) // (self.batch_size * self.world)

    def __iter__(self):
        order, dy, dx, flip = epoch_draws(len(self.labels), self.seed, self.epoch, self.pad)
        mine = torch.arange(self.rank, len(self) * self.batch_size * self.world, self.world)
        device = self.images.device
        order, dy, dx, flip = (t[mine].to(device) for t in (order, dy, dx, flip))
        for start in range(0, len(mine), self.batch_size):
            part = slice(start, start + self.batch_size)
            index = order[part]
            images = self.images[index]
            if self.augment:
                images = crop_flip(images, dy[part], dx[part], flip[part], self.pad)
            # torchvision's own scaling, bit for bit what the evaluation images get
            yield v2.functional.to_dtype(images, torch.float32, scale=True), self.labels[index]


def resident_tensors(dataset):
    """(uint8 images, labels) of a :class:`CifarBatches` or a ``Subset`` of one (any depth)."""
    index = None
    while isinstance(dataset, Subset):
        inner = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        index = inner if index is None else inner[index]
        dataset = dataset.dataset
    if index is None:
        return dataset.images, dataset.labels
    return dataset.images[index], dataset.labels[index]


def transforms(train: bool, pad: int = PAD):
    """Float [0, 1] images; training adds random crop (zero padding ``pad``) and horizontal
    flip."""
    to_float = v2.ToDtype(torch.float32, scale=True)
    if train:
        return v2.Compose([v2.RandomCrop(32, padding=pad), v2.RandomHorizontalFlip(), to_float])
    return to_float


def datasets(data_dir, download: bool, val_split: int = 0, subset=None, seed: int = 0,
             pad: int = PAD):
    """(train, eval, test) datasets. ``val_split`` images held out of the training set (a fixed
    permutation from ``seed``) form the eval set; without one, eval is the test set.
    ``subset`` keeps the first N training images, for quick runs (evaluation and test sets stay
    whole, so figures of quick runs compare with full ones). ``pad``: the training images'
    random crop (the workers loader's transforms)."""
    folder = ensure_cifar10(data_dir, download)
    train = CifarBatches(folder, True, transforms(True, pad))
    train_plain = CifarBatches(folder, True, transforms(False))
    test = CifarBatches(folder, False, transforms(False))
    if not 0 <= val_split < len(train):
        raise ValueError(f"val_split must be in [0, {len(train)}), got {val_split}")
    if val_split:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        train, evaluation = Subset(train, order[val_split:]), Subset(train_plain, order[:val_split])
    else:
        evaluation = test
    if subset:
        train = Subset(train, range(min(subset, len(train))))
    return train, evaluation, test
