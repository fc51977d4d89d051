"""
Evaluation of FQGAN / FAR (arXiv 2411.16681): FID, IS, precision/recall, PSNR, SSIM, codebook usage, and the ADM
npz format (uint8 NHWC, key arr_0) that the official numbers are computed from.

    python eval_fid.py --mode=rfid --ckpt=out/tokenizer/ckpt.pt --net=fmnist            # -> ckpt.pt.rfid.json
    python eval_fid.py --mode=stats --net=fmnist --split=train --image_size=32 --out=fmnist_train.npz
    python eval_fid.py --mode=gfid --net=fmnist --ckpt=out/far/ckpt.pt --ref=fmnist_train.npz --num_samples=10000
    torchrun --standalone --nproc_per_node=8 eval_fid.py --mode=rfid --ckpt=fqgan_dual16.pt --data=/data/imagenet/val
    torchrun --standalone --nproc_per_node=8 eval_fid.py --mode=gfid --ckpt=far.pt \\
        --ref=VIRTUAL_imagenet256_labeled.npz --num_samples=50000 --cfg_scale=2.0 --save_npz=samples.npz

--net=inception: pytorch-fid's port of the TF FID Inception (close to, NOT identical with, the ADM TF evaluator);
fmnist: our evaluation CNN (train_classifier.py --net=featnet): keys *_fmnist (FID-FMNIST etc.), a domain metric, not
FID; random: smoke tests only (flagged). torchrun: image i on rank i mod world, rank 0 writes the JSON atomically.
Shapes: N images, H W C pixels (NHWC uint8 in npz files, NCHW float [0,1] in torch), F features, K sub-codebooks.
"""
import time
from dataclasses import asdict, dataclass

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.special import softmax, xlogy
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common import (Logger, build, check, cli, image_seed, load_checkpoint, save_json, save_npz, session, to_uint8)
from data import make_dataset
from fqgan import FQGAN
from pretrained import feature_net
from sample import generate_images, load_generator


# ---- metrics
def feature_stats(feats):
    """Features (N, F) -> (mu (F,), sigma (F, F)) in float64, sigma with the N-1 normaliser."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64, with pytorch-fid's numerics."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape, "mean / covariance shapes differ"
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)  # no `disp` argument: SciPy 1.18 removes it
    if not np.isfinite(covmean).all():  # singular product: retry with eps on the diagonals (only then)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rank-deficient sigmas give tiny imaginary parts; large ones mean a real problem
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(feats, mu2, sigma2):
    """FID of features (N, F) against (mu2, sigma2). N <= F: tr sqrt(S1 S2) exactly from the N eigenvalues of the PSD
    Xc S2 Xc^T / (N-1) (no slow F x F sqrtm, no eps fallback). Small-N FIDs are biased up: report N >= 10k."""
    feats = np.asarray(feats, dtype=np.float64)
    (mu1, sigma1), n = feature_stats(feats), len(feats)
    if n > feats.shape[1]:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    xc = feats - mu1  # (N, F)
    m = xc @ np.asarray(sigma2, np.float64) @ xc.T / (n - 1)  # (N, N)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(x, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))) per consecutive chunk (`splits`, as ADM) of logits (N, C) -> (mean, std)."""
    x = np.asarray(x, dtype=np.float64)
    assert len(x) >= splits, f"need at least splits={splits} samples"
    chunks = np.array_split(softmax(x, axis=1), splits)  # p(y|x), p(y) = the mean over a chunk
    scores = [np.exp((xlogy(q, q) - xlogy(q, q.mean(0, keepdims=True))).sum(1).mean()) for q in chunks]  # 0 log 0 = 0
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(real, fake, k=3, batch_size=1000, device=None):
    """Kynkaanniemi et al. 2019 -> (fraction of fakes inside some real k-NN ball, of reals inside some fake one)."""
    real, fake = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device) for a in (real, fake))
    assert len(real) > k and len(fake) > k, f"need more than k={k} samples per set"
    rows = lambda q, c: (torch.cdist(q[i:i + batch_size], c) for i in range(0, len(q), batch_size))  # noqa: E731
    radius = lambda a: torch.cat([d.kthvalue(k + 1, dim=1).values for d in rows(a, a)])  # noqa: E731  col 0 = itself
    inside = lambda q, c, r: torch.cat([(d <= r).any(1) for d in rows(q, c)]).double().mean().item()  # noqa: E731
    return inside(fake, real, radius(real)), inside(real, fake, radius(fake))


