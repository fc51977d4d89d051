"""
Train the FQGAN tokenizer (Bai et al., "Factorized Visual Tokenization and Generation", arXiv 2411.16681) with its
full objective (official recipe: train_fqgan_{dual,triple}.sh of showlab/FQGAN, built on LlamaGen's VQGAN trainer):

    L_G = mse_weight * MSE(x, x_rec) + lpips_weight * LPIPS(x, x_rec) + w_adv * -mean D(x_rec)      (taming / LlamaGen)
          + sum_k (vq_k + commit_k + entropy_k) + disentanglement                (fqgan.FQGAN: aux['vq_total'])
          + rep_weight * sum over supervised branches k of InfoNCE(head_k(q_k)[cls], teacher_k(x)[cls])
    L_D = w_adv * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(sg(x_rec))))                        (hinge PatchGAN)

w_adv = disc_weight from step disc_start on (the discriminator is not run at all before); disc_adaptive=true scales
the generator term by taming's gradient-norm ratio at the last decoder layer. rep_loss=cosine swaps the InfoNCE for
VQ-KD's per-token feature reconstruction (Wang et al., arXiv 2411.04406): 1 - cos(head patch tokens, teacher patches).
Branch 0 ("vis") never has a teacher; Dual: CLIP ViT-L/14 on branch 1; Triple: DINOv2 ViT-S/14 on 1, CLIP ViT-B/16 on 2.

    python train_tokenizer.py                          # tiny preset, Fashion-MNIST 32 px, CPU: < 10 min, ~22.5 dB
    python train_tokenizer.py --teachers=none,clip_tiny --lpips=tiny --disc_start=0   # every term, tiny stand-ins
    python train_tokenizer.py --preset=dual16 --data=/data/imagenet/train --batch_size=32 --max_steps=200000 \\
        --disc_start=20000 --num_workers=8 --log_interval=100 --eval_interval=5000 --ckpt_interval=5000
    torchrun --standalone --nproc_per_node=8 train_tokenizer.py --preset=dual16 --data=/data/imagenet/train ...
    python train_tokenizer.py --resume=true ...         # continue out_dir/ckpt.pt exactly (pass the same flags)
Pretrained teachers and LPIPS-VGG are read from torch.hub.get_dir()/checkpoints or the given paths (pretrained.py).
The tiny preset (the CPU default) uses neither by default (a random tiny teacher teaches nothing); its 1200 steps also
end before disc_start, so the default run is MSE + VQ terms + disentanglement. On a CPU shared with other jobs,
OMP_NUM_THREADS=1 avoids oversubscribed threads (it can be several times faster there).

Shape legend: B batch, H W image size, h w latent grid, T = h*w tokens, K sub-codebooks, D code dim, W teacher width.
"""
import ast
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (Logger, autocast, batches, cleanup_distributed, get_lr, init_distributed, load_checkpoint,
                    make_dataset, parse_config, restore_rng, rng_states, save_checkpoint)
from fqgan import FQGAN, FQGANConfig, ResidualAttentionBlock, checkpoint_dict, config_from_preset, load_strict
from pretrained import lpips_vgg, teacher


