"""
What the entry scripts share: flags, the entry point (a user's mistake is one line), device / DDP / precision, atomic
files and checkpoints, the log, training helpers and the per-image seed rule. Nothing runs at import time.
"""
import inspect
import json
import math
import os
import pickle
import re
import sys
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


# ---- flags: every dataclass field is a --field=value flag
def parse_config(cls, argv=None):
    """Build `cls` from --key=value flags: types from the defaults, tuples comma-separated, bools true/false."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        notes = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), flags=re.M))
        show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else v  # noqa
        rows = [f"  --{f.name}={show(f.default)}  {notes.get(f.name, '')}" for f in fields(cls)]
        print("\n".join([(sys.modules["__main__"].__doc__ or "").strip(), "", "flags (--name=value):", *rows]))
        raise SystemExit(0)
    values, names = {}, {f.name: f.default for f in fields(cls)}
    for arg in argv:
        key, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise SystemExit(f"bad argument '{arg}': flags are --name=value (see --help)")
        if key not in names:
            raise SystemExit(f"unknown flag --{key} (see --help for the list)")
        values[key] = convert(text, names[key], key)
    return cls(**values)


def convert(text, default, name):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--{name} takes true or false, not '{text}'")
        return text.lower() in ("true", "1")
    if isinstance(default, tuple):
        return tuple(convert(t, default[0] if default else "", name) for t in text.split(",") if t)
    try:
        return type(default)(text)
    except ValueError:
        raise SystemExit(f"--{name} expects a {type(default).__name__}, got '{text}'") from None


def check(cfg, positive="", unit="", **choices):
    """Flag bounds: numbers finite, >= 0, those in `positive` > 0, those in `unit` <= 1; keywords: a flag's choices."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lo = "> 0" if f.name in positive.split() else ">= 0"
            if not math.isfinite(v) or v < 0 or (lo == "> 0" and v == 0) or (f.name in unit.split() and v > 1):
                raise SystemExit(f"--{f.name}={v}: must be {lo}" + (" and <= 1" if f.name in unit.split() else ""))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name}={getattr(cfg, name)}: choose one of {', '.join(map(str, allowed))}")


