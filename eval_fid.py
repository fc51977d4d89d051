"""
Evaluation of FQGAN / FAR (arXiv 2411.16681): FID, IS, precision/recall, PSNR, SSIM, codebook usage, and the ADM npz
format (uint8 NHWC, key arr_0) that the official numbers are computed from.

    python eval_fid.py --mode=rfid --ckpt=out/tokenizer/ckpt.pt --data=fashion-mnist      # -> ckpt.pt.rfid.json
    python eval_fid.py --mode=stats --data=fashion-mnist --split=train --image_size=32 --out=fmnist_train.npz
    python eval_fid.py --mode=gfid --ckpt=out/far/ckpt.pt --ref=fmnist_train.npz --num_samples=10000
    torchrun --standalone --nproc_per_node=8 eval_fid.py --mode=rfid --ckpt=fqgan_dual16.pt --data=/data/imagenet/val
    torchrun --standalone --nproc_per_node=8 eval_fid.py --mode=gfid --ckpt=far.pt \\
        --ref=VIRTUAL_imagenet256_labeled.npz --num_samples=50000 --cfg_scale=2.0 --save_npz=samples.npz
    python eval_fid.py --mode=gfid --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz  # score an npz

- rfid: reconstructions of --data (fashion-mnist test split, synthetic, or an ImageFolder with the ADM centre crop,
  e.g. ImageNet val) against those same images (paper protocol; not the VIRTUAL batch, LlamaGen #34), PSNR (data
  range 1), SSIM (data range 1; LlamaGen/FQGAN pass 2, which inflates it), usage and perplexity per sub-codebook.
- gfid: --num_samples images of the FAR checkpoint, labels uniformly random (--labels=balanced: i mod classes),
  image i with label labels[i] and sampling seed --seed + i, so the samples do not depend on the number of GPUs or
  the batch size; FID / IS / precision / recall against --ref: our stats npz (--mode=stats) or an ADM reference batch
  (its mu/sigma for FID, its 10k images for precision/recall, as the ADM evaluator).
- stats: mu, sigma and a feature subset of a dataset, folder or ADM npz, cached for --ref.
- --save_npz writes the samples / reconstructions / images as ADM npz and --samples scores an existing one, so the same
  images can also go through the ADM TensorFlow evaluator. Its numbers and ours are close but NOT identical: we use
  the pytorch-fid port of the TF Inception weights (pt_inception-2015-12-05), torch bilinear resize to 299 and 2x-1
  (as pytorch-fid 0.3.0), and for an ADM --ref its TF-made mu/sigma. State which evaluator a number comes from.
- Multi-GPU: torchrun shards images i = rank mod world, gathers features to rank 0 (gloo, on the CPU), which computes
  the metrics and writes the JSON (atomically); one process on the CPU works too. --inception=random (random
  weights, no file) is for smoke tests only and is flagged loudly in the log and the JSON.
- FID weights: --inception=PATH or <torch hub dir>/checkpoints/pt_inception-2015-12-05-6726825d.pth; fetched from the
  pytorch-fid GitHub release only with --download=true.
Metrics: Frechet distance and IS follow pytorch-fid / torch-fidelity (unbiased 1008-way logits); precision/recall
follow Kynkaanniemi et al. 2019 (k=3) on Inception pool features, as the ADM evaluator does.
Shapes: N images, H W C pixels (NHWC uint8 in npz files, NCHW float [0,1] in torch), D=2048 pool features,
K sub-codebooks, V entries per codebook.
"""
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.special import softmax, xlogy
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common import (FashionMNIST, Logger, autocast, cleanup_distributed, init_distributed, make_dataset, parse_config,
                    save_npz, savez_atomic, to_uint8, write_json)
from fqgan import FQGAN
from sample import generate_images, load_generator

FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}'

