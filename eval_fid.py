"""Evaluation metrics for FQGAN / FAR (arXiv 2411.16681): FID, IS, precision/recall, PSNR, SSIM, codebook usage,
and the ADM npz format (uint8 NHWC, key arr_0) that the official numbers are computed from.

- FID network: the FID variant of InceptionV3 with the TF-ported weights pt_inception-2015-12-05 (pytorch-fid's
  port of the TTUR graph), reimplemented below under the weight file's own key names. Input [0,1], bilinear resize to
  299 (align_corners=False, no antialias), then 2x-1, as pytorch-fid 0.3.0. Numbers are close to, not bit-identical
  with, the TF ADM evaluator used by the paper.
- Frechet distance and IS follow pytorch-fid / torch-fidelity (unbiased 1008-way logits); precision/recall follow
  Kynkaanniemi et al. 2019 (k=3) on Inception pool features, as the ADM evaluator does.
Shapes: N images, H W C pixels (NHWC uint8 in npz files, NCHW float [0,1] in torch), D=2048 pool features,
K sub-codebooks, V entries per codebook.
"""
import os

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.special import softmax, xlogy

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


def fid_inception(path=None, random_init=False, download=True):
    """The FID Inception in eval mode, frozen. Weights: `path`, else the torch hub cache
    <torch.hub.get_dir()>/checkpoints/pt_inception-2015-12-05-6726825d.pth, downloaded from FID_WEIGHTS_URL
    (the pytorch-fid GitHub release) if absent and download=True. random_init=True skips loading (smoke tests)."""
    model = FIDInceptionV3().eval().requires_grad_(False)
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
            raise FileNotFoundError(f'FID Inception weights not found at {path} ({why}): '
                                    f'fetch {FID_WEIGHTS_URL} and put it there')
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


def _savez_atomic(path, **arrays):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:  # a file object stops numpy from appending '.npz' to the temp name
        np.savez(f, **arrays)
    os.replace(tmp, path)  # readers never see a half-written file


def save_npz(path, images):
    """Write uint8 images (N, H, W, 3) as an ADM sample batch (key arr_0), atomically."""
    images = np.asarray(images)
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, 'need uint8 (N, H, W, 3)'
    _savez_atomic(path, arr_0=images)


def save_ref_stats(path, mu, sigma, features=None):
    """Cache reference statistics (mu, sigma, and optionally pool features for precision/recall), atomically."""
    _savez_atomic(path, mu=mu, sigma=sigma, **({} if features is None else {'features': features}))


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
    return out

# ---- CLI (modes added later)

if __name__ == '__main__':
    raise SystemExit('not implemented yet')
