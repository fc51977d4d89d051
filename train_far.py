"""
Train FAR, the factorized autoregressive generator of arXiv 2411.16681, on the codes of a trained FQGAN tokenizer
(official recipe: train_far_dual.sh of showlab/FQGAN). One command runs both steps:

1. Code extraction (once): train images -> `crops` views -> tokenizer.encode (fp32) -> one packed memmap
   codes_dir/train.npy (N, crops, K, T) + labels + json; held-out images (one centre view) -> val.*. crops=10 is the
   official ImageNet recipe (ADM centre crop to int(1.1 * size), then ten crops). Unreadable images (label -1) are
   never trained on; a killed extraction resumes; ranks share the images; another tokenizer's codes are refused.
2. Training: one random view per image; logged: the loss, the val cross-entropy per sub-token, a sample grid.

    python train_far.py                                   # tiny FAR on out/tokenizer/ckpt.pt's Fashion-MNIST codes
    torchrun --standalone --nproc_per_node=8 train_far.py --tokenizer=fqgan_dual16.pt --data=/data/imagenet/train \\
        --val_data=/data/imagenet/val --preset=B --batch_size=32 --lr=1e-4 --warmup_steps=0 --lr_decay=constant \\
        --max_steps=1500000 --num_workers=8 --eval_interval=25000 --ckpt_interval=25000   # official FAR-B (batch 256)

Shape legend: B batch, N images, C views (crops) per image, K sub-codebooks, T = h*w tokens, V entries per codebook.
"""
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torchvision
import torchvision.transforms.functional as TF
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (Logger, adamw, build, check, cli, get_lr, load_checkpoint, resume, rng_states,
                    save_checkpoint, save_json, session)
from data import make_dataset
from far import FAR, PRESETS, FARConfig, checkpoint_dict
from fqgan import FQGAN
from sample import generate_images


@dataclass
class TrainConfig:
    # data and output
    tokenizer: str = "out/tokenizer/ckpt.pt"  # FQGAN checkpoint (train_tokenizer.py or an official file)
    data: str = "fashion-mnist"     # 'fashion-mnist' | 'synthetic' | PATH of an ImageFolder tree root/<class>/<image>
    val_data: str = ""              # held-out ImageFolder PATH; '' = the test split (fashion-mnist, synthetic)
    crops: int = 0                  # views per image: 10 (ten-crop) | 2 (image, flip) | 1; 0: 10 for a folder, else 1
    train_images: int = 0           # encode and train on only this many train images, evenly spaced (0 = all)
    codes_dir: str = ""             # packed codes train.npy / val.npy + labels + json; '' = out_dir/codes
    out_dir: str = "out/far"        # log.txt, ckpt.pt and samples_<step>.png are written here
    resume: bool = False            # continue out_dir/ckpt.pt exactly (same flags): weights, optimizer, step, RNG
    # model: K, V, T come from the tokenizer, the number of classes from the data
    preset: str = "tiny"            # far.PRESETS: tiny | B | L
    head: str = "ar"                # 'ar' (factorized AR head) | 'linear' | 'mlp' (K classifiers, paper Table 4)
    # optimisation (official: AdamW (0.9, 0.95), lr 1e-4 constant, wd 0.05, clip 1.0, global batch 256, ~1.5M steps)
    batch_size: int = 32            # sequences per micro-step per process
    grad_accum: int = 1             # micro-steps per optimizer step; global batch = batch_size * grad_accum * world
    max_steps: int = 2000           # optimizer steps of the run
    lr: float = 1e-3                # peak learning rate (official 1e-4: far too slow for the tiny demo)
    warmup_steps: int = 100         # linear warm-up steps (official: none)
    lr_decay: str = "cosine"        # 'constant' (official) | 'cosine' (to 0.1 * lr at max_steps; the demo)
    beta1: float = 0.9              # AdamW beta1
    beta2: float = 0.95             # AdamW beta2
    weight_decay: float = 0.05      # AdamW decay of >= 2-D tensors (matrices, embeddings); 1-D ones get none
    grad_clip: float = 1.0          # max global gradient norm (0 = no clipping)
    # evaluation
    val_images: int = 2000          # held-out images for the val cross-entropy (a fixed evenly spaced subset)
    grid_classes: int = 10          # class rows of the sample grid (evenly spaced class ids)
    grid_per_class: int = 8         # samples per row of the grid
    cfg_scale: float = 2.0          # classifier-free guidance of the grid samples (paper: 2.0)
    # system
    device: str = "auto"            # 'auto' (cuda if available) | 'cpu' | 'cuda'
    compile: bool = True            # torch.compile the FAR training forward (CUDA only; eager fp32 on CPU)
    seed: int = 0                   # model init uses seed; dropout seed + rank; data order and views seed
    extract_batch: int = 256        # images per tokenizer call (x crops) during the extraction
    num_workers: int = 0            # DataLoader workers reading images for the extraction (8+ for ImageFolder)
    log_interval: int = 100         # optimizer steps between log lines
    eval_interval: int = 1000       # steps between val CE + sample grid (and at the last step)
    ckpt_interval: int = 1000       # steps between checkpoints (and at the last step)

    def __post_init__(self):
        check(self, positive="batch_size grad_accum lr log_interval eval_interval ckpt_interval extract_batch "
                             "val_images grid_classes grid_per_class cfg_scale", unit="beta1 beta2",
              preset=tuple(PRESETS), head=("ar", "linear", "mlp"), lr_decay=("constant", "cosine"), crops=(0, 1, 2, 10))


