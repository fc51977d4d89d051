"""
Speed and memory of the hot paths, one line each: the median over --repeats timed runs after a warm-up run.

    tokenizer train step  the full objective (MSE, LPIPS, VQ terms, disentanglement, InfoNCE, GAN on) with random
                          stand-ins for the pretrained files; img/s and peak memory
    tokenizer encode / decode  img/s (fp32, as extraction and sampling use it)
    FAR train step        tokens/s; on CUDA also MFU = 6 N + 12 L D T FLOPs per token over --peak_tflops
    FAR sampling          images/s and sub-tokens/s at batch 1, 8, 64 with CFG, and the time to the first image
                          (the first call, compilation included); compiled static decoding on CUDA, eager on the CPU

Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the peak resident set of a fresh process per line
(so it includes the weights and the Python/torch baseline, ~0.4 GiB).

    python bench.py                                   # tiny preset, CPU, < 2 min
    python bench.py --preset=paper --device=cuda      # FQGAN-Dual (256 px) and FAR-B on Dual codes
    python bench.py --sweep=8,16,32,64 --repeats=2    # peak memory of the train steps against the batch size
    git show <old commit>:far.py > /tmp/far_old.py && python bench.py --baseline_far=/tmp/far_old.py
                                                      # FAR sampling of another far.py on the same weights, same run
"""
import importlib.util
import multiprocessing as mp
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import far as far_module
import train_tokenizer as tt
from common import adamw, check, cli, session
from fqgan import FQGAN, config_from_preset
from pretrained import lpips_vgg, teacher

PRESETS = {  # tokenizer preset, its batch, FAR preset, FAR batch
    "micro": dict(tok="tiny", tok_over=dict(codebook_size=64), tok_batch=4, far="tiny", far_batch=4, batches=(1, 2)),
    "tiny": dict(tok="tiny", tok_over={}, tok_batch=16, far="tiny", far_batch=32, batches=(1, 8, 64)),
    "paper": dict(tok="dual16", tok_over={}, tok_batch=32, far="B", far_batch=32, batches=(1, 8, 64)),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense bf16


@dataclass
class BenchConfig:
    preset: str = "tiny"            # micro (tests) | tiny (CPU) | paper (dual16 + FAR-B, for a GPU)
    device: str = "auto"            # 'auto' (cuda if available) | 'cpu' | 'cuda'
    repeats: int = 5                # timed runs per line (median reported), after one warm-up run
    compile: bool = True            # torch.compile the training steps and the decode step (CUDA only)
    peak_tflops: float = 0          # bf16 peak of the device for MFU; 0 = from PEAK_TFLOPS by device name
    baseline_far: str = ""          # another far.py whose generate() is timed on the same weights (side by side)
    only: str = ""                  # comma-separated line names to run (default: all)
    sweep: str = ""                 # comma-separated batch sizes: the two train-step lines at each (memory vs batch)

    def __post_init__(self):
        check(self, positive="repeats", preset=tuple(PRESETS))


def timed(fn, repeats, cuda):
    """(median seconds of `repeats` calls after one warm-up call, seconds of the warm-up call)."""
    def once():
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t
    first = once()
    return statistics.median(once() for _ in range(repeats)), first


def models(p, dev):
    torch.manual_seed(0)
    tok = FQGAN(config_from_preset(p["tok"], **p["tok_over"])).to(dev)
    c = tok.cfg
    far = far_module.FAR(far_module.FARConfig(**far_module.PRESETS[p["far"]], n_codebooks=c.n_codebooks,
                                              codebook_size=c.codebook_size, block_size=tok.grid ** 2)).to(dev)
    for out in far.lm_head:  # random outputs: sampling sees spread-out logits, not uniform ones
        torch.nn.init.normal_(out.weight, std=0.02)
    return tok, far


def bench_tokenizer_train(cfg, p, s):
    tok, _ = models(p, s.device)
    t_cfg = tt.TrainConfig(disc_start=0, lpips="tiny", device=s.device)
    teachers = {"1": teacher("clip_tiny").to(s.device)}
    heads = torch.nn.ModuleDict({"1": tt.FeatPredHead(tok.cfg.codebook_dim, 64, tok.grid ** 2)})
    gen, disc = tt.Generator(tok, heads, "full").to(s.device), tt.PatchGAN().to(s.device)
    opt, opt_d = adamw(gen, 2e-4, (0.9, 0.95), 0, s.device_type), adamw(disc, 2e-4, (0.9, 0.95), 0, s.device_type)
    fast = cfg.compile and s.device_type == "cuda"
    gen_c, disc_c = (torch.compile(gen), torch.compile(disc)) if fast else (gen, disc)
    x = torch.rand(p["tok_batch"], 3, tok.cfg.image_size, tok.cfg.image_size, device=s.device) * 2 - 1
    lpips = lpips_vgg("tiny").to(s.device)
    step = lambda: tt.train_step(t_cfg, s, 0, [(x, None)], (gen, gen_c, opt), (disc, disc_c, disc_c, opt_d),  # noqa
                                 teachers, lpips)
    t, _ = timed(step, cfg.repeats, s.device_type == "cuda")
    return f"tokenizer train step ({p['tok']}, batch {len(x)}): {len(x) / t:.1f} img/s"


@torch.no_grad()
def bench_tokenizer_codec(cfg, p, s):
    tok, _ = models(p, s.device)
    tok.eval()
    x = torch.rand(p["tok_batch"], 3, tok.cfg.image_size, tok.cfg.image_size, device=s.device) * 2 - 1
    idx = tok.encode(x)
    te, _ = timed(lambda: tok.encode(x), cfg.repeats, s.device_type == "cuda")
    td, _ = timed(lambda: tok.decode_indices(idx), cfg.repeats, s.device_type == "cuda")
    return f"tokenizer encode / decode ({p['tok']}, batch {len(x)}): {len(x) / te:.1f} / {len(x) / td:.1f} img/s"


def bench_far_train(cfg, p, s):
    _, far = models(p, s.device)
    far.train()
    c, B = far.cfg, p["far_batch"]
    opt = adamw(far, 1e-4, (0.9, 0.95), 0.05, s.device_type)
    model = torch.compile(far) if cfg.compile and s.device_type == "cuda" else far
    idx = torch.randint(c.codebook_size, (B, c.n_codebooks, c.block_size), device=s.device)
    labels = torch.randint(c.num_classes, (B,), device=s.device)

    def step():
        with s.autocast():
            loss = model(idx, labels, targets=idx)[1].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t, _ = timed(step, cfg.repeats, s.device_type == "cuda")
    tokens = B * c.block_size / t
    line = f"FAR train step ({p['far']}, batch {B}): {tokens:,.0f} tokens/s"
    if s.device_type == "cuda":
        n = sum(q.numel() for name, q in far.named_parameters() if "wte" not in name and "cls_emb" not in name)
        flops = 6 * n + 12 * (c.n_layer + c.head_layers) * c.n_embd * c.block_size  # per token, forward + backward
        name = torch.cuda.get_device_name()
        peak = cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0)
        line += f" | MFU {100 * tokens * flops / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s" if peak else ""
    return line


