"""
Helpers shared by the entry scripts (train_tokenizer.py, train_far.py, sample.py, eval_fid.py): --key=value flags
generated from a dataclass, DDP set-up, bf16 autocast, atomic checkpoints, logging, the learning-rate schedule and
the image datasets (Fashion-MNIST, ImageFolder trees, synthetic). Nothing here runs at import time.
"""
import gzip
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

# ---- command line: every dataclass field is a --field=value flag


def _field_comments(cls):
    """name -> trailing comment of each field in the dataclass source (for --help)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", src, flags=re.M))


def _convert(text, default, name):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--{name} takes true or false, not '{text}'")
        return text.lower() in ("true", "1")
    if isinstance(default, (tuple, list)):
        kind = type(default[0]) if default else str
        return tuple(_convert(t, kind(), name) if kind is not bool else _convert(t, False, name)
                     for t in text.split(",") if t != "")
    try:
        return type(default)(text) if default is not None else text
    except ValueError:
        raise SystemExit(f"--{name} expects a {type(default).__name__}, got '{text}'") from None


def parse_config(cls, argv=None):
    """Build `cls` from --key=value flags (types from the defaults; tuples comma-separated; bools true/false)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg, names = cls(), {f.name for f in fields(cls)}
    for arg in argv:
        if arg in ("-h", "--help"):
            doc = (sys.modules["__main__"].__doc__ or "").strip()
            notes = _field_comments(cls)
            lines = [doc, "", "flags (--name=value):"] + [
                f"  --{f.name}={_show(getattr(cfg, f.name))}  {notes.get(f.name, '')}" for f in fields(cls)]
            print("\n".join(lines))
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"bad argument '{arg}': flags are --name=value (see --help)")
        key, value = arg[2:].split("=", 1)
        if key not in names:
            raise SystemExit(f"unknown flag --{key} (see --help for the list)")
        setattr(cfg, key, _convert(value, getattr(cfg, key), key))
    if hasattr(cfg, "__post_init__"):
        cfg.__post_init__()
    return cfg


def _show(v):
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v).lower() if isinstance(v, bool) else v


# ---- devices, DDP, precision


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: str
    master: bool

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else "cpu"


def init_distributed(device="auto"):
    """Under torchrun (RANK set): join the process group (nccl on CUDA, gloo on CPU). Else a single process."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if "RANK" in os.environ:
        rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        dev = f"cuda:{local}" if cuda else "cpu"
    else:
        rank, local, world = 0, 0, 1
        dev = "cuda" if cuda else "cpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Dist(rank, local, world, dev, rank == 0)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast(device_type):
    """bf16 autocast on CUDA; fp32 on CPU (bf16 on CPUs without AVX512-BF16 is many times slower)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()


def get_lr(step, lr, warmup=0, max_steps=0, decay="constant", min_lr_ratio=0.1):
    """Learning rate as a pure function of the step: linear warmup, then constant or cosine to min_lr_ratio*lr."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if decay == "cosine" and max_steps > warmup:
        t = min(1.0, (step - warmup) / (max_steps - warmup))
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return lr


# ---- checkpoints and logs


def save_checkpoint(obj, path):
    """torch.save to a temp file in the same folder, fsync, then rename: a kill never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path, kind):
    """Our checkpoints are plain dicts with a 'kind'; loaded with weights_only=True. Wrong file -> clear error."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: check the path (or run the training script first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); is it a torch checkpoint?") from e
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        got = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is a '{got}' checkpoint, expected '{kind}': pass a checkpoint written by the "
                         f"{'train_tokenizer.py' if kind == 'fqgan' else 'train_far.py'} script")
    return ckpt


def rng_states(d):
    """Every rank's CPU (and CUDA) generator state, stacked (world, n) uint8, for a checkpoint; collective under DDP."""
    mine = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if d.device_type == "cuda" else [])
    every = [mine]
    if d.world_size > 1:
        every = [None] * d.world_size
        dist.all_gather_object(every, mine)
    return {"rng_cpu": torch.stack([s[0] for s in every]),
            "rng_cuda": torch.stack([s[1] for s in every]) if d.device_type == "cuda" else None}