# ---- step 1: code extraction
def fingerprint(tok):
    """Cheap identity of what the codes depend on: blake2b of the config and every weight except the decoder's."""
    h = hashlib.blake2b(repr(asdict(tok.cfg)).encode(), digest_size=8)
    for name, t in tok.state_dict().items():
        if not name.startswith(("decoder.", "post_quant_conv.")) and not name.endswith("codebook_used"):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def code_meta(tok, path):
    """What packed codes depend on (stored in their json; all but the path must match to reuse them)."""
    return dict(tokenizer=str(Path(path).resolve()), fingerprint=fingerprint(tok), n_codebooks=tok.cfg.n_codebooks,
                codebook_size=tok.cfg.codebook_size, tokens=tok.grid ** 2, image_size=tok.cfg.image_size)


def views(x, crops, size):
    """Images (B, 3, S, S) -> views (B, crops, 3, size, size) in torchvision TenCrop order: top-left, top-right,
    bottom-left, bottom-right, centre, then the same five of the flipped image; crops 2: centre and its flip."""
    v = TF.ten_crop(x, size) if crops == 10 else (TF.center_crop(x, size), TF.center_crop(x, size).flip(-1))
    return torch.stack(v[:crops], 1)  # (B, C, 3, size, size)


def extract(tok, meta, data, split, crops, limit, cfg, s, log):
    """Encode the split's images (only `limit` of them, evenly spaced, when given) into codes_dir/{split}.npy
    (n, C, K, T) + {split}_labels.npy (n,) + {split}.json -> (codes memmap, labels); label -1: an unreadable image."""
    base = Path(cfg.codes_dir or Path(cfg.out_dir) / "codes")
    final, lab_final, meta_path = base / f"{split}.npy", base / f"{split}_labels.npy", base / f"{split}.json"
    K, T, V, size = tok.cfg.n_codebooks, tok.grid ** 2, tok.cfg.codebook_size, tok.cfg.image_size
    ds = make_dataset(data, int(size * 1.1) if crops == 10 else size, "train" if split == "train" else "test")
    keep = np.linspace(0, len(ds) - 1, min(limit or len(ds), len(ds))).round().astype(int).tolist()
    want = dict(meta, data=data, crops=crops, images=len(keep), first=keep[0], last=keep[-1])
    if meta_path.exists():
        have = json.loads(meta_path.read_text())
        stale = {k: (have.get(k), v) for k, v in want.items() if k != "tokenizer" and have.get(k) != v}
        if stale:
            raise SystemExit(f"{meta_path}: these codes do not match this run (stored, now): {stale}. They were "
                             f"extracted with {have.get('tokenizer')}: delete {base} or pass a new --codes_dir")
        return np.load(final, mmap_mode="r"), np.load(lab_final)
    part, lab_part = base / f"{split}.npy.partial", base / f"{split}_labels.npy.partial"
    b, W = cfg.extract_batch, s.world_size
    markers = [base / f"{split}.progress{r}.json" for r in range(W)]
    resume = dict(want, world_size=W, extract_batch=b)
    if s.master and not (part.exists() and lab_part.exists() and all(
            m.exists() and json.loads(m.read_text())["want"] == resume for m in markers)):  # (re)start from chunk 0
        base.mkdir(parents=True, exist_ok=True)
        for m in base.glob(f"{split}.progress*.json"):
            m.unlink()
        np.lib.format.open_memmap(part, "w+", np.int16 if V <= 32767 else np.int32, (len(keep), crops, K, T)).flush()
        np.lib.format.open_memmap(lab_part, "w+", np.int64, (len(keep),)).flush()
        for m in markers:
            save_json(m, dict(want=resume, done=0))
    if W > 1:
        dist.barrier()
    done = json.loads(markers[s.rank].read_text())["done"]  # chunks of this rank already written
    codes, labels = np.load(part, mmap_mode="r+"), np.load(lab_part, mmap_mode="r+")
    mine = list(range(s.rank, math.ceil(len(keep) / b), W))  # chunk c = rows [c*b, (c+1)*b)
    log(f"extracting {split} codes of {data}: {len(keep)} images x {crops} views -> {final}"
        + (f" (resuming: rank 0 has {done}/{len(mine)} chunks)" if done else ""))
    todo, t0 = [keep[c * b:c * b + b] for c in mine[done:]], time.time()
    for i, (x, y) in enumerate(torch.utils.data.DataLoader(ds, batch_sampler=todo, num_workers=cfg.num_workers),
                               start=done):
        lo = mine[i] * b
        idx = tok.encode(views(x, crops, size).flatten(0, 1).to(s.device))  # (B*C, K, h, w), fp32 as the official
        codes[lo:lo + len(x)] = idx.view(len(x), crops, K, T).cpu().numpy()
        labels[lo:lo + len(x)] = y.numpy()  # -1: an unreadable image (its codes are never used)
        codes.flush()  # data on disk before the marker says so
        labels.flush()
        save_json(markers[s.rank], dict(want=resume, done=i + 1))
    log(f"extracted {split} in {time.time() - t0:.0f} s (this process)")
    del codes, labels
    if W > 1:
        dist.barrier()
    if s.master:  # complete: rename into place, meta last (its presence means 'done')
        lab_part.replace(lab_final)
        part.replace(final)
        save_json(meta_path, dict(want, unreadable=int((np.load(lab_final) < 0).sum())))
        for m in markers:
            m.unlink()
    if W > 1:
        dist.barrier()
    return np.load(final, mmap_mode="r"), np.load(lab_final)


