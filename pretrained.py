"""
Frozen pretrained networks used as training losses by the FQGAN tokenizer (arXiv 2411.16681, sections 3.2-3.3):
the semantic teachers (OpenAI CLIP image encoder, DINOv2) and the LPIPS-VGG perceptual distance.

    CLIPVision : OpenAI CLIP ViT (openai/CLIP clip/model.py VisionTransformer); FQGAN's feature is the class token of
                 the last block BEFORE ln_post (HF hidden_states[-1][:, 0]). FQGAN-Dual: ViT-L/14; Triple: ViT-B/16.
    DINOv2     : facebookresearch/dinov2 DinoVisionTransformer (ViT-S/14, ViT-B/14, optional 4 registers); FQGAN's
                 feature is the class token AFTER the final norm (x_norm_clstoken). FQGAN-Triple: ViT-S/14.
    Teacher    : images in [-1, 1] -> x*0.5+0.5 -> F.interpolate to 224 (nearest, as the official code) -> CLIP or
                 ImageNet mean/std -> (cls feature, patch features).
    LPIPS      : LPIPS v0.1 'vgg' (richzhang/PerceptualSimilarity, lpips 0.1.4): VGG16 taps relu1_2..relu5_3,
                 unit-normalised channels, squared difference, 1x1 'lin' weights, spatial mean, sum over taps.

Each network is built by ONE function naming its weight source; nothing is downloaded unless download=True.
With path=None the file is looked up in torch.hub.get_dir()/checkpoints/<original file name>:
    ViT-B-16.pt, ViT-L-14.pt  https://openaipublic.azureedge.net/clip/models/<sha256>/ViT-{B-16,L-14}.pt (TorchScript)
    dinov2_<v>_pretrain.pth   https://dl.fbaipublicfiles.com/dinov2/dinov2_<v>/dinov2_<v>[_reg4]_pretrain.pth
    vgg16-397923af.pth        https://download.pytorch.org/models/vgg16-397923af.pth (torchvision IMAGENET1K_V1)
    vgg.pth                   LPIPS v0.1 lin weights, PerceptualSimilarity lpips/weights/v0.1/vgg.pth (also shipped
                              inside the `lpips` pip wheel; md5 d507d7349b931f0638a25a48a722f98a)
Loading is strict: every tensor of the file (minus CLIP's text tower and VGG's classifier) must be used, and every
missing / unexpected / mis-shaped key is named. Name 'tiny' gives small random networks for CPU tests (no file).

Shape legend: B batch, H W image size, g patch grid side, N = g*g patch tokens, R register tokens,
D token width (the teacher feature width), E CLIP embedding width, C channels.
"""
import math
import os
import warnings
import zipfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fqgan import ResidualAttentionBlock, load_strict

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLIP_URL = "https://openaipublic.azureedge.net/clip/models/"
WEIGHT_URLS = {  # original file name -> original release URL
    "ViT-B-16.pt": _CLIP_URL + "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L-14.pt": _CLIP_URL + "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    **{f"dinov2_{v}{r}_pretrain.pth": f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{v}/dinov2_{v}{r}_pretrain.pth"
       for v in ("vits14", "vitb14") for r in ("", "_reg4")},
    "vgg16-397923af.pth": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg.pth": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
}


# ---- configs

@dataclass
class CLIPConfig:
    input_resolution: int = 224  # image side in pixels; CLIP has no position interpolation, inputs must match
    patch_size: int = 16         # conv1 kernel = stride, in pixels
    width: int = 768             # D, token width
    layers: int = 12             # residual attention blocks
    heads: int = 12              # attention heads (D / 64 in the real models)
    output_dim: int = 512        # E, width of the projected image embedding (proj is (D, E), used as x @ proj)


@dataclass
class DINOv2Config:
    img_size: int = 518          # pixels the position table was trained for: an M x M grid, M = img_size // patch
    patch_size: int = 14         # patch_embed kernel = stride, in pixels
    embed_dim: int = 384         # D, token width
    depth: int = 12              # transformer blocks
    num_heads: int = 6           # attention heads (D / 64)
    mlp_ratio: float = 4.0       # MLP hidden width / D
    num_register_tokens: int = 0  # R, extra learned tokens between cls and patches (no position embedding)
    interpolate_offset: float = 0.1  # 0.1: scale_factor=(g+0.1)/M (original models); 0: size=(g, g) (register models)
    interpolate_antialias: bool = False  # antialias of the bicubic position resize (True for the register models)


# ---- loading helpers

def frozen(model):
    """Freeze a network in place: no gradients to its weights, eval mode."""
    return model.requires_grad_(False).eval()