@torch.no_grad()
def bench_far_sample(cfg, p, s, module=None):
    _, far = models(p, s.device)
    far.eval()
    compile_ = cfg.compile and s.device_type == "cuda"
    if module is not None:  # another far.py: same weights in its FAR class
        c = {k: v for k, v in vars(far.cfg).items() if k in module.FARConfig.__dataclass_fields__}
        old = module.FAR(module.FARConfig(**c)).to(s.device).eval()
        old.load_state_dict(far.state_dict(), strict=False)
    lines = []
    for B in p["batches"]:
        labels = torch.arange(B, device=s.device) % far.cfg.num_classes
        if module is None:
            fn = lambda: far.generate(labels, 2.0, top_k=0, seeds=list(range(B)), compile=compile_)  # noqa: E731
        else:
            fn = lambda: old.generate(labels, cfg_scale=2.0, generator=torch.Generator(s.device).manual_seed(0))  # noqa
        with s.autocast():
            t, first = timed(fn, max(1, cfg.repeats // 2), s.device_type == "cuda")
        K, T = far.cfg.n_codebooks, far.cfg.block_size
        lines.append(f"FAR sampling{' (' + cfg.baseline_far + ')' if module else ''} ({p['far']}, batch {B}, cfg 2): "
                     f"{B / t:.2f} images/s, {B * K * T / t:,.0f} sub-tokens/s, first call {first:.2f} s")
    return "\n".join(lines)


def run_line(args):
    """One benchmark line in a fresh process (its peak memory is its own); -> the printed line."""
    cfg, name, batch = args
    with session(cfg.device) as s:
        p = dict(PRESETS[cfg.preset], **(dict(tok_batch=batch, far_batch=batch) if batch else {}))
        module = None
        if name == "baseline":
            src = open(cfg.baseline_far).read().replace("from fqgan import load_strict, torch_load", "")
            spec = importlib.util.spec_from_loader("far_baseline", loader=None)
            module = importlib.util.module_from_spec(spec)
            sys.modules["far_baseline"] = module
            exec(compile(src, cfg.baseline_far, "exec"), module.__dict__)
        fn = {"tok_train": bench_tokenizer_train, "tok_codec": bench_tokenizer_codec, "far_train": bench_far_train,
              "far_sample": bench_far_sample, "baseline": lambda c, p, s: bench_far_sample(c, p, s, module)}[name]
        if s.device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        line = fn(cfg, p, s)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if s.device_type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        return f"{line} | peak {'CUDA' if s.device_type == 'cuda' else 'RSS'} {peak:.2f} GiB"


def main(cfg):
    names = ["tok_train", "tok_codec", "far_train", "far_sample"] + (["baseline"] if cfg.baseline_far else [])
    jobs = [(cfg, n, 0) for n in names if not cfg.only or n in cfg.only.split(",")]
    if cfg.sweep:
        jobs = [(cfg, n, int(b)) for b in cfg.sweep.split(",") for n in ("tok_train", "far_train")]
    print(f"bench {cfg.preset} | torch {torch.__version__} | device "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.device != 'cpu' else 'cpu'}")
    lines = []
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for line in pool.imap(run_line, jobs):
            print(line, flush=True)
            lines.append(line)
    return lines


if __name__ == "__main__":
    cli(main, BenchConfig)
