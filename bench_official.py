"""
Training steps side by side with the official code (showlab/FQGAN; not part of this project, whose license it does not
share: point --official at a checkout). Same config, same weights (ours loaded from the official state dict through our
loaders), same inputs, on the CPU, one torch thread, every measurement in a fresh process:

    far        FAR-Dual training step: width 512, 8 + 3 blocks, 8 heads, V 16384, T 256, dropout 0.1 as the recipe
    tokenizer  FQGAN-Dual model step at 256 px: MSE + codebook / commitment / entropy (0.03) + disentanglement (0.1)
               losses; no LPIPS, GAN or teacher (the same networks in both)
    quantizer  one l2-normalised VQ layer (V 16384, D 8, 16x16 grid): forward with its losses, backward

A step is forward, backward and AdamW. Printed per line: the loss of ours and of the official code (FAR: eval mode,
without dropout; the others: the first training step), the time of one step, and its peak memory: the peak resident
set during one step after a warm-up step, minus the resident set just before it (activations, gradients, temporaries),
with glibc told to return freed memory. Linux only (/proc).

    git clone https://github.com/showlab/FQGAN /tmp/FQGAN && pip install einops
    python bench_official.py --official=/tmp/FQGAN                      # about 10 minutes on 2 cores
"""
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from common import cli
from far import FAR, FARConfig
from far import load_official_state_dict as load_far
from fqgan import FQGAN, FQGANConfig, Quantizer, config_from_official
from fqgan import load_official_state_dict as load_tokenizer

FAR_ARGS = dict(dim=512, n_layer=8, n_head=8, ar_n_layer=3, vocab_size=16384, block_size=256, num_classes=1000)


@dataclass
class Config:
    official: str = ""                      # path of a showlab/FQGAN checkout (required)
    what: str = "far,tokenizer,quantizer"   # comparisons to run, comma-separated
    far_batch: str = "2,4,8"                # FAR sequences per step, one line each
    tokenizer_batch: str = "2"              # 256 px images per step
    quantizer_batch: str = "4,8,16"         # 16x16 latent grids per step
    run: str = ""                           # internal: 'kind,impl,batch', one measurement in this process


def build_far(B, g):
    from autoregressive.models.far_dual import ModelArgs, Transformer
    off = Transformer(ModelArgs(**FAR_ARGS))
    for out in (off.output_1, off.output_2):  # random outputs: zero-initialised ones make every loss log(V)
        torch.nn.init.normal_(out.weight, std=0.02)
    a = FAR_ARGS
    ours = FAR(FARConfig(n_codebooks=2, codebook_size=a["vocab_size"], block_size=a["block_size"],
                         n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["dim"], head_layers=a["ar_n_layer"],
                         num_classes=a["num_classes"]))
    load_far(ours, off.state_dict())
    idx = torch.randint(a["vocab_size"], (B, 2, a["block_size"]), generator=g)  # (B, K, T)
    y, i1, i2 = torch.randint(a["num_classes"], (B,), generator=g), idx[:, 0].contiguous(), idx[:, 1].contiguous()
    official_loss = lambda: off(i1, i2, y, targets_1=i1, targets_2=i2)[2]  # noqa: E731  (logits, None, loss)
    return (ours, lambda: ours(idx, y, targets=idx)[1].mean()), (off, official_loss)


def build_tokenizer(B, g):
    from tokenizer.vq_model_dual import ModelArgs, VQModel
    off = VQModel(ModelArgs(entropy_loss_ratio=0.03, with_disentanglement=True, disentanglement_ratio=0.1))
    ours = FQGAN(replace(config_from_official(off.state_dict()), entropy_ratio=0.03, disentangle_weight=0.1))
    load_tokenizer(ours, off.state_dict())
    x = torch.rand(B, 3, 256, 256, generator=g) * 2 - 1

    def ours_loss():
        rec, aux = ours(x)
        return F.mse_loss(rec, x) + aux["vq_total"]

    def official_loss():
        dec, (v1, c1, e1, _), (v2, c2, e2, _), dis, _ = off(x)
        return F.mse_loss(dec, x) + v1 + c1 + e1 + v2 + c2 + e2 + dis
    return (ours, ours_loss), (off, official_loss)


