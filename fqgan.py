"""
FQGAN: the factorized-quantization image tokenizer of "Factorized Visual Tokenization and Generation"
(Bai et al., arXiv 2411.16681), built on the LlamaGen VQGAN (Sun et al., arXiv 2406.06525).

    image -> shared CNN encoder trunk -> K branches, each: adapter (transformer) -> GroupNorm/swish/conv -> quant_conv
          -> l2-normalised VQ (its own sub-codebook) -> concat the K sub-codes (branch 0 "vis" first) on channels
          -> post_quant_conv -> CNN decoder -> reconstruction in [-1, 1] (not clamped)

K (n_codebooks) is a config value. K=1 with adapter_layers=0 is LlamaGen's VQ-16 (or VQ-8) exactly.
Training-only parts (teachers, feature-prediction heads, LPIPS, PatchGAN) live in train_tokenizer.py / pretrained.py.

Shape legend: B batch, H W image size, h w latent grid (H / 2**(len(ch_mult)-1)), T = h*w tokens,
K sub-codebooks, V entries per sub-codebook, D code dimension, C channels, W adapter width (= ch * ch_mult[-1]).
"""
import math
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
    adapter_heads: int = 8           # attention heads of the adapter blocks
    beta: float = 0.25               # commitment-loss weight (paper's beta)
    entropy_ratio: float = 0.03      # weight of the codebook entropy loss (0 = off; official argparse default 0)
    entropy_temperature: float = 0.01  # softmax temperature over -distances in the entropy loss
    disentangle_weight: float = 0.1  # weight of the squared-cosine disentanglement regulariser (paper eq. 3)
    usage_window: int = 65536        # recent indices kept per sub-codebook for the usage statistic

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        assert self.image_size % 2 ** (len(self.ch_mult) - 1) == 0, "image_size must be divisible by the downsampling"
        assert self.ch % 32 == 0, "ch must be a multiple of 32 (GroupNorm with 32 groups)"
        assert self.n_codebooks >= 1, "n_codebooks must be >= 1"
        if self.adapter_layers:
            assert (self.ch * self.ch_mult[-1]) % self.adapter_heads == 0, "adapter width must divide adapter_heads"


# ---- CNN building blocks (taming / LlamaGen)

