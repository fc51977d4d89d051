"""
FAR: the factorized autoregressive generator of "Factorized Visual Tokenization and Generation"
(Bai et al., arXiv 2411.16681), a LlamaGen class-conditional GPT (Sun et al., arXiv 2406.06525) over FQGAN codes.

    label -> [class token, agg(e_1(x_1,0)..e_K(x_K,0)), ..., agg(.. position T-2 ..)] -> n_layer blocks -> h_t
    h_t   -> per position t, a tiny causal transformer (head_layers blocks) over
             [h_t, e_1(x_1,t), ..., e_{K-1}(x_{K-1},t)] -> shared final RMSNorm
          -> output_k on head token k predicts sub-token k of position t (k = 0 is "vis", then the semantic ones)

The K input embedding tables e_k are shared between the input aggregation and the head. Loss = mean_k CE_k.
Sampling (generate) uses a backbone KV cache plus a K-long head KV cache, both allocated once per call, with
classifier-free guidance u + s * (c - u) by batch doubling applied to every sub-token. (The official sampler
re-allocates the head cache at every position; that changes nothing numerically.) Official state dicts
(tok_embeddings_1, output_1, aggregation_layer, layers.i, ar_head.i, ...) load through load_official_state_dict.

Class-token RoPE (cfg.cls_rope): LlamaGen gives the class token a table entry cos=0, sin=0, so its q and k are zero
('zero', the default, needed for parity with the official code and its fixtures); 'identity' (cos=1, sin=0) is the
clean alternative (the class token then simply gets no rotation). The head uses entries 0..K-1 of the same table, so
h_t gets the class entry there too.

Shape legend: B batch, K sub-codebooks, T tokens per image (block_size = side*side, raster order), V entries per
sub-codebook, D width (n_embd), H heads, hd = D/H head dim, L tokens fed in one call, N = B or 2B under CFG.
Codes are (B, K, T) int64: idx[b, k, t] = sub-token k of image position t. Logits are (B, K, T, V) float32.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fqgan import load_strict, torch_load


@dataclass
class FARConfig:
    n_codebooks: int = 2          # K, sub-codebooks of the tokenizer (2 Dual, 3 Triple)
    codebook_size: int = 16384    # V, entries per sub-codebook (from the tokenizer)
    block_size: int = 256         # T, tokens per image (16x16 grid for 256px / ds16); grid side = sqrt(T)
    n_layer: int = 24             # backbone transformer blocks
    n_head: int = 16              # attention heads (backbone and head); head dim must be divisible by 4 (2D RoPE)
    n_embd: int = 1024            # D, model width
    head_layers: int = 3          # depth of the factorized AR head (official `ar_n_layer`)
    num_classes: int = 1000       # class labels; id num_classes is the null (unconditional) label for CFG
    class_dropout: float = 0.1    # training only: label -> null id with this probability (CFG training)
    token_dropout: float = 0.1    # dropout on the backbone input sequence (not on the head inputs)
    resid_dropout: float = 0.1    # dropout after the attention output projection
    ffn_dropout: float = 0.1      # dropout after the SwiGLU output projection
    rope_base: float = 10000.0    # RoPE frequency base
    norm_eps: float = 1e-5        # RMSNorm epsilon
    multiple_of: int = 256        # SwiGLU hidden = round_up(int(2 * 4D / 3), multiple_of)
    cls_rope: str = "zero"        # class-token RoPE entry: 'zero' (official quirk, q = k = 0) or 'identity'

    def __post_init__(self):
        side = math.isqrt(self.block_size)
        assert side * side == self.block_size, "block_size must be a square (tokens of a square grid)"
        assert self.n_embd % self.n_head == 0 and (self.n_embd // self.n_head) % 4 == 0, \
            "n_embd / n_head must be a multiple of 4 (2D RoPE splits head dim pairs into rows and columns)"
        assert self.cls_rope in ("zero", "identity"), "cls_rope must be 'zero' or 'identity'"
        assert self.n_codebooks <= self.block_size + 1, "the head reuses RoPE entries 0..K-1"


# ---- helpers: 2D RoPE, RMSNorm, KV cache

def build_rope(cfg):
    """(1 + T, hd/2, 2) table of (cos, sin): entry 0 = class token, entry 1 + p = grid position p = (row, col)."""
    hd, side = cfg.n_embd // cfg.n_head, math.isqrt(cfg.block_size)
    n = hd // 2  # rotation pairs per head; the first n/2 rotate by row, the last n/2 by column
    freqs = 1.0 / cfg.rope_base ** (torch.arange(0, n, 2)[: n // 2].float() / n)  # f_j = base^(-4j/hd), (hd/4,)
    ang = torch.outer(torch.arange(side).float(), freqs)  # (side, hd/4)
    grid = torch.cat([ang[:, None].expand(-1, side, -1), ang[None, :].expand(side, -1, -1)], -1)  # (side, side, hd/2)
    grid = grid.reshape(side * side, n)  # (T, hd/2), raster order
    table = torch.stack([grid.cos(), grid.sin()], -1)  # (T, hd/2, 2)
    cls = torch.zeros(1, n, 2)
    if cfg.cls_rope == "identity":
        cls[..., 0] = 1.0
    return torch.cat([cls, table])  # (1 + T, hd/2, 2)


def apply_rope(x, rope):
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, L, H, hd) by rope (L, hd/2, 2), in fp32."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, L, H, hd/2, 2)
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]  # (1, L, 1, hd/2)
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(3).type_as(x)  # (B, L, H, hd)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, normalised in fp32 (as LlamaGen)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache:
    """Keys/values of one attention layer for `length` positions, allocated on first write (so it takes the dtype
    autocast gives k and v); positions are overwritten by index, so one cache serves a whole generate() call."""

    def __init__(self, length):
        self.length, self.k, self.v = length, None, None

    def update(self, k, v, pos):
        """Write k, v (N, H, L, hd) at positions [pos, pos + L); return all keys/values up to pos + L."""
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], k.shape[1], self.length, k.shape[3])  # (N, H, length, hd)
            self.v = torch.zeros_like(self.k)
        L = k.shape[2]
        assert pos == 0 or L == 1, "cached attention feeds one token at a time after position 0"
        self.k[:, :, pos:pos + L], self.v[:, :, pos:pos + L] = k, v
        return self.k[:, :, :pos + L], self.v[:, :, :pos + L]  # (N, H, pos + L, hd)


# ---- transformer blocks (LlamaGen GPT)

class Attention(nn.Module):
    """Causal self-attention: fused qkv (rows [q; k; v], head h owns rows [h*hd, (h+1)*hd) of each), 2D RoPE, SDPA."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.wqkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, rope, cache=None, pos=0):
        N, L, D = x.shape
        q, k, v = self.wqkv(x).view(N, L, 3, self.n_head, D // self.n_head).unbind(2)  # 3 x (N, L, H, hd)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (N, H, L, hd)
        if cache is not None:
            k, v = cache.update(k, v, pos)  # (N, H, pos + L, hd); one new query sees every cached key
        y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)  # (N, H, L, hd)
        return self.drop(self.wo(y.transpose(1, 2).reshape(N, L, D)))  # (N, L, D)