# ---- FID InceptionV3


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF default) -> ReLU."""

    def __init__(self, cin, cout, k, s=1, p=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool(x, kind):
    # TF's average pool ignores padded zeros (count_include_pad=False); 'max' is Mixed_7c's TF-graph quirk
    if kind == 'avg':
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return F.max_pool2d(x, 3, 1, 1) if kind == 'max' else F.max_pool2d(x, 3, 2)  # 'max2': stride-2 reduction


class Mixed(nn.Module):
    """An Inception block built from a table: a list of branches, each a list of steps, concatenated on channels.
    A step is a pool name ('avg', 'max', 'max2'), a conv (name, cout, kernel, stride=1, pad=0), or a list of convs
    applied in parallel and concatenated (the split 1x3 / 3x1 ends of the E blocks)."""

    def __init__(self, cin, branches):
        super().__init__()
        self.branches, self.cout = [], 0
        for branch in branches:
            c, steps = cin, []
            for step in branch:
                if isinstance(step, str):
                    steps.append(step)
                    continue
                convs = step if isinstance(step, list) else [step]
                for name, cout, *ksp in convs:
                    self.add_module(name, BasicConv2d(c, cout, *ksp))
                steps.append([name for name, *_ in convs])
                c = sum(cout for _, cout, *_ in convs)
            self.branches.append(steps)
            self.cout += c

    def forward(self, x):
        outs = []
        for steps in self.branches:
            h = x
            for step in steps:
                h = _pool(h, step) if isinstance(step, str) else torch.cat([self.get_submodule(n)(h) for n in step], 1)
            outs.append(h)
        return torch.cat(outs, 1)  # (N, sum of branch channels, H', W')


def block_a(pool_ch):  # FID-A: Mixed_5b/5c/5d
    return [[('branch1x1', 64, 1)], [('branch5x5_1', 48, 1), ('branch5x5_2', 64, 5, 1, 2)],
            [('branch3x3dbl_1', 64, 1), ('branch3x3dbl_2', 96, 3, 1, 1), ('branch3x3dbl_3', 96, 3, 1, 1)],
            ['avg', ('branch_pool', pool_ch, 1)]]


def block_b():  # torchvision InceptionB: Mixed_6a (35 -> 17)
    return [[('branch3x3', 384, 3, 2)],
            [('branch3x3dbl_1', 64, 1), ('branch3x3dbl_2', 96, 3, 1, 1), ('branch3x3dbl_3', 96, 3, 2)], ['max2']]


def block_c(c7):  # FID-C: Mixed_6b..6e, factorized 7x7 convs
    r, c = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # (kernel, stride, pad) of a 1x7 row / 7x1 column conv
    return [[('branch1x1', 192, 1)], [('branch7x7_1', c7, 1), ('branch7x7_2', c7, *r), ('branch7x7_3', 192, *c)],
            [('branch7x7dbl_1', c7, 1), ('branch7x7dbl_2', c7, *c), ('branch7x7dbl_3', c7, *r),
             ('branch7x7dbl_4', c7, *c), ('branch7x7dbl_5', 192, *r)], ['avg', ('branch_pool', 192, 1)]]


def block_d():  # torchvision InceptionD: Mixed_7a (17 -> 8)
    return [[('branch3x3_1', 192, 1), ('branch3x3_2', 320, 3, 2)],
            [('branch7x7x3_1', 192, 1), ('branch7x7x3_2', 192, (1, 7), 1, (0, 3)),
             ('branch7x7x3_3', 192, (7, 1), 1, (3, 0)), ('branch7x7x3_4', 192, 3, 2)], ['max2']]


def block_e(pool):  # FID-E_1 (Mixed_7b, 'avg') and FID-E_2 (Mixed_7c, 'max')
    r, c = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
    return [[('branch1x1', 320, 1)],
            [('branch3x3_1', 384, 1), [('branch3x3_2a', 384, *r), ('branch3x3_2b', 384, *c)]],
            [('branch3x3dbl_1', 448, 1), ('branch3x3dbl_2', 384, 3, 1, 1),
             [('branch3x3dbl_3a', 384, *r), ('branch3x3dbl_3b', 384, *c)]], [pool, ('branch_pool', 192, 1)]]


class FIDInceptionV3(nn.Module):
    """InceptionV3 as in the TF FID graph: [0,1] images (N, 3, H, W) -> (pool (N, 2048), logits_unbiased (N, 1008))."""

    stem = [('Conv2d_1a_3x3', 32, 3, 2), ('Conv2d_2a_3x3', 32, 3), ('Conv2d_2b_3x3', 64, 3, 1, 1), 'max2',
            ('Conv2d_3b_1x1', 80, 1), ('Conv2d_4a_3x3', 192, 3), 'max2']
    mixed = [('Mixed_5b', block_a(32)), ('Mixed_5c', block_a(64)), ('Mixed_5d', block_a(64)), ('Mixed_6a', block_b()),
             ('Mixed_6b', block_c(128)), ('Mixed_6c', block_c(160)), ('Mixed_6d', block_c(160)),
             ('Mixed_6e', block_c(192)), ('Mixed_7a', block_d()), ('Mixed_7b', block_e('avg')),
             ('Mixed_7c', block_e('max'))]

    def __init__(self):
        super().__init__()
        self.layers, c = [], 3  # forward order: module names, or 'max2' for the stem's stride-2 max pools
        for step in self.stem:
            if isinstance(step, tuple):
                name, cout, *ksp = step
                self.add_module(name, BasicConv2d(c, cout, *ksp))
                step, c = name, cout
            self.layers.append(step)
        for name, branches in self.mixed:
            self.add_module(name, Mixed(c, branches))
            self.layers.append(name)
            c = self.get_submodule(name).cout
        assert c == 2048, c
        self.fc = nn.Linear(2048, 1008)  # the TF classifier (1001 classes + padding); used only for IS

    def forward(self, x):
        # x: (N, 3, H, W) in [0, 1]; exactly pytorch-fid's resize_input + normalize_input
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1  # (N, 3, 299, 299) in [-1, 1]
        for name in self.layers:
            x = _pool(x, name) if name == 'max2' else self.get_submodule(name)(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048) "pool3", the FID feature
        return pool, pool @ self.fc.weight.T  # logits without the bias, as TF's softmax/logits/MatMul


def fid_inception(path=None, random_init=False, download=False):
    """The FID Inception in eval mode, frozen. Weights: `path`, else the torch hub cache
    <torch.hub.get_dir()>/checkpoints/pt_inception-2015-12-05-6726825d.pth; fetched from FID_WEIGHTS_URL (the
    pytorch-fid GitHub release) only if absent and download=True. random_init=True: no file, He-initialised weights
    from the fixed seed 0 (the same network in every process and run; feature scale ~1): smoke tests only."""
    with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's RNG
        torch.manual_seed(0)
        model = FIDInceptionV3().eval().requires_grad_(False)
        if random_init:  # PyTorch's default conv init shrinks activations ~1e-8 after 90 layers; He init keeps ~1
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
            nn.init.normal_(model.fc.weight, std=2048 ** -0.5)
    if random_init:
        return model
    path = path or os.path.join(torch.hub.get_dir(), 'checkpoints', FID_WEIGHTS_NAME)
    if not os.path.exists(path):
        why = 'download=False'
        if download:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                torch.hub.download_url_to_file(FID_WEIGHTS_URL, path)
            except Exception as e:  # offline, proxy, disk: one actionable line, not a traceback through urllib
                why = f'download failed: {type(e).__name__}'
        if not os.path.exists(path):
            raise FileNotFoundError(f'FID Inception weights not found at {path} ({why}): fetch {FID_WEIGHTS_URL} and '
                                    f'put it there (or pass --inception=PATH), or run with --download=true')
    sd = torch.load(path, map_location='cpu', weights_only=True)
    # num_batches_tracked never affects eval; accept files with or without it, everything else strictly
    own = {k: v for k, v in model.state_dict().items() if k.endswith('num_batches_tracked')}
    model.load_state_dict({**own, **sd})  # strict: the error names every missing / unexpected / mis-shaped key
    return model


@torch.no_grad()
def images_to_features(model, images, batch_size=50, device=None):
    """uint8 images (N, H, W, 3) -> (pool (N, 2048), logits_unbiased (N, 1008)) as float32 numpy arrays."""
    device = device or next(model.parameters()).device
    pools, logits = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
        p, l = model(x)
        pools.append(p.float().cpu().numpy())
        logits.append(l.float().cpu().numpy())
    return np.concatenate(pools), np.concatenate(logits)

# ---- metrics


def feature_stats(feats):
    """Features (N, D) -> (mu (D,), sigma (D, D)) in float64, sigma with the N-1 normaliser."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm(m):
    out = scipy.linalg.sqrtm(m)  # no `disp`: deprecated in SciPy 1.17, removed in 1.18; old versions return a tuple
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64, with pytorch-fid's numerics."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape, 'mean / covariance shapes differ'
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # singular product: retry with eps on the diagonals (only then)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # rank-deficient sigmas give tiny imaginary parts; large ones mean a real problem
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'sqrtm(S1 S2) has imaginary component {np.abs(covmean.imag).max():.3g}')
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(feats, mu2, sigma2):
    """FID of features (N, D) against (mu2, sigma2). With N <= D, S1 = Xc^T Xc / (N-1) (Xc centred) has rank < N and
    S1 S2 has the same non-zero eigenvalues as the symmetric PSD Xc S2 Xc^T / (N-1): tr sqrt(S1 S2) is then the sum of
    the square roots of N eigenvalues, exact and fast, where a D x D sqrtm is slow and needs the eps fallback.
    Such small-N FIDs are biased upwards; report only N >= 10k. With N > D: frechet_distance (pytorch-fid)."""
    feats = np.asarray(feats, dtype=np.float64)
    mu1, sigma1 = feature_stats(feats)
    n = len(feats)
    if n > feats.shape[1]:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    xc = feats - mu1  # (N, D)
    m = xc @ np.asarray(sigma2, np.float64) @ xc.T / (n - 1)  # (N, N)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - np.asarray(mu2, np.float64)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(x, splits=10, is_probs=False):
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean over each of `splits` consecutive chunks (no shuffle, as ADM).
    x: (N, 1008) unbiased logits (softmax taken here, float64), or probabilities with is_probs=True. -> (mean, std)"""
    x = np.asarray(x, dtype=np.float64)
    assert len(x) >= splits, f'need at least splits={splits} samples'
    p = x if is_probs else softmax(x, axis=1)
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)  # (1, 1008) split marginal
        kl = (xlogy(part, part) - xlogy(part, py)).sum(axis=1)  # xlogy: 0 log 0 = 0 for one-hot predictions
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_radius(feats, k, batch_size):
    # distance from each point to its k-th nearest neighbour in the same set; column 0 of the sorted row is itself
    return torch.cat([torch.cdist(feats[i:i + batch_size], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), batch_size)])


def _inside_any_ball(queries, centres, radii, batch_size):
    # for each query: is it within radius of at least one centre?
    return torch.cat([(torch.cdist(queries[i:i + batch_size], centres) <= radii).any(dim=1)
                      for i in range(0, len(queries), batch_size)])


def precision_recall(real_feats, fake_feats, k=3, batch_size=1000, device=None):
    """Kynkaanniemi et al. 2019 manifold estimate -> (precision, recall). Precision: fraction of fakes inside some
    real k-NN ball; recall: fraction of reals inside some fake k-NN ball. Distances are computed in row batches
    (batch_size x N floats at a time), so 50k x 10k fits on a GPU."""
    real = torch.as_tensor(real_feats, dtype=torch.float32, device=device)
    fake = torch.as_tensor(fake_feats, dtype=torch.float32, device=device)
    assert len(real) > k and len(fake) > k, f'need more than k={k} samples per set'
    precision = _inside_any_ball(fake, real, _kth_radius(real, k, batch_size), batch_size).double().mean()
    recall = _inside_any_ball(real, fake, _kth_radius(fake, k, batch_size), batch_size).double().mean()
    return precision.item(), recall.item()


def psnr(a, b):
    """Per-image PSNR in dB of [0,1] images (N, ...) with data range 1 (inf for identical images) -> (N,) float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse)