def build_quantizer(B, g):
    from tokenizer.vq_model_dual import VectorQuantizer
    off, ours = VectorQuantizer(16384, 8, 0.25, 0.03, True, True), Quantizer(FQGANConfig(codebook_size=16384))
    with torch.no_grad():
        ours.embedding.weight.copy_(off.embedding.weight)
    z = torch.randn(B, 8, 16, 16, generator=g, requires_grad=True)  # (B, D, h, w)

    def ours_loss():
        q, stats = ours(z, with_losses=True)
        return stats["vq_loss"] + stats["commit_loss"] + stats["entropy_loss"] + q.square().mean()

    def official_loss():
        q, (vq, commit, entropy, _), _ = off(z)
        return vq + commit + entropy + q.square().mean()
    return (ours, ours_loss), (off, official_loss)


def measure(cfg, kind, impl, B):
    """One side of one comparison in this process -> dict(loss, step_s, peak_mib)."""
    torch.set_num_threads(1)
    sys.path.insert(0, cfg.official)
    torch.manual_seed(0)
    pair = {"far": build_far, "tokenizer": build_tokenizer, "quantizer": build_quantizer}[kind](
        B, torch.Generator().manual_seed(1))
    model, loss_fn = pair[impl == "official"]
    del pair
    for m in model.modules():  # the official usage buffer is a Parameter: .cuda() detaches it there, .cpu() does not
        if isinstance(getattr(m, "codebook_used", None), torch.nn.Parameter):
            m.codebook_used.requires_grad_(False)
    if kind == "far":  # eval mode (no dropout): the two losses must agree
        model.eval()
        with torch.no_grad():
            first_loss = loss_fn().item()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def step():
        value = loss_fn()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value.item()
    loss = step()  # warm-up: AdamW states exist from here on
    gc.collect()
    before = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident set
    t = time.perf_counter()
    step()
    seconds = time.perf_counter() - t
    return dict(loss=first_loss if kind == "far" else loss, step_s=seconds, peak_mib=rss("VmHWM") - before)


def rss(key):
    """VmRSS (resident set) or VmHWM (its peak) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def main(cfg):
    if cfg.run:
        kind, impl, B = cfg.run.split(",")
        print(json.dumps(measure(cfg, kind, impl, int(B))))
        return
    if set(cfg.what.split(",")) - {"far", "tokenizer", "quantizer"}:
        raise SystemExit(f"--what={cfg.what}: choose among far, tokenizer, quantizer (comma-separated)")
    if not os.path.isdir(os.path.join(cfg.official, "autoregressive")) or not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit(f"--official={cfg.official!r}: pass a showlab/FQGAN checkout (git clone "
                         "https://github.com/showlab/FQGAN); needs Linux (/proc) and einops")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    print(f"bench_official | torch {torch.__version__} | cpu, 1 thread | ours / official")
    for kind in cfg.what.split(","):
        for B in getattr(cfg, f"{kind}_batch").split(","):
            r = {}
            for impl in ("ours", "official"):
                args = [sys.executable, __file__, f"--official={cfg.official}", f"--run={kind},{impl},{B}"]
                out = subprocess.run(args, capture_output=True, text=True, env=env)
                if out.returncode:
                    raise SystemExit(f"{kind} ({impl}) failed: {out.stderr.strip().splitlines()[-1]}")
                r[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            o, f = r["ours"], r["official"]
            print(f"{kind} step, batch {B}: loss {o['loss']:.6f} / {f['loss']:.6f} | time {o['step_s']:.2f} / "
                  f"{f['step_s']:.2f} s ({o['step_s'] / f['step_s']:.2f}x) | peak {o['peak_mib']:.0f} / "
                  f"{f['peak_mib']:.0f} MiB ({o['peak_mib'] / f['peak_mib']:.2f}x)", flush=True)


if __name__ == "__main__":
    cli(main, Config)