def psnr(a, b):
    """Per-image PSNR in dB of [0,1] images (N, ...) with data range 1 (inf for identical images) -> (N,) float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return 10 * torch.log10(1 / (a - b).pow(2).flatten(1).mean(dim=1))


def ssim(a, b, data_range=1.0, sigma=1.5, win=11, k1=0.01, k2=0.03):
    """Per-image SSIM of [0,1] images (N, C, H, W) -> (N,) float64, the channel mean = skimage structural_similarity(
    gaussian_weights=True, use_sample_covariance=False, data_range=1) (LlamaGen/FQGAN pass 2, which inflates it)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    c = a.shape[1]
    assert min(a.shape[-2:]) >= win, f"images must be at least {win}x{win}"
    g = torch.exp(-(torch.arange(win, dtype=torch.float64) - win // 2) ** 2 / (2 * sigma ** 2)).to(a.device)
    kernel = (torch.outer(g, g) / g.sum() ** 2).expand(c, 1, win, win)  # (C, 1, win, win) depthwise Gaussian
    blur = lambda x: F.conv2d(x, kernel, groups=c)  # noqa: E731  'valid' conv
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def codebook_stats(counts):
    """Counts (K, V) -> fraction of entries used (K,), perplexity = exp(entropy) (K,) (V: uniform, 1: collapse)."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / counts.sum(axis=1, keepdims=True)
    return (counts > 0).mean(axis=1), np.exp(-xlogy(p, p).sum(axis=1))


# ---- ADM npz files
def open_npz(path, need):
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as e:
        raise SystemExit(f"{path}: not a readable npz archive ({type(e).__name__}): pass an ADM or eval_fid npz") \
            from None
    if not set(need) <= set(out):
        raise SystemExit(f"{path}: expected the keys {need}, found {sorted(out)[:6]}: pass an ADM / eval_fid npz")
    return out


def load_npz_images(path):
    """Read an ADM sample / reference batch: arr_0 = uint8 images (N, H, W, 3); other keys are ignored."""
    x = open_npz(path, ["arr_0"])["arr_0"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise SystemExit(f"{path}: arr_0 must be uint8 images (N, H, W, 3) (ADM npz), found {x.dtype} {x.shape}")
    return x


def load_ref_stats(path):
    """Reference statistics -> 'mu' (F,), 'sigma' (F, F) float64, and if present 'features' (ours) or 'images' (ADM's
    arr_0) for precision/recall and 'net' (ours: the feature network that made them). ADM's sFID stats are ignored."""
    z = open_npz(path, ["mu", "sigma"])
    out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64), "images": z.get("arr_0")}
    return {**out, "features": z.get("features"), "net": str(z["net"]) if "net" in z else None}


# ---- command line: --mode=rfid | gfid | stats, one process or torchrun
@dataclass
class EvalConfig:
    mode: str = "rfid"              # rfid | gfid | stats
    ckpt: str = ""                  # rfid: tokenizer checkpoint (ours / official); gfid: FAR checkpoint
    tokenizer: str = ""             # gfid: tokenizer checkpoint; '' = the path recorded in the FAR checkpoint
    data: str = "fashion-mnist"     # rfid / stats: fashion-mnist | synthetic | ImageFolder PATH | (stats) npz
    split: str = "test"             # fashion-mnist / synthetic split: test | train (never augmented)
    image_size: int = 0             # stats from a dataset: image side (required); rfid uses the tokenizer's
    max_images: int = 0             # rfid / stats: only the first N images of --data (0 = all)
    ref: str = ""                   # reference stats npz: ours (--mode=stats) or an ADM batch (mu, sigma[, arr_0])
    samples: str = ""               # rfid / gfid: score this ADM npz (arr_0) instead of reconstructing / generating
    save_npz: str = ""              # rfid: reconstructions, gfid: samples (+ labels), stats: the images, as ADM npz
    out: str = ""                   # results JSON ('' = <ckpt or samples>.<mode>.json); stats: the npz
    num_samples: int = 50000        # gfid: images to generate
    cfg_scale: float = 2.0          # gfid: classifier-free guidance scale (paper: 2.0)
    temperature: float = 1.0        # gfid: sampling temperature
    top_k: int = 0                  # gfid: top-k filter (0 = off)
    top_p: float = 1.0              # gfid: nucleus filter (1 = off)
    seed: int = 0                   # gfid: image i uses image_seed(seed, i); labels and the stats subset use seed
    batch_size: int = 32            # images per process per batch (generation, tokenizer and feature network)
    num_workers: int = 0            # DataLoader workers per process (8 for ImageFolder JPEGs)
    net: str = "inception"          # feature network: inception | fmnist (FID-FMNIST) | random (smoke tests only)
    net_path: str = ""              # its weight file; '' = the default place (torch hub cache / out/featnet)
    download: bool = False          # fetch the FID Inception weights into the torch hub cache when missing
    ref_features: int = 10000       # stats: features kept for precision/recall, a seeded random subset (0 = all)
    is_splits: int = 10             # IS splits (ADM: 10 of 5000 at 50k)
    device: str = "auto"            # 'auto' (cuda if available) | 'cpu' | 'cuda'

    def __post_init__(self):
        check(self, positive="batch_size num_samples is_splits cfg_scale temperature top_p", unit="top_p",
              mode=("rfid", "gfid", "stats"), split=("test", "train"), net=("inception", "fmnist", "random"))