class FeedForward(nn.Module):
    """SwiGLU w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, cfg):
        super().__init__()
        hidden = int(2 * 4 * cfg.n_embd / 3)
        hidden = -(-hidden // cfg.multiple_of) * cfg.multiple_of  # round up to a multiple of multiple_of
        self.w1 = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x):
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.n_embd, cfg.norm_eps), Attention(cfg)
        self.ffn_norm, self.ffn = RMSNorm(cfg.n_embd, cfg.norm_eps), FeedForward(cfg)

    def forward(self, x, rope, cache=None, pos=0):
        x = x + self.attn(self.attn_norm(x), rope, cache, pos)
        return x + self.ffn(self.ffn_norm(x))


# ---- the model

class FAR(nn.Module):
    """Class-conditional GPT over K-factorized codes with the factorized AR head (FAR)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        K, V, D = cfg.n_codebooks, cfg.codebook_size, cfg.n_embd
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, D)  # last row = null label for CFG
        self.wte = nn.ModuleList(nn.Embedding(V, D) for _ in range(K))  # sub-token embeddings, shared with the head
        self.agg = nn.Linear(K * D, D)  # aggregation of the K embeddings of one position (with bias)
        self.tok_drop = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.head_layers))
        self.norm = RMSNorm(D, cfg.norm_eps)  # shared final norm, after the head
        self.lm_head = nn.ModuleList(nn.Linear(D, V, bias=False) for _ in range(K))  # output k -> sub-token k
        self.register_buffer("rope", build_rope(cfg), persistent=False)  # (1 + T, hd/2, 2), fp32
        self.apply(self._init_weights)
        for out in self.lm_head:
            nn.init.zeros_(out.weight)  # zero-init outputs (LlamaGen): initial loss is exactly log(V)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, codes):
        """Aggregated input embedding of codes (N, K, L) -> (N, L, D)."""
        e = torch.cat([wte(codes[:, k]) for k, wte in enumerate(self.wte)], -1)  # (N, L, K*D), sub-token order
        return self.agg(e)  # (N, L, D)

    def backbone(self, idx, labels):
        """Backbone output h (B, T, D) before the head and the final norm; h[:, t] predicts image position t."""
        B, K, T = idx.shape
        assert K == self.cfg.n_codebooks and T <= self.cfg.block_size, "idx must be (B, n_codebooks, <= block_size)"
        if self.training and self.cfg.class_dropout > 0:  # CFG training: drop labels to the null id
            drop = torch.rand(B, device=labels.device) < self.cfg.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)
        x = torch.cat([self.cls_emb(labels)[:, None], self.embed(idx[:, :, :-1])], 1)  # (B, T, D): last pos not fed
        x = self.tok_drop(x)
        for block in self.blocks:
            x = block(x, self.rope[:T])
        return x  # (B, T, D)

    def head(self, h, idx):
        """Factorized AR head, teacher-forced with idx (B, K, T): logits (B, K, T, V) in fp32."""
        B, T, D = h.shape
        K = self.cfg.n_codebooks
        x = torch.stack([h] + [self.wte[k](idx[:, k]) for k in range(K - 1)], 2)  # (B, T, K, D)
        x = x.reshape(B * T, K, D)  # every image position is its own K-long sequence
        for block in self.head_blocks:
            x = block(x, self.rope[:K])
        x = self.norm(x).view(B, T, K, D)  # (B, T, K, D)
        return torch.stack([self.lm_head[k](x[:, :, k]) for k in range(K)], 1).float()  # (B, K, T, V)

    def forward(self, idx, labels, targets=None):
        """idx (B, K, T) codes, labels (B,) -> logits (B, K, T, V) fp32 and loss (mean over k of CE_k) or None.
        idx feeds both the backbone (shifted by one position) and the head (teacher forcing); targets is normally
        idx itself."""
        logits = self.head(self.backbone(idx, labels), idx)  # (B, K, T, V)
        loss = None
        if targets is not None:  # equal counts per k, so the global mean is the mean of the K per-k means
            loss = F.cross_entropy(logits.flatten(0, 2), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, labels, cfg_scale=1.0, cfg_schedule="constant", temperature=1.0, top_k=0, top_p=1.0,
                 generator=None, return_logits=False):
        """Sample codes (B, K, T) for labels (B,). Call in eval mode.

        cfg_scale s != 1 doubles the batch (labels + null labels) and samples from u + s_t * (c - u) for every
        sub-token; the sampled token is fed to both halves. cfg_schedule 'constant': s_t = s; 'linear': s_t ramps
        from 1 at position 0 to s at position T-1. Then temperature, top-k (0 = off; 1 = greedy) and top-p (1 = off).
        generator: one torch.Generator for the batch, or a list of B (one per row, on the model's device) so that
        each image depends only on its own seed, not on how a run is split into batches.
        return_logits: also return the guided logits (B, K, T, V) fp32, before temperature and filtering."""
        cfg, (B,) = self.cfg, labels.shape
        K, T, V = cfg.n_codebooks, cfg.block_size, cfg.codebook_size
        assert cfg_schedule in ("constant", "linear"), "cfg_schedule must be 'constant' or 'linear'"
        guided = cfg_scale != 1.0
        cond = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if guided else labels  # (N,)
        caches = [KVCache(T) for _ in self.blocks]  # allocated once, written by position index
        head_caches = [KVCache(K) for _ in self.head_blocks]  # reused by every position (overwritten)
        out = torch.zeros(B, K, T, dtype=torch.long, device=labels.device)
        all_logits = torch.zeros(B, K, T, V, device=labels.device) if return_logits else None
        x = self.cls_emb(cond)[:, None]  # (N, 1, D): position 0 is predicted from the class token
        for t in range(T):
            if t > 0:  # feed the sub-tokens sampled at position t-1
                x = self.embed(out[:, :, t - 1:t].repeat(2 if guided else 1, 1, 1))  # (N, 1, D)
            for block, cache in zip(self.blocks, caches):
                x = block(x, self.rope[t:t + 1], cache, t)
            s = 1 + (cfg_scale - 1) * t / max(T - 1, 1) if cfg_schedule == "linear" else cfg_scale
            z = x  # (N, 1, D): h_t starts the head sequence
            for k in range(K):
                if k > 0:
                    z = self.wte[k - 1](out[:, k - 1, t].repeat(2 if guided else 1))[:, None]  # (N, 1, D)
                for block, cache in zip(self.head_blocks, head_caches):
                    z = block(z, self.rope[k:k + 1], cache, k)
                logits = self.lm_head[k](self.norm(z)[:, 0]).float()  # (N, V)
                if guided:
                    c, u = logits.chunk(2)  # (B, V) each
                    logits = u + s * (c - u)
                if return_logits:
                    all_logits[:, k, t] = logits
                out[:, k, t] = sample_logits(logits, temperature, top_k, top_p, generator)
        return (out, all_logits) if return_logits else out

    # ---- checkpoints and optimizer

    @classmethod
    def from_checkpoint(cls, path, device="cpu", prefer_ema=True, ckpt=None):
        """Load our own checkpoint {'kind': 'far', 'config': asdict(cfg), 'model': sd, optional 'ema': sd, ...}
        (torch.load weights_only=True; or `ckpt`, that file's dict already in memory); prefers 'ema' when present.
        Returns the model in eval mode on device."""
        ckpt = torch_load(path) if ckpt is None else ckpt
        kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
        if kind != "far":
            raise ValueError(f"{path} has kind={kind!r}, not 'far': pass a checkpoint written by train_far.py "
                             "(official FAR weights go through load_official_state_dict)")
        try:
            model = cls(FARConfig(**ckpt["config"]))
        except TypeError as e:
            raise ValueError(f"{path}: its 'config' does not fit FARConfig ({e}): was it written by another version?")
        sd = ckpt["ema"] if prefer_ema and ckpt.get("ema") is not None else ckpt["model"]
        load_strict(model, sd, path)
        return model.to(device).eval()

    def configure_optimizer(self, weight_decay, lr, betas, device_type):
        """AdamW with weight decay on >= 2-D tensors (matrices, embeddings) only; fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Draw one token per row of logits (N, V): temperature, top-k, top-p (nucleus), then multinomial -> (N,)."""
    assert temperature > 0, "temperature must be > 0 (use top_k=1 for greedy decoding)"
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before a token already exceeds top_p (the top token stays)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):  # one generator per row
        assert len(generator) == probs.shape[0], "need one generator per batch row"
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)[:, 0] for i, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (N,)


