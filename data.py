"""
The image datasets of every script: Fashion-MNIST (default, Debian's dataset-fashion-mnist), an ImageFolder tree (ADM
crops) or synthetic images; items (image (3, S, S) in [-1, 1], label), (zeros, -1) for an unreadable image (skipped).
"""
import functools
import gzip
import hashlib
import math
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FASHION_DIRS = ["/usr/share/datasets/fashion-mnist", "~/.cache/fqgan/fashion-mnist"]  # Debian package, our cache
FASHION_CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".jpe"}


def fashion_mnist(train=True):
    """(uint8 images (N, 28, 28), int64 labels (N,)): Debian's idx files, our cache, else torchvision's downloader."""
    split = "train" if train else "t10k"
    names = [f"{split}-images-idx3-ubyte.gz", f"{split}-labels-idx1-ubyte.gz"]
    for d in (Path(p).expanduser() for p in FASHION_DIRS):
        if all((d / n).is_file() for n in names):
            raw = [gzip.open(d / n).read() for n in names]  # idx: magic (ndim in byte 3), big-endian dims, data
            dims = [[int.from_bytes(r[4 + 4 * i:8 + 4 * i], "big") for i in range(r[3])] for r in raw]
            x, y = (np.frombuffer(r, np.uint8, offset=4 + 4 * len(s)).reshape(s) for r, s in zip(raw, dims))
            return x, y.astype(np.int64)
    try:
        import torchvision
        ds = torchvision.datasets.FashionMNIST(str(Path(FASHION_DIRS[1]).expanduser()), train=train, download=True)
        return ds.data.numpy(), ds.targets.numpy().astype(np.int64)
    except Exception as e:
        raise SystemExit(f"Fashion-MNIST not found in {FASHION_DIRS} and not downloadable ({type(e).__name__}): "
                         "apt-get install dataset-fashion-mnist, or pass --data=PATH to an ImageFolder tree") from None


def rng(*key):
    """random.Random seeded by (seed, epoch, index): augmentation is a pure function of them (exact resume)."""
    return random.Random(int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little"))


class Tensors(torch.utils.data.TensorDataset):
    """Images already in memory (Fashion-MNIST, synthetic): (N, C, S, S) in [-1, 1], optional random flips."""

    def __init__(self, images, labels, flip=False):
        super().__init__(images, labels)
        self.images, self.labels, self.flip, self.seed, self.epoch = images, labels, flip, 0, 0

    def __getitem__(self, i):
        x = self.images[i].expand(3, -1, -1)
        if self.flip and rng(self.seed, self.epoch, i).random() < 0.5:
            x = x.flip(-1)
        return x.contiguous(), int(self.labels[i])


def adm_crop(img, size, r=None, max_scale=1.25):
    """ADM crop: centre (r=None) or random, short side in [size, ceil(size*max_scale)]; BOX-halve, bicubic, crop."""
    target = size if r is None else r.randint(size, math.ceil(size * max_scale))
    while min(img.size) >= 2 * target:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = target / min(img.size)
    img = img.resize(tuple(max(target, round(s * scale)) for s in img.size), resample=Image.BICUBIC)
    x0, y0 = ((s - size) // 2 if r is None else r.randint(0, s - size) for s in img.size)
    return img.crop((x0, y0, x0 + size, y0 + size))


def to_rgb(img):
    """Any PIL mode -> RGB. 16-bit grayscale (I;16*, I) is scaled to 8 bits, not clipped (convert() would clip)."""
    if img.mode.startswith("I"):
        img = Image.fromarray((np.asarray(img, np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image> (ImageNet layout): ADM random-resize-crop + flip when augment, else the centre crop."""

    def __init__(self, root, image_size, augment=False):
        root = Path(root)
        if not root.is_dir():
            raise SystemExit(f"--data={root}: no such folder (expected an ImageFolder tree root/<class>/<images>)")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [(p, c) for c, d in enumerate(self.classes) for p in sorted((root / d).rglob("*"))
                        if p.suffix.lower() in IMG_EXT]
        if not self.samples:
            raise SystemExit(f"--data={root}: no images under {root}/<class>/ (extensions {sorted(IMG_EXT)})")
        self.size, self.augment, self.seed, self.epoch = image_size, augment, 0, 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        r = rng(self.seed, self.epoch, i) if self.augment else None
        try:
            with Image.open(path) as img:
                img = adm_crop(to_rgb(img), self.size, r)  # raises on truncated or non-image data
        except Exception as e:
            warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e})")
            return torch.zeros(3, self.size, self.size), -1
        if r is not None and r.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1, label


@functools.lru_cache(maxsize=4)
def fashion_tensors(train, image_size):
    """Fashion-MNIST (images (N, 1, S, S) in [-1, 1], labels (N,)), resized once per process and shared: read-only."""
    x, y = fashion_mnist(train)
    x = torch.from_numpy(x.copy()).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28)
    if image_size != 28:
        x = torch.cat([F.interpolate(c, size=image_size, mode="bicubic", antialias=True).clamp(-1, 1)
                       for c in x.split(4096)])
    return x, torch.from_numpy(y)


def make_dataset(data, image_size, split="train", augment=False):
    """--data = 'fashion-mnist' | 'synthetic' | PATH of an ImageFolder (its own split); split 'train' | 'test'. Fashion-
    MNIST is resized 28 -> image_size (bicubic, antialiased); augment = random flips (ADM crops for a folder)."""
    if data == "fashion-mnist":
        return Tensors(*fashion_tensors(split == "train", image_size), flip=augment)
    if data == "synthetic":  # smooth random images with random labels: tests and benchmarks, no files
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 256 if split == "train" else 64
        x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=image_size, mode="bilinear")
        return Tensors(x, torch.randint(0, 10, (n,), generator=g), flip=augment)
    return ImageFolder(data, image_size, augment)


def batches(dataset, batch_size, seed, rank=0, world_size=1, start_step=0, num_workers=0):
    """Endless (step, x, y) batches. Each epoch is a permutation seeded by (seed, epoch), split across ranks, so the
    data is a pure function of the step: resuming at start_step continues exactly where a run left off."""
    per_step, step = batch_size * world_size, start_step
    steps_per_epoch = len(dataset) // per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images are fewer than one global batch of {per_step}: lower --batch_size")
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        dataset.seed, dataset.epoch = seed, epoch
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        idx = perm[:steps_per_epoch * per_step].view(steps_per_epoch, world_size, batch_size)[offset:, rank]
        for x, y in torch.utils.data.DataLoader(dataset, batch_sampler=idx.tolist(), num_workers=num_workers,
                                                pin_memory=torch.cuda.is_available()):
            yield step, x, y
            step += 1