def ssim(a, b, data_range=1.0, sigma=1.5, win=11, k1=0.01, k2=0.03):
    """Per-image SSIM (Wang et al. 2004) of [0,1] images (N, C, H, W) -> (N,) float64, averaged over channels:
    11x11 Gaussian window (sigma 1.5), population statistics, valid region only, data range 1. This equals
    scikit-image's structural_similarity(gaussian_weights=True, use_sample_covariance=False, data_range=1).
    Note: LlamaGen (and FQGAN's val script) pass data_range=2 for [0,1] images, which inflates SSIM."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    n, c, h, w = a.shape
    assert min(h, w) >= win, f'images must be at least {win}x{win}'
    g = torch.exp(-(torch.arange(win, dtype=torch.float64) - win // 2) ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(a.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, win, win)  # (C, 1, win, win) depthwise Gaussian
    blur = lambda x: F.conv2d(x, kernel, groups=c)  # noqa: E731  'valid' conv: (N, C, H-win+1, W-win+1)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))  # equal-sized channels: mean over C of the per-channel means


def index_histogram(indices, codebook_size):
    """Code indices (..., K) -> counts (K, V) int64."""
    idx = torch.as_tensor(indices)
    idx = idx.reshape(-1, idx.shape[-1])  # (M, K)
    return torch.stack([torch.bincount(idx[:, k], minlength=codebook_size) for k in range(idx.shape[1])])


def codebook_stats(counts):
    """Counts (K, V) -> (usage (K,), perplexity (K,)) float64: fraction of entries used at least once, and
    exp(entropy) of the code distribution (V means uniform use, 1 means collapse to a single entry)."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / counts.sum(axis=1, keepdims=True)
    return (counts > 0).mean(axis=1), np.exp(-xlogy(p, p).sum(axis=1))