@dataclass
class TrainConfig:
    # data and output
    data: str = "fashion-mnist"     # 'fashion-mnist' | 'synthetic' | PATH of an ImageFolder tree root/<class>/<image>
    val_data: str = ""              # held-out set for PSNR and the grid; '' = fashion-mnist's test split / --data
    out_dir: str = "out/tokenizer"  # log.txt, ckpt.pt and recon_<step>.png are written here
    resume: bool = False            # continue out_dir/ckpt.pt: weights, optimizers, EMA, step, data order, RNG
    # model
    preset: str = "tiny"            # fqgan.PRESETS: tiny | vq16 | vq8 | dual16 | triple16 | dual8 | triple8
    model_overrides: str = ""       # FQGANConfig fields 'name=value;...', e.g. 'image_size=128;codebook_size=4096'
    # optimisation (official: Adam betas (0.9, 0.95), lr 2e-4 constant, clip 1.0, global batch 256, ~200k steps)
    batch_size: int = 16            # images per micro-step per process (official: 32 per GPU)
    grad_accum: int = 1             # micro-steps per optimizer step; global batch = batch_size * grad_accum * world
    max_steps: int = 1200           # optimizer steps of the run (official: ~200k)
    lr: float = 2e-4                # learning rate of both the tokenizer (with its heads) and the discriminator
    warmup_steps: int = 0           # linear warm-up steps (official: none)
    lr_decay: str = "constant"      # 'constant' (official) | 'cosine' (to 0.1 * lr at max_steps)
    beta1: float = 0.9              # Adam beta1
    beta2: float = 0.95             # Adam beta2
    weight_decay: float = 0.0       # AdamW decay of >= 2-D weights (official: plain Adam, no decay)
    grad_clip: float = 1.0          # max global gradient norm, each optimizer (0 = no clipping)
    ema: bool = False               # keep an EMA of the tokenizer (saved as 'ema'; from_checkpoint prefers it)
    ema_decay: float = 0.999        # EMA decay per optimizer step
    # loss terms
    mse_weight: float = 1.0         # pixel MSE in [-1, 1]
    lpips: str = "auto"             # 'vgg16' (pretrained files) | 'tiny' (random, tests) | 'none'; auto: none if tiny
    lpips_weight: float = 1.0       # LPIPS weight (official 1.0)
    lpips_vgg_path: str = ""        # vgg16-397923af.pth; '' = torch hub cache
    lpips_lin_path: str = ""        # LPIPS v0.1 vgg.pth lin weights; '' = torch hub cache
    disc_start: int = 20000         # first step with the GAN terms; the discriminator is not run before it
    disc_weight: float = 0.5        # w_adv of the generator hinge term and of the discriminator loss
    disc_adaptive: bool = False     # multiply the generator GAN term by taming's adaptive weight (official: off)
    disc_ndf: int = 64              # PatchGAN base width
    disc_layers: int = 3            # PatchGAN n_layers (3: 256 px -> 30x30 logits; use 2 for 16 px images)
    teachers: tuple = ("auto",)     # per branch: none|clip_l14|clip_b16|dinov2_s14|dinov2_b14|clip_tiny|dinov2_tiny
    #                                 or a pretrained.teacher spec; auto = the paper's map (Dual/Triple), none for tiny
    teacher_paths: tuple = ("auto",)  # weight file per branch (same order); auto = torch hub cache
    teacher_resize: str = "nearest"  # interpolation of the image to the teacher's input size (official: nearest)
    rep_loss: str = "infonce"       # 'infonce' on the CLS token (official) | 'cosine' per token (VQ-KD)
    rep_weight: float = 0.5         # weight per supervised branch (official 0.5)
    rep_temperature: float = 1.0    # InfoNCE temperature (official 1; negatives = the per-process batch)
    rep_layers: int = 3             # transformer blocks in each feature-prediction head (official 3)
    download: bool = False          # download missing pretrained files from their release URLs
    # system
    device: str = "auto"            # 'auto' (cuda if available) | 'cpu' | 'cuda'
    compile: bool = True            # torch.compile the networks (CUDA only; eager fp32 on CPU)
    seed: int = 0                   # model init uses seed; training randomness seed + rank; data order seed
    num_workers: int = 0            # DataLoader workers per process (8+ for ImageFolder data on GPU)
    log_interval: int = 50          # optimizer steps between log lines
    eval_interval: int = 300        # steps between held-out PSNR + recon grid (and at the last step)
    eval_images: int = 256          # held-out images for PSNR; the grid shows the first 8
    ckpt_interval: int = 300        # steps between checkpoints (and at the last step)

    def __post_init__(self):  # a bad value stops with a one-line message
        for name, allowed in (("rep_loss", ("infonce", "cosine")), ("lr_decay", ("constant", "cosine")),
                              ("lpips", ("auto", "vgg16", "tiny", "none"))):
            if getattr(self, name) not in allowed:
                raise SystemExit(f"--{name}={getattr(self, name)}: choose one of {', '.join(allowed)}")
        if min(self.batch_size, self.grad_accum, self.log_interval, self.eval_interval, self.ckpt_interval) < 1:
            raise SystemExit("batch_size, grad_accum and the *_interval flags must be >= 1")


