"""
Train the FQGAN tokenizer (Bai et al., arXiv 2411.16681; official recipe: showlab/FQGAN's train_fqgan_{dual,triple}.sh
on LlamaGen's VQGAN trainer) and the VQ-KD / Cluster tokenizers (Wang et al., arXiv 2411.04406). Objective (t = step):

  generator_loss      L_G = w_mse MSE(x, x^) + w_lpips LPIPS(x, x^)
                            + sum_k (L_vq,k + beta L_commit,k + lambda_ent L_ent,k) + lambda_dis L_dis      (fqgan.py)
                            + w_rep sum_{k supervised} L_rep,k + w_adv(t) (-mean D(x^))
  discriminator_loss  L_D = w_adv(t) 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(sg(x^))))         (hinge PatchGAN)
  representation_loss L_rep (L_sem of the official code): InfoNCE of the head's class token vs the teacher's CLS of
                      the ORIGINAL image, temperature 1, negatives = the process's batch; VQ-KD: 1 - cos per patch
  w_adv(t) = disc_weight (0.5) from disc_start (20000) on, else 0; D is not run before; no adaptive weight.

    python train_tokenizer.py                 # FQGAN-Dual on Fashion-MNIST 32 px with the IU teacher on branch 1
    python train_tokenizer.py --stage=features --model_overrides=n_codebooks=1 --teachers=fmnist_vit \\
        --rep_loss=cosine --rep_layers=1 --out_dir=out/vqkd1                                   # VQ-KD stage 1
    python train_tokenizer.py --stage=decoder --init=out/vqkd1/ckpt.pt --out_dir=out/vqkd      # VQ-KD stage 2
    python train_tokenizer.py --stage=decoder --init=cluster --teachers=fmnist_vit --out_dir=out/cluster  # Cluster
    torchrun --standalone --nproc_per_node=8 train_tokenizer.py --preset=dual16 --data=/data/imagenet/train \\
        --batch_size=32 --max_steps=200000 --num_workers=8 --eval_interval=5000 --ckpt_interval=5000   # the paper

Shape legend: B batch, H W image size, h w latent grid, T = h*w tokens, K sub-codebooks, D code dim, W teacher width.
"""
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (Logger, adamw, build, check, cli, convert, load_checkpoint, resume, rng_states,
                    save_checkpoint, session)
from data import batches, make_dataset
from fqgan import FQGAN, PRESETS, FQGANConfig, ResidualAttentionBlock, checkpoint_dict, config_from_preset
from pretrained import lpips_vgg, teacher


