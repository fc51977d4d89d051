"""
FQGAN: the factorized-quantization image tokenizer of "Factorized Visual Tokenization and Generation"
(Bai et al., arXiv 2411.16681), built on the LlamaGen VQGAN (Sun et al., arXiv 2406.06525): K=1 with adapter_layers=0
is LlamaGen's VQ-16 (or VQ-8) exactly. Training-only parts: train_tokenizer.py, pretrained.py.

    image -> shared CNN encoder trunk -> K branches, each: adapter (transformer) -> GroupNorm/swish/conv -> quant_conv
          -> l2-normalised VQ (its own sub-codebook) -> concat the K sub-codes (branch 0 "vis" first) on channels
          -> post_quant_conv -> CNN decoder -> reconstruction in [-1, 1] (not clamped)

Shape legend: B batch, H W image size, h w latent grid (H / 2**(len(ch_mult)-1)), T = h*w tokens,
K sub-codebooks, V entries per sub-codebook, D code dimension, C channels, W trunk width (= ch * ch_mult[-1]).
"""
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from itertools import combinations

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class FQGANConfig:
    image_size: int = 256            # input resolution H = W (sets the adapters' positional tables)
    ch: int = 128                    # base width of the CNN encoder/decoder
    ch_mult: tuple = (1, 1, 2, 2, 4)  # width multiplier per resolution level; len-1 downsamples (5 levels = /16)
    num_res_blocks: int = 2          # ResBlocks per encoder level; the decoder uses num_res_blocks + 1 (as taming)
    z_channels: int = 256            # channels of each branch's conv_out and of post_quant_conv
    dropout: float = 0.0             # dropout inside the ResBlocks
    n_codebooks: int = 2             # K, number of factorized sub-codebooks (= branches); 1 = LlamaGen VQ
    codebook_size: int = 16384       # V, entries per sub-codebook
    codebook_dim: int = 8            # D, dimension of a code vector (codes are l2-normalised)
    adapter_layers: int = 6          # transformer blocks in each branch adapter; 0 = no adapter (LlamaGen)
    adapter_heads: int = 8           # attention heads of the adapter (and ViT trunk) blocks
    beta: float = 0.25               # commitment-loss weight (paper's beta)
    entropy_ratio: float = 0.03      # weight of the codebook entropy loss (official scripts 0.03; argparse default 0)
    entropy_temperature: float = 0.01  # softmax temperature over -distances in the entropy loss
    disentangle_weight: float = 0.1  # weight of the squared-cosine disentanglement regulariser (paper eq. 3)
    usage_window: int = 65536        # recent indices kept per sub-codebook for the usage statistic
    encoder: str = "cnn"             # 'cnn' (taming) | 'vit' (ViT, width codebook_dim, patch = ch_mult's downsampling)
    vit_layers: int = 0              # encoder='vit': transformer blocks of the trunk

    def __post_init__(self):
        self.ch_mult, down = tuple(self.ch_mult), 2 ** (len(self.ch_mult) - 1)
        if self.image_size % down:
            raise ValueError(f"image_size={self.image_size} is not divisible by the downsampling {down} of ch_mult "
                             f"{self.ch_mult}: use a multiple of {down}")
        if self.encoder not in ("cnn", "vit") or self.n_codebooks < 1 or self.ch % 32:
            raise ValueError(f"encoder must be 'cnn' or 'vit', n_codebooks >= 1, ch a multiple of 32 (GroupNorm): "
                             f"got {self.encoder!r}, {self.n_codebooks}, {self.ch}")


# ---- CNN building blocks (taming / LlamaGen)
def Normalize(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN-swish-conv3x3 twice with a residual; 1x1 conv shortcut when the width changes."""

    def __init__(self, c_in, c_out, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = Normalize(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = Normalize(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout, self.nin_shortcut = nn.Dropout(dropout), nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.silu(self.norm2(h))  # rebinding h frees conv1's output before conv2 runs (inference peak memory)
        h = self.conv2(self.dropout(h))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions with 1x1-conv projections."""

    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(2, 3) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C^-0.5
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Resample(nn.Module):
    """Down: zero-pad right/bottom by one, stride-2 3x3 conv (taming's asymmetric padding). Up: nearest x2, 3x3 conv."""

    def __init__(self, c, up):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=int(up))

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1)))