# ---- step 2: training
def get_batch(codes, labels, valid, step, cfg, s):
    """Micro-batch number `step` of this rank: (codes (B, K, T) int64, labels (B,)) from the readable images `valid`.
    Epoch order seeded by (seed, epoch), one random view per image from a generator seeded by (seed, step)."""
    per = cfg.batch_size * s.world_size
    epoch, off = divmod(step, len(valid) // per)
    perm = torch.randperm(len(valid), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch)).numpy()
    mine = slice(s.rank * cfg.batch_size, (s.rank + 1) * cfg.batch_size)
    idx = valid[perm[off * per:(off + 1) * per][mine]]
    view = torch.randint(codes.shape[1], (per,), generator=torch.Generator().manual_seed(cfg.seed * 1000003 + step))
    order = np.argsort(idx)  # sorted reads from the memmap, then back to batch order
    x = codes[idx[order], view[mine].numpy()[order]][np.argsort(order)].astype(np.int64)  # (B, K, T)
    return torch.from_numpy(x), torch.from_numpy(labels[idx])


@torch.no_grad()
def evaluate(model, val_x, val_y, s, batch_size):
    """Held-out cross-entropy per sub-token k (K,), eval mode (no dropout), averaged over the images of all ranks."""
    was_training, K = model.training, val_x.shape[1]
    model.eval()
    total = torch.zeros(K + 1, device=s.device)  # per-k sums of per-batch mean CE x batch size, image count
    for x, y in zip(val_x.split(batch_size), val_y.split(batch_size)):
        with s.autocast():
            _, ce = model(x.to(s.device), y.to(s.device), targets=x.to(s.device))  # (K,)
        total += torch.cat([ce.float() * len(x), ce.new_tensor([len(x)])])
    model.train(was_training)
    return s.all_reduce(total)[:K] / total[K].clamp_min(1)


