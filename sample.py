"""
Sample class-conditional images from a trained FAR checkpoint and its FQGAN tokenizer (single process, CPU or GPU;
bf16 on CUDA). The tokenizer path is read from the FAR checkpoint; --tokenizer overrides it.

    python sample.py --ckpt=out/far/ckpt.pt                      # PNG grid next to the checkpoint, one row per class
    python sample.py --ckpt=out/far/ckpt.pt --classes=0,7,9 --per_class=16 --cfg_scale=3 --top_k=100 --out=a.png
    python sample.py --ckpt=far.pt --tokenizer=fqgan_dual16.pt --per_class=50 --npz=samples.npz   # ADM npz too

Image j of the output is drawn with the seed (seed, j) only, so it does not depend on --batch_size or the device
batch it was generated in (eval_fid.py imports load_generator and generate_images for bulk sampling).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from common import autocast, load_checkpoint, parse_config, save_npz, to_uint8
from far import FAR
from fqgan import FQGAN


@dataclass
class SampleConfig:
    ckpt: str = "out/far/ckpt.pt"   # FAR checkpoint written by train_far.py
    tokenizer: str = ""             # FQGAN checkpoint; '' = the path recorded in the FAR checkpoint
    classes: str = ""               # comma-separated class ids, one grid row each; '' = up to 10 evenly spaced
    per_class: int = 8              # images per class (grid columns)
    cfg_scale: float = 2.0          # classifier-free guidance scale (paper: 2.0; 1 = off)
    cfg_schedule: str = "constant"  # 'constant' | 'linear' (from 1 at the first token to cfg_scale at the last)
    temperature: float = 1.0        # softmax temperature of every sub-token
    top_k: int = 0                  # keep the k most likely entries (0 = off, 1 = greedy)
    top_p: float = 1.0              # nucleus sampling mass (1 = off)
    seed: int = 0                   # image j uses the generator seed seed * 1000003 + j
    batch_size: int = 64            # images per generate call
    out: str = ""                   # PNG grid path; '' = samples.png next to the checkpoint
    npz: str = ""                   # also write every image to this ADM npz (arr_0 uint8 NHWC, arr_1 labels)
    device: str = "auto"            # 'auto' (cuda if available) | 'cpu' | 'cuda'
    compile: bool = True            # torch.compile the tokenizer decoder (CUDA only)


def load_generator(path, device="cpu", tokenizer=None):
    """FAR checkpoint -> (far, tokenizer) on `device`, eval mode. The tokenizer path comes from the FAR checkpoint
    unless `tokenizer` is given; K, V and the token grid must agree."""
    ckpt = load_checkpoint(path, "far")
    tok_path = tokenizer or ckpt.get("tokenizer")
    if not tok_path or not Path(tok_path).is_file():
        raise SystemExit(f"tokenizer checkpoint '{tok_path}' (recorded in {path}) not found: pass --tokenizer=PATH")
    far, tok = FAR.from_checkpoint(path, device, ckpt=ckpt), FQGAN.from_checkpoint(tok_path, device)
    del ckpt
    c, t = far.cfg, tok.cfg
    if (c.n_codebooks, c.codebook_size, c.block_size) != (t.n_codebooks, t.codebook_size, tok.grid ** 2):
        raise SystemExit(f"tokenizer {tok_path} (K={t.n_codebooks}, V={t.codebook_size}, T={tok.grid ** 2}) does not "
                         f"match the generator (K={c.n_codebooks}, V={c.codebook_size}, T={c.block_size})")
    return far, tok


@torch.no_grad()
def generate_images(far, tok, labels, seeds, cfg_scale=2.0, cfg_schedule="constant", temperature=1.0, top_k=0,
                    top_p=1.0):
    """labels (B,) and one integer seed per image -> uint8 images (B, H, W, 3). Each image depends only on its own
    (label, seed), never on the batch it was drawn in or on the number of GPUs (up to float rounding: the decoder's
    output can move a pixel by 1 with the batch size)."""
    device = next(far.parameters()).device
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    with autocast(device.type):
        codes = far.generate(torch.as_tensor(labels, device=device), cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                             temperature=temperature, top_k=top_k, top_p=top_p, generator=gens)  # (B, K, T)
        images = tok.decode_indices(codes.view(codes.shape[0], codes.shape[1], tok.grid, tok.grid))  # (B, 3, H, W)
    return to_uint8(images)


def main(cfg):
    """Write the grid PNG (and the npz); returns the uint8 images (N, H, W, 3) and their labels (N,)."""
    device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    torch.set_float32_matmul_precision("high")
    far, tok = load_generator(cfg.ckpt, device, cfg.tokenizer or None)
    if cfg.compile and device == "cuda":  # static shapes: worth it. The FAR decode step (a KV cache that grows
        tok.decoder = torch.compile(tok.decoder)  # every token) would recompile per position, so it stays eager.
    n = far.cfg.num_classes
    classes = [int(c) for c in cfg.classes.split(",") if c.strip()] if cfg.classes else \
        torch.linspace(0, n - 1, min(10, n)).long().tolist()
    if not classes or not all(0 <= c < n for c in classes):
        raise SystemExit(f"--classes={cfg.classes}: class ids must be in [0, {n - 1}]")
    labels = torch.tensor(classes).repeat_interleave(cfg.per_class)  # (N,), class-major: rows = classes
    seeds = [cfg.seed * 1000003 + j for j in range(len(labels))]
    print(f"sampling {len(labels)} images ({len(classes)} classes x {cfg.per_class}) on {device} | cfg "
          f"{cfg.cfg_scale} ({cfg.cfg_schedule}) | temperature {cfg.temperature} | top-k {cfg.top_k} | "
          f"top-p {cfg.top_p} | tokenizer {cfg.tokenizer or 'from the checkpoint'}")
    images = np.concatenate([generate_images(far, tok, labels[i:i + cfg.batch_size], seeds[i:i + cfg.batch_size],
                                             cfg.cfg_scale, cfg.cfg_schedule, cfg.temperature, cfg.top_k, cfg.top_p)
                             for i in tqdm(range(0, len(labels), cfg.batch_size), desc="batches")])
    out = Path(cfg.out or Path(cfg.ckpt).with_name("samples.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    torchvision.utils.save_image(grid, out, nrow=cfg.per_class)
    print(f"wrote {out}")
    if cfg.npz:
        save_npz(cfg.npz, images, labels.numpy())  # atomic
        print(f"wrote {cfg.npz}: arr_0 {images.shape} uint8 (ADM format), arr_1 labels")
    return images, labels.numpy()


if __name__ == "__main__":
    main(parse_config(SampleConfig))