def cli(main, cls):
    """Run a script: a mistake a user can fix (bad flag, missing or wrong file, unreadable checkpoint) ends in one line
    on stderr and exit status 1, never a traceback; --debug shows the traceback instead."""
    try:
        main(parse_config(cls, [a for a in sys.argv[1:] if a != "--debug"]))
    except (Exception, SystemExit) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise
        if "--debug" in sys.argv:
            traceback.print_exc()
            sys.exit(1)
        text = " ".join(str(e.code if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}").split())
        print(f"error: {text[:700]}{' ...' if len(text) > 700 else ''} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)


# ---- device, DDP, precision
@dataclass
class Session:
    rank: int
    local_rank: int
    world_size: int
    device: str
    master: bool

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else "cpu"

    def autocast(self):
        return autocast(self.device_type)

    def all_reduce(self, t, group=None):
        if self.world_size > 1:
            dist.all_reduce(t, group=group)
        return t


def autocast(device_type):
    """The precision rule: bf16 autocast on CUDA for training and FAR sampling; fp32 on the CPU (bf16 on CPUs without
    AVX512-BF16 is many times slower). The tokenizer runs in fp32 at inference (extraction, rFID, decoding)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()


@contextmanager
def session(device="auto", all_cores=False):
    """The one place that sets up a process: torchrun group (nccl on CUDA, gloo on CPU); CUDA: TF32; CPU: one thread
    unless OMP_NUM_THREADS is set or all_cores (a job meant to run alone keeps torch's default, all cores). Measured on
    2 cores: 1 thread 39 / 36 img/s idle / one core busy, 2 threads 52 / 17 img/s: more threads collapse under load."""
    if device not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"--device={device}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=cuda but no CUDA device is visible: use --device=cpu")
    cuda = torch.cuda.is_available() and device != "cpu"
    rank, local, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if cuda:
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ and not all_cores:
        torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Session(rank, local, world, f"cuda:{local}" if cuda else "cpu", rank == 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- files: atomic writes, checkpoints, log
def atomic_write(path, write):
    """write(file) into a temp file beside `path`, fsync, rename: a killed write never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by an earlier killed write
        stale.unlink()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save_npz(path, **arrays):
    atomic_write(path, lambda f: np.savez(f, **arrays))


WRITERS = {"fqgan": "train_tokenizer.py", "far": "train_far.py", "teacher": "train_classifier.py --net=teacher",
           "featnet": "train_classifier.py --net=featnet"}


def load_checkpoint(path, kind):
    """A checkpoint of `kind` as a dict, read with the safe loader (weights_only=True); every failure is one line
    that names the file and the fix. An official tokenizer file (no 'kind') passes as kind 'fqgan'."""
    fix = f"pass a checkpoint written by {WRITERS[kind]}"
    if not Path(path).is_file():
        raise SystemExit(f"checkpoint {path} not found: check the path, or create it with `python {WRITERS[kind]}`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SystemExit(f"{path} is not a trusted checkpoint of ours: it holds Python objects beyond tensors and "
                         f"plain values, so the safe loader refused it; {fix}") from None
    except Exception as e:
        raise SystemExit(f"{path} cannot be read ({type(e).__name__}): it is empty, truncated or not a torch file; "
                         f"{fix}") from None
    got = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if got != kind and not (kind == "fqgan" and got is None and isinstance(ckpt, dict)):
        raise SystemExit(f"{path} is {f'a {got!r}' if got else 'not our'} checkpoint, not a {kind!r} one: {fix}")
    return ckpt


def build(cls, ckpt, path, device="cpu"):
    """cls.from_checkpoint(ckpt) with a one-line error when the weights do not fit the config it carries."""
    try:
        return cls.from_checkpoint(ckpt).to(device)
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise SystemExit(f"{path} does not load as a {cls.__name__} ({' '.join(str(e).split())[:300]}): was it "
                         f"written by another version or edited? Pass a checkpoint written by this code") from None


def Logger(out_dir, master=True):
    """log(*msg): print on rank 0, mirrored to out_dir/log.txt (when out_dir is given)."""
    outs = [None] if master else []  # print(file=None) writes to stdout
    if master and out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        outs.append(open(Path(out_dir) / "log.txt", "a"))

    def log(*msg):
        for out in outs:
            print(*msg, file=out, flush=True)
    return log


# ---- training helpers
def get_lr(step, lr, warmup=0, max_steps=0, decay="constant", min_ratio=0.1):
    """Learning rate as a pure function of the step: linear warmup, then constant or cosine to min_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if decay == "cosine" and max_steps > warmup:
        t = min(1.0, (step - warmup) / (max_steps - warmup))
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return lr


def adamw(module, lr, betas, weight_decay, device_type):
    """AdamW, weight decay on >= 2-D tensors only, fused on CUDA; weight_decay 0 = Adam (FQGAN tokenizer; FAR: 0.05)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def rng_states(s):
    """Every rank's CPU (and CUDA) generator state, stacked (world, n) uint8, for a checkpoint; collective."""
    mine = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if s.device_type == "cuda" else [])
    every = [mine] * s.world_size  # filled in place by the gather
    if s.world_size > 1:
        dist.all_gather_object(every, mine)
    return {"rng": [torch.stack(parts) for parts in zip(*every)]}


def resume(ckpt, parts, s, cfg, path, log):
    """Start a run: fresh (ckpt None: seed + rank) or resumed: load_state_dict of each parts[key] from ckpt[key], put
    back this rank's generator states (on another number of processes: reseeded, no longer exact). -> the start step."""
    if not ckpt:
        torch.manual_seed(cfg.seed + s.rank)
        return 0
    for key, obj in parts.items():
        obj.load_state_dict(ckpt[key])
    step, states = ckpt["step"], ckpt["rng"]
    log(f"resumed from {path} at step {step}")
    if step > cfg.max_steps:
        raise SystemExit(f"{path} is at step {step}, beyond --max_steps={cfg.max_steps}: raise --max_steps")
    if states[0].shape[0] != s.world_size:
        log(f"note: checkpoint from {states[0].shape[0]} processes, resumed on {s.world_size}: RNG reseeded")
        torch.manual_seed(cfg.seed + s.rank + step)
        return step
    torch.set_rng_state(states[0][s.rank])
    if s.device_type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1][s.rank])
    return step


def image_seed(seed, i):
    """The seed of image i under --seed=seed in sample.py and eval_fid.py: same label, same image, any batch or GPUs."""
    return seed * 1_000_003 + i


def to_uint8(x):
    """[-1, 1] images (B, 3, H, W) -> uint8 NHWC numpy, with the official rounding 127.5 x + 128."""
    return (127.5 * x.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