def weight_path(fname, path=None, download=False, arg="path"):
    """Local file of a weight: `path`, else torch.hub.get_dir()/checkpoints/fname; a one-line error if absent."""
    url, given = WEIGHT_URLS.get(fname), path is not None
    if not given:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
        if download and not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, path)
            except Exception as e:  # offline, proxy, truncated transfer: report in one line
                raise FileNotFoundError(f"downloading {fname} from {url} failed ({type(e).__name__}): "
                                        f"put the file at {path} or pass {arg}=...") from None
    if not os.path.exists(path):
        if given:
            fix = f"given as {arg}=" + (f"; the original is {url}" if url else "")
        else:
            fix = f"download {url} to that path (torch.hub.get_dir()/checkpoints) or pass {arg}=..."
        raise FileNotFoundError(f"weight file {fname} not found at {path}: {fix}")
    return path


def read_state_dict(path):
    """Tensors of a weight file: a plain torch state dict, or a TorchScript archive (how OpenAI ships CLIP)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:  # TorchScript archives hold compiled code next to the tensors
            scripted = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    if zipfile.is_zipfile(path) and scripted:
        with warnings.catch_warnings():  # torch.jit is deprecated in recent torch; it still reads these archives
            warnings.simplefilter("ignore")
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict_strict(model, sd, prefix="", source="state dict"):
    """Load sd[prefix + key] into every model key, cast to float32 (fqgan.load_strict names every bad key)."""
    got = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    got.update({k: v for k, v in sd.items() if not k.startswith(prefix)})  # reported as unexpected
    return load_strict(model, got, f"{source} (keys under '{prefix}')" if prefix else source)


# ---- CLIP image encoder

class CLIPVision(nn.Module):
    """OpenAI CLIP ViT image encoder; key names as the checkpoint minus 'visual.'; forward returns teacher features."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, g = cfg.width, cfg.input_resolution // cfg.patch_size
        scale = D ** -0.5  # OpenAI's init; real weights overwrite it
        self.class_embedding = nn.Parameter(scale * torch.randn(D))
        self.positional_embedding = nn.Parameter(scale * torch.randn(g * g + 1, D))  # (1+N, D)
        self.proj = nn.Parameter(scale * torch.randn(D, cfg.output_dim))  # (D, E), multiplies from the right
        self.conv1 = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.ln_pre = nn.LayerNorm(D)  # eps 1e-5 throughout CLIP
        blocks = [ResidualAttentionBlock(D, cfg.heads, act="quick_gelu") for _ in range(cfg.layers)]
        self.transformer = nn.ModuleDict({"resblocks": nn.ModuleList(blocks)})  # keys transformer.resblocks.i.*
        self.ln_post = nn.LayerNorm(D)

    def forward(self, x):
        """x (B, 3, H, W) CLIP-normalised -> dict cls (B, D) before ln_post, patch (B, N, D), embedding (B, E)."""
        S = self.cfg.input_resolution
        assert x.shape[-2:] == (S, S), f"CLIP input must be {S}x{S} (cfg.input_resolution), got {tuple(x.shape)}"
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major grid
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))  # (B, 1+N, D)
        for block in self.transformer.resblocks:
            x = block(x)  # (B, 1+N, D)
        y = self.ln_post(x)  # (B, 1+N, D); the reference applies it to the class token only, same values
        return {"cls": x[:, 0], "patch": y[:, 1:], "embedding": y[:, 0] @ self.proj.to(y.dtype)}


CLIP_PRESETS = {  # name -> (CLIPConfig kwargs, weight file)
    "ViT-B/16": (dict(input_resolution=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512),
                 "ViT-B-16.pt"),
    "ViT-L/14": (dict(input_resolution=224, patch_size=14, width=1024, layers=24, heads=16, output_dim=768),
                 "ViT-L-14.pt"),
    "tiny": (dict(input_resolution=32, patch_size=8, width=64, layers=2, heads=4, output_dim=32), None),
}


def clip_vit(name="ViT-B/16", path=None, download=False):
    """Frozen CLIP image encoder 'ViT-B/16' | 'ViT-L/14' from the OpenAI file, or 'tiny' (random unless path)."""
    kwargs, fname = CLIP_PRESETS[name]
    if fname is None and path is None:
        return frozen(CLIPVision(CLIPConfig(**kwargs)))  # random weights
    path = weight_path(fname or os.path.basename(path), path, download)  # fail before building a large model
    model = CLIPVision(CLIPConfig(**kwargs))
    sd = {k: v for k, v in read_state_dict(path).items() if k.startswith("visual.")}  # text tower ignored
    return frozen(load_state_dict_strict(model, sd, prefix="visual.", source=str(path)))