def Normalize(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN-swish-conv3x3 twice with a residual; 1x1 conv shortcut when the width changes."""

    def __init__(self, c_in, c_out, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = Normalize(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = Normalize(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
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
        h = F.scaled_dot_product_attention(q, k, v)  # scale C^-0.5
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv (taming's asymmetric padding)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """The shared trunk: conv_in, len(ch_mult) levels of ResBlocks (attention at the last), mid Res-Attn-Res."""

    def __init__(self, cfg):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c = ch
        for i in range(n):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(c, ch * mult[i], cfg.dropout))
                c = ch * mult[i]
                if i == n - 1:
                    block.attn.append(AttnBlock(c))
            if i != n - 1:
                block.downsample = Downsample(c)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(c, c, cfg.dropout), AttnBlock(c), ResnetBlock(c, c, cfg.dropout)])

    def forward(self, x):  # (B, 3, H, W)
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return h  # (B, W, h, w)


class Decoder(nn.Module):
    """conv_in, mid Res-Attn-Res, levels from lowest resolution up (attention at the lowest), GN-swish-conv_out."""

    def __init__(self, cfg):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c, c, cfg.dropout), AttnBlock(c), ResnetBlock(c, c, cfg.dropout)])
        self.conv_blocks = nn.ModuleList()
        for i in range(n):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                block.res.append(ResnetBlock(c, ch * mult[n - 1 - i], cfg.dropout))
                c = ch * mult[n - 1 - i]
                if i == 0:
                    block.attn.append(AttnBlock(c))
            if i != n - 1:
                block.upsample = Upsample(c)
            self.conv_blocks.append(block)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):  # (B, z_channels, h, w)
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


# ---- transformer blocks (CLIP style; reused by the adapters, the feature-prediction heads and the CLIP teacher)

class Attention(nn.Module):
    """Multi-head self-attention with torch.nn.MultiheadAttention's parameter layout (in_proj rows = [q; k; v])."""

    def __init__(self, width, n_head):
        super().__init__()
        self.n_head = n_head
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):  # (B, T, W)
        B, T, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.n_head, W // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, n_head, T, W/n_head)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, W))


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x += attn(ln_1(x)); x += mlp(ln_2(x)). act: 'gelu' (exact erf) or 'quick_gelu'."""

    def __init__(self, width, n_head, mlp_ratio=4.0, act="gelu"):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(width), Attention(width, n_head), nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

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
        B, W, h, w = x.shape
        x = x.flatten(2).transpose(1, 2) + self.positional_embedding  # (B, T, W), row-major tokens
        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x)
        return self.ln_post(x).transpose(1, 2).reshape(B, W, h, w)


class Branch(nn.Module):
    """One factorized branch: [adapter] -> GN -> swish -> conv_out 3x3 -> quant_conv 1x1 to the code dimension."""

    def __init__(self, cfg):
        super().__init__()
        width, grid = cfg.ch * cfg.ch_mult[-1], cfg.image_size // 2 ** (len(cfg.ch_mult) - 1)
        self.adapter = None
        if cfg.adapter_layers:
            self.adapter = Adapter(width, grid * grid, cfg.adapter_layers, cfg.adapter_heads)
        self.norm_out = Normalize(width)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)

    def forward(self, h):  # (B, W, h, w) trunk features
        if self.adapter is not None:
            h = self.adapter(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))  # (B, D, h, w), before l2-normalisation


# ---- quantizer

class Quantizer(nn.Module):
    """l2-normalised VQ (LlamaGen): nearest code by cosine, straight-through, codebook/commit/entropy losses in fp32."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        V = cfg.codebook_size
        self.embedding = nn.Embedding(V, cfg.codebook_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / V, 1.0 / V)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # sliding window of the most recent indices (-1 = empty), for the usage statistic
        self.register_buffer("codebook_used", torch.full((cfg.usage_window,), -1, dtype=torch.long))

    def codebook(self):
        return F.normalize(self.embedding.weight.float(), dim=-1)  # (V, D), re-normalised every call

    def lookup(self, idx):  # (B, h, w) -> (B, D, h, w)
        return self.codebook()[idx].permute(0, 3, 1, 2)

    def forward(self, z, with_losses):  # z (B, D, h, w)
        cfg = self.cfg
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float().permute(0, 2, 3, 1), dim=-1)  # (B, h, w, D) unit vectors
            e = self.codebook()
            zf = z.reshape(-1, z.shape[-1])  # (N, D), N = B*h*w
            d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()  # (N, V) = 2 - 2 cos
            idx = d.argmin(1)  # (N,)
            q = e[idx].view_as(z)  # (B, h, w, D)
            stats = {"indices": idx.view(z.shape[:3])}
            if with_losses:
                stats["vq_loss"] = F.mse_loss(q, z.detach())  # moves the codebook
                stats["commit_loss"] = cfg.beta * F.mse_loss(q.detach(), z)  # moves the encoder
                stats["entropy_loss"] = cfg.entropy_ratio * entropy_loss(-d, cfg.entropy_temperature) \
                    if cfg.entropy_ratio > 0 else d.new_zeros(())
            with torch.no_grad():
                counts = torch.zeros(cfg.codebook_size, device=z.device).index_add_(0, idx, torch.ones_like(d[:, 0]))
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


def entropy_loss(affinity, temperature):
    """Per-sample entropy minus entropy of the batch-mean distribution (LlamaGen's codebook entropy loss)."""
    logits = affinity / temperature  # (N, V)
    p = F.softmax(logits, dim=-1)
    logp = F.log_softmax(logits + 1e-5, dim=-1)  # the +1e-5 shift is a no-op kept from the official code
    sample_entropy = -(p * logp).sum(-1).mean()
    p_avg = p.mean(0)
    avg_entropy = -(p_avg * torch.log(p_avg + 1e-5)).sum()
    return sample_entropy - avg_entropy