TEACHERS = {"clip_l14": "clip:ViT-L/14", "clip_b16": "clip:ViT-B/16", "dinov2_s14": "dinov2:vits14",
            "dinov2_b14": "dinov2:vitb14", "clip_tiny": "clip:tiny", "dinov2_tiny": "dinov2:tiny"}
OFFICIAL_TEACHERS = {2: ("none", "clip_l14"), 3: ("none", "dinov2_s14", "clip_b16")}  # Dual, Triple


# ---- training-only networks and losses

class FeatPredHead(nn.Module):
    """Official "FeatPredHead": one branch's codes -> MLP to the teacher width -> [cls; tokens] + positions -> LN ->
    CLIP blocks -> LN. Token 0 predicts the teacher's CLS feature, tokens 1.. its patch features."""

    def __init__(self, code_dim, width, n_tokens, n_layer=3, n_head=8):
        super().__init__()
        self.upscale = nn.Sequential(nn.Linear(code_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.class_embedding = nn.Parameter(width ** -0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(n_tokens + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, n_head) for _ in range(n_layer)])  # exact GELU

    def forward(self, q):  # (B, D, h, w) straight-through codes of one branch
        x = self.upscale(q.flatten(2).transpose(1, 2))  # (B, T, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))  # (B, 1+T, W)
        for block in self.transformer:
            x = block(x)
        return self.ln_post(x)  # (B, 1+T, W)


class Generator(nn.Module):
    """The tokenizer plus its feature-prediction heads: everything the generator optimizer trains, one DDP module."""

    def __init__(self, tokenizer, heads):
        super().__init__()
        self.tokenizer, self.heads = tokenizer, heads  # heads: ModuleDict {str(branch): FeatPredHead}

    def forward(self, x):  # (B, 3, H, W) in [-1, 1]
        recon, aux = self.tokenizer(x)
        D = self.tokenizer.cfg.codebook_dim
        preds = {k: head(aux["quant"][:, int(k) * D:(int(k) + 1) * D]) for k, head in self.heads.items()}
        return recon, aux, preds  # preds[k] (B, 1+T, W)


class PatchGAN(nn.Module):
    """pix2pix NLayerDiscriminator: 4x4 convs (stride 2, last two stride 1), BatchNorm, LeakyReLU 0.2 -> logit map."""

    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
        for n in range(1, n_layers + 1):
            c_out = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if n < n_layers else 1, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2, True)]
            c = c_out
        self.main = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        for m in self.modules():  # pix2pix init: conv weights N(0, 0.02), BatchNorm gamma N(1, 0.02), beta 0
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, 3, H, W) -> (B, 1, h', w') logits
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def rep_loss(kind, pred, cls_t, patch_t, temperature):
    """InfoNCE of the head's CLS against the teacher CLS (negatives: the other images of this process's batch), or
    1 - cos per token against the teacher's patch features resized to the latent grid."""
    if kind == "infonce":
        p, t = F.normalize(pred[:, 0].float(), dim=-1), F.normalize(cls_t.float(), dim=-1)  # (B, W)
        logits = p @ t.t() / temperature  # (B, B): row b scores image b's prediction against every teacher CLS
        return F.cross_entropy(logits, torch.arange(len(p), device=p.device))
    tokens = pred[:, 1:].float()  # (B, T, W)
    B, T, W = tokens.shape
    h, g = math.isqrt(T), math.isqrt(patch_t.shape[1])
    t = patch_t.float().transpose(1, 2).reshape(B, W, g, g)  # (B, W, g, g)
    t = F.interpolate(t, size=(h, h), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)  # (B, T, W)
    return (1 - F.cosine_similarity(tokens, t, dim=-1)).mean()