def per_rank(cfg, s, n, step, desc, data=None):
    """This rank takes images i = rank, rank + world, ... < n in batches (same work whatever the world size); step(idx,
    x = a batch of `data` (B, 3, H, W) in [-1, 1], or None) -> per-image arrays, gathered on rank 0 in index order."""
    idx = list(range(s.rank, n, s.world_size))
    chunks = [idx[j:j + cfg.batch_size] for j in range(0, len(idx), cfg.batch_size)]
    loader = [None] * len(chunks) if data is None else DataLoader(Subset(data, idx), batch_size=cfg.batch_size,
                                                                  num_workers=cfg.num_workers)
    out = {}
    with tqdm(total=n, desc=desc, unit="img", disable=not s.master, dynamic_ncols=True) as bar:
        for chunk, batch in zip(chunks, loader):
            for k, v in step(chunk, None if batch is None else batch[0].to(s.device)).items():
                out.setdefault(k, []).append(v)
            bar.update(min(len(chunk) * s.world_size, n - bar.n))
    mine = (np.asarray(idx, dtype=np.int64), {k: np.concatenate(v) for k, v in out.items()})
    parts = [mine] * s.world_size if s.master else None  # filled in place by the gather
    if s.world_size > 1:  # through a gloo group on the CPU: NCCL runs never stage images through the GPU
        dist.gather_object(mine, parts, dst=0, group=s.cpu_group)
    if not s.master:
        return None
    parts = [p for p in parts if len(p[0])]  # a rank with no images sent no arrays
    order = np.argsort(np.concatenate([i for i, _ in parts]), kind="stable")
    return {k: np.concatenate([a[k] for _, a in parts])[order] for k in parts[0][1]}


@torch.no_grad()
def features(net, images, s):
    """uint8 images (B, H, W, 3) -> {'feats': (B, F), 'logits': (B, C)} float32."""
    f, logits = net(torch.from_numpy(np.ascontiguousarray(images)).to(s.device).permute(0, 3, 1, 2).float() / 255)
    return {"feats": f.float().cpu().numpy(), "logits": logits.float().cpu().numpy()}


def rfid(cfg, s, net, ref, log):
    """Reconstruct --data in fp32 (or read --samples, its first images in order): rFID against the originals (paper
    protocol; not the VIRTUAL batch, LlamaGen #34) or --ref, PSNR / SSIM, codebook usage / perplexity."""
    if not (cfg.ckpt or cfg.samples):
        raise SystemExit("--mode=rfid needs --ckpt=TOKENIZER or --samples=RECONSTRUCTIONS.npz")
    recon = load_npz_images(cfg.samples) if cfg.samples else None
    tok = None if cfg.samples else build(FQGAN, load_checkpoint(cfg.ckpt, "fqgan"), cfg.ckpt, s.device)
    ds = make_dataset(cfg.data, tok.cfg.image_size if tok else recon.shape[1], cfg.split)
    n = min(len(ds), cfg.max_images or len(ds), len(recon) if recon is not None else len(ds))
    K, V = (tok.cfg.n_codebooks, tok.cfg.codebook_size) if tok else (0, 0)
    counts = torch.zeros(K, V, dtype=torch.long)  # (K, V) code histogram of this rank's images
    log(f"rfid: {n} images of {cfg.data} ({cfg.split}), " + (f"tokenizer {cfg.ckpt} (K={K}, V={V})" if tok else
        f"reconstructions from {cfg.samples}") + f", reference {cfg.ref or 'the originals'}")

    def step(chunk, x):
        if tok is not None:
            rec, aux = tok(x)  # (B, 3, H, W), aux['indices'] (B, K, h, w); fp32
            counts.add_(torch.stack([torch.bincount(i.flatten().cpu(), minlength=V) for i in aux["indices"].unbind(1)]))
            rec = to_uint8(rec)  # (B, H, W, 3), the official rounding
        else:
            rec = recon[chunk]
        a = ((x.double() + 1) / 2).clamp(0, 1)  # originals in [0, 1]
        b = torch.from_numpy(rec).to(s.device).permute(0, 3, 1, 2).double() / 255  # (B, 3, H, W) as saved
        out = {"psnr": psnr(a, b).cpu().numpy(), "ssim": ssim(a, b).cpu().numpy(), **features(net, rec, s)}
        if ref is None:
            out["ref_feats"] = features(net, to_uint8(x), s)["feats"]
        return {**out, **({"images": rec} if cfg.save_npz else {})}
    g = per_rank(cfg, s, n, step, "rfid", data=ds)
    s.all_reduce(counts, s.cpu_group)
    if not s.master:
        return None
    mu, sigma = (ref["mu"], ref["sigma"]) if ref else feature_stats(g["ref_feats"])
    res = {"rfid": fid_from_features(g["feats"], mu, sigma), "psnr": float(g["psnr"].mean()),
           "ssim": float(g["ssim"].mean())}
    if K:
        usage, ppl = codebook_stats(counts.numpy())
        res.update(usage=usage.tolist(), perplexity=ppl.tolist(), codebook_size=V)
    if cfg.save_npz:
        save_npz(cfg.save_npz, arr_0=g["images"])
    return {**res, "num_images": n}


