"""
Every frozen pretrained network of the project, in our own compact code that loads the original files: OpenAI CLIP
and DINOv2 (FQGAN's teachers: Dual = CLIP ViT-L/14, Triple = DINOv2 ViT-S/14 + CLIP ViT-B/16), the two Fashion-MNIST
networks of train_classifier.py (IU teacher, FID-FMNIST CNN), LPIPS v0.1 'vgg' and pytorch-fid's FID Inception.
A teacher's cls feature: CLIP's is the class token BEFORE ln_post (HF hidden_states[-1][:, 0]), DINOv2's AFTER the final
norm (x_norm_clstoken). 'tiny' = small random CLIP / DINOv2 / LPIPS (tests). Shapes: B batch, H W image size, g grid
side, N = g*g patch tokens, R registers, D token (teacher feature) width, E CLIP embedding width, C channels.
"""
import math
import os
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import load_checkpoint
from fqgan import ResidualAttentionBlock, ViT

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
    "pt_inception-2015-12-05-6726825d.pth":
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
}
TRAINED_HERE = {"teacher": "out/teacher/ckpt.pt", "featnet": "out/featnet/ckpt.pt"}  # train_classifier.py --net=...


# ---- weight files
def weight_file(fname, path, download, flag):
    """`path`, else torch.hub.get_dir()/checkpoints/fname (downloaded if download); absent: a one-line error."""
    url, given = WEIGHT_URLS.get(fname), path is not None
    path = str(path) if given else os.path.join(torch.hub.get_dir(), "checkpoints", fname)
    if not given and download and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path)
        except Exception as e:  # offline, proxy, truncated transfer
            raise SystemExit(f"downloading {fname} from {url} failed ({type(e).__name__}): put the file at {path} "
                             f"or pass {flag}=...") from None
    if not os.path.exists(path):
        fix = f"given as {flag}" if given else f"download {url} to that path (torch.hub.get_dir()/checkpoints), " \
                                               f"pass {flag}=..., or run with --download=true"
        raise SystemExit(f"weight file {fname} not found at {path}: {fix}")
    return path