# ---- ADM npz files


def save_ref_stats(path, mu, sigma, features=None, inception=None):
    """Cache reference statistics (mu, sigma, optionally pool features for precision/recall and the name of the
    Inception weights that made them), atomically."""
    extra = {} if features is None else {'features': features}
    savez_atomic(path, mu=mu, sigma=sigma, **extra, **({} if inception is None else {'inception': str(inception)}))


def _open_npz(path):
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f'{path}: not a readable npz file ({type(e).__name__})') from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f'{path}: a single .npy array, not an npz archive')
    with z:
        return {k: z[k] for k in z.files}


def load_npz_images(path):
    """Read an ADM sample / reference batch: arr_0 = uint8 images (N, H, W, 3); other keys are ignored."""
    z = _open_npz(path)
    x = z.get('arr_0')
    if x is None or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        found = 'no arr_0' if x is None else f'arr_0 {x.dtype} {x.shape}'
        raise ValueError(f'{path}: expected arr_0 = uint8 images (N, H, W, 3) (ADM npz), found {found} '
                         f'(keys {sorted(z)})')
    return x


def load_ref_stats(path):
    """Reference statistics for FID -> dict with 'mu' (D,), 'sigma' (D, D) float64 and, when present, 'features'
    (M, D) (our cache, for precision/recall) and 'images' (arr_0 uint8, an ADM reference batch: its 10k images are
    for precision/recall). Keys read: mu, sigma, features, arr_0; ADM's sFID mu_s / sigma_s are ignored. ADM's
    mu/sigma come from the TF Inception graph, so FID against them is close to, not exactly, the TF evaluator's."""
    z = _open_npz(path)
    if 'mu' not in z or 'sigma' not in z:
        raise ValueError(f'{path}: expected reference stats with keys mu and sigma, found keys {sorted(z)}')
    out = {'mu': z['mu'].astype(np.float64), 'sigma': z['sigma'].astype(np.float64)}
    if 'features' in z:
        out['features'] = z['features']
    if 'arr_0' in z:
        out['images'] = z['arr_0']
    if 'inception' in z:  # ours: which FID weights made them ('random' for smoke tests)
        out['inception'] = str(z['inception'])
    return out