def gfid(cfg, s, net, ref, log):
    """Generate num_samples images of the FAR checkpoint (image i: labels[i], seed image_seed(--seed, i), as sample.py)
    or read --samples, and score them against --ref: FID, IS, precision / recall, class accuracy under --net=fmnist."""
    if cfg.samples:
        samples, labels = load_npz_images(cfg.samples), open_npz(cfg.samples, ["arr_0"]).get("arr_1")
        n = min(cfg.num_samples, len(samples))
        log(f"gfid: {n} samples from {cfg.samples}")
    elif cfg.ckpt:
        far, tok = load_generator(cfg.ckpt, s.device, tokenizer=cfg.tokenizer or None)
        n, classes = cfg.num_samples, far.cfg.num_classes
        labels = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(cfg.seed)).numpy()  # uniform
        log(f"gfid: {n} samples of {cfg.ckpt} | random labels over {classes} classes | cfg {cfg.cfg_scale} | "
            f"temperature {cfg.temperature} top_k {cfg.top_k} top_p {cfg.top_p} | seed {cfg.seed}")
    else:
        raise SystemExit("--mode=gfid needs --ckpt=FAR_CHECKPOINT or --samples=SAMPLES.npz")

    def step(chunk, _):
        images = samples[chunk] if cfg.samples else generate_images(
            far, tok, labels[chunk], [image_seed(cfg.seed, i) for i in chunk], cfg.cfg_scale, cfg.temperature,
            cfg.top_k, cfg.top_p, compile=s.device_type == "cuda")  # (B, H, W, 3) uint8
        return {**features(net, images, s), **({"images": images} if cfg.save_npz else {})}
    g = per_rank(cfg, s, n, step, "gfid")
    real = None if ref is None else ref["features"]
    if ref is not None and real is None and ref["images"] is not None:  # precision/recall: ADM's reference images
        r = per_rank(cfg, s, len(ref["images"]), lambda c, _: features(net, ref["images"][c], s), "ref")
        real = r["feats"] if r else None
    if not s.master:
        return None
    res = dict(zip(("is", "is_std"), inception_score(g["logits"], splits=min(cfg.is_splits, n))))
    if ref is not None:
        res["fid"] = fid_from_features(g["feats"], ref["mu"], ref["sigma"])
        if real is not None:
            res["precision"], res["recall"] = precision_recall(real, g["feats"], device=s.device)
    if cfg.net == "fmnist" and labels is not None:
        res["class_acc"] = float((g["logits"].argmax(1) == labels[:n]).mean())
    if cfg.save_npz:
        save_npz(cfg.save_npz, arr_0=g["images"], **({} if labels is None else {"arr_1": labels[:n]}))
    return {**res, "num_images": n}