def disentangle_loss(codes):
    """Mean over branch pairs of the squared cosine between their codes at each position (paper sec. 3.2)."""
    pairs = list(combinations(range(len(codes)), 2))
    if not pairs:
        return codes[0].new_zeros(())
    terms = [(F.normalize(codes[a], dim=1) * F.normalize(codes[b], dim=1)).sum(1).pow(2).mean() for a, b in pairs]
    return sum(terms) / len(pairs)


# ---- the tokenizer

class FQGAN(nn.Module):
    """Shared encoder trunk, K branches with their own sub-codebooks, one decoder over the concatenated sub-codes."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.branches = nn.ModuleList([Branch(cfg) for _ in range(cfg.n_codebooks)])
        self.quantizers = nn.ModuleList([Quantizer(cfg) for _ in range(cfg.n_codebooks)])
        self.post_quant_conv = nn.Conv2d(cfg.n_codebooks * cfg.codebook_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def grid(self):
        """Side h = w of the latent grid."""
        return self.cfg.image_size // 2 ** (len(self.cfg.ch_mult) - 1)

    def quantize(self, x, with_losses=False):
        """Images -> (list of K straight-through codes (B, D, h, w), dict of per-branch stats)."""
        assert x.shape[-2:] == (self.cfg.image_size,) * 2, f"expected {self.cfg.image_size}px input (cfg.image_size)"
        trunk = self.encoder(x)  # (B, W, h, w)
        codes, stats = [], []
        for branch, quantizer in zip(self.branches, self.quantizers):
            q, s = quantizer(branch(trunk), with_losses)
            codes.append(q)
            stats.append(s)
        return codes, {k: torch.stack([s[k] for s in stats], dim=1 if k == "indices" else 0) for k in stats[0]}

    def decode(self, quant):  # (B, K*D, h, w) -> (B, 3, H, W)
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x, with_losses=None):
        """x (B, 3, H, W) in [-1, 1] -> (reconstruction, aux). aux: per-branch 'vq_loss', 'commit_loss',
        'entropy_loss', 'perplexity', 'usage' (K,); 'disentangle_loss', 'vq_total' (all VQ terms summed) ();
        'indices' (B, K, h, w); 'quant' (B, K*D, h, w), the straight-through codes (gradients reach the encoder).
        Loss terms are computed when with_losses (default: in training mode)."""
        with_losses = self.training if with_losses is None else with_losses
        codes, aux = self.quantize(x, with_losses)
        aux["quant"] = torch.cat(codes, dim=1)  # (B, K*D, h, w), branch k owns channels [kD, (k+1)D)
        aux["disentangle_loss"] = self.cfg.disentangle_weight * disentangle_loss(codes)
        aux["usage"] = torch.stack([q.usage() for q in self.quantizers])
        if with_losses:
            vq = aux["vq_loss"] + aux["commit_loss"] + aux["entropy_loss"]  # (K,)
            aux["vq_total"] = vq.sum() + aux["disentangle_loss"]
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
        codes = [q.lookup(indices[:, k]) * (1.0 if k in keep else 0.0) for k, q in enumerate(self.quantizers)]
        return torch.cat(codes, dim=1)

    def decode_indices(self, indices, keep=None):
        """Indices (B, K, h, w) -> images (B, 3, H, W); `keep` = branch ids to use (Fig. 3 ablation), others zeroed."""
        return self.decode(self.indices_to_codes(indices, keep))

    @classmethod
    def from_checkpoint(cls, path, device="cpu", prefer_ema=True):
        """Load our own checkpoint or an official FQGAN / LlamaGen one (see load_official_state_dict)."""
        ckpt = torch_load(path)
        if isinstance(ckpt, dict) and "kind" in ckpt:
            if ckpt["kind"] != "fqgan":
                raise ValueError(f"{path} is a '{ckpt['kind']}' checkpoint, not a tokenizer: pass a train_tokenizer.py "
                                 "checkpoint or an official FQGAN/LlamaGen file")
            model = cls(FQGANConfig(**ckpt["config"]))
            sd = ckpt.get("ema") if prefer_ema and ckpt.get("ema") is not None else ckpt["model"]
            load_strict(model, sd, path)
        else:
            sd = ckpt
            if isinstance(ckpt, dict):  # official files: plain state dict under 'ema' or 'model'
                for key in (("ema", "model", "state_dict") if prefer_ema else ("model", "ema", "state_dict")):
                    if isinstance(ckpt.get(key), dict):
                        sd = ckpt[key]
                        break
            model = cls(config_from_official(sd, path))
            load_official_state_dict(model, sd, path)
        return model.to(device).eval()


# ---- official checkpoints (FQGAN showlab/FQGAN, LlamaGen FoundationVision/LlamaGen)

# official module suffix and adapter name per branch, by K
OFFICIAL_BRANCHES = {
    1: [("", None)],
    2: [("_vis", "visual_head"), ("_sem", "semantic_head")],
    3: [("_vis", "visual_head"), ("_sem_mid", "semantic_head_mid"), ("_sem_high", "semantic_head_high")],
}
TRAINING_ONLY = "feat_pred"  # official semantic feature-prediction heads (e.g. mid_sem_feat_pred.*): skipped


def official_key_map(K):
    """(official prefix, our prefix) rules, most specific first."""
    rules = []
    for k, (suffix, head) in enumerate(OFFICIAL_BRANCHES[K]):
        if head:
            rules.append((f"encoder.{head}.0.", f"branches.{k}.adapter."))
        rules += [(f"encoder.norm_out{suffix}.", f"branches.{k}.norm_out."),
                  (f"encoder.conv_out{suffix}.", f"branches.{k}.conv_out."),
                  (f"quant_conv{suffix}.", f"branches.{k}.quant_conv."), (f"quantize{suffix}.", f"quantizers.{k}.")]
    return rules + [("encoder.", "encoder."), ("decoder.", "decoder."), ("post_quant_conv.", "post_quant_conv.")]


def _official_K(sd):
    return 3 if "quantize_sem_high.embedding.weight" in sd else 2 if "quantize_sem.embedding.weight" in sd else 1


def config_from_official(sd, path="state dict"):
    """Infer an FQGANConfig from an official state dict's shapes (K, widths, levels, codebook, adapter, grid)."""
    try:
        K = _official_K(sd)
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
        raise ValueError(f"{path} is not an FQGAN/LlamaGen tokenizer state dict (no {e}): pass a tokenizer checkpoint")