@dataclass
class TrainConfig:
    # data and output
    data: str = "fashion-mnist"     # 'fashion-mnist' | 'synthetic' | PATH of an ImageFolder tree root/<class>/<image>
    val_data: str = ""              # held-out set for PSNR and the grid; '' = the test split of --data
    out_dir: str = "out/tokenizer"  # log.txt, ckpt.pt and recon_<step>.png are written here
    resume: bool = False            # continue out_dir/ckpt.pt exactly (same flags): weights, optimizers, step, RNG
    # model
    preset: str = "tiny"            # fqgan.PRESETS: tiny | vq16 | vq8 | dual16 | triple16 | dual8 | triple8
    model_overrides: str = ""       # FQGANConfig fields 'name=value;...', e.g. 'image_size=128;codebook_size=4096'
    stage: str = "full"             # full (FQGAN) | features (VQ-KD stage 1) | decoder (frozen encoder + codebooks)
    init: str = ""                  # '' | PATH of a tokenizer checkpoint | cluster (frozen teacher, k-means codebook)
    kmeans_images: int = 10000      # --init=cluster: training images whose teacher patch features are clustered
    # optimisation (official: Adam betas (0.9, 0.95), lr 2e-4 constant, clip 1.0, global batch 256, ~200k steps)
    batch_size: int = 16            # images per micro-step per process (official: 32 per GPU)
    grad_accum: int = 1             # micro-steps per optimizer step; global batch = batch_size * grad_accum * world
    max_steps: int = 600            # optimizer steps of the run (official: ~200k)
    lr: float = 2e-4                # Adam learning rate of the generator (tokenizer + heads) and the discriminator
    beta1: float = 0.9              # Adam beta1
    beta2: float = 0.95             # Adam beta2
    grad_clip: float = 1.0          # max global gradient norm, each optimizer (0 = no clipping)
    # loss terms
    mse_weight: float = 1.0         # w_mse, pixel MSE in [-1, 1]
    lpips: str = "auto"             # 'vgg16' (pretrained files) | 'tiny' (random, tests) | 'none'; auto: none if tiny
    lpips_weight: float = 1.0       # w_lpips (official 1.0)
    lpips_vgg_path: str = ""        # vgg16-397923af.pth; '' = torch hub cache
    lpips_lin_path: str = ""        # LPIPS v0.1 vgg.pth lin weights; '' = torch hub cache
    disc_start: int = 20000         # first step with the GAN terms; the discriminator is not run before it
    disc_weight: float = 0.5        # w_adv of the generator hinge term and of the discriminator loss
    disc_ndf: int = 64              # PatchGAN base width
    disc_layers: int = 3            # PatchGAN n_layers (3: 256 px -> 30x30 logits; use 2 for 16 px images)
    teachers: tuple = ("auto",)     # per branch: none | pretrained.TEACHERS key; auto: official (demo: fmnist_vit on 1)
    teacher_paths: tuple = ("auto",)  # weight file per branch (same order); auto = the default place
    rep_loss: str = "infonce"       # 'infonce' on the CLS token (official) | 'cosine' per token (VQ-KD)
    rep_weight: float = 0.5         # w_rep per supervised branch (official 0.5)
    rep_temperature: float = 1.0    # InfoNCE temperature (official 1)
    rep_layers: int = 3             # transformer blocks in each feature-prediction head (official 3; VQ-KD 1)
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

    def __post_init__(self):
        check(self, positive="batch_size grad_accum lr log_interval eval_interval eval_images ckpt_interval "
                             "kmeans_images disc_ndf disc_layers rep_temperature", unit="beta1 beta2",
              stage=("full", "features", "decoder"), rep_loss=("infonce", "cosine"),
              lpips=("auto", "vgg16", "tiny", "none"), preset=tuple(PRESETS))
        if self.init == "cluster" and self.stage != "decoder":
            raise SystemExit("--init=cluster builds a frozen encoder and codebook: use it with --stage=decoder")


# ---- training-only networks
class FeatPredHead(nn.Module):
    """Official "FeatPredHead" (also VQ-KD's feature decoder): one branch's codes -> MLP to the teacher width ->
    [cls; tokens] + positions -> LN -> CLIP blocks -> LN. Token 0 predicts the teacher's CLS, tokens 1.. its patches."""

    def __init__(self, code_dim, width, n_tokens, n_layer=3, n_head=8):
        super().__init__()
        self.upscale = nn.Sequential(nn.Linear(code_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.class_embedding = nn.Parameter(width ** -0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(n_tokens + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, n_head) for _ in range(n_layer)])

    def forward(self, q):  # (B, D, h, w) straight-through codes of one branch
        x = self.upscale(q.flatten(2).transpose(1, 2))  # (B, T, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))  # (B, 1+T, W)
        for block in self.transformer:
            x = block(x)
        return self.ln_post(x)  # (B, 1+T, W)


class Generator(nn.Module):
    """Everything the generator optimizer trains, as one DDP module: the tokenizer and its feature heads."""

    def __init__(self, tokenizer, heads, stage):
        super().__init__()
        self.tokenizer, self.heads, self.stage = tokenizer, heads, stage

    def forward(self, x):  # (B, 3, H, W) in [-1, 1]
        tok, D = self.tokenizer, self.tokenizer.cfg.codebook_dim
        if self.stage == "decoder":  # frozen parts stay in eval mode (a ViT trunk's BatchNorm statistics too)
            for m in (tok.encoder, tok.branches, tok.quantizers):
                m.eval()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage != "decoder"):
            aux = tok.codes(x, with_losses=True)
        recon = None if self.stage == "features" else tok.decode(aux["quant"])  # (B, 3, H, W)
        preds = {k: head(aux["quant"][:, int(k) * D:(int(k) + 1) * D]) for k, head in self.heads.items()}
        return recon, aux, preds  # preds[k] (B, 1+T, W)