# ---- command line: --mode=rfid | gfid | stats, one process or torchrun


@dataclass
class EvalConfig:
    mode: str = 'rfid'              # rfid (tokenizer reconstructions) | gfid (FAR samples) | stats (reference stats)
    ckpt: str = ''                  # rfid: tokenizer checkpoint (ours / official FQGAN, LlamaGen); gfid: FAR checkpoint
    tokenizer: str = ''             # gfid: tokenizer checkpoint; '' = the path recorded in the FAR checkpoint
    data: str = 'fashion-mnist'     # rfid / stats: 'fashion-mnist' | 'synthetic' | ImageFolder PATH | (stats) ADM npz
    split: str = 'test'             # fashion-mnist / synthetic split: test | train (never augmented)
    image_size: int = 0             # stats from a dataset: image side (required); rfid uses the tokenizer's
    max_images: int = 0             # rfid / stats: only the first N images of --data (0 = all)
    ref: str = ''                   # reference stats npz: ours (--mode=stats) or an ADM batch (mu, sigma[, arr_0])
    samples: str = ''               # rfid / gfid: score this ADM npz (arr_0) instead of reconstructing / generating
    save_npz: str = ''              # rfid: reconstructions, gfid: samples (+ labels), stats: the images, as ADM npz
    out: str = ''                   # rfid / gfid: results JSON ('' = <ckpt or samples>.<mode>.json); stats: the npz
    num_samples: int = 50000        # gfid: images to generate (labels uniformly random, as FQGAN)
    labels: str = 'random'          # gfid: 'random' (uniform, seeded by --seed) | 'balanced' (label = i mod classes)
    cfg_scale: float = 2.0          # gfid: classifier-free guidance scale (paper: 2.0)
    cfg_schedule: str = 'constant'  # gfid: 'constant' | 'linear' (1 -> cfg_scale over the positions)
    temperature: float = 1.0        # gfid: sampling temperature
    top_k: int = 0                  # gfid: top-k filter (0 = off)
    top_p: float = 1.0              # gfid: nucleus filter (1 = off)
    seed: int = 0                   # gfid: image i uses seed + i; labels and the stats feature subset use seed
    batch_size: int = 32            # images per process per batch (generation, tokenizer and Inception)
    num_workers: int = 0            # DataLoader workers per process (8 for ImageFolder JPEGs)
    inception: str = ''             # FID weights file; '' = torch hub cache; 'random' = random weights (smoke tests)
    download: bool = False          # fetch the FID weights into the torch hub cache when missing
    ref_features: int = 10000       # stats: features kept for precision/recall, a seeded random subset (0 = all)
    is_splits: int = 10             # IS splits (ADM: 10 of 5000 at 50k)
    device: str = 'auto'            # 'auto' (cuda if available) | 'cpu' | 'cuda'

    def __post_init__(self):  # a bad value stops with a one-line message
        for name, allowed in (('mode', ('rfid', 'gfid', 'stats')), ('split', ('test', 'train')),
                              ('labels', ('random', 'balanced')), ('cfg_schedule', ('constant', 'linear'))):
            if getattr(self, name) not in allowed:
                raise SystemExit(f'--{name}={getattr(self, name)}: choose one of {", ".join(allowed)}')
        if min(self.batch_size, self.num_samples, self.is_splits) < 1:
            raise SystemExit('--batch_size, --num_samples and --is_splits must be >= 1')


