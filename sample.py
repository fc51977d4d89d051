"""
Sample class-conditional images (one process, CPU or GPU) from a trained FAR checkpoint and the FQGAN tokenizer it
records (--tokenizer overrides it). A label and --seed give the same image as eval_fid.py, on any batch size or GPUs.

    python sample.py --ckpt=out/far/ckpt.pt                      # PNG grid next to the checkpoint, one row per class
    python sample.py --ckpt=out/far/ckpt.pt --classes=0,7,9 --per_class=16 --cfg_scale=3 --top_k=100 --out=a.png
    python sample.py --ckpt=far.pt --tokenizer=fqgan_dual16.pt --per_class=50 --npz=samples.npz   # ADM npz too
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from common import autocast, build, check, cli, image_seed, load_checkpoint, save_npz, session, to_uint8
from far import FAR
from fqgan import FQGAN


@dataclass
class SampleConfig:
    ckpt: str = "out/far/ckpt.pt"   # FAR checkpoint written by train_far.py
    tokenizer: str = ""             # FQGAN checkpoint; '' = the path recorded in the FAR checkpoint
    classes: str = ""               # comma-separated class ids, one grid row each; '' = up to 10 evenly spaced
    per_class: int = 8              # images per class (grid columns)
    cfg_scale: float = 2.0          # classifier-free guidance scale (paper: 2.0; 1 = off)
    temperature: float = 1.0        # softmax temperature of every sub-token
    top_k: int = 0                  # keep the k most likely entries (0 = off, 1 = greedy)
    top_p: float = 1.0              # nucleus sampling mass (1 = off)
    seed: int = 0                   # image j uses the per-image seed common.image_seed(seed, j)
    batch_size: int = 64            # images per generate call
    out: str = ""                   # PNG grid path; '' = samples.png next to the checkpoint
    npz: str = ""                   # also write every image to this ADM npz (arr_0 uint8 NHWC, arr_1 labels)
    device: str = "auto"            # 'auto' (cuda if available) | 'cpu' | 'cuda'
    compile: bool = True            # CUDA only: compile the decode step (CUDA graph) and the tokenizer decoder

    def __post_init__(self):
        check(self, positive="per_class cfg_scale temperature top_p batch_size", unit="top_p")


def load_generator(path, device="cpu", tokenizer=None):
    """FAR checkpoint -> (far, tokenizer) in eval mode; tokenizer: the given path or the one the checkpoint records."""
    ckpt = load_checkpoint(path, "far")
    tok_path = tokenizer or ckpt.get("tokenizer")
    if not tok_path or not Path(tok_path).is_file():
        raise SystemExit(f"tokenizer checkpoint '{tok_path}' (recorded in {path}) not found: pass --tokenizer=PATH")
    far, tok = build(FAR, ckpt, path, device), build(FQGAN, load_checkpoint(tok_path, "fqgan"), tok_path, device)
    c, t = far.cfg, tok.cfg
    if (c.n_codebooks, c.codebook_size, c.block_size) != (t.n_codebooks, t.codebook_size, tok.grid ** 2):
        raise SystemExit(f"tokenizer {tok_path} (K={t.n_codebooks}, V={t.codebook_size}, T={tok.grid ** 2}) does not "
                         f"match the generator (K={c.n_codebooks}, V={c.codebook_size}, T={c.block_size})")
    return far, tok


@torch.no_grad()
def generate_images(far, tok, labels, seeds, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, compile=False):
    """labels (B,), an int seed per image -> uint8 images (B, H, W, 3). An image's codes depend only on its (label,
    seed) (FAR in bf16 on CUDA); decoding is fp32 (the decoder may move a pixel by 1 with the batch size)."""
    device = next(far.parameters()).device
    with autocast(device.type):
        codes = far.generate(torch.as_tensor(labels, device=device), cfg_scale, temperature, top_k, top_p,
                             seeds=seeds, compile=compile)  # (B, K, T)
    return to_uint8(tok.decode_indices(codes.view(*codes.shape[:2], tok.grid, tok.grid)))  # (B, H, W, 3)


def main(cfg):
    """Write the grid PNG (and the npz); returns the uint8 images (N, H, W, 3) and their labels (N,)."""
    with session(cfg.device) as s:
        far, tok = load_generator(cfg.ckpt, s.device, cfg.tokenizer or None)
        fast = cfg.compile and s.device_type == "cuda"
        if fast:  # static shapes: compiled once
            tok.decoder = torch.compile(tok.decoder)
        n = far.cfg.num_classes
        try:
            classes = [int(c) for c in cfg.classes.split(",")] if cfg.classes else \
                torch.linspace(0, n - 1, min(10, n)).long().tolist()
            assert all(0 <= c < n for c in classes)
        except (ValueError, AssertionError):
            raise SystemExit(f"--classes={cfg.classes}: give comma-separated class ids in [0, {n - 1}]") from None
        labels = torch.tensor(classes).repeat_interleave(cfg.per_class)  # (N,), class-major: rows = classes
        seeds = [image_seed(cfg.seed, j) for j in range(len(labels))]
        print(f"sampling {len(labels)} images ({len(classes)} classes x {cfg.per_class}) on {s.device} | cfg "
              f"{cfg.cfg_scale} | temperature {cfg.temperature} | top-k {cfg.top_k} | top-p {cfg.top_p}")
        images = np.concatenate([generate_images(far, tok, labels[i:i + cfg.batch_size], seeds[i:i + cfg.batch_size],
                                                 cfg.cfg_scale, cfg.temperature, cfg.top_k, cfg.top_p, fast)
                                 for i in tqdm(range(0, len(labels), cfg.batch_size), desc="batches")])
        out = Path(cfg.out or Path(cfg.ckpt).with_name("samples.png"))
        out.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(torch.from_numpy(images).permute(0, 3, 1, 2) / 255, out, nrow=cfg.per_class)
        print(f"wrote {out}")
        if cfg.npz:
            save_npz(cfg.npz, arr_0=images, arr_1=labels.numpy())  # ADM format (+ labels), atomic
            print(f"wrote {cfg.npz}: arr_0 {images.shape} uint8 (ADM format), arr_1 labels")
        return images, labels.numpy()


if __name__ == "__main__":
    cli(main, SampleConfig)