def res_levels(cfg, widths, n_res, attn_level, up):
    """A module per level: `res` ResBlocks, `attn` (at attn_level), `upsample`/`downsample` but last (official keys)."""
    levels = nn.ModuleList()
    for i, w in enumerate(widths[1:]):
        level = nn.Module()
        level.res = nn.ModuleList(ResnetBlock(widths[i] if j == 0 else w, w, cfg.dropout) for j in range(n_res))
        level.attn = nn.ModuleList(AttnBlock(w) for _ in range(n_res if i == attn_level else 0))
        if i < len(widths) - 2:
            setattr(level, "upsample" if up else "downsample", Resample(w, up))
        levels.append(level)
    return levels


def run_levels(levels, h):
    for level in levels:
        for j, res in enumerate(level.res):
            h = level.attn[j](res(h)) if len(level.attn) else res(h)
        for name in ("downsample", "upsample"):
            h = getattr(level, name)(h) if hasattr(level, name) else h
    return h


class Encoder(nn.Module):
    """The shared trunk: conv_in, len(ch_mult) levels of ResBlocks (attention at the last), mid Res-Attn-Res."""

    def __init__(self, cfg):
        super().__init__()
        widths, c = [cfg.ch * m for m in cfg.ch_mult], cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = res_levels(cfg, [cfg.ch] + widths, cfg.num_res_blocks, len(widths) - 1, up=False)
        self.mid = nn.Sequential(ResnetBlock(c, c, cfg.dropout), AttnBlock(c), ResnetBlock(c, c, cfg.dropout))

    def forward(self, x):  # (B, 3, H, W)
        return self.mid(run_levels(self.conv_blocks, self.conv_in(x)))  # (B, W, h, w)


class Decoder(nn.Module):
    """conv_in, mid Res-Attn-Res, levels from lowest resolution up (attention at the lowest), GN-swish-conv_out."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]
        c = widths[0]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(c, c, cfg.dropout), AttnBlock(c), ResnetBlock(c, c, cfg.dropout))
        self.conv_blocks = res_levels(cfg, [c] + widths, cfg.num_res_blocks + 1, 0, up=True)
        self.norm_out, self.conv_out = Normalize(widths[-1]), nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z):  # (B, z_channels, h, w)
        h = run_levels(self.conv_blocks, self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


# ---- transformer blocks (CLIP style; reused by the adapters, the ViT trunk, the heads and the CLIP teacher)
class Attention(nn.Module):
    """Multi-head self-attention with torch.nn.MultiheadAttention's parameter layout (in_proj rows = [q; k; v])."""

    def __init__(self, width, n_head):
        super().__init__()
        self.n_head, self.in_proj_weight = n_head, nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias, self.out_proj = nn.Parameter(torch.zeros(3 * width)), nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):  # (B, T, W)
        B, T, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.n_head, W // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, n_head, T, W/n_head)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, W))


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x += attn(ln_1(x)); x += mlp(ln_2(x)). act: 'gelu' (exact erf) or 'quick_gelu'."""

    def __init__(self, width, n_head, mlp_ratio=4.0, act="gelu"):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(width), Attention(width, n_head), nn.LayerNorm(width)
        hidden, gelu = int(width * mlp_ratio), QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=gelu, c_proj=nn.Linear(hidden, width)))

    def forward(self, x):  # (B, T, W)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Adapter(nn.Module):
    """FQGAN's per-branch "FactorizedAdapter": tokens + learned positions -> LN -> blocks -> LN, shape preserved."""

    def __init__(self, width, n_tokens, n_layer, n_head):
        super().__init__()
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(n_tokens, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, n_head) for _ in range(n_layer)])

    def forward(self, x):  # (B, W, h, w)
        t = self.ln_pre(x.flatten(2).transpose(1, 2) + self.positional_embedding)  # (B, T, W), row-major tokens
        for block in self.transformer:
            t = block(t)
        return self.ln_post(t).transpose(1, 2).reshape(x.shape)


