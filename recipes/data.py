"""CIFAR-10 in torchvision's on-disk layout (``cifar-10-batches-py``), read without md5 checks
so that small fixtures in the same format work too."""
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


def transforms(train: bool):
    """Float [0, 1] images; training adds random crop (padding 4) and horizontal flip."""
    to_float = v2.ToDtype(torch.float32, scale=True)
    if train:
        return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), to_float])
    return to_float


def datasets(data_dir, download: bool, val_split: int = 0, subset=None, seed: int = 0):
    """(train, eval, test) datasets. ``val_split`` images held out of the training set (a fixed
    permutation from ``seed``) form the eval set; without one, eval is the test set.
    ``subset`` keeps the first N images of train and of eval/test, for quick runs."""
    folder = ensure_cifar10(data_dir, download)
    train = CifarBatches(folder, True, transforms(True))
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
        evaluation = Subset(evaluation, range(min(subset, len(evaluation))))
        test = Subset(test, range(min(subset, len(test))))
    return train, evaluation, test