def restore_rng(ckpt, d, seed, log):
    """Put back this rank's generator states from rng_states(); a run resumed on another number of processes is
    reseeded instead (it then no longer matches the uninterrupted run exactly, and says so)."""
    if ckpt["rng_cpu"].shape[0] == d.world_size:
        torch.set_rng_state(ckpt["rng_cpu"][d.rank])
        if d.device_type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"][d.rank])
    else:
        log(f"note: checkpoint from {ckpt['rng_cpu'].shape[0]} processes, resumed on {d.world_size}: RNG reseeded")
        torch.manual_seed(seed + d.rank + ckpt["step"])


def savez_atomic(path, **arrays):
    """np.savez through a temp file + rename: readers never see a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object stops numpy from appending '.npz' to the temp name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def write_json(path, obj):
    """json.dump through a temp file + rename: readers never see a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_npz(path, images, labels=None):
    """Write uint8 images (N, H, W, 3) as an ADM sample batch (key arr_0; class labels as arr_1, as ADM's class-
    conditional samplers do), atomically."""
    images = np.asarray(images)
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, "need uint8 (N, H, W, 3)"
    savez_atomic(path, arr_0=images, **({} if labels is None else {"arr_1": np.asarray(labels, np.int64)}))


class Logger:
    """Rank-0 printing mirrored to out_dir/log.txt."""

    def __init__(self, out_dir, master=True):
        self.master, self.file = master, None
        if master and out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(out_dir) / "log.txt", "a")

    def __call__(self, *msg):
        if self.master:
            line = " ".join(str(m) for m in msg)
            print(line, flush=True)
            if self.file:
                self.file.write(line + "\n")
                self.file.flush()