def stats(cfg, s, net, ref, log):
    """Reference statistics of --data (a dataset or an ADM npz): mu, sigma and a feature subset, cached in --out."""
    if not cfg.out:
        raise SystemExit("--mode=stats needs --out=PATH.npz (where to write the statistics)")
    images = load_npz_images(cfg.data) if cfg.data.endswith(".npz") else None
    if images is None and cfg.image_size < 1:
        raise SystemExit("--mode=stats from a dataset needs --image_size (the side of the evaluated images)")
    ds = None if images is not None else make_dataset(cfg.data, cfg.image_size, cfg.split)
    n = min(len(images) if ds is None else len(ds), cfg.max_images or 1 << 62)

    def step(chunk, x):
        u8 = images[chunk] if ds is None else to_uint8(x)  # (B, H, W, 3): what a saved sample batch holds
        return {**features(net, u8, s), **({"images": u8} if cfg.save_npz else {})}
    log(f"stats: {n} images of {cfg.data}" + (f" ({cfg.split}, {cfg.image_size} px)" if ds is not None else ""))
    g = per_rank(cfg, s, n, step, "stats", data=ds)
    if not s.master:
        return None
    mu, sigma = feature_stats(g["feats"])
    keep = np.sort(np.random.default_rng(cfg.seed).choice(n, min(n, cfg.ref_features or n), replace=False))
    save_npz(cfg.out, mu=mu, sigma=sigma, features=g["feats"][keep], net=cfg.net)
    if cfg.save_npz:
        save_npz(cfg.save_npz, arr_0=g["images"])
    return {"num_images": n, "features_kept": len(keep), "stats": cfg.out}


@torch.no_grad()
def main(cfg):
    """Run one evaluation; returns the results dict on rank 0 (None on the other ranks)."""
    with session(cfg.device) as s:
        log = Logger(None, s.master)
        if s.device_type == "cuda":  # features in true fp32 (pytorch-fid parity); the generator runs in bf16 anyway
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        s.cpu_group = dist.new_group(backend="gloo") if s.world_size > 1 and s.device_type == "cuda" else None
        log(f"eval_fid --mode={cfg.mode} | device {s.device} | world size {s.world_size} | torch {torch.__version__}")
        warnings = ["WARNING: --net=random: the feature network has RANDOM weights, every number here is meaningless "
                    "(smoke tests only)"] if cfg.net == "random" else []
        if s.world_size > 1 and not s.master:
            dist.barrier()  # rank 0 fetches the weights first (when --download=true)
        net = feature_net(cfg.net, cfg.net_path or None, cfg.download).to(s.device)
        if s.world_size > 1 and s.master:
            dist.barrier()
        ref = load_ref_stats(cfg.ref) if cfg.ref and cfg.mode != "stats" else None
        width = ref is not None and net(torch.zeros(1, 3, 32, 32, device=s.device))[0].shape[1]
        if width and width != len(ref["mu"]):  # e.g. an Inception reference under --net=fmnist: fail before the run
            raise SystemExit(f"{cfg.ref} holds {len(ref['mu'])}-d statistics but --net={cfg.net} gives {width}-d "
                             f"features: make the reference with the same --net (--mode=stats)")
        if ref is not None and ref["net"] not in (None, cfg.net):  # ours record their net; ADM's: TF Inception
            warnings.append(f"WARNING: {cfg.ref} was made with --net={ref['net']}, this run uses --net={cfg.net}: "
                            f"the numbers are not comparable")
        for w in warnings:
            log(w)
        t0 = time.time()
        res = {"rfid": rfid, "gfid": gfid, "stats": stats}[cfg.mode](cfg, s, net, ref, log)
        if s.master:
            suffix = "_fmnist" if cfg.net == "fmnist" else ""  # FID-FMNIST is a domain metric, never called FID
            renamed = ("rfid", "fid", "is", "is_std", "precision", "recall")
            res = {"mode": cfg.mode, **{k + suffix if k in renamed else k: v for k, v in res.items()}, "net": cfg.net,
                   "world_size": s.world_size, "seconds": round(time.time() - t0, 1),
                   **({"warning": " | ".join(warnings)} if warnings else {}),
                   "note": "FID-FMNIST: features of our Fashion-MNIST CNN, not the Inception" if suffix else
                   "PyTorch FID Inception (pytorch-fid port of the TF weights): close to, not identical with, the ADM "
                   "TensorFlow evaluator used by the paper", "config": asdict(cfg)}
            if cfg.mode != "stats":
                res["json"] = cfg.out or f"{cfg.ckpt or cfg.samples}.{cfg.mode}.json"
                save_json(res["json"], res)
            log(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()
                           if k not in ("config", "note", "warning")))
        if s.world_size > 1:
            dist.barrier()  # rank 0 has written its files
        return res


if __name__ == "__main__":
    cli(main, EvalConfig)