RANDOM_WARNING = ('WARNING: --inception=random: the FID network has RANDOM weights, so every number here is '
                  'meaningless (smoke tests only)')
TF_NOTE = ('PyTorch FID Inception (pytorch-fid port of the TF weights): close to, not identical with, the ADM '
           'TensorFlow evaluator used by the paper')


def eval_dataset(cfg, image_size):
    """--data at image_size without augmentation: --split picks the Fashion-MNIST / synthetic split; a folder gets the
    ADM centre crop."""
    if cfg.data == 'fashion-mnist':
        return FashionMNIST(image_size, train=cfg.split == 'train', flip=False)
    return make_dataset(cfg.data, image_size, train=cfg.split == 'train' and cfg.data == 'synthetic')


def gather(d, idx, arrays):
    """Per-rank arrays (rows = images idx) -> on rank 0 the arrays of all ranks in global index order; else None.
    Gathered through a gloo group on the CPU, so NCCL runs never stage images through the GPU."""
    parts = [(np.asarray(idx, dtype=np.int64), arrays)]
    if d.world_size > 1:
        parts = [None] * d.world_size if d.master else None
        dist.gather_object((np.asarray(idx, dtype=np.int64), arrays), parts, dst=0, group=d.cpu_group)
    if not d.master:
        return None
    parts = [p for p in parts if len(p[0])]  # a rank with no images sent no arrays
    order = np.argsort(np.concatenate([i for i, _ in parts]), kind='stable')
    return {k: np.concatenate([a[k] for _, a in parts])[order] for k in parts[0][1]}