def to_uint8(x):
    """[-1, 1] float images (B, 3, H, W) -> uint8 NHWC numpy, with the official rounding 127.5 x + 128."""
    return (127.5 * x.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---- datasets: items are (image (3, S, S) float in [-1, 1], label int)

FASHION_DIRS = ["/usr/share/datasets/fashion-mnist", "~/.cache/fqgan/fashion-mnist"]  # Debian: dataset-fashion-mnist


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_arrays(train=True, root=None):
    """(images uint8 (N, 28, 28), labels (N,)) from the raw idx files: `root`, Debian's package folder, our cache;
    else torchvision's downloader; else a clear error."""
    split = "train" if train else "t10k"
    names = (f"{split}-images-idx3-ubyte.gz", f"{split}-labels-idx1-ubyte.gz")
    dirs = ([root] if root else []) + FASHION_DIRS
    for d in map(lambda p: Path(p).expanduser(), dirs):
        if all((d / n).is_file() for n in names):
            return _read_idx(d / names[0]), _read_idx(d / names[1]).astype(np.int64)
    try:  # online: torchvision keeps the same files (unzipped) under <cache>/FashionMNIST/raw
        import torchvision
        cache = Path(FASHION_DIRS[1]).expanduser()
        ds = torchvision.datasets.FashionMNIST(str(cache), train=train, download=True)
        return ds.data.numpy(), ds.targets.numpy().astype(np.int64)
    except Exception as e:
        raise SystemExit(f"Fashion-MNIST not found in {dirs} and could not be downloaded ({type(e).__name__}): "
                         "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass "
                         "--data=PATH to an ImageFolder tree") from None


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST as RGB [-1, 1] images resized to image_size (bicubic, antialiased); random flips if train."""

    classes = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]

    def __init__(self, image_size, train=True, flip=True, root=None):
        images, self.labels = fashion_mnist_arrays(train, root)
        x = torch.from_numpy(images.copy()).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28)
        self.images = x if image_size == 28 else torch.cat([
            F.interpolate(c, size=image_size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
            for c in x.split(4096)])
        self.flip, self.seed, self.epoch, self.num_classes = flip and train, 0, 0, 10

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].expand(3, -1, -1)
        if self.flip and _rng(self.seed, self.epoch, i).random() < 0.5:
            x = x.flip(-1)
        return x.contiguous(), int(self.labels[i])


def _rng(*key):
    """A random.Random seeded by (seed, epoch, index): augmentation is a pure function of them (exact resume)."""
    return random.Random(int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little"))


IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".jpe"}


def adm_crop(img, size, rng=None, max_scale=1.25):
    """ADM crops: centre (rng=None) or random-resize-crop with the short side drawn in [size, ceil(size*max_scale)].
    BOX-halve while the short side >= 2*target, bicubic-resize the short side to the target, then crop size x size."""
    target = size if rng is None else rng.randint(size, math.ceil(size * max_scale))
    while min(img.size) >= 2 * target:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = target / min(img.size)
    img = img.resize(tuple(max(target, round(s * scale)) for s in img.size), resample=Image.BICUBIC)
    w, h = img.size
    x0 = (w - size) // 2 if rng is None else rng.randint(0, w - size)
    y0 = (h - size) // 2 if rng is None else rng.randint(0, h - size)
    return img.crop((x0, y0, x0 + size, y0 + size))


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image> (ImageNet layout). Any PIL mode is converted to RGB; train: ADM random-resize-crop +
    flip, else centre crop. An unreadable or truncated file is skipped (the next good one is returned), counted in
    `bad` and reported once with a warning: never a crash mid-epoch."""

    def __init__(self, root, image_size, train=True):
        root = Path(root)
        if not root.is_dir():
            raise SystemExit(f"--data={root}: no such folder (expected an ImageFolder tree root/<class>/<images>)")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [(p, c) for c, d in enumerate(self.classes) for p in sorted((root / d).rglob("*"))
                        if p.suffix.lower() in IMG_EXT]
        if not self.samples:
            raise SystemExit(f"--data={root}: no images found under {root}/<class>/ (extensions {sorted(IMG_EXT)})")
        self.image_size, self.train, self.seed, self.epoch = image_size, train, 0, 0
        self.num_classes, self.bad = len(self.classes), set()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def load(self, i, rng):
        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")  # L / RGBA / CMYK / P -> RGB; raises on truncated data
        img = adm_crop(img, self.image_size, rng)
        if rng is not None and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
        return x, label

    def __getitem__(self, i):
        for j in range(len(self.samples)):
            k = (i + j) % len(self.samples)
            try:
                return self.load(k, _rng(self.seed, self.epoch, k) if self.train else None)
            except Exception as e:  # corrupt / truncated / not an image
                if k not in self.bad:
                    self.bad.add(k)
                    warnings.warn(f"skipping unreadable image {self.samples[k][0]} ({type(e).__name__}: {e})")
        raise RuntimeError("no readable image in the dataset")


class Synthetic(torch.utils.data.Dataset):
    """Deterministic smooth random images with labels (tests and benchmarks; no files needed)."""

    def __init__(self, image_size, n=256, num_classes=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
        self.images = F.interpolate(low, size=image_size, mode="bilinear", align_corners=False)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        self.num_classes, self.epoch = num_classes, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def make_dataset(data, image_size, train=True, data_root=None):
    """--data=fashion-mnist | synthetic | PATH (ImageFolder)."""
    if data == "fashion-mnist":
        return FashionMNIST(image_size, train=train, root=data_root)
    if data == "synthetic":
        return Synthetic(image_size, n=256 if train else 64, seed=0 if train else 1)
    return ImageFolder(data, image_size, train=train)


def batches(dataset, batch_size, seed, rank=0, world_size=1, start_step=0, num_workers=0):
    """Endless (epoch, step, x, y) batches. Each epoch is a permutation seeded by (seed, epoch), split across ranks,
    so the order is a pure function of the step: resuming at start_step continues exactly where a run left off."""
    per_step = batch_size * world_size
    steps_per_epoch = len(dataset) // per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"dataset of {len(dataset)} images is smaller than one global batch of {per_step}")
    step = start_step
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        idx = perm[: steps_per_epoch * per_step].view(steps_per_epoch, world_size, batch_size)[offset:, rank]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=idx.tolist(), num_workers=num_workers,
                                             pin_memory=torch.cuda.is_available())
        for x, y in loader:
            yield epoch, step, x, y
            step += 1

