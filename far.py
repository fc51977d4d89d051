"""
FAR: the factorized autoregressive generator of "Factorized Visual Tokenization and Generation"
(Bai et al., arXiv 2411.16681), a LlamaGen class-conditional GPT (Sun et al., arXiv 2406.06525) over FQGAN codes.

    label -> [class token, agg(e_1(x_1,0)..e_K(x_K,0)), ..., agg(.. position T-2 ..)] -> n_layer blocks -> h_t
    h_t   -> per position t, a tiny causal transformer (head_layers blocks) over [h_t, e_1(x_1,t), ..,
             e_{K-1}(x_{K-1},t)] -> shared final RMSNorm -> output_k on head token k predicts sub-token k of position t

The tables e_k are shared by the input aggregation and the head; loss = mean_k CE_k. head='linear' / 'mlp': K
independent classifiers on norm(h_t) instead (Table 4). The class token's RoPE entry is cos = sin = 0 (LlamaGen and
the official FAR; needed for parity). generate(): static KV caches for the whole image, one static-shape step per
position (compiles once; a CUDA graph on CUDA); every token drawn by the inverse CDF at a uniform from its image's seed.

Shape legend: B batch, K sub-codebooks, T tokens per image (block_size = side*side, raster order), V entries per
sub-codebook, D width (n_embd), H heads, hd = D/H head dim, L tokens fed in one call, N = B or 2B under CFG.
Codes are (B, K, T) int64: idx[b, k, t] = sub-token k of image position t. Logits are (B, K, T, V) float32.
"""
import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class FARConfig:
    n_codebooks: int = 2          # K, sub-codebooks of the tokenizer (2 Dual, 3 Triple)
    codebook_size: int = 16384    # V, entries per sub-codebook (from the tokenizer)
    block_size: int = 256         # T, tokens per image (16x16 grid for 256px / ds16); grid side = sqrt(T)
    n_layer: int = 24             # backbone transformer blocks
    n_head: int = 16              # attention heads (backbone and head); head dim must be divisible by 4 (2D RoPE)
    n_embd: int = 1024            # D, model width
    head: str = "ar"              # 'ar' (factorized AR head) | 'linear' / 'mlp' (K independent classifiers, Table 4)
    head_layers: int = 3          # depth of the factorized AR head (official `ar_n_layer`; unused by linear / mlp)
    num_classes: int = 1000       # class labels; id num_classes is the null (unconditional) label for CFG
    class_dropout: float = 0.1    # training only: label -> null id with this probability (CFG training)
    token_dropout: float = 0.1    # dropout on the backbone input sequence (not on the head inputs)
    resid_dropout: float = 0.1    # dropout after the attention output projection
    ffn_dropout: float = 0.1      # dropout after the SwiGLU output projection
    rope_base: float = 10000.0    # RoPE frequency base
    norm_eps: float = 1e-5        # RMSNorm epsilon
    multiple_of: int = 256        # SwiGLU hidden = round_up(int(2 * 4D / 3), multiple_of)

    def __post_init__(self):
        problems = [(math.isqrt(self.block_size) ** 2 != self.block_size, "block_size must be a square (a grid)"),
                    (self.n_embd % self.n_head or (self.n_embd // self.n_head) % 4,
                     "n_embd / n_head must be a multiple of 4 (2D RoPE splits the head dim into rows and columns)"),
                    (self.head not in ("ar", "linear", "mlp"), f"head={self.head!r}: choose 'ar', 'linear' or 'mlp'")]
        for bad, message in problems:
            if bad:
                raise ValueError(message)


# ---- LlamaGen GPT parts: 2D RoPE, RMSNorm, transformer blocks
def build_rope(cfg):
    """(1 + T, hd/2, 2) table of (cos, sin): entry 0 = the class token (zero), entry 1 + p = grid position p (raster
    order). Of the hd/2 rotation pairs of a head, the first hd/4 rotate by row, the last hd/4 by column."""
    n, side = cfg.n_embd // cfg.n_head // 2, math.isqrt(cfg.block_size)  # n = hd/2
    freqs = 1.0 / cfg.rope_base ** (torch.arange(0, n, 2)[: n // 2].float() / n)  # f_j = base^(-4j/hd), (hd/4,)
    ang = torch.outer(torch.arange(side).float(), freqs)  # (side, hd/4)
    grid = torch.cat([ang[:, None].expand(-1, side, -1), ang[None, :].expand(side, -1, -1)], -1)  # (side, side, hd/2)
    return torch.cat([torch.zeros(1, n, 2), torch.stack([grid.cos(), grid.sin()], -1).flatten(0, 1)])  # (1+T, hd/2, 2)


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


class Attention(nn.Module):
    """Causal self-attention: fused qkv (rows [q; k; v], head h owns rows [h*hd, (h+1)*hd) of each), 2D RoPE, SDPA.
    During generate() it also holds a static KV cache (cache_k, cache_v: (N, H, length, hd), not saved)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.wqkv = cfg.n_head, nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.wo, self.drop = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False), nn.Dropout(cfg.resid_dropout)
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def forward(self, x, rope, pos=None):
        N, L, D = x.shape
        q, k, v = self.wqkv(x).view(N, L, 3, self.n_head, D // self.n_head).unbind(2)  # 3 x (N, L, H, hd)
        q, k, v = (t.transpose(1, 2) for t in (apply_rope(q, rope), apply_rope(k, rope), v))  # (N, H, L, hd)
        if pos is None:  # training / scoring: the whole causal sequence
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # decoding one token at position pos (0-d tensor): write it, attend to every position <= pos
            self.cache_k.index_copy_(2, pos.view(1), k)
            self.cache_v.index_copy_(2, pos.view(1), v)
            mask = (torch.arange(self.cache_k.shape[2], device=x.device) <= pos)[None]  # (1, length): static
            y = F.scaled_dot_product_attention(q, self.cache_k, self.cache_v, attn_mask=mask)
        return self.drop(self.wo(y.transpose(1, 2).reshape(N, L, D)))  # (N, L, D)


class FeedForward(nn.Module):
    """SwiGLU w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, cfg):
        super().__init__()
        hidden = -(-int(2 * 4 * cfg.n_embd / 3) // cfg.multiple_of) * cfg.multiple_of  # rounded up to multiple_of
        self.w1, self.w3 = nn.Linear(cfg.n_embd, hidden, bias=False), nn.Linear(cfg.n_embd, hidden, bias=False)
        self.w2, self.drop = nn.Linear(hidden, cfg.n_embd, bias=False), nn.Dropout(cfg.ffn_dropout)

    def forward(self, x):
        return self.drop(self.w2(recompute(lambda a, b: F.silu(a) * b, self.w1(x), self.w3(x))))


def recompute(fn, *args):
    """fn(*args), pointwise (RMSNorm, SwiGLU gate); with autograd on, only args are kept and fn runs again in the
    backward: ~25% less activation memory in training for a few % more time (BENCHMARKS.md)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.n_embd, cfg.norm_eps), Attention(cfg)
        self.ffn_norm, self.ffn = RMSNorm(cfg.n_embd, cfg.norm_eps), FeedForward(cfg)

    def forward(self, x, rope, pos=None):
        x = x + self.attn(recompute(self.attn_norm, x), rope, pos)
        return x + self.ffn(recompute(self.ffn_norm, x))


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
        self.head_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.head_layers if cfg.head == "ar" else 0))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.GELU()) for _ in range(K * (cfg.head == "mlp")))
        self.norm = RMSNorm(D, cfg.norm_eps)  # shared final norm, after the head
        self.lm_head = nn.ModuleList(nn.Linear(D, V, bias=False) for _ in range(K))  # output k -> sub-token k
        self.register_buffer("rope", build_rope(cfg), persistent=False)  # (1 + T, hd/2, 2), fp32
        self.register_buffer("head_pos", torch.arange(K), persistent=False)  # head cache positions 0..K-1
        for m in self.modules():  # the leaves in the order of self.apply
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for out in self.lm_head:
            nn.init.zeros_(out.weight)  # zero-init outputs (LlamaGen): initial loss is exactly log(V)
        self._compiled_step = None

    def embed(self, codes):
        """Aggregated input embedding of codes (N, K, L) -> (N, L, D)."""
        return self.agg(torch.cat([wte(codes[:, k]) for k, wte in enumerate(self.wte)], -1))  # (N, L, K*D) -> (N, L, D)

    def backbone(self, idx, labels):
        """Backbone output h (B, T, D) before the head and the final norm; h[:, t] predicts image position t."""
        B, K, T = idx.shape
        assert K == self.cfg.n_codebooks and T <= self.cfg.block_size, "idx must be (B, n_codebooks, <= block_size)"
        if self.training and self.cfg.class_dropout > 0:  # CFG training: drop labels to the null id
            drop = torch.rand(B, device=labels.device) < self.cfg.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)
        x = self.tok_drop(torch.cat([self.cls_emb(labels)[:, None], self.embed(idx[:, :, :-1])], 1))  # (B, T, D)
        for block in self.blocks:
            x = block(x, self.rope[:T])
        return x  # (B, T, D)

    def head(self, h, idx):
        """The K normed features (B, T, D) predicting the K sub-tokens. 'ar': the factorized AR head over each
        position's [h_t, e_1(x_1,t), ..], teacher-forced by idx (B, K, T); 'linear' / 'mlp': norm(h_t) for every k."""
        if self.cfg.head != "ar":
            return [self.norm(h)] * self.cfg.n_codebooks
        (B, T, D), K = h.shape, self.cfg.n_codebooks
        x = torch.stack([h] + [self.wte[k](idx[:, k]) for k in range(K - 1)], 2).flatten(0, 1)  # (B*T, K, D)
        for block in self.head_blocks:
            x = block(x, self.rope[:K])
        return self.norm(x).view(B, T, K, D).unbind(2)  # K x (B, T, D)

    def out(self, z, k):
        """Logits of sub-token k from its head feature z (..., D) -> (..., V) fp32."""
        return self.lm_head[k](self.mlps[k](z) if self.cfg.head == "mlp" else z).float()

    def forward(self, idx, labels, targets=None):
        """idx (B, K, T), labels (B,) -> (logits (B, K, T, V) fp32, None); with targets (teacher forcing: idx itself)
        -> (None, CE per sub-token (K,)), one sub-token's logits at a time. idx feeds backbone (shifted) and head."""
        feats = self.head(self.backbone(idx, labels), idx)
        if targets is None:
            return torch.stack([self.out(z, k) for k, z in enumerate(feats)], 1), None
        mlp = self.cfg.head == "mlp"
        return None, torch.stack([LinearCrossEntropy.apply((self.mlps[k](z) if mlp else z).flatten(0, 1),
                                                           self.lm_head[k].weight, targets[:, k].flatten(),
                                                           torch.is_grad_enabled()) for k, z in enumerate(feats)])

    # ---- sampling
    def decode_step(self, x, pos, u, cfg_scale, temperature, top_k, top_p):
        """One image position: the backbone step at pos (x (N, 1, D): the class token at pos 0, else the aggregated
        sub-tokens of position pos-1), then K head steps, each with CFG and sampling. Static shapes: compiles once.
        u (B, K) uniforms. -> sampled tokens (B, K), guided logits (B, K, V) fp32 (before temperature/filters)."""
        for block in self.blocks:
            x = block(x, self.rope[pos.view(1)], pos)  # (N, 1, D)
        tokens, logits = [], []
        for k in range(self.cfg.n_codebooks):
            z = self.wte[k - 1](tokens[-1].repeat(len(x) // len(u)))[:, None] if k and self.cfg.head == "ar" else x
            for block in self.head_blocks:  # 'ar' only; z (N, 1, D)
                z = block(z, self.rope[k:k + 1], self.head_pos[k])
            lk = self.out(self.norm(z)[:, 0], k)  # (N, V)
            if cfg_scale != 1.0:
                c, uncond = lk.chunk(2)  # (B, V) each: the cond half and the null-label half
                lk = uncond + cfg_scale * (c - uncond)
            tokens.append(sample_logits(lk, u[:, k], temperature, top_k, top_p))
            logits.append(lk)
        return torch.stack(tokens, 1), torch.stack(logits, 1)

    @torch.no_grad()
    def generate(self, labels, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, seeds=None, compile=False,
                 return_logits=False):
        """Codes (B, K, T) for labels (B,), eval mode. cfg_scale s != 1: batch + null labels, every sub-token from u + s
        (c - u), then temperature, top-k (0 off, 1 greedy), top-p (1 off). seeds: one int per image (its tokens depend
        only on label and seed). compile: the step. return_logits: also the guided logits (B, K, T, V) fp32."""
        cfg, B, dev, K, T = self.cfg, len(labels), labels.device, self.cfg.n_codebooks, self.cfg.block_size
        assert temperature > 0 and 0 < top_p <= 1 and top_k >= 0, "need temperature > 0, 0 < top_p <= 1, top_k >= 0"
        u = (torch.rand(B, T, K) if seeds is None else torch.stack(
            [torch.rand(T, K, generator=torch.Generator().manual_seed(int(s))) for s in seeds])).to(dev)  # (B, T, K)
        cond = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if cfg_scale != 1.0 else labels  # (N,)
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.norm.weight.dtype
        for blocks, length in ((self.blocks, T), (self.head_blocks, K)):  # static caches for the whole image
            for block in blocks:
                shape = (len(cond), cfg.n_head, length, cfg.n_embd // cfg.n_head)
                block.attn.cache_k, block.attn.cache_v = (torch.zeros(shape, dtype=dtype, device=dev) for _ in range(2))
        if compile and self._compiled_step is None:
            mode = "reduce-overhead" if dev.type == "cuda" else None
            self._compiled_step = torch.compile(self.decode_step, mode=mode, dynamic=False)
        step = self._compiled_step if compile else self.decode_step
        out, all_logits = torch.zeros(B, K, T, dtype=torch.long, device=dev), []
        x = self.cls_emb(cond)[:, None]  # (N, 1, D): position 0 is predicted from the class token
        for t in range(T):
            if compile and dev.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            tokens, logits = step(x, torch.tensor(t, device=dev), u[:, t], cfg_scale, temperature, top_k, top_p)
            out[:, :, t] = tokens
            if return_logits:
                all_logits.append(logits.clone())
            x = self.embed(tokens.repeat(len(cond) // B, 1)[:, :, None])  # (N, 1, D): position t's sub-tokens
        for block in list(self.blocks) + list(self.head_blocks):
            block.attn.cache_k = block.attn.cache_v = None
        return (out, torch.stack(all_logits, 2)) if return_logits else out

    @classmethod
    def from_checkpoint(cls, ckpt):
        """Our checkpoint {'kind': 'far', 'config', 'model'} or its path -> model in eval mode on the CPU; strict."""
        if not isinstance(ckpt, dict):
            ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert ckpt.get("kind") == "far", f"kind={ckpt.get('kind')!r}, not 'far': not a train_far.py checkpoint"
        model = cls(FARConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        return model.eval()


class LinearCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(F.linear(z, W).float(), y), z (N, D), W (V, D), y (N,), walking N in chunks: with grads, dz and
    dW (softmax - onehot) are made on the way, so no (N, V) tensor is kept for the backward. Same FLOPs as the plain
    path."""

    @staticmethod
    def forward(ctx, z, w, y, grads):
        rows = max(1, 2 ** 22 // w.shape[0])  # 4M logits (16 MiB fp32) per chunk
        loss = z.new_zeros((), dtype=torch.float32)
        dz, dw = (torch.zeros_like(z), torch.zeros_like(w)) if grads else (None, None)  # no work for evaluation
        for s in range(0, len(z), rows):
            zc, yc = z[s:s + rows], y[s:s + rows]
            logits = (zc @ w.t()).float()  # (n, V)
            loss -= logits.log_softmax(-1).gather(1, yc[:, None]).sum()
            if grads:
                g = logits.softmax(-1)
                g[torch.arange(len(yc), device=g.device), yc] -= 1.0
                g = g.div_(len(z)).to(zc.dtype)  # dloss/dlogits of the mean
                dz[s:s + rows] = g @ w
                dw += g.t() @ zc
        ctx.save_for_backward(dz, dw)
        return loss / len(z)

    @staticmethod
    def backward(ctx, grad):  # scales the stored gradients in place (no second copy): one backward per forward
        dz, dw = ctx.saved_tensors
        return dz.mul_(grad), dw.mul_(grad), None, None


def sample_logits(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """One token per row of logits (N, V): temperature, top-k, top-p (nucleus), then the inverse CDF at the uniforms
    u (N,) in [0, 1): the first token whose cumulative probability exceeds u. Static shapes (compiles)."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before a token already exceeds top_p (the top token stays)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = logits.softmax(-1).cumsum(-1)  # (N, V)
    return (cdf <= u[:, None] * cdf[:, -1:]).sum(-1).clamp_max(logits.shape[-1] - 1)  # (N,)


def checkpoint_dict(model, **extra):
    """Our checkpoint format (loads with weights_only=True): kind, config as a plain dict, model weights, extras."""
    return {"kind": "far", "config": asdict(model.cfg), "model": model.state_dict(), **extra}


# ---- official FAR state dicts (showlab/FQGAN autoregressive/models/far_{dual,triple}.py)
OFFICIAL_NAMES = [(r"^cls_embedding\.embedding_table\.", "cls_emb."), (r"^aggregation_layer\.", "agg."),
                  (r"^layers\.", "blocks."), (r"^ar_head\.", "head_blocks."), (r"\.attention\.", ".attn."),
                  (r"\.attention_norm\.", ".attn_norm."), (r"\.feed_forward\.", ".ffn.")]  # (official, ours), in order


def official_key(key):
    """Our name for an official key: tok_embeddings_2.weight -> wte.1.weight (official numbering starts at 1),
    layers.0.attention.wo.weight -> blocks.0.attn.wo.weight."""
    key = re.sub(r"^(tok_embeddings|output)_(\d+)\.", lambda m: f"{'wte' if m[1] == 'tok_embeddings' else 'lm_head'}."
                 f"{int(m[2]) - 1}.", key)
    for pattern, ours in OFFICIAL_NAMES:
        key = re.sub(pattern, ours, key)
    return key


def load_official_state_dict(model, sd):
    """Load an official FAR state dict (or a checkpoint dict holding it under 'model') into model, strictly; a key
    we do not know keeps its official name in the error."""
    sd, ours = sd["model"] if isinstance(sd.get("model"), dict) else sd, model.state_dict()
    model.load_state_dict({official_key(k) if official_key(k) in ours else k: v for k, v in sd.items()})


# ---- presets (data, not code): FARConfig(**PRESETS[name], n_codebooks=K, codebook_size=V, block_size=T)
PRESETS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, head_layers=1),  # CPU tests and demos
    "B": dict(n_layer=24, n_embd=1024, n_head=16, head_layers=3),  # FAR-B (LlamaGen GPT-L shapes), ~415M
    "L": dict(n_layer=36, n_embd=1280, n_head=20, head_layers=4),  # FAR-L (LlamaGen GPT-XL shapes), ~898M
}
