"""
Train FAR, the factorized autoregressive generator of "Factorized Visual Tokenization and Generation" (Bai et al.,
arXiv 2411.16681), on the codes of a trained FQGAN tokenizer (official recipe: train_far_dual.sh of showlab/FQGAN).
One command runs both steps:

1. Code extraction (once). Every train image -> `crops` views -> tokenizer.encode -> ONE packed array
   codes_dir/train.npy (N, crops, K, T), int16 (int32 when V > 32767), read memory-mapped, + train_labels.npy +
   train.json (tokenizer path and fingerprint, data, crops, shapes). The held-out split (one centre view per image)
   goes to val.*. Views: crops=10 is the official ImageNet recipe, ADM centre crop to int(1.1 * size), then
   torchvision TenCrop(size) = 4 corners + centre of the image and of its horizontal flip; crops=2 = the image and
   its flip; crops=1 = the image (default for Fashion-MNIST and synthetic: small centred objects, nothing to crop,
   and a second view would add ~80 s of encoding to the ~7 minute CPU demo for little gain in a 2-epoch run).
   Extraction writes *.partial files plus a progress marker per rank: a killed run continues where it stopped, and
   the final names appear only complete. Under torchrun the ranks share the images.
   Existing codes are reused when they match the tokenizer (fingerprint of its encoder and codebook weights) and the
   flags; codes of another tokenizer are refused (delete codes_dir or pass a new --codes_dir).
2. Training: one random view per image and access (drawn from a generator seeded by (seed, micro-step)), the epoch
   order seeded by (seed, epoch): the data is a pure function of the step, so resuming is exact. AdamW (0.9, 0.95),
   weight decay on >= 2-D tensors, lr from common.get_lr, grad clip, bf16 + torch.compile on CUDA, DDP, gradient
   accumulation. Logged: train loss, per-sub-token val cross-entropy on a fixed held-out set, a sample grid PNG.

    python train_far.py --tokenizer=out/tokenizer/ckpt.pt      # tiny FAR on Fashion-MNIST codes: 2 CPU cores, ~7 min
    torchrun --standalone --nproc_per_node=8 train_far.py --tokenizer=fqgan_dual16.pt --data=/data/imagenet/train \\
        --val_data=/data/imagenet/val --preset=B --batch_size=32 --lr=1e-4 --warmup_steps=0 --lr_decay=constant \\
        --max_steps=1500000 --num_workers=8 --log_interval=100 --eval_interval=25000 --ckpt_interval=25000
                                                                # the official FAR-B recipe (global batch 256)
    python train_far.py --resume=true ...                      # continue out_dir/ckpt.pt exactly (same flags)

Shape legend: B batch, N images, C views (crops) per image, K sub-codebooks, T = h*w tokens, V entries per codebook.
"""
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (FashionMNIST, ImageFolder, Logger, Synthetic, autocast, cleanup_distributed, get_lr,
                    init_distributed, load_checkpoint, parse_config, restore_rng, rng_states, save_checkpoint,
                    write_json)
from far import FAR, PRESETS, FARConfig, checkpoint_dict
from fqgan import FQGAN
from sample import generate_images


