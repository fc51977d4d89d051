"""
The paper's ablations at laptop scale (Fashion-MNIST, 32 px): one command, one table, one plot.

  tokenizer rows (paper Table 3, plus the VQ-KD and Cluster tokenizers of Wang et al., arXiv 2411.04406), all with
  the same number of tokenizer steps of the same batch: held-out PSNR, rFID-FMNIST, usage / perplexity / linear-probe
  accuracy per sub-codebook, and a tiny FAR trained on each tokenizer's codes: val CE per sub-token, gFID-FMNIST of
  samples at cfg 2 and their class accuracy;
  head rows (paper Table 4): the factorized AR head, K linear and K MLP classifiers on the codes of the best two-
  codebook tokenizer row (lowest gFID-FMNIST), each scored at two top-k values.

Every (row, seed) is a job that writes rows/<row>_s<seed>.json when it finishes: a finished job is never recomputed,
so an interrupted run continues where it stopped. Jobs run in --workers processes of one thread each; the log says how
many are done and the ETA. FID-FMNIST uses the evaluation CNN (train_classifier.py --net=featnet): a domain metric,
not FID. The spread reported with each mean is half the range over the seeds (max - min) / 2.

    python train_classifier.py && python train_classifier.py --net=featnet    # the teacher and the evaluation CNN
    python ablate.py                          # the full table -> out/ablate/{results.md, results.json, ablation.png}
    python ablate.py --quick                  # the whole pipeline on toy budgets (minutes; numbers meaningless)
    python ablate.py --probe=out/tokenizer/ckpt.pt   # linear probe + codebook picture of one tokenizer
"""
import contextlib
import json
import multiprocessing as mp
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import eval_fid
import train_classifier
import train_far
import train_tokenizer
from common import check, cli, load_checkpoint, save_json
from data import FASHION_CLASSES, make_dataset
from fqgan import FQGAN


@dataclass
class AblateConfig:
    out_dir: str = "out/ablate"     # rows/*.json, runs/<row>_s<seed>/ (checkpoints, logs), results.md/.json, .png
    seeds: tuple = (0, 1)           # every row is run once per seed
    workers: int = 2                # parallel jobs (processes of one thread each)
    quick: bool = False             # toy budgets for every value below (a smoke test of the whole pipeline)
    codebook_size: int = 256        # V, entries per sub-codebook (K=1 rows: V or 2V)
    tokenizer_steps: int = 600      # optimizer steps of batch 16 per tokenizer row (VQ-KD: half per stage)
    far_steps: int = 1500           # FAR steps of batch 32 per row (tiny preset, lr 1e-3 cosine)
    far_train_images: int = 0       # Fashion-MNIST train images encoded for FAR (0 = all 60k)
    eval_images: int = 2000         # test images for PSNR / rFID-FMNIST / the probe's test set
    probe_train: int = 5000         # training images of the linear probe
    samples: int = 1000             # FAR samples per row for gFID-FMNIST and class accuracy (cfg 2, labels random)
    top_k: tuple = (0, 64)          # head rows: top-k values of the sampling (0 = off)
    teacher: str = "out/teacher/ckpt.pt"  # the IU teacher (train_classifier.py --net=teacher)
    featnet: str = "out/featnet/ckpt.pt"  # the evaluation CNN (train_classifier.py --net=featnet)
    probe: str = ""                 # only probe this tokenizer checkpoint (linear probe + codebook picture) and stop

    def __post_init__(self):
        check(self, positive="workers codebook_size tokenizer_steps far_steps eval_images probe_train samples")


QUICK = dict(codebook_size=32, tokenizer_steps=6, far_steps=6, far_train_images=256, eval_images=40, probe_train=100,
             samples=20, top_k=(0, 8))