# ---- DINOv2

class LayerScale(nn.Module):
    """Per-channel residual branch scale (key 'gamma')."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DinoAttention(nn.Module):
    """DINOv2 self-attention: qkv rows [q; k; v], head h owns a contiguous slice of each."""

    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class DinoBlock(nn.Module):
    """x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x))); LayerNorm eps 1e-6, exact erf GELU."""

    def __init__(self, dim, n_head, mlp_ratio):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), DinoAttention(dim, n_head), LayerScale(dim)
        self.norm2, self.ls2 = nn.LayerNorm(dim, eps=1e-6), LayerScale(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x):  # (B, T, D)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """DINOv2 ViT with the facebookresearch key names (block_chunks=0); forward returns teacher features."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, M, R = cfg.embed_dim, cfg.img_size // cfg.patch_size, cfg.num_register_tokens
        self.cls_token = nn.Parameter(1e-6 * torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + M * M, D))  # (1, 1+M*M, D)
        self.register_tokens = nn.Parameter(1e-6 * torch.randn(1, R, D)) if R else None  # (1, R, D)
        self.mask_token = nn.Parameter(torch.zeros(1, D))  # only used in masked pretraining; kept for strict loading
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size)})
        self.blocks = nn.ModuleList([DinoBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def interpolate_pos_encoding(self, H, W):
        """Position table (1, 1+gh*gw, D) for an H x W image: bicubic resize of the M x M grid, as the reference."""
        p, n = self.cfg.patch_size, self.pos_embed.shape[1] - 1
        gh, gw, M = H // p, W // p, int(math.sqrt(n))
        if gh * gw == n and H == W:
            return self.pos_embed
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        off = self.cfg.interpolate_offset  # 0.1 keeps the reference's float scale factor (not a size): 16.1/37 at 224
        size = dict(scale_factor=((gh + off) / M, (gw + off) / M)) if off else dict(size=(gh, gw))
        grid = F.interpolate(grid, mode="bicubic", antialias=self.cfg.interpolate_antialias, **size)  # (1, D, gh, gw)
        assert grid.shape[-2:] == (gh, gw), f"position grid {tuple(grid.shape[-2:])} != patch grid {(gh, gw)}"
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)  # (1, N, D), row-major
        return torch.cat([pos[:, :1], grid], dim=1).to(self.pos_embed.dtype)  # (1, 1+N, D)

    def forward(self, x):
        """x (B, 3, H, W) ImageNet-normalised -> dict cls (B, D) and patch (B, N, D) after norm, reg, prenorm."""
        B, _, H, W = x.shape
        R = self.cfg.num_register_tokens
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1+N, D)
        x = x + self.interpolate_pos_encoding(H, W).to(x.dtype)
        if R:  # registers go between cls and patches, after the position embedding (they get none)
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)  # (B, 1+R+N, D)
        y = self.norm(x)
        return {"cls": y[:, 0], "patch": y[:, 1 + R:], "reg": y[:, 1:1 + R], "prenorm": x}


_REG = dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
DINOV2_PRESETS = {  # name -> DINOv2Config kwargs (hub construction: img_size 518, patch 14, mlp 4x)
    "vits14": dict(embed_dim=384, depth=12, num_heads=6),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "vits14_reg": dict(embed_dim=384, depth=12, num_heads=6, **_REG),
    "vitb14_reg": dict(embed_dim=768, depth=12, num_heads=12, **_REG),
    "tiny": dict(img_size=28, embed_dim=64, depth=2, num_heads=4),
}


def dinov2(name="vits14", path=None, download=False):
    """Frozen DINOv2 'vits14' | 'vitb14' | 'vits14_reg' | 'vitb14_reg' from the facebookresearch file, or 'tiny'."""
    cfg = DINOv2Config(**DINOV2_PRESETS[name])
    if name == "tiny" and path is None:
        return frozen(DINOv2(cfg))  # random weights
    fname = f"dinov2_{name.removesuffix('_reg')}{'_reg4' if name.endswith('_reg') else ''}_pretrain.pth"
    path = weight_path(fname, path, download)
    return frozen(load_state_dict_strict(DINOv2(cfg), read_state_dict(path), source=str(path)))


# ---- teacher interface