class PatchGAN(nn.Module):
    """pix2pix NLayerDiscriminator: 4x4 convs (stride 2, last two stride 1), BatchNorm, LeakyReLU 0.2 -> logit map."""

    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        c = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]  # widths, c[0] = ndf
        layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for n in range(1, n_layers + 1):
            layers += [nn.Conv2d(c[n - 1], c[n], 4, 2 if n < n_layers else 1, 1, bias=False), nn.BatchNorm2d(c[n]),
                       nn.LeakyReLU(0.2, True)]
        self.main = nn.Sequential(*layers, nn.Conv2d(c[-1], 1, 4, 1, 1))
        for m in self.modules():  # pix2pix init: conv weights N(0, 0.02), BatchNorm gamma N(1, 0.02) (beta 0)
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, float(isinstance(m, nn.BatchNorm2d)), 0.02)

    def forward(self, x):  # (B, 3, H, W) -> (B, 1, h', w') logits
        return self.main(x)


# ---- the objective
def gan_weight(step, cfg):  # w_adv(t) of the module docstring
    return cfg.disc_weight if step >= cfg.disc_start else 0.0


def representation_loss(pred, cls_t, patch_t, kind="infonce", temperature=1.0):
    """L_rep. 'infonce': cross-entropy of the logits p_b . t_c / temperature over the batch (c), target c = b, with
    p = the head's l2-normalised class token and t = the teacher's l2-normalised CLS (one direction: prediction ->
    teacher). 'cosine' (VQ-KD): mean over tokens of 1 - cos(head token, teacher patch resized to the latent grid)."""
    if kind == "infonce":
        p, t = F.normalize(pred[:, 0].float(), dim=-1), F.normalize(cls_t.float(), dim=-1)  # (B, W)
        return F.cross_entropy(p @ t.t() / temperature, torch.arange(len(p), device=p.device))
    tokens = pred[:, 1:].float()  # (B, T, W)
    h, g = math.isqrt(tokens.shape[1]), math.isqrt(patch_t.shape[1])
    t = patch_t.float().transpose(1, 2).unflatten(2, (g, g))  # (B, W, g, g)
    t = F.interpolate(t, size=(h, h), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)  # (B, T, W)
    return (1 - F.cosine_similarity(tokens, t, dim=-1)).mean()


def generator_loss(x, recon, aux, preds, teachers, step, cfg, disc=None, lpips=None):
    """L_G of the module docstring -> (loss, dict of its terms). recon None (stage 'features'): no pixel terms.
    teachers: {branch: frozen Teacher}; each sees the ORIGINAL image x, never the reconstruction."""
    terms = {"vq": aux["vq_total"] - aux["disentangle_loss"], "dis": aux["disentangle_loss"]}
    loss = aux["vq_total"]
    if recon is not None:
        terms["mse"] = F.mse_loss(recon.float(), x.float())
        loss = loss + cfg.mse_weight * terms["mse"]
        if lpips is not None:
            terms["lpips"] = lpips(x, recon).mean()
            loss = loss + cfg.lpips_weight * terms["lpips"]
    for k, t in teachers.items():
        terms[f"rep{k}"] = representation_loss(preds[k], *t(x), cfg.rep_loss, cfg.rep_temperature)
        loss = loss + cfg.rep_weight * terms[f"rep{k}"]
    w = gan_weight(step, cfg)
    if w and recon is not None:
        terms["gan"] = -disc(recon).float().mean()
        loss = loss + w * terms["gan"]
    return loss, terms