@dataclass
class TrainConfig:
    # data and output
    tokenizer: str = "out/tokenizer/ckpt.pt"  # FQGAN checkpoint (train_tokenizer.py or an official file)
    data: str = "fashion-mnist"     # 'fashion-mnist' | 'synthetic' | PATH of an ImageFolder tree root/<class>/<image>
    val_data: str = ""              # held-out ImageFolder PATH; '' = the test split (fashion-mnist, synthetic)
    crops: int = 0                  # views per train image: 10 (ten-crop), 2 (image, flip), 1; 0 = 10 if ImageFolder
    #                                 else 1
    codes_dir: str = ""             # packed codes train.npy / val.npy + labels + json; '' = out_dir/codes
    out_dir: str = "out/far"        # log.txt, ckpt.pt and samples_<step>.png are written here
    resume: bool = False            # continue out_dir/ckpt.pt: weights, optimizer, step, RNG (data order follows)
    # model: K, V, T come from the tokenizer, the number of classes from the data
    preset: str = "tiny"            # far.PRESETS: tiny | B | L
    # optimisation (official: AdamW (0.9, 0.95), lr 1e-4 constant, wd 0.05, clip 1.0, global batch 256, ~1.5M steps)
    batch_size: int = 32            # sequences per micro-step per process
    grad_accum: int = 1             # micro-steps per optimizer step; global batch = batch_size * grad_accum * world
    max_steps: int = 3000           # optimizer steps of the run
    lr: float = 1e-3                # peak learning rate (official 1e-4: far too slow for the 3000-step tiny demo)
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

    def __post_init__(self):  # a bad value stops with a one-line message
        if self.preset not in PRESETS:
            raise SystemExit(f"--preset={self.preset}: choose one of {', '.join(PRESETS)}")
        if self.lr_decay not in ("constant", "cosine"):
            raise SystemExit(f"--lr_decay={self.lr_decay}: choose one of constant, cosine")
        if self.crops not in (0, 1, 2, 10):
            raise SystemExit(f"--crops={self.crops}: choose 10 (ten-crop), 2 (image + flip), 1 or 0 (auto)")
        if min(self.batch_size, self.grad_accum, self.log_interval, self.eval_interval, self.ckpt_interval,
               self.extract_batch, self.val_images) < 1:
            raise SystemExit("batch_size, grad_accum, extract_batch, val_images and the *_interval flags must be >= 1")


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


def source(data, split, size):
    """Images of a split (train: --data, val: --val_data or the test split) with no random augmentation."""
    if data == "fashion-mnist":
        return FashionMNIST(size, train=split == "train", flip=False)
    if data == "synthetic":
        return Synthetic(size, n=256 if split == "train" else 64, seed=0 if split == "train" else 1)
    return ImageFolder(data, size, train=False)  # ADM centre crop