class ViT(nn.Module):
    """Hybrid ViT: log2(patch) stride-2 3x3 conv + BatchNorm layers -> (H/p) x (W/p) grid of `width` tokens -> an
    Adapter. The IU teacher's network (pretrained.py) and, frozen, the Cluster tokenizer's trunk (encoder='vit')."""

    def __init__(self, width, image_size, patch, n_layer, n_head):
        super().__init__()
        convs, c = [], 3
        for i, w in enumerate([width // 2] + [width] * (int(math.log2(patch)) - 1)):
            convs += [nn.GELU()] * (i > 0) + [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w)]
            c = w
        self.stem = nn.Sequential(*convs)
        self.body = Adapter(width, (image_size // patch) ** 2, n_layer, n_head)

    def forward(self, x):  # (B, 3, H, W)
        return self.body(self.stem(x))  # (B, W, h, w)


class Branch(nn.Module):
    """One factorized branch: [adapter] -> GN -> swish -> conv_out 3x3 -> quant_conv 1x1 to the code dimension."""

    def __init__(self, cfg):
        super().__init__()
        width, grid = cfg.ch * cfg.ch_mult[-1], cfg.image_size // 2 ** (len(cfg.ch_mult) - 1)
        self.adapter = Adapter(width, grid ** 2, cfg.adapter_layers, cfg.adapter_heads) if cfg.adapter_layers else None
        self.norm_out, self.conv_out = Normalize(width), nn.Conv2d(width, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)

    def forward(self, h):  # (B, W, h, w) trunk features
        h = h if self.adapter is None else self.adapter(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))  # (B, D, h, w), before l2-normalisation


# ---- quantizer, losses, the tokenizer
class Quantizer(nn.Module):
    """l2-normalised VQ (LlamaGen): nearest code by cosine, straight-through, codebook/commit/entropy losses in fp32."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, V = cfg, cfg.codebook_size
        self.embedding = nn.Embedding(V, cfg.codebook_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / V, 1.0 / V)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.full((cfg.usage_window,), -1, dtype=torch.long))  # -1: empty slot

    def codebook(self):
        return F.normalize(self.embedding.weight.float(), dim=-1)  # (V, D), re-normalised every call

    def lookup(self, idx):  # (B, h, w) -> (B, D, h, w)
        return self.codebook()[idx].permute(0, 3, 1, 2)

    def forward(self, z, with_losses):  # z (B, D, h, w)
        cfg = self.cfg
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float().permute(0, 2, 3, 1), dim=-1)  # (B, h, w, D) unit vectors
            zf, e = z.reshape(-1, z.shape[-1]), self.codebook()  # (N, D), N = B*h*w; (V, D)
            entropy = with_losses and cfg.entropy_ratio > 0
            h, idx = NearestCode.apply(zf, e, cfg.entropy_temperature if entropy else 0.0)  # (), (N,)
            q = e[idx].view_as(z)  # (B, h, w, D)
            stats = {"indices": idx.view(z.shape[:3])}
            if with_losses:
                stats["vq_loss"] = F.mse_loss(q, z.detach())  # moves the codebook
                stats["commit_loss"] = cfg.beta * F.mse_loss(q.detach(), z)  # moves the encoder
                stats["entropy_loss"] = cfg.entropy_ratio * h
            with torch.no_grad():
                counts = torch.zeros(cfg.codebook_size, device=z.device).index_add_(0, idx, torch.ones_like(zf[:, 0]))
                p = counts / counts.sum()
                stats["perplexity"] = torch.exp(-(p * torch.log(p + 1e-10)).sum())
                if self.training:  # slide the usage window
                    n = min(idx.numel(), cfg.usage_window)
                    self.codebook_used.copy_(torch.cat([self.codebook_used[n:], idx[-n:]]))
            q = z + (q - z).detach()  # straight-through: the decoder sees unit codes, gradients reach z
        return q.permute(0, 3, 1, 2), stats  # (B, D, h, w)

    @torch.no_grad()
    def usage(self):
        """Fraction of the V codes seen in the last usage_window indices (compile-friendly: no torch.unique)."""
        V, used = self.cfg.codebook_size, self.codebook_used
        seen = torch.zeros(V + 1, device=used.device).index_fill_(0, torch.where(used < 0, V, used), 1.0)
        return seen[:V].sum() / V


def distances(z, e):
    """Squared distances (n, V) of rows z (n, D) to codes e (V, D), |z|^2 + |e|^2 - 2 z.e (the official formula)."""
    return torch.addmm(z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1), z, e.t(), alpha=-2.0)


class NearestCode(torch.autograd.Function):
    """Nearest code of each row of zf (N, D) and, if temperature > 0, LlamaGen's entropy loss mean_n H(p_n) - H(pbar)
    (H(pbar) with log(pbar + 1e-5); the official +1e-5 logit shift is a no-op), p_n = softmax(-d_n / temperature),
    pbar = mean_n p_n. N is walked in chunks; nothing (N, V) is kept: the backward recomputes the distances."""

    @staticmethod
    def forward(ctx, zf, e, temperature):  # -> (loss (), indices (N,))
        rows, idx = max(1, 2 ** 22 // len(e)), []
        h, psum = zf.new_zeros(()), e.new_zeros(len(e))
        for s in range(0, len(zf), rows):
            d = distances(zf[s:s + rows], e)  # (n, V)
            idx.append(d.argmin(1))
            if temperature > 0:
                logits = d.mul_(-1.0 / temperature)
                p = logits.softmax(-1)
                h -= torch.dot(p.flatten(), logits.log_softmax(-1).flatten())  # sum_n H(p_n)
                psum += p.sum(0)
        pbar, idx = psum / len(zf), torch.cat(idx)
        ctx.save_for_backward(zf, e, pbar)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.mark_non_differentiable(idx)
        return (h / len(zf) + (pbar * torch.log(pbar + 1e-5)).sum() if temperature > 0 else h), idx

    @staticmethod
    def backward(ctx, grad, _):
        if ctx.temperature == 0:  # no entropy term: the loss is the constant 0
            return None, None, None
        (zf, e, pbar), t, rows = ctx.saved_tensors, ctx.temperature, ctx.rows
        dz, de = torch.zeros_like(zf), torch.zeros_like(e)
        c, scale = torch.log(pbar + 1e-5) + pbar / (pbar + 1e-5), grad * 2.0 / (t * len(zf))  # (V,), ()
        for s in range(0, len(zf), rows):
            zc = zf[s:s + rows]
            logits = distances(zc, e).mul_(-1.0 / t)  # (n, V)
            p = logits.softmax(-1)
            g = (c - logits).add_(((p * logits).sum(-1) - p @ c)[:, None]).mul_(p)  # N dloss/dlogits; rows sum to 0
            dz[s:s + rows] = scale * (g @ e)  # d = |z|^2 + |e|^2 - 2 z.e, dd/dlogits = -t; |z|^2 drops (rows sum 0)
            de += scale * (g.t() @ zc - e * g.sum(0)[:, None])
        return dz, de, None


def disentangle_loss(codes):
    """Paper sec. 3.2: (1 / #pairs) sum_{a<b} mean_{b,y,x} <q_a / |q_a|, q_b / |q_b|>^2; 0 for a single branch."""
    pairs = list(combinations(range(len(codes)), 2))
    terms = [(F.normalize(codes[a], dim=1) * F.normalize(codes[b], dim=1)).sum(1).pow(2).mean() for a, b in pairs]
    return sum(terms, codes[0].new_zeros(())) / max(len(pairs), 1)


class FQGAN(nn.Module):
    """Shared encoder trunk, K branches with their own sub-codebooks, one decoder over the concatenated sub-codes."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.down, vit = cfg, 2 ** (len(cfg.ch_mult) - 1), cfg.encoder == "vit"  # down: downsampling factor
        self.grid = cfg.image_size // self.down  # side h = w of the latent grid
        self.encoder = ViT(cfg.codebook_dim, cfg.image_size, self.down, cfg.vit_layers, cfg.adapter_heads) if vit \
            else Encoder(cfg)
        self.branches = nn.ModuleList(nn.Identity() if vit else Branch(cfg) for _ in range(cfg.n_codebooks))
        self.quantizers = nn.ModuleList([Quantizer(cfg) for _ in range(cfg.n_codebooks)])
        self.post_quant_conv = nn.Conv2d(cfg.n_codebooks * cfg.codebook_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def quantize(self, x, with_losses=False):
        """Images -> (list of K straight-through codes (B, D, h, w), dict of per-branch stats)."""
        S = self.cfg.image_size
        assert x.shape[-2:] == (S, S), f"the tokenizer takes {S}x{S} images (cfg.image_size), got {tuple(x.shape)}"
        trunk = self.encoder(x)  # (B, W, h, w)
        codes, stats = zip(*(q(b(trunk), with_losses) for b, q in zip(self.branches, self.quantizers)))  # K each
        return list(codes), {k: torch.stack([s[k] for s in stats], dim=1 if k == "indices" else 0) for k in stats[0]}

    def decode(self, quant):  # (B, K*D, h, w) -> (B, 3, H, W)
        return self.decoder(self.post_quant_conv(quant))

    def codes(self, x, with_losses=None):
        """x (B, 3, H, W) in [-1, 1] -> aux: per-branch (K,) 'vq_loss', 'commit_loss' (x beta), 'entropy_loss' (x
        entropy_ratio), 'perplexity', 'usage'; 'disentangle_loss' (x disentangle_weight), 'vq_total' (sum of all, ());
        'indices' (B, K, h, w); 'quant' (B, K*D, h, w), straight-through. Losses iff with_losses (default: training)."""
        with_losses = self.training if with_losses is None else with_losses
        codes, aux = self.quantize(x, with_losses)
        aux["quant"] = torch.cat(codes, dim=1)  # (B, K*D, h, w), branch k owns channels [kD, (k+1)D)
        aux["disentangle_loss"] = self.cfg.disentangle_weight * disentangle_loss(codes)
        aux["usage"] = torch.stack([q.usage() for q in self.quantizers])
        if with_losses:
            vq = aux["vq_loss"] + aux["commit_loss"] + aux["entropy_loss"]  # (K,)
            aux["vq_total"] = vq.sum() + aux["disentangle_loss"]
        return aux

    def forward(self, x, with_losses=None):
        """x (B, 3, H, W) in [-1, 1] -> (reconstruction (B, 3, H, W), aux of codes())."""
        aux = self.codes(x, with_losses)
        return self.decode(aux["quant"]), aux

    @torch.no_grad()
    def encode(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> indices (B, K, h, w)."""
        return self.quantize(x)[1]["indices"]

    def indices_to_codes(self, indices, keep=None):
        """(B, K, h, w) -> (B, K*D, h, w). Branches not in `keep` are filled with zero vectors: a zero code has
        cosine 0 to every entry, i.e. carries no information (the paper does not say how it blanked sub-codes)."""
        assert indices.shape[1] == self.cfg.n_codebooks, f"indices must be (B, {self.cfg.n_codebooks}, h, w)"
        keep = range(self.cfg.n_codebooks) if keep is None else keep
        return torch.cat([q.lookup(indices[:, k]) * float(k in keep) for k, q in enumerate(self.quantizers)], dim=1)

    def decode_indices(self, indices, keep=None):
        """Indices (B, K, h, w) -> images (B, 3, H, W); `keep` = branch ids to use (Fig. 3 ablation), others zeroed."""
        return self.decode(self.indices_to_codes(indices, keep))

    @classmethod
    def from_checkpoint(cls, ckpt, prefer_ema=True):
        """A checkpoint (a path or its dict) -> model in eval mode on the CPU, strictly loaded. Ours: {'kind', 'config',
        'model'}. Official FQGAN / LlamaGen: a state dict, bare or under 'ema' (preferred), 'model' or 'state_dict'."""
        if not isinstance(ckpt, dict):
            ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
        if "kind" in ckpt:
            model = cls(FQGANConfig(**ckpt["config"]))
            model.load_state_dict(ckpt["model"])
        else:
            order = ("ema", "model", "state_dict") if prefer_ema else ("model", "ema", "state_dict")
            sd = next((ckpt[k] for k in order if isinstance(ckpt.get(k), dict)), ckpt)
            model = cls(config_from_official(sd))
            load_official_state_dict(model, sd)
        return model.eval()


def checkpoint_dict(model, **extra):
    """The plain dict our checkpoints hold (loads with weights_only=True): kind, config, model weights, extras."""
    return {"kind": "fqgan", "config": asdict(model.cfg), "model": model.state_dict(), **extra}


# ---- official checkpoints (FQGAN showlab/FQGAN, LlamaGen FoundationVision/LlamaGen)
OFFICIAL_BRANCHES = {  # official (module suffix, adapter name) per branch, by K
    1: [("", None)], 2: [("_vis", "visual_head"), ("_sem", "semantic_head")],
    3: [("_vis", "visual_head"), ("_sem_mid", "semantic_head_mid"), ("_sem_high", "semantic_head_high")]}


def config_from_official(sd):
    """Infer an FQGANConfig from an official state dict's shapes (K, widths, levels, codebook, adapter, grid)."""
    try:
        K = 3 if "quantize_sem_high.embedding.weight" in sd else 2 if "quantize_sem.embedding.weight" in sd else 1
        suffix, head = OFFICIAL_BRANCHES[K][0]
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks.")})
        ch_mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in levels)
        n_res = len({k.split(".")[4] for k in sd if k.startswith("encoder.conv_blocks.0.res.")})
        V, D = sd[f"quantize{suffix}.embedding.weight"].shape
        n_adapter = len({k.split(".")[4] for k in sd if head and k.startswith(f"encoder.{head}.0.transformer.")})
        grid = math.isqrt(sd[f"encoder.{head}.0.positional_embedding"].shape[0]) if head else 256 >> (len(levels) - 1)
        return FQGANConfig(image_size=grid << (len(levels) - 1), ch=ch, ch_mult=ch_mult, num_res_blocks=n_res,
                           z_channels=sd["decoder.conv_in.weight"].shape[1], n_codebooks=K, codebook_size=V,
                           codebook_dim=D, adapter_layers=n_adapter,
                           usage_window=sd[f"quantize{suffix}.codebook_used"].shape[0])
    except (KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"not an FQGAN/LlamaGen tokenizer state dict (no {e}): pass a tokenizer checkpoint") from None


def load_official_state_dict(model, sd):
    """Strictly load an official FQGAN-Dual/Triple or LlamaGen VQ state dict; skips and returns *feat_pred* keys."""
    rules = []  # (official prefix, our prefix), most specific first
    for k, (suffix, head) in enumerate(OFFICIAL_BRANCHES[model.cfg.n_codebooks]):
        rules += [(f"encoder.{head}.0.", f"branches.{k}.adapter.")] if head else []
        rules += [(f"encoder.{a}{suffix}.", f"branches.{k}.{a}.") for a in ("norm_out", "conv_out")]
        rules += [(f"quant_conv{suffix}.", f"branches.{k}.quant_conv."), (f"quantize{suffix}.", f"quantizers.{k}.")]
    ours, skipped = {}, [key for key in sd if "feat_pred" in key]
    for key, value in sd.items():
        if key not in skipped:
            new = next((b + key[len(a):] for a, b in rules if key.startswith(a)), key)
            ours[new] = value.round().long() if new.endswith("codebook_used") else value  # official: float window
    model.load_state_dict(ours)
    return skipped


# ---- presets (data, not code): FQGANConfig(**PRESETS[name])
PRESETS = {
    "tiny": dict(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, n_codebooks=2,
                 codebook_size=512, adapter_layers=1, adapter_heads=4, usage_window=4096),  # CPU tests and demo
    "vq16": dict(n_codebooks=1, adapter_layers=0),  # LlamaGen VQ-16 (72M)
    "vq8": dict(ch_mult=(1, 2, 2, 4), n_codebooks=1, adapter_layers=0),  # LlamaGen VQ-8
    "dual16": dict(n_codebooks=2),  # FQGAN-Dual, downsample 16 (111M)
    "triple16": dict(n_codebooks=3),  # FQGAN-Triple, downsample 16 (132M)
    "dual8": dict(ch_mult=(1, 2, 2, 4), n_codebooks=2),  # FQGAN-Dual, downsample 8
    "triple8": dict(ch_mult=(1, 2, 2, 4), n_codebooks=3),  # FQGAN-Triple, downsample 8
}


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer preset '{name}': choose one of {', '.join(PRESETS)}")
    return FQGANConfig(**{**PRESETS[name], **overrides})