def discriminator_loss(disc, x, fake, step, cfg):
    """L_D = w_adv(t) * 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(fake))), fake = the detached reconstruction."""
    return gan_weight(step, cfg) * 0.5 * (F.relu(1 - disc(x).float()).mean() + F.relu(1 + disc(fake).float()).mean())


# ---- set-up
def kmeans(x, k, iters=20, seed=0):
    """Spherical k-means of the rows of x (N, D) -> (k, D) unit centres: seeded k-means++ (next centre drawn with p ~
    1 - cos to the nearest so far), then Lloyd iterations; an empty cluster is re-seeded with the worst-served point."""
    g, x = torch.Generator().manual_seed(seed), F.normalize(x.float(), dim=1)
    c = x[torch.randint(len(x), (1,), generator=g)]
    d = 1 - x @ c[0]  # (N,) cosine distance to the nearest centre
    for _ in range(k - 1):
        c = torch.cat([c, x[torch.multinomial(d.clamp_min(1e-12), 1, generator=g)]])
        d = torch.minimum(d, 1 - x @ c[-1])
    for _ in range(iters):
        best = [(part @ c.t()).max(1) for part in x.split(65536)]  # in chunks: (N, k) is never held at once
        sim, assign = torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = torch.bincount(assign, minlength=k) == 0
        sums[empty] = x[sim.argsort()[:int(empty.sum())]]
        c = F.normalize(sums, dim=1)
    return c


def teacher_names(cfg, K):
    """{branch: (pretrained.TEACHERS name, weight path or None)} for each branch with a teacher."""
    names = cfg.teachers
    if names == ("auto",):
        official = {2: ("none", "clip_l14"), 3: ("none", "dinov2_s14", "clip_b16")}  # Dual, Triple
        demo = ("none", "fmnist_vit") if K == 2 and cfg.data == "fashion-mnist" and cfg.stage == "full" else None
        names = (demo or ("none",) * K) if cfg.preset == "tiny" else official.get(K, ("none",) * K)
    paths = cfg.teacher_paths * K if cfg.teacher_paths == ("auto",) else cfg.teacher_paths
    if len(names) != K or len(paths) != K:
        raise SystemExit(f"--teachers / --teacher_paths need one entry per sub-codebook ({K}), got {names} / {paths}")
    return {str(k): (n, None if p == "auto" else p) for k, (n, p) in enumerate(zip(names, paths)) if n != "none"}


def cluster_tokenizer(cfg, log):
    """The Cluster tokenizer: the frozen IU teacher as a ViT trunk, the codebook a k-means of its patch features."""
    name, path = teacher_names(cfg, 1).get("0", (None, None))
    if name is None:
        raise SystemExit("--init=cluster needs the teacher of its one sub-codebook: --teachers=fmnist_vit")
    net = teacher(name, path).net
    c = net.cfg
    if getattr(c, "net", None) != "vit":
        raise SystemExit(f"--init=cluster needs a ViT teacher trained here (fmnist_vit), not {name}")
    base = config_from_preset(cfg.preset, **parse_overrides(cfg.model_overrides))
    levels = int(math.log2(c.patch)) + 1
    mult = (base.ch_mult + base.ch_mult[-1:] * levels)[:levels]  # decoder levels for the teacher's patch size
    tok = FQGAN(replace(base, encoder="vit", image_size=c.image_size, ch_mult=mult, n_codebooks=1, codebook_dim=c.width,
                        adapter_layers=0, vit_layers=c.layers, adapter_heads=c.heads))
    tok.encoder.load_state_dict(net.body.state_dict())  # the teacher's own weights: encoder(x) = its patch features
    tok.encoder.eval()  # its BatchNorm statistics are the teacher's: never updated
    train_ds = make_dataset(cfg.data, c.image_size, "train")
    pick = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.kmeans_images]
    with torch.no_grad():
        feats = torch.cat([tok.encoder(torch.stack([train_ds[int(i)][0] for i in chunk])).flatten(2).transpose(1, 2)
                           .flatten(0, 1) for chunk in pick.split(256)])  # (n * T, W)
        tok.quantizers[0].embedding.weight.copy_(kmeans(feats, tok.cfg.codebook_size, seed=cfg.seed))
    log(f"cluster: {c.image_size} px teacher ({c.width} wide, {c.image_size // c.patch}^2 tokens) as the encoder, "
        f"k-means of {len(feats)} patch features into {tok.cfg.codebook_size} codes")
    return tok