def extract(tok, meta, data, split, crops, cfg, d, log):
    """Encode a split once into codes_dir/{split}.npy (N, C, K, T) + {split}_labels.npy (N,) + {split}.json; return
    (codes memmap, labels). Resumable (per-rank progress markers) and atomic (rename at the end)."""
    base = Path(cfg.codes_dir or Path(cfg.out_dir) / "codes")
    final, lab_final, meta_path = base / f"{split}.npy", base / f"{split}_labels.npy", base / f"{split}.json"
    want = dict(meta, data=data, crops=crops)
    if meta_path.exists():
        have = json.loads(meta_path.read_text())
        stale = {k: (have.get(k), v) for k, v in want.items() if k != "tokenizer" and have.get(k) != v}
        if stale:
            raise SystemExit(f"{meta_path}: these codes do not match this run (stored, now): {stale}. They were "
                             f"extracted with {have.get('tokenizer')}. Delete {base} or pass a new --codes_dir")
        return np.load(final, mmap_mode="r"), np.load(lab_final)
    K, T, size = tok.cfg.n_codebooks, tok.grid ** 2, tok.cfg.image_size
    ds = source(data, split, int(size * 1.1) if crops == 10 else size)
    N, b, W = len(ds), cfg.extract_batch, d.world_size
    part, lab_part = base / f"{split}.npy.partial", base / f"{split}_labels.npy.partial"
    markers = [base / f"{split}.progress{r}.json" for r in range(W)]
    want.update(n=N, world_size=W, extract_batch=b)
    if d.master:
        base.mkdir(parents=True, exist_ok=True)
        fresh = not (part.exists() and lab_part.exists() and all(
            m.exists() and json.loads(m.read_text())["want"] == want for m in markers))
        if fresh:  # (re)start: new partial files, every rank at chunk 0
            for m in base.glob(f"{split}.progress*.json"):
                m.unlink()
            dtype = np.int16 if meta["codebook_size"] <= 32767 else np.int32
            np.lib.format.open_memmap(part, "w+", dtype, (N, crops, K, T)).flush()
            np.lib.format.open_memmap(lab_part, "w+", np.int64, (N,)).flush()
            for m in markers:
                write_json(m, dict(want=want, done=0))
    if W > 1:
        dist.barrier()
    done = json.loads(markers[d.rank].read_text())["done"]  # chunks of this rank already written
    codes, labels = np.load(part, mmap_mode="r+"), np.load(lab_part, mmap_mode="r+")
    mine = list(range(d.rank, math.ceil(N / b), W))  # chunk c = images [c*b, (c+1)*b)
    log(f"extracting {split} codes of {data}: {N} images x {crops} views -> {final}"
        + (f" (resuming: rank 0 has {done}/{len(mine)} chunks)" if done else ""))
    todo = [list(range(c * b, min(N, c * b + b))) for c in mine[done:]]  # this rank's remaining chunks
    loader = torch.utils.data.DataLoader(ds, batch_sampler=todo, num_workers=cfg.num_workers)
    t0 = t_log = time.time()
    for i, (x, y) in enumerate(loader, start=done):
        lo = mine[i] * b
        v = views(x, crops, size).flatten(0, 1).to(d.device)  # (B*C, 3, size, size)
        with autocast(d.device_type):
            idx = tok.encode(v)  # (B*C, K, h, w)
        codes[lo:lo + len(x)] = idx.view(len(x), crops, K, T).cpu().numpy()
        labels[lo:lo + len(x)] = y.numpy()
        codes.flush(), labels.flush()  # data on disk before the marker says so
        write_json(markers[d.rank], dict(want=want, done=i + 1))
        if time.time() - t_log > 60:
            log(f"{split}: {i + 1}/{len(mine)} chunks of {b} images done (rank 0)")
            t_log = time.time()
    log(f"extracted {split} in {time.time() - t0:.0f} s (this process)")
    del codes, labels
    if W > 1:
        dist.barrier()
    if d.master:  # complete: rename into place, meta last (its presence means 'done')
        os.replace(lab_part, lab_final)
        os.replace(part, final)
        write_json(meta_path, want)
        for m in markers:
            m.unlink()
    if W > 1:
        dist.barrier()
    return np.load(final, mmap_mode="r"), np.load(lab_final)


# ---- step 2: training

