"""
Train the two small Fashion-MNIST networks (pretrained.Classifier) on the labelled train split:

  --net=teacher  the image-understanding (IU) teacher, a compact hybrid ViT (the paper family's "supervised ViT"): it
                 supervises FQGAN's semantic branch (--teachers=none,fmnist_vit), is distilled by VQ-KD and is the
                 Cluster tokenizer's encoder. Its input is the tokenizer's [-1, 1] image.
  --net=featnet  the evaluation CNN: its features give FID-FMNIST, its predictions the class accuracy of samples
                 (eval_fid.py --net=fmnist). It is not the teacher: a metric must not be the training target.

AdamW, warm-up then cosine decay, label smoothing 0.1, 32 px; recipes in NETS (no flips or 2-pixel shifts for the
teacher: they cost it ~0.5 and ~1.3 points here). The test accuracy goes into the checkpoint.
"""
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from common import Logger, adamw, check, cli, get_lr, save_checkpoint, session
from data import make_dataset
from pretrained import TRAINED_HERE, Classifier, ClassifierConfig, checkpoint_dict

NETS = {  # --net -> (ClassifierConfig fields, recipe: epochs, batch size, peak lr, random flips)
    "teacher": (dict(net="vit", width=32, patch=8, layers=4, heads=2, mean=0.5, std=0.5), (10, 256, 3e-3, False)),
    "featnet": (dict(net="cnn", width=128, mean=0.2860, std=0.3530), (3, 128, 2e-3, True)),
}


@dataclass
class TrainConfig:
    net: str = "teacher"            # 'teacher' (the IU teacher, a hybrid ViT) | 'featnet' (the evaluation CNN)
    out: str = ""                   # checkpoint path; '' = out/teacher/ckpt.pt or out/featnet/ckpt.pt
    epochs: float = 0               # passes over the 60k training images; 0 = the net's recipe (NETS), as are
    batch_size: int = 0             # images per step
    lr: float = 0                   # peak AdamW learning rate (100 warm-up steps, cosine to 0)
    weight_decay: float = 0.05      # AdamW decay of >= 2-D weights
    seed: int = 0                   # init, batches and flips
    device: str = "auto"            # 'auto' (cuda if available) | 'cpu' | 'cuda'

    def __post_init__(self):
        check(self, net=tuple(NETS))


def main(cfg):
    """Train, test, save; returns {'test_acc', 'seconds', 'path', 'model'}."""
    with session(cfg.device, all_cores=True) as s:  # it runs alone: both cores (OMP_NUM_THREADS=1 if busy)
        arch, (epochs, batch_size, lr, flip) = NETS[cfg.net]
        epochs, batch_size, lr = cfg.epochs or epochs, cfg.batch_size or batch_size, cfg.lr or lr
        path, log = cfg.out or TRAINED_HERE[cfg.net], Logger(None)
        train, test = make_dataset("fashion-mnist", 32, "train"), make_dataset("fashion-mnist", 32, "test")
        torch.manual_seed(cfg.seed)
        model = Classifier(ClassifierConfig(**arch)).to(s.device)
        opt = adamw(model, lr, (0.9, 0.999), cfg.weight_decay, s.device_type)
        steps = math.ceil(epochs * len(train) / batch_size)
        log(f"{cfg.net}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters, {steps} steps of "
            f"{batch_size} on {s.device} ({torch.get_num_threads()} threads) | {asdict(model.cfg)}")
        g, t0 = torch.Generator().manual_seed(cfg.seed), time.time()
        for step in range(steps):
            idx = torch.randint(len(train), (batch_size,), generator=g)
            x, y = train.images[idx], train.labels[idx]  # (B, 1, 32, 32) in [-1, 1]
            if flip:
                x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
            for group in opt.param_groups:
                group["lr"] = get_lr(step, lr, 100, steps, "cosine", min_ratio=0.0)
            with s.autocast():
                logits = model(x.expand(-1, 3, -1, -1).to(s.device))["logits"].float()
                loss = F.cross_entropy(logits, y.to(s.device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % max(1, steps // 10) == 0:
                log(f"step {step + 1}/{steps} | loss {loss.item():.4f} | {time.time() - t0:.0f} s")
        model.eval()
        with torch.no_grad():  # test accuracy
            hits = sum((model(x.to(s.device).expand(-1, 3, -1, -1))["logits"].argmax(1).cpu() == y).sum().item()
                       for x, y in zip(test.images.split(500), test.labels.split(500)))
        acc, seconds = hits / len(test.labels), time.time() - t0
        log(f"{cfg.net}: test accuracy {acc:.4f} after {seconds:.0f} s of training -> {path}")
        save_checkpoint(checkpoint_dict(model.cpu(), cfg.net, test_acc=acc, train_config=asdict(cfg)), path)
        return {"test_acc": acc, "seconds": seconds, "path": path, "model": model}


if __name__ == "__main__":
    cli(main, TrainConfig)