class Teacher(nn.Module):
    """Frozen CLIP / DINOv2 with FQGAN's preprocessing: images in [-1, 1] -> (cls (B, D), patch (B, N, D))."""

    def __init__(self, net, size=None, mode="nearest"):
        super().__init__()
        is_clip = isinstance(net, CLIPVision)
        self.net = frozen(net)
        self.width = net.cfg.width if is_clip else net.cfg.embed_dim  # D, feature width of the teacher
        # FQGAN feeds 224 px to every teacher; small test models get their native size
        self.size = size or (net.cfg.input_resolution if is_clip else min(224, net.cfg.img_size))
        self.mode = mode  # F.interpolate mode: 'nearest' is the official default; 'bilinear' avoids aliasing
        mean, std = (CLIP_MEAN, CLIP_STD) if is_clip else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        """Always eval: the teacher is frozen whatever the training loop asks."""
        return super().train(False)

    @torch.no_grad()  # the features are targets: no graph is kept
    def forward(self, x):
        """x (B, 3, H, W) in [-1, 1] -> teacher features cls (B, D), patch (B, N, D)."""
        x = x * 0.5 + 0.5  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.size, self.size):
            align = False if self.mode in ("bilinear", "bicubic") else None
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=align)
        out = self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        return out["cls"], out["patch"]  # (B, D), (B, N, D)


def teacher(spec, path=None, mode="nearest", download=False):
    """Teacher from 'clip:ViT-L/14' | 'clip:ViT-B/16' | 'clip:tiny' | 'dinov2:vits14' | ... | 'dinov2:tiny'."""
    kind, name = spec.split(":", 1)
    build = {"clip": clip_vit, "dinov2": dinov2}[kind]
    return Teacher(build(name, path=path, download=download), mode=mode)


# ---- LPIPS

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # conv widths, pools
LPIPS_TAPS = (3, 8, 15, 22, 29)  # vgg16().features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class LinLayer(nn.Module):
    """LPIPS 1x1 'lin' conv C -> 1, no bias; nested as the file keys lin{k}.model.1.weight (index 0 was Dropout)."""

    def __init__(self, c):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))  # no dropout: deterministic
        nn.init.constant_(self.model[1].weight, 1.0 / c)  # random-trunk default: plain channel mean

    def forward(self, x):  # (B, C, h, w) -> (B, 1, h, w)
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 VGG distance between images in [-1, 1]; frozen, deterministic. ch_div shrinks widths (tests)."""

    def __init__(self, ch_div=1):
        super().__init__()
        # (x - shift) / scale = ImageNet normalisation of (x+1)/2; constants from the LPIPS code, in no weight file
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        layers, c_in = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v // ch_div, 3, padding=1), nn.ReLU()]
                c_in = v // ch_div
        self.features = nn.Sequential(*layers)  # = torchvision vgg16().features[:30], same indices and keys
        chans = [self.features[i - 1].out_channels for i in LPIPS_TAPS]  # 64, 128, 256, 512, 512
        self.lins = nn.ModuleDict({f"lin{k}": LinLayer(c) for k, c in enumerate(chans)})

    def train(self, mode=True):
        """Always eval (the official FQGAN loop put LPIPS in train mode, making it stochastic; not kept here)."""
        return super().train(False)

    def taps(self, x):
        """The five VGG feature maps [(B, C_k, H/2^k, W/2^k)] of images x (B, 3, H, W) in [-1, 1]."""
        h, out = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype), []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h)
        return out

    def forward(self, x0, x1, per_layer=False):
        """Distance (B,) between x0 and x1 (B, 3, H, W) in [-1, 1]; per_layer=True also returns the (B, 5) terms."""
        B = x0.shape[0]
        d, terms = 0.0, []
        for k, f in enumerate(self.taps(torch.cat([x0, x1]))):  # f (2B, C, h, w): one trunk pass for both
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit channel vectors, eps outside the sqrt
            term = self.lins[f"lin{k}"]((f[:B] - f[B:]).pow(2)).mean(dim=(1, 2, 3))  # (B,)
            d = d + term
            terms.append(term)
        return (d, torch.stack(terms, dim=1)) if per_layer else d


def lpips_vgg(name="vgg16", vgg_path=None, lin_path=None, download=False):
    """Frozen LPIPS: 'vgg16' = torchvision ImageNet VGG16 trunk + LPIPS v0.1 lin weights; 'tiny' = random, 1/8 width."""
    if name == "tiny":
        return frozen(LPIPS(ch_div=8))
    vgg_path = weight_path("vgg16-397923af.pth", vgg_path, download, arg="vgg_path")
    lin_path = weight_path("vgg.pth", lin_path, download, arg="lin_path")
    model = LPIPS()
    sd = {k: v for k, v in read_state_dict(vgg_path).items() if not k.startswith("classifier.")}  # head unused
    load_state_dict_strict(model.features, sd, prefix="features.", source=str(vgg_path))
    load_state_dict_strict(model.lins, read_state_dict(lin_path), source=str(lin_path))
    return frozen(model)