def main(cfg):
    """Extract (if needed) and train; returns {'step', 'val_ce' (K,), 'history', 'model' (raw FAR)}."""
    with session(cfg.device) as s:
        log, path = Logger(cfg.out_dir, s.master), Path(cfg.out_dir) / "ckpt.pt"
        use_compile = cfg.compile and s.device_type == "cuda"
        log(f"device {s.device} | world size {s.world_size} | torch {torch.__version__} | compile {use_compile}")
        log(f"train config: {asdict(cfg)}")
        tok = build(FQGAN, load_checkpoint(cfg.tokenizer, "fqgan"), cfg.tokenizer, s.device).requires_grad_(False)
        K, V, T = tok.cfg.n_codebooks, tok.cfg.codebook_size, tok.grid ** 2
        meta = code_meta(tok, cfg.tokenizer)
        log(f"tokenizer {cfg.tokenizer}: K={K} x V={V}, T={T} tokens, fingerprint {meta['fingerprint']}")
        ckpt = load_checkpoint(path, "far") if cfg.resume else None
        if ckpt:  # checked before any image is encoded; the same tokenizer also means the same K, V, T
            resumed = build(FAR, ckpt, path)
            if ckpt.get("tokenizer_fingerprint") != meta["fingerprint"]:
                raise SystemExit(f"{path} was trained on the codes of another tokenizer ({ckpt.get('tokenizer')}): "
                                 "pass that --tokenizer, or a new --out_dir")

        t0 = time.time()  # step 1: packed codes (reused when they match this tokenizer)
        crops = cfg.crops or (1 if cfg.data in ("fashion-mnist", "synthetic") else 10)
        train_codes, train_labels = extract(tok, meta, cfg.data, "train", crops, cfg.train_images, cfg, s, log)
        held_out = cfg.val_data or (cfg.data if cfg.data in ("fashion-mnist", "synthetic") else "")
        if not held_out:
            raise SystemExit("--data is a folder: pass --val_data=PATH (a held-out ImageFolder) for the val CE")
        val_codes, val_labels = extract(tok, meta, held_out, "val", 1, cfg.val_images, cfg, s, log)
        pick = np.flatnonzero(val_labels >= 0)[s.rank::s.world_size]
        val_x, val_y = torch.from_numpy(val_codes[pick, 0].astype(np.int64)), torch.from_numpy(val_labels[pick])
        valid = np.flatnonzero(train_labels >= 0)  # unreadable images are never trained on
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
        log(f"codes: train {tuple(train_codes.shape)} {train_codes.dtype} ({len(train_labels) - len(valid)} unreadable "
            f"images skipped), val {len(pick)} images per rank, {num_classes} classes | {time.time() - t0:.1f} s")

        model_cfg = ckpt["config"] if ckpt else dict(**PRESETS[cfg.preset], head=cfg.head, n_codebooks=K,
                                                     codebook_size=V, block_size=T, num_classes=num_classes)
        log(f"model config: {model_cfg}")
        torch.manual_seed(cfg.seed)  # the same init on every rank
        raw = (resumed.train() if ckpt else FAR(FARConfig(**model_cfg))).to(s.device)
        log(f"parameters: FAR {sum(p.numel() for p in raw.parameters()) / 1e6:.3f} M | tokenizer (frozen) "
            f"{sum(p.numel() for p in tok.parameters()) / 1e6:.3f} M")
        opt = adamw(raw, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, s.device_type)
        step = resume(ckpt, {"opt": opt}, s, cfg, path, log)
        model = torch.compile(raw) if use_compile else raw
        if s.world_size > 1:
            model = DDP(model, device_ids=[s.local_rank] if s.device_type == "cuda" else None)
        global_batch = cfg.batch_size * cfg.grad_accum * s.world_size
        if len(valid) < cfg.batch_size * s.world_size:
            raise SystemExit(f"{len(valid)} training images are fewer than one batch: lower --batch_size")
        log(f"global batch {global_batch} = {cfg.batch_size} x {cfg.grad_accum} accum x {s.world_size} ranks | "
            f"{len(valid) / global_batch:.0f} steps/epoch")

        grid_labels = torch.linspace(0, num_classes - 1, min(cfg.grid_classes, num_classes)).long()
        grid_labels = grid_labels.repeat_interleave(cfg.grid_per_class)  # rows = classes
        history, loss_sum, n_sum, val_ce, t0 = [], torch.zeros((), device=s.device), 0, None, time.time()
        while True:
            last = step == cfg.max_steps
            if step % cfg.eval_interval == 0 or last:  # val CE (all ranks) + sample grid (rank 0)
                t_eval = time.time()
                val_ce = evaluate(raw, val_x, val_y, s, cfg.batch_size)
                log(f"step {step} | val CE {val_ce.mean():.4f} | per sub-token " + " ".join(f"{c:.4f}" for c in val_ce))
                if s.master:
                    imgs = generate_images(raw.eval(), tok, grid_labels, range(len(grid_labels)), cfg.cfg_scale)
                    raw.train()
                    torchvision.utils.save_image(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255,
                                                 Path(cfg.out_dir) / f"samples_{step:07d}.png", nrow=cfg.grid_per_class)
                t0 += time.time() - t_eval
            if (step % cfg.ckpt_interval == 0 and step > 0) or last:
                extra = dict(tokenizer=meta["tokenizer"], tokenizer_fingerprint=meta["fingerprint"], step=step,
                             train_config=asdict(cfg), opt=opt.state_dict(), **rng_states(s))
                if s.master:
                    save_checkpoint(checkpoint_dict(raw, **extra), path)
            if last:
                break
            lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.lr_decay)
            for group in opt.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                x, y = (t.to(s.device, non_blocking=True) for t in
                        get_batch(train_codes, train_labels, valid, step * cfg.grad_accum + micro, cfg, s))
                if s.world_size > 1:
                    model.require_backward_grad_sync = micro == cfg.grad_accum - 1
                with s.autocast():
                    loss = model(x, y, targets=x)[1].mean()  # teacher forcing: the targets are the inputs
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step, n_sum = step + 1, n_sum + 1
            if step % cfg.log_interval == 0 or step == cfg.max_steps:  # .item() (a sync) only here
                dt = time.time() - t0
                row = dict(step=step, loss=(loss_sum / n_sum).item(), lr=lr, grad_norm=norm.item(),
                           img_per_s=n_sum * global_batch / dt)
                if not math.isfinite(row["loss"]):
                    raise SystemExit(f"loss is {row['loss']} at step {step}: stopping; "
                                     f"{path} keeps the last good state")
                history.append(row)
                log(f"step {step} | loss {row['loss']:.4f} | lr {lr:.2e} | gnorm {row['grad_norm']:.3f} | "
                    f"{1000 * dt / n_sum:.0f} ms/step | {row['img_per_s']:.0f} img/s")
                loss_sum, n_sum, t0 = torch.zeros((), device=s.device), 0, time.time()
        log(f"done: step {step} | val CE {val_ce.mean().item():.4f} | checkpoint {path}")
        return {"step": step, "val_ce": val_ce.tolist(), "history": history, "model": raw}


if __name__ == "__main__":
    cli(main, TrainConfig)