def parse_overrides(text):
    """'name=value;name=value' -> FQGANConfig fields, each value read as its default's type (tuples as 1,2,2)."""
    fields, items = FQGANConfig.__dataclass_fields__, [s.strip().partition("=") for s in text.split(";") if s.strip()]
    for key, eq, value in items:
        if key not in fields or not value:
            raise SystemExit(f"--model_overrides: bad item '{key}{eq}{value}' (name=value of a FQGANConfig field)")
    return {key: convert(value, fields[key].default, f"model_overrides {key}") for key, _, value in items}


def make_tokenizer(cfg, ckpt, log):
    """The tokenizer of this run: from the resumed checkpoint, --init (a checkpoint, or cluster), or a preset."""
    if ckpt or cfg.init not in ("", "cluster"):
        src = cfg.init if not ckpt else "resumed checkpoint"
        return build(FQGAN, ckpt or load_checkpoint(cfg.init, "fqgan"), src).train()
    if cfg.init == "cluster":
        return cluster_tokenizer(cfg, log)
    return FQGAN(config_from_preset(cfg.preset, **parse_overrides(cfg.model_overrides)))  # a bad value: ValueError


@torch.no_grad()
def evaluate(tok, images, s, batch_size, grid_path=None):
    """Held-out PSNR (data range [0, 1], mean over images, summed over ranks), tokenizer in fp32, and on rank 0 a PNG
    grid whose rows are original | reconstruction | decoded from each sub-codebook alone."""
    was_training, K = tok.training, tok.cfg.n_codebooks
    tok.eval()
    total = torch.zeros(2, device=s.device)
    for i, x in enumerate(images.split(batch_size)):
        x = x.to(s.device)
        idx = tok.encode(x)  # (B, K, h, w)
        rec = tok.decode_indices(idx).clamp(-1, 1)
        if i == 0 and grid_path:
            alone = [tok.decode_indices(idx[:8], keep=[k]).clamp(-1, 1) for k in range(K)]
            rows = torch.stack([x[:8], rec[:8], *alone], dim=1).flatten(0, 1)  # (8 * (2+K), 3, H, W)
            torchvision.utils.save_image(rows.cpu() * 0.5 + 0.5, grid_path, nrow=2 + K)
        mse = ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3))  # (B,) in [0, 1] units
        total += torch.stack([(10 * torch.log10(1.0 / mse.clamp_min(1e-10))).sum(), mse.new_tensor(len(x))])
    tok.train(was_training)
    return (s.all_reduce(total)[0] / total[1]).item()