def adaptive_weight(rec_loss, gan_loss, last_layer):
    """taming: ||grad rec|| / ||grad gan|| at the last decoder weight, clamped to [0, 1e4], no gradient."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# ---- set-up helpers

def parse_overrides(text):
    """'name=value;name=value' -> dict, values as Python literals (tuples may be written 1,2,2)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, _, value = item.partition("=")
        if key not in FQGANConfig.__dataclass_fields__ or not value:
            raise SystemExit(f"--model_overrides: bad item '{item}' (expected name=value with a FQGANConfig field)")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--model_overrides: cannot read the value of '{item}'") from None
    return out


def teacher_specs(cfg, K):
    """One entry per branch: None or a pretrained.teacher spec such as 'clip:ViT-L/14'."""
    names = cfg.teachers
    if names == ("auto",):
        names = ("none",) * K if cfg.preset == "tiny" else OFFICIAL_TEACHERS.get(K, ("none",) * K)
    if len(names) != K:
        raise SystemExit(f"--teachers has {len(names)} entries for {K} sub-codebooks: give one per branch")
    return [None if n == "none" else TEACHERS.get(n, n) for n in names]


def make_optimizer(module, cfg, device_type):
    """AdamW (= Adam at weight_decay 0, the official setting); decay only on >= 2-D weights."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device_type == "cuda")


class LabelsFlagBad(torch.utils.data.Dataset):
    """Wraps a dataset so the label of an unreadable image (replaced by the next good one) becomes -1 - index: the
    main process can then count skipped files even when DataLoader workers do the loading (labels are unused)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def set_epoch(self, epoch):
        self.ds.set_epoch(epoch)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x, (-1 - i) if i in getattr(self.ds, "bad", ()) else y


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def evaluate(tok, images, d, batch_size, grid_path=None):
    """Held-out PSNR (data range [0, 1], mean over images, summed over ranks) and, on rank 0, a PNG grid whose rows
    are original | reconstruction | decoded from each sub-codebook alone."""
    was_training = tok.training
    tok.eval()
    total, rows, K = torch.zeros(2, device=d.device), [], tok.cfg.n_codebooks
    for i, x in enumerate(images.split(batch_size)):
        x = x.to(d.device)
        with autocast(d.device_type):
            idx = tok.encode(x)  # (B, K, h, w)
            rec = tok.decode_indices(idx).float().clamp(-1, 1)
            if i == 0 and grid_path:
                alone = [tok.decode_indices(idx[:8], keep=[k]).float().clamp(-1, 1) for k in range(K)]
                rows = torch.stack([x[:8], rec[:8], *alone], dim=1).flatten(0, 1)  # (8 * (2+K), 3, H, W)
        mse = ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3))  # (B,) in [0, 1] units
        total += torch.stack([(10 * torch.log10(1.0 / mse.clamp_min(1e-10))).sum(), mse.new_tensor(len(x))])
    if d.world_size > 1:
        dist.all_reduce(total)
    if grid_path and len(rows):
        torchvision.utils.save_image(rows.cpu() * 0.5 + 0.5, grid_path, nrow=2 + K)
    tok.train(was_training)
    return (total[0] / total[1]).item()


# ---- training

def main(cfg):
    """Train; returns {'step', 'psnr', 'history' (one dict per log line), 'bad_files', and the raw modules}."""
    d = init_distributed(cfg.device)
    try:
        return train(cfg, d)
    finally:
        cleanup_distributed()