def per_rank(cfg, d, n, step, desc, data=None):
    """Rank-interleaved loop: this rank takes images i = rank, rank + world, ... < n in batches, so every image is
    processed the same way whatever the number of processes. step(indices, x) -> dict of per-image numpy arrays,
    x the batch of `data` (a Dataset: (B, 3, H, W) in [-1, 1] on the device) or None. -> gathered dict on rank 0."""
    idx = list(range(d.rank, n, d.world_size))
    chunks = [idx[j:j + cfg.batch_size] for j in range(0, len(idx), cfg.batch_size)]
    batches = [None] * len(chunks) if data is None else DataLoader(
        Subset(data, idx), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    out = {}
    with tqdm(total=n, desc=desc, unit='img', disable=not d.master, dynamic_ncols=True) as bar:  # rate and ETA
        for chunk, batch in zip(chunks, batches):
            for k, v in step(chunk, None if batch is None else batch[0].to(d.device)).items():
                out.setdefault(k, []).append(v)
            bar.update(min(len(chunk) * d.world_size, n - bar.n))
    return gather(d, idx, {k: np.concatenate(v) for k, v in out.items()})


def features(cfg, inception, images):
    """uint8 images (B, H, W, 3) -> {'pool': (B, 2048), 'logits': (B, 1008)}."""
    pool, logits = images_to_features(inception, images, cfg.batch_size)
    return {'pool': pool, 'logits': logits}


def rfid(cfg, d, inception, ref, log):
    """Reconstruct --data with the tokenizer (or read --samples: reconstructions of the first images of --data, in
    order) and compare with the originals: rFID (reference = the originals, or --ref), PSNR / SSIM (data range 1),
    and per-sub-codebook usage / perplexity."""
    if not (cfg.ckpt or cfg.samples):
        raise SystemExit('--mode=rfid needs --ckpt=TOKENIZER or --samples=RECONSTRUCTIONS.npz')
    recon = load_npz_images(cfg.samples) if cfg.samples else None
    tok = FQGAN.from_checkpoint(cfg.ckpt, d.device) if recon is None else None
    ds = eval_dataset(cfg, recon.shape[1] if recon is not None else tok.cfg.image_size)
    n = min(len(ds), cfg.max_images or len(ds), len(recon) if recon is not None else len(ds))
    K, V = (tok.cfg.n_codebooks, tok.cfg.codebook_size) if recon is None else (0, 0)
    counts = torch.zeros(K, V, dtype=torch.long)  # (K, V) code histogram of this rank's images
    log(f'rfid: {n} images of {cfg.data} ({cfg.split}), ' + (f'reconstructions from {cfg.samples}' if recon is not None
        else f'tokenizer {cfg.ckpt} (K={K}, V={V})') + f', reference {cfg.ref or "the originals"}')

    def step(chunk, x):
        if recon is None:
            with autocast(d.device_type):
                rec, aux = tok(x)  # (B, 3, H, W), aux['indices'] (B, K, h, w)
            counts.add_(index_histogram(aux['indices'].permute(0, 2, 3, 1).cpu(), V))
            rec = to_uint8(rec)  # (B, H, W, 3), the official rounding
        else:
            rec = recon[chunk]
        a = ((x.double() + 1) / 2).clamp(0, 1)  # originals in [0, 1]
        b = torch.from_numpy(rec).to(d.device).permute(0, 3, 1, 2).double() / 255  # (B, 3, H, W) as saved
        out = {'psnr': psnr(a, b).cpu().numpy(), 'ssim': ssim(a, b).cpu().numpy(), **features(cfg, inception, rec)}
        if ref is None:
            out['ref_pool'] = features(cfg, inception, to_uint8(x))['pool']
        return {**out, **({'images': rec} if cfg.save_npz else {})}

    g = per_rank(cfg, d, n, step, 'rfid', data=ds)
    if d.world_size > 1:
        dist.all_reduce(counts, group=d.cpu_group)
    if not d.master:
        return None
    mu, sigma = (ref['mu'], ref['sigma']) if ref else feature_stats(g['ref_pool'])
    res = {'rfid': fid_from_features(g['pool'], mu, sigma), 'psnr': float(g['psnr'].mean()),
           'ssim': float(g['ssim'].mean())}
    if K:
        usage, ppl = codebook_stats(counts.numpy())
        res.update(usage=usage.tolist(), perplexity=ppl.tolist(), codebook_size=V)
    if cfg.save_npz:
        save_npz(cfg.save_npz, g['images'])
    return {**res, 'num_images': n}


def gfid(cfg, d, inception, ref, log):
    """Generate num_samples images with the FAR checkpoint (or read --samples) and score them against --ref: FID, IS,
    precision / recall. Image i: label labels[i], sampling seed seed + i, whatever the world size or batch size."""
    if cfg.samples:
        samples = load_npz_images(cfg.samples)
        n, labels = min(cfg.num_samples, len(samples)), None
        log(f'gfid: {n} samples from {cfg.samples}')
    elif cfg.ckpt:
        far, tok = load_generator(cfg.ckpt, d.device, tokenizer=cfg.tokenizer or None)
        n, classes = cfg.num_samples, far.cfg.num_classes
        labels = (torch.arange(n) % classes if cfg.labels == 'balanced' else
                  torch.randint(classes, (n,), generator=torch.Generator().manual_seed(cfg.seed))).numpy()
        log(f'gfid: {n} samples of {cfg.ckpt} | labels {cfg.labels} over {classes} classes | cfg {cfg.cfg_scale} '
            f'({cfg.cfg_schedule}) | temperature {cfg.temperature} top_k {cfg.top_k} top_p {cfg.top_p} '
            f'| seed {cfg.seed}')
    else:
        raise SystemExit('--mode=gfid needs --ckpt=FAR_CHECKPOINT or --samples=SAMPLES.npz')
    if ref is None:
        log('note: no --ref: only IS is computed (FID and precision/recall need reference statistics)')

    def step(chunk, _):
        if labels is None:
            images = samples[chunk]
        else:
            images = generate_images(far, tok, labels[chunk], [cfg.seed + i for i in chunk], cfg.cfg_scale,
                                     cfg.cfg_schedule, cfg.temperature, cfg.top_k, cfg.top_p)  # (B, H, W, 3) uint8
        return {**features(cfg, inception, images), **({'images': images} if cfg.save_npz else {})}

    g = per_rank(cfg, d, n, step, 'gfid')
    real = None
    if ref is not None:  # precision/recall: our cached features, else the images of an ADM reference batch
        real = ref.get('features')
        if real is None and 'images' in ref:
            r = per_rank(cfg, d, len(ref['images']), lambda c, _: features(cfg, inception, ref['images'][c]), 'ref')
            real = r['pool'] if r else None
    if not d.master:
        return None
    res = dict(zip(('is', 'is_std'), inception_score(g['logits'], splits=min(cfg.is_splits, n))))
    if ref is not None:
        res['fid'] = fid_from_features(g['pool'], ref['mu'], ref['sigma'])
        if real is not None:
            res['precision'], res['recall'] = precision_recall(real, g['pool'], device=d.device)
        else:
            log(f'note: {cfg.ref} holds no features or images: precision/recall skipped')
    if cfg.save_npz:
        save_npz(cfg.save_npz, g['images'], labels[:n] if labels is not None else None)
    return {**res, 'num_images': n}


def stats(cfg, d, inception, ref, log):
    """Reference statistics of --data (a dataset, an ImageFolder or an ADM npz): mu, sigma and a subset of the pool
    features (for precision/recall), cached in --out."""
    if not cfg.out:
        raise SystemExit('--mode=stats needs --out=PATH.npz (where to write the statistics)')
    if cfg.data.endswith('.npz'):
        images, ds = load_npz_images(cfg.data), None
        n = min(len(images), cfg.max_images or len(images))
        step = lambda chunk, _: {**features(cfg, inception, images[chunk]),  # noqa: E731
                                 **({'images': images[chunk]} if cfg.save_npz else {})}
    else:
        if cfg.image_size < 1:
            raise SystemExit('--mode=stats from a dataset needs --image_size (the side of the evaluated images)')
        ds = eval_dataset(cfg, cfg.image_size)
        n = min(len(ds), cfg.max_images or len(ds))

        def step(chunk, x):
            u8 = to_uint8(x)  # (B, H, W, 3): what a saved sample batch holds
            return {**features(cfg, inception, u8), **({'images': u8} if cfg.save_npz else {})}
    log(f'stats: {n} images of {cfg.data}' + (f' ({cfg.split}, {cfg.image_size} px)' if ds is not None else ''))
    g = per_rank(cfg, d, n, step, 'stats', data=ds)
    if not d.master:
        return None
    mu, sigma = feature_stats(g['pool'])
    m = n if cfg.ref_features <= 0 else min(n, cfg.ref_features)
    keep = np.sort(np.random.default_rng(cfg.seed).choice(n, m, replace=False))
    save_ref_stats(cfg.out, mu, sigma, g['pool'][keep], inception=cfg.inception or FID_WEIGHTS_NAME)
    if cfg.save_npz:
        save_npz(cfg.save_npz, g['images'])
    return {'num_images': n, 'features_kept': m, 'stats': cfg.out}


@torch.no_grad()
def evaluate(cfg, d):
    log = Logger(None, d.master)
    if d.device_type == 'cuda':  # FID features in true fp32 (pytorch-fid parity); the generator runs in bf16 anyway
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    d.cpu_group = dist.new_group(backend='gloo') if d.world_size > 1 and d.device_type == 'cuda' else None
    log(f'eval_fid --mode={cfg.mode} | device {d.device} | world size {d.world_size} | torch {torch.__version__}')
    log(f'config: {asdict(cfg)}')
    warnings = []
    if cfg.inception == 'random':
        warnings.append(RANDOM_WARNING)
        log(RANDOM_WARNING)
    if d.world_size > 1 and not d.master:
        dist.barrier()  # rank 0 fetches the weights first (when --download=true)
    try:
        inception = fid_inception(None if cfg.inception in ('', 'random') else cfg.inception,
                                  random_init=cfg.inception == 'random', download=cfg.download).to(d.device)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if d.world_size > 1 and d.master:
        dist.barrier()
    ref = load_ref_stats(cfg.ref) if cfg.ref and cfg.mode != 'stats' else None
    if ref is not None:
        made_by = ref.get('inception')  # our stats record their FID network; ADM's come from the TF graph
        if made_by is not None and (made_by == 'random') != (cfg.inception == 'random'):
            warnings.append(f'WARNING: {cfg.ref} was made with Inception {made_by!r}, this run uses '
                            f'{cfg.inception or FID_WEIGHTS_NAME!r}: the numbers are not comparable')
            log(warnings[-1])
    t0 = time.time()
    res = {'rfid': rfid, 'gfid': gfid, 'stats': stats}[cfg.mode](cfg, d, inception, ref, log)
    if d.master:
        res = {'mode': cfg.mode, **res, 'inception': 'random' if cfg.inception == 'random' else
               (cfg.inception or FID_WEIGHTS_NAME), 'note': TF_NOTE, **({'warning': ' | '.join(warnings)} if
               warnings else {}), 'world_size': d.world_size, 'seconds': round(time.time() - t0, 1),
               'config': asdict(cfg)}
        if cfg.mode != 'stats':
            res['json'] = cfg.out or f'{cfg.ckpt or cfg.samples}.{cfg.mode}.json'
            write_json(res['json'], res)
        log(' | '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in res.items()
                       if k not in ('config', 'note', 'warning')))
        if warnings:
            log('\n'.join(warnings))
    if d.world_size > 1:
        dist.barrier()  # rank 0 has written its files
    return res


def main(cfg):
    """Run one evaluation; returns the results dict on rank 0 (None on the other ranks)."""
    d = init_distributed(cfg.device)
    try:
        return evaluate(cfg, d)
    finally:
        cleanup_distributed()


if __name__ == '__main__':
    main(parse_config(EvalConfig))