# ---- official FAR state dicts (showlab/FQGAN autoregressive/models/far_{dual,triple}.py)

OFFICIAL_RULES = [  # (official prefix, our prefix); numbered official names are handled in official_key
    ("cls_embedding.embedding_table.", "cls_emb."), ("aggregation_layer.", "agg."), ("layers.", "blocks."),
    ("ar_head.", "head_blocks."), ("norm.", "norm."),
]
OFFICIAL_BLOCK = {"attention.wqkv.": "attn.wqkv.", "attention.wo.": "attn.wo.", "feed_forward.": "ffn.",
                  "attention_norm.": "attn_norm.", "ffn_norm.": "ffn_norm."}


def official_key(key):
    """Our name for an official FAR key (e.g. tok_embeddings_2.weight -> wte.1.weight), or None if unknown."""
    for stem, ours in (("tok_embeddings_", "wte."), ("output_", "lm_head.")):
        num, _, rest = key[len(stem):].partition(".")
        if key.startswith(stem) and num.isdigit() and int(num) >= 1:  # official numbering starts at 1
            return f"{ours}{int(num) - 1}.{rest}"
    for a, b in OFFICIAL_RULES:
        if key.startswith(a) and b in ("blocks.", "head_blocks."):  # '<i>.<official block part>'
            i, _, part = key[len(a):].partition(".")
            new = next((o + part[len(p):] for p, o in OFFICIAL_BLOCK.items() if part.startswith(p)), None)
            return f"{b}{i}.{new}" if new and i.isdigit() else None
        if key.startswith(a):
            return b + key[len(a):]
    return None