def train(cfg, d):
    log = Logger(cfg.out_dir, d.master)
    use_compile = cfg.compile and d.device_type == "cuda"
    path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path, "fqgan") if cfg.resume else None
    # on resume the model comes from the checkpoint, every other setting from this command's flags
    model_cfg = FQGANConfig(**ckpt["config"]) if ckpt else \
        config_from_preset(cfg.preset, **parse_overrides(cfg.model_overrides))
    K, grid = model_cfg.n_codebooks, model_cfg.image_size // 2 ** (len(model_cfg.ch_mult) - 1)
    specs = teacher_specs(cfg, K)
    if specs[0] is not None:
        log(f"note: branch 0 (vis) gets teacher {specs[0]}; the paper never supervises it")
    paths = cfg.teacher_paths * K if len(cfg.teacher_paths) == 1 else cfg.teacher_paths
    if len(paths) != K:
        raise SystemExit(f"--teacher_paths needs one entry per branch ({K}) or a single 'auto'")
    log(f"device {d.device} | world size {d.world_size} | torch {torch.__version__} | compile {use_compile}")
    log(f"train config: {asdict(cfg)}")
    log(f"model config: {asdict(model_cfg)}")
    if ckpt:
        diff = {k: (v, getattr(cfg, k)) for k, v in ckpt.get("train_config", {}).items()
                if k not in ("resume", "max_steps", "out_dir") and getattr(cfg, k, v) != v}
        if diff:
            log(f"note: flags differ from the checkpoint's run (then, now): {diff}")

    # data (first, so a bad --data fails fast); the held-out images are fixed, each rank takes a share
    train_ds = make_dataset(cfg.data, model_cfg.image_size, train=True)
    val_ds = make_dataset(cfg.val_data or cfg.data, model_cfg.image_size, train=False)
    pick = torch.linspace(0, len(val_ds) - 1, min(cfg.eval_images, len(val_ds))).long()[d.rank::d.world_size]
    held_out = torch.stack([val_ds[int(i)][0] for i in pick])  # (n, 3, H, W)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world_size
    log(f"data {cfg.data}: {len(train_ds)} train images, {len(val_ds)} held-out ({len(pick)} per rank used) | "
        f"global batch {global_batch} = {cfg.batch_size} x {cfg.grad_accum} accum x {d.world_size} ranks")

    # networks: same init on every rank (seed), then the frozen pretrained ones
    torch.manual_seed(cfg.seed)
    tokenizer = FQGAN(model_cfg)
    teachers = {}
    for k, spec in enumerate(specs):
        if spec is not None:
            try:
                teachers[str(k)] = teacher(spec, path=None if paths[k] == "auto" else paths[k],
                                           mode=cfg.teacher_resize, download=cfg.download)
            except (KeyError, ValueError) as e:
                raise SystemExit(f"--teachers: unknown teacher '{spec}' ({e}); use none, {', '.join(TEACHERS)}, "
                                 "or a pretrained.teacher spec such as clip:ViT-B/16") from None
            except FileNotFoundError as e:  # offline without the weight file: pretrained.py's one-line message
                raise SystemExit(f"teacher of branch {k}: {e} (flag: --teacher_paths)") from None
    heads = nn.ModuleDict({k: FeatPredHead(model_cfg.codebook_dim, t.width, grid * grid, cfg.rep_layers)
                           for k, t in teachers.items()})
    gen = Generator(tokenizer, heads).to(d.device)
    disc = PatchGAN(cfg.disc_ndf, cfg.disc_layers).to(d.device)
    lpips_name = cfg.lpips if cfg.lpips != "auto" else ("none" if cfg.preset == "tiny" else "vgg16")
    # LPIPS stays in eval mode (pretrained.LPIPS ignores .train()): deterministic. The official loop put it in train
    # mode, so its dropout was active and the loss stochastic.
    try:
        lpips = None if lpips_name == "none" else lpips_vgg(lpips_name, cfg.lpips_vgg_path or None,
                                                            cfg.lpips_lin_path or None, cfg.download).to(d.device)
    except FileNotFoundError as e:
        raise SystemExit(f"lpips: {e} (flags: --lpips_vgg_path, --lpips_lin_path, or --lpips=none)") from None
    teachers = {k: t.to(d.device) for k, t in teachers.items()}
    ema = copy.deepcopy(tokenizer).requires_grad_(False).eval() if cfg.ema else None
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    log(f"parameters (M): tokenizer {count(tokenizer):.3f} | heads {count(heads):.3f} | discriminator "
        f"{count(disc):.3f} | frozen: teachers {sum(count(t) for t in teachers.values()):.3f}, "
        f"lpips {count(lpips) if lpips else 0:.3f} | teachers per branch {specs} | lpips {lpips_name}")
    opt, opt_d = make_optimizer(gen, cfg, d.device_type), make_optimizer(disc, cfg, d.device_type)

    step = 0
    if ckpt:
        for module, what in ((tokenizer, "model"), (heads, "heads"), (disc, "disc")):
            load_strict(module, ckpt[what], f"cannot resume from {path}: its '{what}'")
        if ema is not None:
            load_strict(ema, ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"], f"{path}: its 'ema'")
        opt.load_state_dict(ckpt["opt"])
        opt_d.load_state_dict(ckpt["opt_disc"])
        step = ckpt["step"]
        restore_rng(ckpt, d, cfg.seed, log)
        log(f"resumed from {path} at step {step}")
        if step > cfg.max_steps:
            raise SystemExit(f"checkpoint is at step {step}, beyond --max_steps={cfg.max_steps}: raise max_steps")
        del ckpt
    else:
        torch.manual_seed(cfg.seed + d.rank)

    # compile after the optimizers, before DDP; raw modules stay in hand for saving, EMA and evaluation
    gen_c, disc_c = (torch.compile(gen), torch.compile(disc)) if use_compile else (gen, disc)
    lpips_c = torch.compile(lpips) if use_compile and lpips is not None else lpips
    teachers = {k: torch.compile(t) for k, t in teachers.items()} if use_compile else teachers
    gen_ddp, disc_ddp = gen_c, disc_c
    if d.world_size > 1:
        ids = [d.local_rank] if d.device_type == "cuda" else None
        gen_ddp = DDP(gen_c, device_ids=ids, broadcast_buffers=False)  # no BatchNorm; usage windows stay per rank
        disc_ddp = DDP(disc_c, device_ids=ids)  # BatchNorm statistics broadcast from rank 0

    data = batches(LabelsFlagBad(train_ds), cfg.batch_size, cfg.seed, d.rank, d.world_size,
                   start_step=step * cfg.grad_accum, num_workers=cfg.num_workers)  # order = f(micro-step)
    first, last_layer = step, tokenizer.decoder.conv_out.weight
    bad_files, history, psnr = set(), [], float("nan")
    sums, n_sum, nonfinite = {}, 0, torch.zeros((), dtype=torch.bool, device=d.device)
    t0 = time.time()

    def check_finite(where):
        flag = nonfinite.int()
        if d.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            log(f"loss became NaN/inf before step {where}: stopping; the last good checkpoint {path} is kept")
            raise SystemExit(f"non-finite loss before step {where}")

    while True:
        last, fresh = step == cfg.max_steps, step == 0 or step != first  # nothing new right after a resume
        if (step % cfg.eval_interval == 0 and fresh) or last:  # held-out PSNR + grid (all ranks take part)
            check_finite(step)
            t_eval = time.time()
            psnr = evaluate(ema if ema is not None else tokenizer, held_out, d, cfg.batch_size,
                            Path(cfg.out_dir) / f"recon_{step:07d}.png" if d.master else None)
            log(f"step {step} | held-out PSNR {psnr:.2f} dB{' (EMA)' if ema is not None else ''}")
            t0 += time.time() - t_eval
        if (step % cfg.ckpt_interval == 0 and step > 0 and fresh) or last:
            check_finite(step)
            t_save = time.time()
            extra = dict(train_config=asdict(cfg), step=step, disc=disc.state_dict(), heads=heads.state_dict(),
                         opt=opt.state_dict(), opt_disc=opt_d.state_dict(),
                         ema=ema.state_dict() if ema is not None else None, **rng_states(d))
            if d.master:
                save_checkpoint(checkpoint_dict(tokenizer, **extra), path)
            t0 += time.time() - t_save
        if last:
            break

        # one optimizer step: generator (tokenizer + heads) on grad_accum micro-batches, then the discriminator
        gan_on = step >= cfg.disc_start
        lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.lr_decay)
        for group in opt.param_groups + opt_d.param_groups:
            group["lr"] = lr
        disc.requires_grad_(False)  # the generator's GAN term must not train D
        pairs, parts = [], {}
        for micro in range(cfg.grad_accum):
            _, _, x, y = next(data)
            bad_files.update((-1 - y[y < 0]).tolist())
            x = x.to(d.device, non_blocking=True)
            if d.world_size > 1:
                gen_ddp.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with autocast(d.device_type):
                recon, aux, preds = gen_ddp(x)
                terms = {"mse": F.mse_loss(recon.float(), x)}
                rec = cfg.mse_weight * terms["mse"]
                if lpips is not None:
                    terms["lpips"] = lpips_c(x, recon).mean()
                    rec = rec + cfg.lpips_weight * terms["lpips"]
                loss = rec + aux["vq_total"]
                terms["vq"], terms["dis"] = aux["vq_total"] - aux["disentangle_loss"], aux["disentangle_loss"]
                for k, t in teachers.items():
                    cls_t, patch_t = t(x)  # (B, W), (B, N, W): targets from the ORIGINAL image, no gradient
                    terms[f"rep{k}"] = rep_loss(cfg.rep_loss, preds[k], cls_t, patch_t, cfg.rep_temperature)
                    loss = loss + cfg.rep_weight * terms[f"rep{k}"]
                if gan_on:
                    terms["gan"] = -disc_c(recon).float().mean()
                    w = cfg.disc_weight * (adaptive_weight(rec, terms["gan"], last_layer) if cfg.disc_adaptive else 1)
                    loss = loss + w * terms["gan"]
            (loss / cfg.grad_accum).backward()
            pairs.append((x, recon.detach()))
            terms["loss"] = loss
            for k, v in terms.items():  # detached micro-step mean
                parts[k] = parts.get(k, 0) + v.detach().float() / cfg.grad_accum
            nonfinite |= ~torch.isfinite(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, tokenizer, cfg.ema_decay)
        if gan_on:  # hinge loss on real images and the detached reconstructions
            disc.requires_grad_(True)
            for micro, (x, fake) in enumerate(pairs):
                if d.world_size > 1:
                    disc_ddp.require_backward_grad_sync = micro == cfg.grad_accum - 1
                with autocast(d.device_type):
                    d_loss = cfg.disc_weight * hinge_d_loss(disc_ddp(x).float(), disc_ddp(fake).float())
                (d_loss / cfg.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip or float("inf"))
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            parts["d"] = d_loss.detach().float()
            nonfinite |= ~torch.isfinite(d_loss.detach())
        step += 1

        for k, v in parts.items():  # running (sum, count) of detached tensors; .item() only on log steps
            total, count = sums.get(k, (0, 0))
            sums[k] = (total + v, count + 1)
        n_sum += 1
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            check_finite(step)
            if d.device_type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            losses = {k: (total / count).item() for k, (total, count) in sums.items()}
            usage, ppl = aux["usage"].tolist(), aux["perplexity"].tolist()  # per sub-codebook, last micro-batch
            row = dict(step=step, **losses, usage=usage, perplexity=ppl, lr=lr, grad_norm=norm.item(),
                       img_per_s=n_sum * global_batch / dt)
            history.append(row)
            log(f"step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in losses.items())
                + f" | usage {','.join(f'{u:.2f}' for u in usage)} ppl {','.join(f'{p:.0f}' for p in ppl)}"
                + f" | lr {lr:.2e} | gnorm {row['grad_norm']:.3f} | {1000 * dt / n_sum:.0f} ms/step"
                + f" | {row['img_per_s']:.1f} img/s" + (f" | skipped files {len(bad_files)}" if bad_files else ""))
            sums, n_sum, t0 = {}, 0, time.time()

    log(f"done: step {step} | held-out PSNR {psnr:.2f} dB | checkpoint {path}"
        + (f" | skipped unreadable files: {len(bad_files)} (rank 0)" if hasattr(train_ds, "bad") else ""))
    return {"step": step, "psnr": psnr, "history": history, "bad_files": len(bad_files), "tokenizer": tokenizer,
            "heads": heads, "disc": disc, "ema": ema}


if __name__ == "__main__":
    main(parse_config(TrainConfig))