# ---- training
def main(cfg):
    """Train; returns {'step', 'psnr', 'history' (a dict per log line), 'bad_files', 'tokenizer', 'heads', 'disc'}."""
    with session(cfg.device) as s:
        log, path = Logger(cfg.out_dir, s.master), Path(cfg.out_dir) / "ckpt.pt"
        ckpt = load_checkpoint(path, "fqgan") if cfg.resume else None
        use_compile = cfg.compile and s.device_type == "cuda"
        log(f"device {s.device} | world size {s.world_size} | torch {torch.__version__} | compile {use_compile}")
        log(f"train config: {asdict(cfg)}")
        torch.manual_seed(cfg.seed)  # the same initial networks on every rank
        tok = make_tokenizer(cfg, ckpt, log)
        names = teacher_names(cfg, tok.cfg.n_codebooks) if cfg.stage != "decoder" else {}  # decoder stage: pixels only
        log(f"model config: {asdict(tok.cfg)}")
        train_ds = make_dataset(cfg.data, tok.cfg.image_size, "train", augment=True)
        val_ds = make_dataset(cfg.val_data or cfg.data, tok.cfg.image_size, "test")
        pick = torch.linspace(0, len(val_ds) - 1, min(cfg.eval_images, len(val_ds))).long()[s.rank::s.world_size]
        held_out = torch.stack([val_ds[int(i)][0] for i in pick])  # (n, 3, H, W), this rank's share
        global_batch = cfg.batch_size * cfg.grad_accum * s.world_size
        log(f"data {cfg.data}: {len(train_ds)} train images, {len(val_ds)} held-out | global batch {global_batch} = "
            f"{cfg.batch_size} x {cfg.grad_accum} accum x {s.world_size} ranks")

        teachers = {k: teacher(n, p, cfg.download).to(s.device) for k, (n, p) in names.items()}
        lpips_name = cfg.lpips if cfg.lpips != "auto" else ("none" if cfg.preset == "tiny" else "vgg16")
        lpips = None if lpips_name == "none" or cfg.stage == "features" else lpips_vgg(
            lpips_name, cfg.lpips_vgg_path or None, cfg.lpips_lin_path or None, cfg.download).to(s.device)
        heads = nn.ModuleDict({k: FeatPredHead(tok.cfg.codebook_dim, t.width, tok.grid ** 2, cfg.rep_layers)
                               for k, t in teachers.items()})
        frozen = dict(decoder=(tok.encoder, tok.branches, tok.quantizers), features=(tok.post_quant_conv, tok.decoder))
        for m in frozen.get(cfg.stage, ()):  # decoder: only post_quant_conv + decoder learn; features: no decoder
            m.requires_grad_(False)
        gen, disc = Generator(tok, heads, cfg.stage).to(s.device), PatchGAN(cfg.disc_ndf, cfg.disc_layers).to(s.device)
        opt, opt_d = (adamw(m, cfg.lr, (cfg.beta1, cfg.beta2), 0.0, s.device_type) for m in (gen, disc))  # Adam
        count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
        log(f"parameters (M): tokenizer {count(tok):.3f} | heads {count(heads):.3f} | discriminator {count(disc):.3f}"
            f" | teachers {names} | lpips {lpips_name} | stage {cfg.stage}")
        step = resume(ckpt, dict(heads=heads, disc=disc, opt=opt, opt_disc=opt_d), s, cfg, path, log)
        # compile after the optimizers, before DDP; the raw modules stay in hand for saving and evaluation
        gen_c, disc_c = (torch.compile(gen), torch.compile(disc)) if use_compile else (gen, disc)
        gen_ddp, disc_ddp = gen_c, disc_c
        if s.world_size > 1:
            ids = [s.local_rank] if s.device_type == "cuda" else None
            gen_ddp = DDP(gen_c, device_ids=ids, broadcast_buffers=False)  # no BatchNorm; usage windows stay per rank
            disc_ddp = DDP(disc_c, device_ids=ids)  # BatchNorm statistics broadcast from rank 0
        data = batches(train_ds, cfg.batch_size, cfg.seed, s.rank, s.world_size, step * cfg.grad_accum, cfg.num_workers)

        first, history, sums, bad, psnr, t0 = step, [], {}, 0, float("nan"), time.time()
        while True:
            last = step == cfg.max_steps
            if ((step % cfg.eval_interval == 0 and (step != first or step == 0)) or last) and cfg.stage != "features":
                t_eval = time.time()
                psnr = evaluate(tok, held_out, s, cfg.batch_size, Path(cfg.out_dir) / f"recon_{step:07d}.png"
                                if s.master else None)
                log(f"step {step} | held-out PSNR {psnr:.2f} dB")
                t0 += time.time() - t_eval
            if (step % cfg.ckpt_interval == 0 and step != first) or last:
                extra = dict(train_config=asdict(cfg), step=step, disc=disc.state_dict(), heads=heads.state_dict(),
                             opt=opt.state_dict(), opt_disc=opt_d.state_dict(), **rng_states(s))
                if s.master:
                    save_checkpoint(checkpoint_dict(tok, **extra), path)
            if last:
                break
            micro = [next(data)[1:] for _ in range(cfg.grad_accum)]
            bad += sum(int((y < 0).sum()) for _, y in micro)
            micro = [(x[y >= 0].to(s.device, non_blocking=True), y) for x, y in micro]  # skip unreadable images
            if any(len(x) == 0 for x, _ in micro):
                raise SystemExit("a whole batch of unreadable images: check the files under --data")
            parts, stats = train_step(cfg, s, step, micro, (gen, gen_ddp, opt), (disc, disc_ddp, disc_c, opt_d),
                                      teachers, lpips)
            step += 1
            for k, v in parts.items():  # running (sum, count) of detached tensors; .item() only on log steps
                sums[k] = (sums.get(k, (0, 0))[0] + v, sums.get(k, (0, 0))[1] + 1)
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                losses = {k: (total / c).item() for k, (total, c) in sums.items()}  # .item() syncs: time after it
                dt, n = time.time() - t0, sums["loss"][1]
                if not all(map(math.isfinite, losses.values())):
                    raise SystemExit(f"loss became NaN/inf before step {step}: stopping; "
                                     f"{path} keeps the last good state")
                row = dict(step=step, **losses, usage=stats["usage"].tolist(), perplexity=stats["perplexity"].tolist(),
                           img_per_s=n * global_batch / dt)
                history.append(row)
                log(f"step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in losses.items())
                    + f" | usage {','.join(f'{u:.2f}' for u in row['usage'])} ppl "
                    + ",".join(f"{p:.0f}" for p in row["perplexity"]) + f" | {1000 * dt / n:.0f} ms/step"
                    + f" | {row['img_per_s']:.1f} img/s" + (f" | skipped unreadable files {bad}" if bad else ""))
                sums, t0 = {}, time.time()
        log(f"done: step {step} | held-out PSNR {psnr:.2f} dB | checkpoint {path}")
        return dict(step=step, psnr=psnr, history=history, bad_files=bad, tokenizer=tok, heads=heads, disc=disc)