def load_official_state_dict(model, sd, path="official state dict"):
    """Load an official FAR state dict (or a checkpoint dict holding it under 'model') into model, strictly: every
    tensor must be used and fit; all problems are named in one ValueError."""
    if isinstance(sd.get("model"), dict):
        sd = sd["model"]
    ours, unknown = {}, []
    for key, value in sd.items():
        new = official_key(key)
        if new is None:
            unknown.append(key)
        else:
            ours[new] = value
    if unknown:
        raise ValueError(f"{path}: keys that are not part of an official FAR model: {unknown}")
    load_strict(model, ours, path)


def checkpoint_dict(model, **extra):
    """Our checkpoint format (loads with weights_only=True): kind, config as a plain dict, model weights, extras."""
    return {"kind": "far", "config": asdict(model.cfg), "model": model.state_dict(), **extra}


# ---- presets (data, not code): FARConfig(**PRESETS[name], n_codebooks=K, codebook_size=V, block_size=T)

PRESETS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, head_layers=1),  # CPU tests and demos
    "B": dict(n_layer=24, n_embd=1024, n_head=16, head_layers=3),  # FAR-B (LlamaGen GPT-L shapes), ~415M
    "L": dict(n_layer=36, n_embd=1280, n_head=20, head_layers=4),  # FAR-L (LlamaGen GPT-XL shapes), ~898M
}
