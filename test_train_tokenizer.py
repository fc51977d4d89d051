"""CPU tests of train_tokenizer.py: every loss term trains, exact resume, 2-process DDP replicas, odd image files,
checkpoint round trip and errors, NaN stop, --help and bad flags. Tiny everything (32 px, random tiny teachers and
LPIPS, a few steps), no downloads."""
import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import train_tokenizer as tt
from fqgan import FQGAN

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this module: tiny convs gain little from more, and on a shared CPU an oversubscribed
    second thread can make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(tmp_path, name="run", **overrides):
    """A TrainConfig for a seconds-long CPU run with every loss term on (GAN from step 0)."""
    kw = dict(data="synthetic", out_dir=str(tmp_path / name), device="cpu", batch_size=8, max_steps=3, lr=1e-3,
              teachers=("none", "clip_tiny"), lpips="tiny", disc_start=0, disc_ndf=16, rep_layers=1,
              log_interval=1, eval_interval=1000, eval_images=8, ckpt_interval=1000)
    return tt.TrainConfig(**{**kw, **overrides})


# Triple with two tiny teachers, cosine rep loss, adaptive GAN weight from step 1, EMA and gradient accumulation
RESUME_KW = dict(model_overrides="n_codebooks=3", teachers=("none", "dinov2_tiny", "clip_tiny"), rep_loss="cosine",
                 disc_start=1, disc_adaptive=True, ema=True, grad_accum=2, batch_size=4)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished 2-step run (its checkpoint is reused by several tests)."""
    root = tmp_path_factory.mktemp("base")
    result = tt.main(tiny(root, max_steps=2, **RESUME_KW))
    return root / "run", result


def test_every_term_lowers_the_loss(tmp_path):
    result = tt.main(tiny(tmp_path, max_steps=8))
    hist = result["history"]
    assert len(hist) == 8 and result["step"] == 8
    for key in ("mse", "lpips", "vq", "dis", "rep1", "gan", "d", "loss"):
        assert all(np.isfinite(h[key]) for h in hist), key
    assert len(hist[0]["usage"]) == 2 and len(hist[0]["perplexity"]) == 2
    first, last = np.mean([h["loss"] for h in hist[:2]]), np.mean([h["loss"] for h in hist[-2:]])
    assert last < first, [round(h["loss"], 4) for h in hist]
    assert np.isfinite(result["psnr"]) and result["psnr"] > 5
    out = Path(tmp_path / "run")
    assert (out / "recon_0000000.png").is_file() and (out / "recon_0000008.png").is_file()
    assert Image.open(out / "recon_0000008.png").size == (4 * 34 + 2, 8 * 34 + 2)  # orig | recon | 2 sub-codebooks
    assert "held-out PSNR" in (out / "log.txt").read_text()


def _flat(sd):
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def test_resume_matches_uninterrupted(tmp_path, two_steps):
    base_dir, _ = two_steps
    tt.main(tiny(tmp_path, "straight", max_steps=4, **RESUME_KW))
    shutil.copytree(base_dir, tmp_path / "resumed")
    tt.main(tiny(tmp_path, "resumed", max_steps=4, resume=True, **RESUME_KW))
    a, b = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True) for n in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema", "heads", "disc"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=0, atol=1e-6, msg=f"{part}.{k}")
    for opt in ("opt", "opt_disc"):
        for i, state in a[opt]["state"].items():
            for k, v in state.items():
                torch.testing.assert_close(b[opt]["state"][i][k], v, rtol=0, atol=1e-6, msg=f"{opt}.{i}.{k}")
    assert "resumed from" in (tmp_path / "resumed" / "log.txt").read_text()


def test_checkpoint_round_trip(two_steps):
    run_dir, result = two_steps
    ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    for key in ("kind", "config", "model", "train_config", "disc", "opt", "opt_disc", "ema", "heads", "step",
                "rng_cpu"):
        assert key in ckpt, key
    assert ckpt["kind"] == "fqgan" and ckpt["step"] == 2 and ckpt["rng_cpu"].dtype == torch.uint8
    assert set(k.split(".")[0] for k in ckpt["heads"]) == {"1", "2"} and "1.upscale.0.weight" in ckpt["heads"]
    model = FQGAN.from_checkpoint(run_dir / "ckpt.pt")  # prefers the EMA weights
    for k, v in result["ema"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    idx = model.encode(x)
    assert idx.shape == (2, 3, 8, 8) and model.decode_indices(idx).shape == x.shape


def test_bad_checkpoints_give_clear_errors(tmp_path, two_steps):
    run_dir, _ = two_steps
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    extra = dict(ckpt, model={**ckpt["model"], "surprise.weight": torch.zeros(1)},
                 ema={**ckpt["ema"], "surprise.weight": torch.zeros(1)})
    (tmp_path / "extra").mkdir()
    torch.save(extra, tmp_path / "extra" / "ckpt.pt")
    with pytest.raises(ValueError, match="surprise.weight"):
        FQGAN.from_checkpoint(tmp_path / "extra" / "ckpt.pt")
    with pytest.raises(ValueError, match="'model' does not fit.*surprise.weight"):
        tt.main(tiny(tmp_path, "extra", max_steps=3, resume=True, **RESUME_KW))
    (tmp_path / "far").mkdir()
    torch.save(dict(ckpt, kind="far"), tmp_path / "far" / "ckpt.pt")
    with pytest.raises(ValueError, match="'far' checkpoint, expected 'fqgan'"):
        tt.main(tiny(tmp_path, "far", max_steps=3, resume=True, **RESUME_KW))
    with pytest.raises(ValueError, match="not a tokenizer"):
        FQGAN.from_checkpoint(tmp_path / "far" / "ckpt.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        tt.main(tiny(tmp_path, "nothing", resume=True))


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, two_steps):
    run_dir, _ = two_steps
    shutil.copytree(run_dir, tmp_path / "nan")
    with pytest.raises(SystemExit, match="non-finite loss"):
        tt.main(tiny(tmp_path, "nan", max_steps=5, resume=True, mse_weight=float("nan"), ckpt_interval=1,
                     **RESUME_KW))
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert "NaN/inf" in (tmp_path / "nan" / "log.txt").read_text()


def _ddp_worker(rank, world, port, kwargs, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = tt.main(tt.TrainConfig(**kwargs))
    params = {f"{name}.{k}": v for name in ("tokenizer", "heads", "disc")
              for k, v in result[name].named_parameters()}
    torch.save(params, Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes_keep_replicas_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kwargs = vars(tiny(tmp_path, max_steps=2, grad_accum=2, batch_size=4, disc_adaptive=True))
    mp.spawn(_ddp_worker, args=(2, port, kwargs, str(tmp_path)), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["rng_cpu"].shape[0] == 2 and ckpt["step"] == 2
    torch.manual_seed(0)  # the run's seed: rebuild its initial tokenizer
    init = FQGAN(FQGAN.from_checkpoint(tmp_path / "run" / "ckpt.pt").cfg)
    for k, v in p0.items():
        assert torch.equal(v, p1[k]), f"replicas differ at {k}"
        if k.startswith("tokenizer."):
            assert torch.equal(v, ckpt["model"][k[len("tokenizer."):]]), k
    assert any(not torch.equal(v, p0[f"tokenizer.{k}"]) for k, v in init.named_parameters()), "nothing trained"
    assert "world size 2" in (tmp_path / "run" / "log.txt").read_text()


def test_imagefolder_with_odd_files(tmp_path):
    root = tmp_path / "images" / "things"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = lambda: rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # noqa: E731
    Image.fromarray(rgb()).save(root / "a.png")
    Image.fromarray(rgb()).save(root / "b.jpg")
    Image.fromarray(rgb()[..., 0]).save(root / "gray.png")  # mode L
    Image.fromarray(np.dstack([rgb(), np.full((40, 48), 200, np.uint8)]), "RGBA").save(root / "rgba.png")
    Image.fromarray(rgb()).convert("CMYK").save(root / "cmyk.jpg")
    buf = io.BytesIO()
    Image.fromarray(rgb()).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.warns(UserWarning, match="truncated.jpg"):
        result = tt.main(tiny(tmp_path, data=str(tmp_path / "images"), batch_size=3, max_steps=3,
                              teachers=("none", "none"), lpips="none"))
    assert result["step"] == 3 and result["bad_files"] == 1 and np.isfinite(result["psnr"])
    assert "skipped files 1" in (tmp_path / "run" / "log.txt").read_text()


def test_help_and_bad_flags():
    run = subprocess.run([sys.executable, "train_tokenizer.py", "--help"], cwd=HERE, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--teachers=auto" in run.stdout and "--rep_loss=infonce" in run.stdout and "torchrun" in run.stdout
    with pytest.raises(SystemExit, match="unknown flag --bogus"):
        tt.parse_config(tt.TrainConfig, ["--bogus=1"])
    with pytest.raises(SystemExit, match="expects a int"):
        tt.parse_config(tt.TrainConfig, ["--max_steps=many"])
    with pytest.raises(SystemExit, match="rep_loss=mse: choose one of infonce, cosine"):
        tt.parse_config(tt.TrainConfig, ["--rep_loss=mse"])
    with pytest.raises(SystemExit, match="model_overrides"):
        tt.parse_overrides("codebook_size")
    assert tt.parse_overrides("ch_mult=1,2,2;codebook_size=64") == {"ch_mult": (1, 2, 2), "codebook_size": 64}
    assert tt.teacher_specs(tt.TrainConfig(preset="dual16"), 2) == [None, "clip:ViT-L/14"]
    assert tt.teacher_specs(tt.TrainConfig(preset="triple16"), 3) == [None, "dinov2:vits14", "clip:ViT-B/16"]
    with pytest.raises(SystemExit, match="one per branch"):
        tt.teacher_specs(tt.TrainConfig(teachers=("none",)), 2)


def test_missing_teacher_file_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="teacher of branch 1: .*teacher_paths"):
        tt.main(tiny(tmp_path, teacher_paths=("auto", str(tmp_path / "missing.pt"))))


def test_rep_losses_and_discriminator_shapes():
    torch.manual_seed(0)
    t = torch.randn(4, 16)
    pred = torch.randn(4, 1 + 64, 16)
    pred[:, 0] = 5 * t  # the CLS prediction points at its own teacher feature
    assert tt.rep_loss("infonce", pred, t, None, 0.1) < 0.01
    assert abs(tt.rep_loss("infonce", pred, t, None, 1.0).item() - 1.0) < 1.0  # temperature 1: bounded away from 0
    patch = torch.randn(4, 16, 16)  # a 4x4 teacher grid, resized to the 8x8 latent grid
    up = torch.nn.functional.interpolate(patch.transpose(1, 2).reshape(4, 16, 4, 4), size=8, mode="bilinear")
    pred[:, 1:] = 3 * up.flatten(2).transpose(1, 2)
    assert tt.rep_loss("cosine", pred, t, patch, 1.0) < 1e-5
    d = tt.PatchGAN(ndf=64, n_layers=3)
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert abs(sum(p.numel() for p in d.parameters()) / 1e6 - 2.77) < 0.01
    assert tt.hinge_d_loss(torch.full((3,), 2.0), torch.full((3,), -2.0)) == 0