def train_step(cfg, s, step, micro, generator, discriminator, teachers, lpips):
    """One optimizer step of the generator (tokenizer + heads) over the micro-batches, then (GAN on) of D on the same
    images and detached reconstructions. -> (detached mean loss terms, the last micro-batch's usage and perplexity)."""
    (gen, gen_ddp, opt), (disc, disc_ddp, disc_c, opt_d) = generator, discriminator
    disc.requires_grad_(False)  # the generator's GAN term must not train D
    parts, fakes, n = {}, [], len(micro)
    for i, (x, _) in enumerate(micro):
        if hasattr(gen_ddp, "require_backward_grad_sync"):
            gen_ddp.require_backward_grad_sync = i == n - 1
        with s.autocast():
            recon, aux, preds = gen_ddp(x)
            loss, terms = generator_loss(x, recon, aux, preds, teachers, step, cfg, disc_c, lpips)
        (loss / n).backward()
        fakes.append(None if recon is None else recon.detach())
        for k, v in dict(terms, loss=loss).items():
            parts[k] = parts.get(k, 0) + v.detach().float() / n
    torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    if gan_weight(step, cfg) and fakes[0] is not None:  # hinge loss on real images and detached reconstructions
        disc.requires_grad_(True)
        for i, ((x, _), fake) in enumerate(zip(micro, fakes)):
            if hasattr(disc_ddp, "require_backward_grad_sync"):
                disc_ddp.require_backward_grad_sync = i == n - 1
            with s.autocast():
                d_loss = discriminator_loss(disc_ddp, x, fake, step, cfg)
            (d_loss / n).backward()
            parts["d"] = parts.get("d", 0) + d_loss.detach().float() / n
        torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip or float("inf"))
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
    return parts, {k: aux[k].detach() for k in ("usage", "perplexity")}


if __name__ == "__main__":
    cli(main, TrainConfig)