def read_state_dict(path):
    """Tensors of a weight file: a plain torch state dict, or a TorchScript archive (how OpenAI ships CLIP)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:  # TorchScript archives hold compiled code next to the tensors
            if any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()):
                with warnings.catch_warnings(action="ignore"):  # torch.jit: deprecated, still reads them
                    return dict(torch.jit.load(path, map_location="cpu").state_dict())
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(model, sd, source, prefix=""):
    """model.load_state_dict of sd[prefix + key] cast to fp32, strictly; the error names the file."""
    sd = {k.removeprefix(prefix): v.float() if v.is_floating_point() else v for k, v in sd.items()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise SystemExit(f"{source} (keys under '{prefix}'): {e}") from None
    return model.requires_grad_(False).eval()


# ---- CLIP image encoder
@dataclass
class CLIPConfig:
    input_resolution: int = 224  # image side in pixels; CLIP has no position interpolation, inputs must match
    patch_size: int = 16         # conv1 kernel = stride, in pixels
    width: int = 768             # D, token width
    layers: int = 12             # residual attention blocks
    heads: int = 12              # attention heads (D / 64 in the real models)
    output_dim: int = 512        # E, width of the projected image embedding (proj is (D, E), used as x @ proj)


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
        return CLIPVision(CLIPConfig(**kwargs)).requires_grad_(False).eval()  # random weights
    path = weight_file(fname or os.path.basename(path), path, download, "--teacher_paths")  # before building it
    sd = {k: v for k, v in read_state_dict(path).items() if k.startswith("visual.")}  # text tower ignored
    return load_weights(CLIPVision(CLIPConfig(**kwargs)), sd, path, prefix="visual.")


# ---- DINOv2
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


class DinoBlock(nn.Module):
    """x += ls1.gamma * attn(norm1(x)); x += ls2.gamma * mlp(norm2(x)); LayerNorm eps 1e-6, exact erf GELU."""

    def __init__(self, dim, n_head, mlp_ratio):
        super().__init__()
        self.n_head, hidden = n_head, int(dim * mlp_ratio)
        attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))  # qkv rows [q; k; v]
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim, eps=1e-6), attn, nn.LayerNorm(dim, eps=1e-6)
        self.ls1 = nn.ParameterDict(dict(gamma=nn.Parameter(torch.ones(dim))))  # LayerScale: per-channel residual scale
        self.ls2 = nn.ParameterDict(dict(gamma=nn.Parameter(torch.ones(dim))))
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(B, T, 3, self.n_head, D // self.n_head)  # head h: a contiguous slice
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        x = x + self.ls1.gamma * self.attn.proj(y)
        return x + self.ls2.gamma * self.mlp(self.norm2(x))


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
        (B, _, H, W), R = x.shape, self.cfg.num_register_tokens
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
    "vits14": dict(embed_dim=384, depth=12, num_heads=6), "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "vits14_reg": dict(embed_dim=384, depth=12, num_heads=6, **_REG),
    "vitb14_reg": dict(embed_dim=768, depth=12, num_heads=12, **_REG),
    "tiny": dict(img_size=28, embed_dim=64, depth=2, num_heads=4),
}


def dinov2(name="vits14", path=None, download=False):
    """Frozen DINOv2 'vits14' | 'vitb14' | 'vits14_reg' | 'vitb14_reg' from the facebookresearch file, or 'tiny'."""
    cfg = DINOv2Config(**DINOV2_PRESETS[name])
    if name == "tiny" and path is None:
        return DINOv2(cfg).requires_grad_(False).eval()  # random weights
    fname = f"dinov2_{name.removesuffix('_reg')}{'_reg4' if name.endswith('_reg') else ''}_pretrain.pth"
    path = weight_file(fname, path, download, "--teacher_paths")
    return load_weights(DINOv2(cfg), read_state_dict(path), path)


# ---- the two small networks trained here (train_classifier.py)
@dataclass
class ClassifierConfig:
    net: str = "vit"             # 'vit' (hybrid ViT + linear head: the IU teacher) | 'cnn' (the evaluation network)
    image_size: int = 32         # input side in pixels
    width: int = 32              # D, the feature width: token width (vit) / hidden layer after the convs (cnn)
    patch: int = 8               # vit: downsampling of the conv stem, grid = image_size / patch
    layers: int = 4              # vit: transformer blocks
    heads: int = 4               # vit: attention heads
    num_classes: int = 10        # output classes
    mean: float = 0.2860         # input normalisation of [0, 1] pixels (Fashion-MNIST train statistics)
    std: float = 0.3530


class Classifier(nn.Module):
    """'vit': fqgan.ViT, cls = mean of the tokens. 'cnn': 4 conv-BN-GELU layers (two of stride 2), cls = a GELU hidden
    layer on the flattened map (a spatial MLP beats global pooling by ~4 points here). logits = fc(cls)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.net == "vit":
            self.body = ViT(cfg.width, cfg.image_size, cfg.patch, cfg.layers, cfg.heads)
        else:
            chans, layers = [3, 32, 64, 64, 64], []
            for i, (a, b) in enumerate(zip(chans, chans[1:])):
                layers += [nn.Conv2d(a, b, 3, stride=1 + i % 2, padding=1, bias=False), nn.BatchNorm2d(b), nn.GELU()]
            self.body = nn.Sequential(*layers)
            self.hidden = nn.Sequential(nn.Linear(64 * (cfg.image_size // 4) ** 2, cfg.width), nn.GELU())
        self.fc = nn.Linear(cfg.width, cfg.num_classes)

    def forward(self, x):
        """x (B, 3, S, S) normalised -> dict cls (B, D), patch (B, N, D or 64), logits (B, num_classes)."""
        fmap = self.body(x)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = tokens.mean(1) if self.cfg.net == "vit" else self.hidden(fmap.flatten(1))
        return {"cls": cls, "patch": tokens, "logits": self.fc(cls)}


def checkpoint_dict(model, kind, **extra):  # what train_classifier.py saves; kind 'teacher' | 'featnet'
    return {"kind": kind, "config": asdict(model.cfg), "model": model.state_dict(), **extra}


def trained_here(kind, path=None):
    """The teacher / featnet network written by train_classifier.py, frozen (errors: common.load_checkpoint's)."""
    path = path or TRAINED_HERE[kind]
    ckpt = load_checkpoint(path, kind)
    return load_weights(Classifier(ClassifierConfig(**ckpt["config"])), ckpt["model"], path)


# ---- teacher interface
class Teacher(nn.Module):
    """A frozen image-understanding network with its own preprocessing: images in [-1, 1] -> (cls (B, D), patch)."""

    def __init__(self, net):
        super().__init__()
        c, self.net = net.cfg, net.requires_grad_(False).eval()
        self.width = getattr(c, "width", getattr(c, "embed_dim", 0))  # D, feature width of the teacher
        # input side: CLIP / DINOv2 224 px (FQGAN's choice; small stand-ins their own), our classifier its own size
        self.size = getattr(c, "input_resolution", 0) or getattr(c, "image_size", 0) or min(224, c.img_size)
        mean, std = {CLIPVision: (CLIP_MEAN, CLIP_STD), DINOv2: (IMAGENET_MEAN, IMAGENET_STD)}.get(
            type(net), ((c.mean,) * 3, (c.std,) * 3) if isinstance(net, Classifier) else None)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # always eval: the teacher is frozen whatever the training loop asks
        return super().train(False)

    @torch.no_grad()  # the features are targets: no graph is kept
    def forward(self, x):
        x = x * 0.5 + 0.5  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="nearest")  # official: the default, nearest
        out = self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        return out["cls"], out["patch"]  # (B, D), (B, N, D)


TEACHERS = {  # --teachers name -> builder(path, download)
    "clip_l14": lambda p, dl: clip_vit("ViT-L/14", p, dl), "clip_b16": lambda p, dl: clip_vit("ViT-B/16", p, dl),
    "dinov2_s14": lambda p, dl: dinov2("vits14", p, dl), "dinov2_b14": lambda p, dl: dinov2("vitb14", p, dl),
    "clip_tiny": lambda p, dl: clip_vit("tiny", p), "dinov2_tiny": lambda p, dl: dinov2("tiny", p),
    "fmnist_vit": lambda p, dl: trained_here("teacher", p),  # the IU teacher of the default data
}


def teacher(name, path=None, download=False):
    """A Teacher by --teachers name (TEACHERS); path = its weight file (None: the default place)."""
    if name not in TEACHERS:
        raise SystemExit(f"unknown teacher '{name}': choose none or one of {', '.join(TEACHERS)}")
    return Teacher(TEACHERS[name](path, download))


# ---- LPIPS
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # conv widths, pools
LPIPS_TAPS = (3, 8, 15, 22, 29)  # vgg16().features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class LPIPS(nn.Module):
    """LPIPS v0.1 VGG distance of images in [-1, 1]; frozen, no dropout (the official FQGAN loop left LPIPS in train
    mode: its dropout made the loss stochastic). ch_div shrinks widths (tests)."""

    def __init__(self, ch_div=1):
        super().__init__()
        # (x - shift) / scale = ImageNet normalisation of (x+1)/2; constants from the LPIPS code, in no weight file
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        layers, c_in = [], 3
        for v in VGG16_CFG:
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c_in, v // ch_div, 3, padding=1), nn.ReLU()]
            c_in = c_in if v == "M" else v // ch_div
        self.features = nn.Sequential(*layers)  # = torchvision vgg16().features[:30], same indices and keys
        self.lins = nn.ModuleDict()  # keys lin{k}.model.1.weight: index 0 was the (dropped) Dropout
        for k, i in enumerate(LPIPS_TAPS):
            lin = nn.Conv2d(self.features[i - 1].out_channels, 1, 1, bias=False)
            nn.init.constant_(lin.weight, 1.0 / lin.in_channels)  # random-trunk default: channel mean
            self.lins[f"lin{k}"] = nn.ModuleDict(dict(model=nn.Sequential(nn.Identity(), lin)))

    def train(self, mode=True):
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
        B, terms = x0.shape[0], []
        for k, f in enumerate(self.taps(torch.cat([x0, x1]))):  # f (2B, C, h, w): one trunk pass for both
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit channel vectors, eps outside the sqrt
            terms.append(self.lins[f"lin{k}"].model((f[:B] - f[B:]).pow(2)).mean(dim=(1, 2, 3)))  # (B,)
        d = sum(terms)
        return (d, torch.stack(terms, dim=1)) if per_layer else d


def lpips_vgg(name="vgg16", vgg_path=None, lin_path=None, download=False):
    """Frozen LPIPS: 'vgg16' = torchvision ImageNet VGG16 trunk + LPIPS v0.1 lin weights; 'tiny' = random, 1/8 width."""
    if name == "tiny":
        return LPIPS(ch_div=8).requires_grad_(False).eval()
    vgg_path = weight_file("vgg16-397923af.pth", vgg_path, download, "--lpips_vgg_path")
    lin_path = weight_file("vgg.pth", lin_path, download, "--lpips_lin_path")
    model = LPIPS()
    sd = {k: v for k, v in read_state_dict(vgg_path).items() if not k.startswith("classifier.")}  # head unused
    load_weights(model.features, sd, vgg_path, prefix="features.")
    load_weights(model.lins, read_state_dict(lin_path), lin_path)
    return model.requires_grad_(False).eval()


# ---- FID Inception (pytorch-fid's FIDInceptionA/C/E_1/E_2 patches of torchvision's InceptionV3)
class BasicConv2d(nn.Sequential):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF default) -> ReLU."""

    def __init__(self, cin, cout, k, s=1, p=0):
        conv, bn = nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout, eps=1e-3)
        super().__init__(OrderedDict(conv=conv, bn=bn, relu=nn.ReLU()))
        self.cout = cout


POOLS = {"avg": nn.AvgPool2d(3, 1, 1, count_include_pad=False),  # TF's average pool ignores the padded zeros
         "max": nn.MaxPool2d(3, 1, 1), "max2": nn.MaxPool2d(3, 2)}  # 'max': Mixed_7c's TF-graph quirk; 'max2': stride 2


class Mixed(nn.Module):
    """Inception layers from a table: branches of steps, concatenated on channels. A step is a pool name ('avg', 'max',
    'max2'), a conv (name, cout, kernel, stride=1, pad=0), a block (name, branches) or a list of parallel convs."""

    def __init__(self, cin, branches):
        super().__init__()
        self.branches, self.cout = [], 0
        for branch in branches:
            c, steps = cin, []
            for step in branch:
                convs = step if isinstance(step, list) else [] if isinstance(step, str) else [step]
                for name, spec, *ksp in convs:  # spec: a conv's cout, or the branches of a nested block
                    self.add_module(name, Mixed(c, spec) if isinstance(spec, list) else BasicConv2d(c, spec, *ksp))
                steps.append(step if isinstance(step, str) else [name for name, *_ in convs])
                c = c if isinstance(step, str) else sum(self.get_submodule(name).cout for name in steps[-1])
            self.branches.append(steps)
            self.cout += c

    def forward(self, x):
        outs = []
        for steps in self.branches:
            h = x
            for step in steps:
                h = POOLS[step](h) if isinstance(step, str) else torch.cat([self.get_submodule(n)(h) for n in step], 1)
            outs.append(h)
        return torch.cat(outs, 1)  # (N, sum of branch channels, H', W')


def block_a(pool_ch):  # FID-A: Mixed_5b/5c/5d
    return [[("branch1x1", 64, 1)], [("branch5x5_1", 48, 1), ("branch5x5_2", 64, 5, 1, 2)],
            [("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, 3, 1, 1), ("branch3x3dbl_3", 96, 3, 1, 1)],
            ["avg", ("branch_pool", pool_ch, 1)]]


def block_c(c7):  # FID-C: Mixed_6b..6e, factorized 7x7 convs; (kernel, stride, pad) of a 1x7 row / 7x1 column conv
    r, c = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return [[("branch1x1", 192, 1)], [("branch7x7_1", c7, 1), ("branch7x7_2", c7, *r), ("branch7x7_3", 192, *c)],
            [("branch7x7dbl_1", c7, 1), ("branch7x7dbl_2", c7, *c), ("branch7x7dbl_3", c7, *r),
             ("branch7x7dbl_4", c7, *c), ("branch7x7dbl_5", 192, *r)], ["avg", ("branch_pool", 192, 1)]]


def block_e(kind):  # FID-E_1 (Mixed_7b, 'avg') and FID-E_2 (Mixed_7c, 'max')
    r, c = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
    return [[("branch1x1", 320, 1)],
            [("branch3x3_1", 384, 1), [("branch3x3_2a", 384, *r), ("branch3x3_2b", 384, *c)]],
            [("branch3x3dbl_1", 448, 1), ("branch3x3dbl_2", 384, 3, 1, 1),
             [("branch3x3dbl_3a", 384, *r), ("branch3x3dbl_3b", 384, *c)]], [kind, ("branch_pool", 192, 1)]]


INCEPTION = [("Conv2d_1a_3x3", 32, 3, 2), ("Conv2d_2a_3x3", 32, 3), ("Conv2d_2b_3x3", 64, 3, 1, 1), "max2",
             ("Conv2d_3b_1x1", 80, 1), ("Conv2d_4a_3x3", 192, 3), "max2",
             ("Mixed_5b", block_a(32)), ("Mixed_5c", block_a(64)), ("Mixed_5d", block_a(64)),
             ("Mixed_6a", [[("branch3x3", 384, 3, 2)],
                           [("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, 3, 1, 1), ("branch3x3dbl_3", 96, 3, 2)],
                           ["max2"]]),
             ("Mixed_6b", block_c(128)), ("Mixed_6c", block_c(160)), ("Mixed_6d", block_c(160)),
             ("Mixed_6e", block_c(192)),
             ("Mixed_7a", [[("branch3x3_1", 192, 1), ("branch3x3_2", 320, 3, 2)],
                           [("branch7x7x3_1", 192, 1), ("branch7x7x3_2", 192, (1, 7), 1, (0, 3)),
                            ("branch7x7x3_3", 192, (7, 1), 1, (3, 0)), ("branch7x7x3_4", 192, 3, 2)], ["max2"]]),
             ("Mixed_7b", block_e("avg")), ("Mixed_7c", block_e("max"))]


class FIDInceptionV3(Mixed):
    """InceptionV3 as in the TF FID graph: [0,1] images (N, 3, H, W) -> (pool (N, 2048), logits_unbiased (N, 1008))."""

    def __init__(self):
        super().__init__(3, [INCEPTION])  # one branch: the stem convs and pools, then the Mixed blocks
        self.fc = nn.Linear(2048, 1008)  # the TF classifier (1001 classes + padding); used only for IS

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # pytorch-fid's resize
        x = super().forward(2 * x - 1)  # (N, 2048, 8, 8) from (N, 3, 299, 299) in [-1, 1]
        feats = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048) "pool3", the FID feature
        return feats, feats @ self.fc.weight.T  # logits without the bias, as TF's softmax/logits/MatMul


class FeatureNet(nn.Module):
    """Our evaluation CNN behind the Inception's interface: [0, 1] images -> (penultimate features, logits)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.size = net, net.cfg.image_size

    def forward(self, x):
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        out = self.net((x - self.net.cfg.mean) / self.net.cfg.std)
        return out["cls"], out["logits"]


def feature_net(name="inception", path=None, download=False):
    """FID's feature network: 'inception' (FID weights), 'fmnist' (our CNN: FID-FMNIST), 'random' (smoke tests only)."""
    if name == "fmnist":
        return FeatureNet(trained_here("featnet", path)).eval()
    with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's RNG
        torch.manual_seed(0)
        model = FIDInceptionV3().eval().requires_grad_(False)
        if name == "random":  # fixed He-init weights: PyTorch's default shrinks activations ~1e-8 after 90 layers
            torch.manual_seed(0)
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.normal_(model.fc.weight, std=2048 ** -0.5)
            return model
    path = weight_file("pt_inception-2015-12-05-6726825d.pth", path, download, "--net_path")
    sd = torch.load(path, map_location="cpu", weights_only=True)  # num_batches_tracked: accepted with or without it
    return load_weights(model, {**{k: v for k, v in model.state_dict().items() if "num_batches" in k}, **sd}, path)
