"""The resident training loader: batched crop and flip against torchvision's per-image
transforms, epoch draws from (seed, epoch) alone, disjoint equal shards per process."""
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from brevitas_ana.recipes.data import (PAD, ResidentLoader, crop_flip, datasets, epoch_draws,
                                       resident_tensors)


@pytest.mark.parametrize("pad", [PAD, 2, 1])
def test_crop_flip_is_torchvisions_pad_crop_flip_per_image(pad):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, 64), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    out = crop_flip(images, dy, dx, flip, pad)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for b in range(64):
        expected = TF.crop(TF.pad(images[b], [pad]), int(dy[b]), int(dx[b]), 32, 32)
        if flip[b]:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(out[b], expected), b
    # the extreme offsets reach the zero padding
    corner = crop_flip(images[:1], torch.tensor([0]), torch.tensor([0]), torch.tensor([False]),
                       pad)
    assert corner[0, :, :pad, :].eq(0).all() and torch.equal(corner[0, :, pad:, pad:],
                                                               images[0, :, :-pad, :-pad])


def test_no_padding_only_flips():
    """``pad=0`` (``data.crop_pad: 0``): every image whole, mirrored where its flip says."""
    n = 40
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    loader = ResidentLoader(images, torch.arange(n), 8, seed=2, pad=0)
    order, dy, dx, flip = epoch_draws(n, 2, 0, pad=0)
    assert dy.eq(0).all() and dx.eq(0).all()
    got = torch.cat([x for x, _ in loader])
    for i, j in enumerate(order.tolist()):
        expected = TF.horizontal_flip(images[j]) if flip[i] else images[j]
        assert torch.equal(got[i], TF.to_dtype(expected, torch.float32, scale=True)), i


def test_epoch_draws_depend_on_seed_and_epoch_only():
    a, b = epoch_draws(1000, 3, 7), epoch_draws(1000, 3, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    order, dy, dx, flip = a
    assert sorted(order.tolist()) == list(range(1000))
    assert 0 <= dy.min() and dy.max() == 2 * PAD and 0 <= dx.min() and dx.max() == 2 * PAD
    # another padding draws other offsets from the same stream: the order and flips stay
    order2, dy2, dx2, flip2 = epoch_draws(1000, 3, 7, pad=2)
    assert torch.equal(order2, order) and torch.equal(flip2, flip)
    assert dy2.max() == dx2.max() == 4 and dy2.min() == 0
    assert 400 < int(flip.sum()) < 600
    assert not torch.equal(epoch_draws(1000, 3, 8)[0], order)
    assert not torch.equal(epoch_draws(1000, 4, 7)[0], order)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_equal_and_the_same_images_as_one_process(world):
    n, batch = 103, 8
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    labels = torch.arange(n)
    loaders = [ResidentLoader(images, labels, batch, seed=5, rank=r, world=world, augment=False)
               for r in range(world)]
    for loader in loaders:
        loader.set_epoch(2)
    seen = [[y for _, y in loader] for loader in loaders]
    assert {len(s) for s in seen} == {n // (batch * world)} == {len(loaders[0])}
    flat = torch.cat([torch.cat(s) for s in seen])
    assert len(set(flat.tolist())) == len(flat) == len(loaders[0]) * batch * world
    # one process visits the epoch's permutation in order; the shards interleave it
    order = epoch_draws(n, 5, 2)[0]
    for r, s in enumerate(seen):
        assert torch.cat(s).tolist() == order[r:len(flat):world].tolist()
    x, y = next(iter(loaders[0]))
    assert x.dtype == torch.float32 and torch.allclose(x[:, 0, 0, 0] * 255, y.float())


def test_resident_tensors_follow_subsets(tiny_cifar):
    """Subset of a Subset (subset of the held-out split): the same images and labels as the
    datasets index them."""
    train, _, _ = datasets(tiny_cifar, False, val_split=20, subset=30, seed=1)
    images, labels = resident_tensors(train)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8
    base = train.dataset.dataset  # Subset(range) of Subset(permutation) of CifarBatches
    for i in (0, 7, 29):
        j = train.dataset.indices[train.indices[i]]
        assert torch.equal(images[i], base.images[j]) and int(labels[i]) == int(base.labels[j])


def test_bench_loader_prints_each_loader_beside_the_step_rate(tiny_cifar, capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_loader
    rates, step = bench_loader.main(["--data-dir", str(tiny_cifar), "--batch-size", "8",
                                     "--batches", "3", "--rounds", "1", "--steps", "1",
                                     "--workers", "0"])
    assert set(rates) == {"resident", "workers 0"} and all(r > 0 for r in rates.values())
    text = capsys.readouterr().out
    assert f"| resident | {rates['resident']:,.0f} | {rates['resident'] / step:.1f} |" in text