def get_batch(codes, labels, step, cfg, d, perms):
    """Micro-batch number `step` of this rank: (codes (B, K, T) int64, labels (B,)). Epoch order seeded by (seed,
    epoch), one random view per image from a generator seeded by (seed, step): a pure function of the step."""
    N, C = codes.shape[:2]
    per = cfg.batch_size * d.world_size
    epoch, off = divmod(step, N // per)
    if epoch not in perms:  # cache the current epoch's permutation only
        perms.clear()
        perms[epoch] = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    mine = slice(d.rank * cfg.batch_size, (d.rank + 1) * cfg.batch_size)
    idx = perms[epoch][off * per:(off + 1) * per][mine].numpy()
    view = torch.randint(C, (per,), generator=torch.Generator().manual_seed(cfg.seed * 1000003 + step))[mine].numpy()
    order = np.argsort(idx)  # sorted reads from the memmap
    x = np.empty((len(idx),) + codes.shape[2:], dtype=np.int64)
    x[order] = codes[idx[order], view[order]]  # (B, K, T)
    return torch.from_numpy(x), torch.from_numpy(labels[idx])


@torch.no_grad()
def evaluate(model, val_x, val_y, d, batch_size):
    """Held-out cross-entropy per sub-token k (K,), eval mode (no dropout), summed over ranks."""
    was_training, K = model.training, val_x.shape[1]
    model.eval()
    total = torch.zeros(K + 1, device=d.device)  # per-k sums of per-image mean CE, image count
    for x, y in zip(val_x.split(batch_size), val_y.split(batch_size)):
        x, y = x.to(d.device), y.to(d.device)
        with autocast(d.device_type):
            logits, _ = model(x, y)  # (B, K, T, V) fp32
        ce = F.cross_entropy(logits.flatten(0, 2), x.flatten(), reduction="none").view(x.shape)  # (B, K, T)
        total += torch.cat([ce.mean(2).sum(0), ce.new_tensor([len(x)])])
    if d.world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return total[:K] / total[K].clamp_min(1)


def main(cfg):
    """Extract (if needed) and train; returns {'step', 'val_ce' (K,), 'history', 'model' (raw FAR)}."""
    d = init_distributed(cfg.device)
    try:
        return train(cfg, d)
    finally:
        cleanup_distributed()


def train(cfg, d):
    log = Logger(cfg.out_dir, d.master)
    use_compile = cfg.compile and d.device_type == "cuda"
    torch.set_float32_matmul_precision("high")
    path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path, "far") if cfg.resume else None
    log(f"device {d.device} | world size {d.world_size} | torch {torch.__version__} | compile {use_compile}")
    log(f"train config: {asdict(cfg)}")
    tok = FQGAN.from_checkpoint(cfg.tokenizer, d.device).requires_grad_(False)
    K, V, T = tok.cfg.n_codebooks, tok.cfg.codebook_size, tok.grid ** 2
    meta = code_meta(tok, cfg.tokenizer)
    if ckpt and ckpt.get("tokenizer_fingerprint") != meta["fingerprint"]:
        raise SystemExit(f"{path} was trained on the codes of another tokenizer ({ckpt.get('tokenizer')}): pass that "
                         f"--tokenizer, or a new --out_dir")
    log(f"tokenizer {cfg.tokenizer}: K={K} sub-codebooks x V={V}, {tok.grid}x{tok.grid} tokens, "
        f"{tok.cfg.image_size} px, fingerprint {meta['fingerprint']}")

    # step 1: packed codes (reused when they match this tokenizer)
    t0 = time.time()
    crops = cfg.crops or (1 if cfg.data in ("fashion-mnist", "synthetic") else 10)
    train_codes, train_labels = extract(tok, meta, cfg.data, "train", crops, cfg, d, log)
    held_out = cfg.val_data or (cfg.data if cfg.data in ("fashion-mnist", "synthetic") else "")
    if held_out:
        val_codes, val_labels = extract(tok, meta, held_out, "val", 1, cfg, d, log)
        centre = 0
    else:  # an ImageFolder without --val_data: fall back to (the centre views of) training images
        log("note: no --val_data: the val CE is measured on training images")
        val_codes, val_labels, centre = train_codes, train_labels, 4 if crops == 10 else 0
    pick = np.linspace(0, len(val_codes) - 1, min(cfg.val_images, len(val_codes))).astype(np.int64)
    pick = pick[d.rank::d.world_size]
    val_x = torch.from_numpy(val_codes[pick, centre].astype(np.int64))  # (n, K, T), this rank's share
    val_y = torch.from_numpy(val_labels[pick])
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    log(f"codes: train {tuple(train_codes.shape)} {train_codes.dtype}, val {len(pick)} images per rank, "
        f"{num_classes} classes | {time.time() - t0:.1f} s")

    # step 2: the model (same init on every rank), optimizer, compile, DDP
    model_cfg = FARConfig(**ckpt["config"]) if ckpt else FARConfig(
        **PRESETS[cfg.preset], n_codebooks=K, codebook_size=V, block_size=T, num_classes=num_classes)
    assert (model_cfg.n_codebooks, model_cfg.codebook_size, model_cfg.block_size) == (K, V, T), "tokenizer mismatch"
    log(f"model config: {asdict(model_cfg)}")
    torch.manual_seed(cfg.seed)
    raw_model = FAR(model_cfg).to(d.device)
    log(f"parameters: FAR {sum(p.numel() for p in raw_model.parameters()) / 1e6:.3f} M | tokenizer (frozen) "
        f"{sum(p.numel() for p in tok.parameters()) / 1e6:.3f} M")
    opt = raw_model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), d.device_type)
    step = 0
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        restore_rng(ckpt, d, cfg.seed, log)
        log(f"resumed from {path} at step {step}")
        if step > cfg.max_steps:
            raise SystemExit(f"checkpoint is at step {step}, beyond --max_steps={cfg.max_steps}: raise max_steps")
        del ckpt
    else:
        torch.manual_seed(cfg.seed + d.rank)
    model = torch.compile(raw_model) if use_compile else raw_model
    if d.world_size > 1:
        model = DDP(model, device_ids=[d.local_rank] if d.device_type == "cuda" else None)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world_size
    assert len(train_codes) >= cfg.batch_size * d.world_size, "fewer training images than one micro-batch"
    log(f"global batch {global_batch} = {cfg.batch_size} x {cfg.grad_accum} accum x {d.world_size} ranks | "
        f"{global_batch * T} tokens (x {K} sub-tokens) per step | {len(train_codes) / global_batch:.0f} steps/epoch")

    grid_labels = torch.linspace(0, num_classes - 1, min(cfg.grid_classes, num_classes)).long()
    grid_labels = grid_labels.repeat_interleave(cfg.grid_per_class)  # rows = classes
    perms, history, loss_sum, n_sum, val_ce = {}, [], torch.zeros((), device=d.device), 0, None
    t0 = time.time()
    while True:
        last = step == cfg.max_steps
        if step % cfg.eval_interval == 0 or last:  # val CE (all ranks) + sample grid (rank 0)
            t_eval = time.time()
            val_ce = evaluate(raw_model, val_x, val_y, d, cfg.batch_size)
            log(f"step {step} | val CE {val_ce.mean().item():.4f} | per sub-token "
                + " ".join(f"{c:.4f}" for c in val_ce.tolist()))
            if d.master:
                raw_model.eval()
                imgs = generate_images(raw_model, tok, grid_labels, range(len(grid_labels)), cfg.cfg_scale)
                raw_model.train()
                grid = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W)
                torchvision.utils.save_image(grid, Path(cfg.out_dir) / f"samples_{step:07d}.png",
                                             nrow=cfg.grid_per_class)
            t0 += time.time() - t_eval
        if (step % cfg.ckpt_interval == 0 and step > 0) or last:
            t_save = time.time()
            extra = dict(tokenizer=meta["tokenizer"], tokenizer_fingerprint=meta["fingerprint"], step=step,
                         train_config=asdict(cfg), opt=opt.state_dict(), **rng_states(d))
            if d.master:
                save_checkpoint(checkpoint_dict(raw_model, **extra), path)
            if d.world_size > 1:
                dist.barrier()
            t0 += time.time() - t_save
        if last:
            break

        lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.lr_decay)
        for group in opt.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            x, y = get_batch(train_codes, train_labels, step * cfg.grad_accum + micro, cfg, d, perms)
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            if d.world_size > 1:
                model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with autocast(d.device_type):
                _, loss = model(x, y, targets=x)  # teacher forcing: the targets are the inputs
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        n_sum += 1
        if step % cfg.log_interval == 0 or step == cfg.max_steps:  # .item() (a sync) only here
            if d.device_type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            row = dict(step=step, loss=(loss_sum / n_sum).item(), lr=lr, grad_norm=norm.item(),
                       img_per_s=n_sum * global_batch / dt)
            if not math.isfinite(row["loss"]):
                raise SystemExit(f"loss is {row['loss']} at step {step}: stopping; {path} keeps the last good state")
            history.append(row)
            log(f"step {step} | loss {row['loss']:.4f} | lr {lr:.2e} | gnorm {row['grad_norm']:.3f} | "
                f"{1000 * dt / n_sum:.0f} ms/step | {row['img_per_s']:.0f} img/s")
            loss_sum, n_sum, t0 = torch.zeros((), device=d.device), 0, time.time()

    log(f"done: step {step} | val CE {val_ce.mean().item():.4f} | checkpoint {path}")
    return {"step": step, "val_ce": val_ce.tolist(), "history": history, "model": raw_model}


if __name__ == "__main__":
    main(parse_config(TrainConfig))