def load_official_state_dict(model, sd, path="state dict"):
    """Load an official FQGAN-Dual/Triple or LlamaGen VQ state dict into `model`, strictly. Returns the skipped
    training-only keys (the semantic feature-prediction heads)."""
    rules, ours, skipped = official_key_map(model.cfg.n_codebooks), {}, []
    for key, value in sd.items():
        if TRAINING_ONLY in key:
            skipped.append(key)
            continue
        new = next((b + key[len(a):] for a, b in rules if key.startswith(a)), key)
        if new.endswith("codebook_used"):  # official: float window of indices; ours: int64
            value = value.round().long()
        ours[new] = value
    load_strict(model, ours, path)
    return skipped


def load_strict(model, sd, source="state dict"):
    """model.load_state_dict(sd, strict=True), with every missing / unexpected / mis-shaped tensor named in one
    ValueError (each list cut after 8 names). Shared by fqgan.py, far.py, pretrained.py and the scripts."""
    own = model.state_dict()
    show = lambda ks: f"{ks[:8]}" + (f" (+{len(ks) - 8} more)" if len(ks) > 8 else "")  # noqa: E731
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs ours {tuple(v.shape)}"
              for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not fit {type(model).__name__}({getattr(model, 'cfg', '')}): missing "
                         f"{show(missing)}, unexpected {show(unexpected)}, shape mismatch {show(shapes)}")
    model.load_state_dict(sd, strict=True)
    return model


def torch_load(path):
    """torch.load(weights_only=True) on CPU, with one-line errors for a missing or unreadable file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} not found: check the path") from None
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}): is it a torch state dict file?") from e


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
        raise ValueError(f"unknown tokenizer preset '{name}': choose one of {sorted(PRESETS)}")
    return FQGANConfig(**{**PRESETS[name], **overrides})


def checkpoint_dict(model, **extra):
    """The plain dict our checkpoints hold (loads with weights_only=True): kind, config, model weights, extras."""
    return {"kind": "fqgan", "config": asdict(model.cfg), "model": model.state_dict(), **extra}