def tokenizer_rows(cfg):
    """Row name -> train_tokenizer.py stages (flag dicts), all with the same total number of steps."""
    V, T, tp = cfg.codebook_size, cfg.tokenizer_steps, cfg.teacher
    one, off = f"n_codebooks=1;codebook_size={V}", f"codebook_size={V};disentangle_weight=0"
    return {
        "VQ 1xV": [dict(model_overrides=one, teachers=("none",))],
        "VQ 1x2V": [dict(model_overrides=f"n_codebooks=1;codebook_size={2 * V}", teachers=("none",))],
        "FQ 2xV": [dict(model_overrides=off, teachers=("none", "none"))],
        "FQ 2xV +dis": [dict(model_overrides=f"codebook_size={V}", teachers=("none", "none"))],
        "FQ 2xV +rep": [dict(model_overrides=off, teachers=("none", "fmnist_vit"), teacher_paths=("auto", tp))],
        "FQ 2xV +dis+rep": [dict(model_overrides=f"codebook_size={V}", teachers=("none", "fmnist_vit"),
                                 teacher_paths=("auto", tp))],
        "VQ-KD 1xV": [dict(stage="features", max_steps=T // 2, model_overrides=one, teachers=("fmnist_vit",),
                           teacher_paths=(tp,), rep_loss="cosine", rep_layers=1),
                      dict(stage="decoder", max_steps=T - T // 2, model_overrides=one, init="previous")],
        "Cluster 1xV": [dict(stage="decoder", init="cluster", model_overrides=f"codebook_size={V}",
                             teachers=("fmnist_vit",), teacher_paths=(tp,), kmeans_images=5000)],
    }


HEADS = ("ar", "linear", "mlp")


def slug(name):
    return name.replace(" ", "_").replace("+", "").replace("-", "")


# ---- probe: what the codes of each sub-codebook know about the class
def linear_probe(xtr, ytr, xte, yte, l2=1e-3, iters=100):
    """Test accuracy of a multinomial logistic regression (standardised features, L2, full-batch L-BFGS)."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(xtr.shape[1], int(ytr.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + l2 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return ((xte @ w + b).argmax(1) == yte).double().mean().item()


@torch.no_grad()
def probe(tok_path, n_train, n_test, picture=None, data="fashion-mnist"):
    """Linear-probe test accuracy per sub-codebook: per image, its code vectors of that sub-codebook (T x D,
    flattened) -> logistic regression trained on n_train training images, scored on n_test test images. Optionally
    the codebook picture. -> list of K accuracies."""
    tok = FQGAN.from_checkpoint(load_checkpoint(tok_path, "fqgan"))

    def codes(split, limit):  # -> indices (N, K, T), labels (N,) of an evenly spaced subset of the split
        ds = make_dataset(data, tok.cfg.image_size, split)
        pick = np.linspace(0, len(ds) - 1, min(limit, len(ds))).round().astype(int)
        x, y = torch.stack([ds[int(i)][0] for i in pick]), torch.tensor([ds[int(i)][1] for i in pick])
        return torch.cat([tok.encode(c).flatten(2) for c in x.split(256)]), y

    (itr, ytr), (ite, yte) = codes("train", n_train), codes("test", n_test)
    vectors = [q.codebook() for q in tok.quantizers]  # K x (V, D)
    with torch.enable_grad():
        acc = [linear_probe(v[itr[:, k]].flatten(1), ytr, v[ite[:, k]].flatten(1), yte) for k, v in enumerate(vectors)]
    if picture:
        codebook_picture(vectors, itr, ytr, picture)
    return acc


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def codebook_picture(vectors, indices, labels, path, side=320):
    """PNG with one panel per sub-codebook: a PCA of its code vectors, each dot coloured by the most frequent class
    among the images using that code (grey: unused), and a legend of the classes (the seed paper's codebook figure)."""
    img = Image.new("RGB", (side * len(vectors), side + 40), "white")
    draw = ImageDraw.Draw(img)
    for k, e in enumerate(vectors):
        votes = torch.zeros(len(e), int(labels.max()) + 1).index_put_(
            (indices[:, k].flatten(), labels[:, None].expand_as(indices[:, k]).flatten()), torch.ones(1), True)
        xy = (e - e.mean(0)) @ torch.linalg.svd(e - e.mean(0), full_matrices=False)[2][:2].T  # (V, 2) PCA
        xy = (xy - xy.min(0).values) / (xy.max(0).values - xy.min(0).values + 1e-8) * (side - 20) + 10
        for (x, y), v in sorted(zip(xy.tolist(), votes), key=lambda p: p[1].sum().item()):  # used codes on top
            color = PALETTE[int(v.argmax()) % 10] if v.sum() > 0 else (215, 215, 215)
            draw.ellipse((k * side + x - 2, y - 2, k * side + x + 2, y + 2), fill=color)
        draw.text((k * side + 8, 4), f"sub-codebook {k}", fill="black")
    for c, name in enumerate(FASHION_CLASSES[:int(labels.max()) + 1]):
        draw.text((8 + c * (side * len(vectors) - 16) // 10, side + 14), name, fill=PALETTE[c % 10])
    img.save(path)


# ---- jobs (each runs in a worker process, its output in its run folder's job.log)
def far_and_samples(cfg, tok_path, run, seed, top_k, head="ar", codes_dir=""):
    """A tiny FAR on the tokenizer's codes (reused when run/far.json says it is done), then gFID-FMNIST and the class
    accuracy of its samples at each top-k (each reused when its JSON exists)."""
    if not (run / "far.json").exists():
        far = train_far.main(train_far.TrainConfig(
            tokenizer=str(tok_path), out_dir=str(run), head=head, max_steps=cfg.far_steps, seed=seed, device="cpu",
            train_images=cfg.far_train_images, codes_dir=codes_dir, val_images=min(1000, cfg.eval_images),
            grid_per_class=1, log_interval=max(1, cfg.far_steps // 5), eval_interval=cfg.far_steps,
            ckpt_interval=cfg.far_steps))
        save_json(run / "far.json", {"val_ce": far["val_ce"]})
    out = json.loads((run / "far.json").read_text())
    for k in top_k:
        path = run / f"gfid_k{k}.json"
        if not path.exists():
            eval_fid.main(eval_fid.EvalConfig(
                mode="gfid", ckpt=str(run / "ckpt.pt"), net="fmnist", net_path=cfg.featnet, ref=str(ref_path(cfg)),
                num_samples=cfg.samples, cfg_scale=2.0, top_k=k, seed=seed, device="cpu", out=str(path)))
        g = json.loads(path.read_text())
        out[f"k{k}"] = {"fid_fmnist": g["fid_fmnist"], "class_acc": g["class_acc"]}
    return out


def tokenizer_job(cfg, name, seed):
    """Train one tokenizer row (its stages), score it, train a tiny FAR on its codes and score the samples."""
    run = Path(cfg.out_dir) / "runs" / f"{slug(name)}_s{seed}"
    base = dict(data="fashion-mnist", device="cpu", seed=seed, batch_size=16, max_steps=cfg.tokenizer_steps,
                log_interval=max(1, cfg.tokenizer_steps // 5), eval_interval=10 ** 9, eval_images=256,
                ckpt_interval=10 ** 9)
    tok = ""
    for i, stage in enumerate(tokenizer_rows(cfg)[name]):
        stage = dict(stage, init=tok) if stage.get("init") == "previous" else stage
        train_tokenizer.main(train_tokenizer.TrainConfig(**{**base, **stage, "out_dir": str(run / f"stage{i}")}))
        tok = str(run / f"stage{i}" / "ckpt.pt")
    r = eval_fid.main(eval_fid.EvalConfig(mode="rfid", ckpt=tok, net="fmnist", net_path=cfg.featnet,
                                          max_images=cfg.eval_images, device="cpu", out=str(run / "rfid.json")))
    return dict(tokenizer=tok, psnr=r["psnr"], rfid_fmnist=r["rfid_fmnist"], usage=r["usage"],
                perplexity=r["perplexity"], **far_and_samples(cfg, tok, run / "far", seed, (0,)),
                probe_acc=probe(tok, cfg.probe_train, cfg.eval_images, run / "codebook.png"))


def head_job(cfg, name, seed, best):
    """A FAR head on the codes of the best tokenizer row (same seed); the 'ar' head is that row's own FAR."""
    row = Path(cfg.out_dir) / "runs" / f"{slug(best)}_s{seed}"
    tok = json.loads((Path(cfg.out_dir) / "rows" / f"{slug(best)}_s{seed}.json").read_text())["tokenizer"]
    run = row / ("far" if name == "ar" else f"far_{name}")
    return far_and_samples(cfg, tok, run, seed, cfg.top_k, head=name, codes_dir=str(row / "far" / "codes"))


def run_job(job):
    """Worker: one (kind, name, seed) job, its prints in its own log; writes and returns rows/<job>.json."""
    cfg, kind, name, seed, best = job
    out = Path(cfg.out_dir) / "rows" / f"{slug(name if kind == 'row' else 'head ' + name)}_s{seed}.json"
    log = Path(cfg.out_dir) / "runs" / "logs" / f"{out.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        res = tokenizer_job(cfg, name, seed) if kind == "row" else head_job(cfg, name, seed, best)
    save_json(out, dict(res, row=name, kind=kind, seed=seed, seconds=round(time.time() - t0, 1)))
    return out


# ---- the runner
def ref_path(cfg):
    return Path(cfg.out_dir) / "fmnist_train_stats.npz"


def prerequisites(cfg, log):
    """The teacher, the evaluation CNN (trained on toy budgets under --quick) and the reference statistics."""
    for net, path in (("teacher", cfg.teacher), ("featnet", cfg.featnet)):
        if not Path(path).exists():
            if not cfg.quick:
                raise SystemExit(f"{path} not found: create it with `python train_classifier.py --net={net}`")
            train_classifier.main(train_classifier.TrainConfig(net=net, epochs=0.02, out=path, device="cpu"))
    if not ref_path(cfg).exists():
        log("reference statistics of the Fashion-MNIST train split (evaluation CNN features)")
        eval_fid.main(eval_fid.EvalConfig(mode="stats", net="fmnist", net_path=cfg.featnet, split="train",
                                          image_size=32, max_images=2000 if cfg.quick else 0, out=str(ref_path(cfg)),
                                          device="cpu"))


def run_all(cfg, jobs, log, pool):
    """Run the jobs that have no rows/*.json yet, logging progress and an ETA; -> all their results."""
    rows = Path(cfg.out_dir) / "rows"
    todo = [j for j in jobs if not (rows / f"{slug(j[2] if j[1] == 'row' else 'head ' + j[2])}_s{j[3]}.json").exists()]
    log(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already done (skipped), {len(todo)} to run")
    t0 = time.time()
    for i, path in enumerate(pool.imap_unordered(run_job, todo), 1):
        eta = (time.time() - t0) / i * (len(todo) - i)
        log(f"done {path.stem} | {i}/{len(todo)} | {(time.time() - t0) / 60:.1f} min | ETA {eta / 60:.1f} min")
    return [json.loads((rows / f"{slug(j[2] if j[1] == 'row' else 'head ' + j[2])}_s{j[3]}.json").read_text())
            for j in jobs]


def main(cfg):
    if cfg.probe:
        picture = Path(cfg.probe).with_suffix(".codebook.png")
        acc = probe(cfg.probe, cfg.probe_train, cfg.eval_images, picture)
        print(f"linear probe test accuracy per sub-codebook: {[round(a, 4) for a in acc]} | picture {picture}")
        return {"probe_acc": acc, "picture": str(picture)}
    cfg = replace(cfg, **QUICK) if cfg.quick else cfg
    torch.set_num_threads(1)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    logfile = open(Path(cfg.out_dir) / "log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()
    t0 = time.time()
    log(f"ablation: {cfg}")
    prerequisites(cfg, log)
    names = list(tokenizer_rows(cfg))
    with mp.get_context("spawn").Pool(cfg.workers) as pool:
        rows = run_all(cfg, [(cfg, "row", n, s, None) for n in names for s in cfg.seeds], log, pool)
        two = [n for n in names if n.startswith("FQ")]
        best = min(two, key=lambda n: np.mean([r["k0"]["fid_fmnist"] for r in rows if r["row"] == n]))
        log(f"head rows on the codes of '{best}' (the two-codebook row with the lowest mean gFID-FMNIST)")
        heads = run_all(cfg, [(cfg, "head", h, s, best) for h in HEADS for s in cfg.seeds], log, pool)
    minutes = (time.time() - t0) / 60
    results = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "best": best, "rows": rows,
               "heads": heads, "minutes_this_run": round(minutes, 1)}
    save_json(Path(cfg.out_dir) / "results.json", results)
    (Path(cfg.out_dir) / "results.md").write_text(table(cfg, rows, heads, best, names))
    plot(rows, names, Path(cfg.out_dir) / "ablation.png")
    log(f"wrote {cfg.out_dir}/results.md, results.json, ablation.png | this run {minutes:.1f} min")
    return results


# ---- outputs
def stat(values):
    """'mean ± spread' with spread = (max - min) / 2 over the seeds; lists are reported element-wise."""
    v = np.asarray(values, dtype=np.float64)
    mean, spread = v.mean(0), (v.max(0) - v.min(0)) / 2
    return " / ".join(f"{m:.3g} ± {s:.2g}" for m, s in zip(np.atleast_1d(mean), np.atleast_1d(spread)))


def table(cfg, rows, heads, best, names):
    """The Markdown report: the tokenizer table, the head table, the settings."""
    cols = [("PSNR", lambda r: r["psnr"]), ("rFID-FMNIST", lambda r: r["rfid_fmnist"]),
            ("usage per sub-codebook", lambda r: r["usage"]), ("perplexity", lambda r: r["perplexity"]),
            ("linear probe acc", lambda r: r["probe_acc"]), ("FAR val CE per sub-token", lambda r: r["val_ce"]),
            ("gFID-FMNIST (cfg 2)", lambda r: r["k0"]["fid_fmnist"]), ("class acc", lambda r: r["k0"]["class_acc"])]
    lines = ["| tokenizer | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in names:
        rs = [r for r in rows if r["row"] == n]
        lines.append(f"| {n} | " + " | ".join(stat([f(r) for r in rs]) for _, f in cols) + " |")
    ks = cfg.top_k
    lines += ["", f"FAR heads on the codes of '{best}':", "",
              "| head | val CE per sub-token | "
              + " | ".join(f"gFID-FMNIST top-k {k or 'off'} | class acc top-k {k or 'off'}" for k in ks) + " |",
              "|---" * (2 + 2 * len(ks)) + "|"]
    for h in HEADS:
        hs = [r for r in heads if r["row"] == h]
        cells = [stat([r["val_ce"] for r in hs])] + [stat([r[f"k{k}"][m] for r in hs]) for k in ks
                                                     for m in ("fid_fmnist", "class_acc")]
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    lines += ["", f"mean ± (max - min) / 2 over seeds {list(cfg.seeds)}; V = {cfg.codebook_size}; "
              f"{cfg.tokenizer_steps} tokenizer steps of batch 16, {cfg.far_steps} FAR steps of batch 32; "
              f"rFID-FMNIST / PSNR / probe test on {cfg.eval_images} test images; {cfg.samples} samples per row."]
    return "\n".join(lines) + "\n"


def plot(rows, names, path, size=640, pad=70):
    """rFID-FMNIST (x) against gFID-FMNIST (y) per tokenizer row, with the seed range as error bars."""
    pts = {n: np.array([[r["rfid_fmnist"], r["k0"]["fid_fmnist"]] for r in rows if r["row"] == n]) for n in names}
    allp = np.concatenate(list(pts.values()))
    lo, hi = allp.min(0), allp.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    to_px = lambda p: (pad + (p[0] - lo[0]) / span[0] * (size - 2 * pad),  # noqa: E731
                       size - pad - (p[1] - lo[1]) / span[1] * (size - 2 * pad))
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.line([(pad, pad / 2), (pad, size - pad), (size - pad / 2, size - pad)], fill="black")
    draw.text((size / 2 - 60, size - pad + 30), "rFID-FMNIST (lower is better)", fill="black")
    draw.text((8, pad / 2 - 20), "gFID-FMNIST (lower is better)", fill="black")
    for axis, (a, b) in enumerate(zip(lo, hi)):
        for v in (a, b):
            x, y = to_px((v, lo[1]) if axis == 0 else (lo[0], v))
            draw.text((x - 10, size - pad + 8) if axis == 0 else (8, y - 6), f"{v:.3g}", fill="black")
    for i, (n, p) in enumerate(pts.items()):
        color, (mx, my) = PALETTE[i % 10], p.mean(0)
        x0, y0 = to_px((p[:, 0].min(), my))
        x1, _ = to_px((p[:, 0].max(), my))
        _, ya = to_px((mx, p[:, 1].min()))
        xm, yb = to_px((mx, p[:, 1].max()))
        draw.line([(x0, y0), (x1, y0)], fill=color, width=2)
        draw.line([(xm, ya), (xm, yb)], fill=color, width=2)
        draw.ellipse((xm - 4, y0 - 4, xm + 4, y0 + 4), fill=color)
        draw.text((xm + 6, y0 + 2), n, fill=color)
    img.save(path)


if __name__ == "__main__":
    cli(main, AblateConfig)
