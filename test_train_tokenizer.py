"""CPU tests of train_tokenizer.py and train_classifier.py: the objective pinned to the official recipe with
hand-computed values, every loss term trains, exact resume, 2-process DDP replicas, odd image files, the VQ-KD stages,
the Cluster tokenizer and its k-means, checkpoints and errors. Tiny everything (32 px, random tiny teachers and LPIPS,
a few steps), no downloads."""
import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import pretrained as P
import train_classifier as tc
import train_tokenizer as tt
from common import parse_config
from data import to_rgb
from fqgan import FQGAN


def tiny(tmp_path, name="run", **overrides):
    """A TrainConfig for a seconds-long CPU run with every loss term on (GAN from step 0)."""
    kw = dict(data="synthetic", out_dir=str(tmp_path / name), device="cpu", batch_size=8, max_steps=3, lr=1e-3,
              teachers=("none", "clip_tiny"), lpips="tiny", disc_start=0, disc_ndf=16, rep_layers=1,
              log_interval=1, eval_interval=1000, eval_images=8, ckpt_interval=1000)
    return tt.TrainConfig(**{**kw, **overrides})


# Triple with two tiny teachers, cosine rep loss, the GAN from step 1 and gradient accumulation
RESUME_KW = dict(model_overrides="n_codebooks=3", teachers=("none", "dinov2_tiny", "clip_tiny"), rep_loss="cosine",
                 disc_start=1, grad_accum=2, batch_size=4)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished 2-step run (its checkpoint is reused by several tests)."""
    root = tmp_path_factory.mktemp("base")
    result = tt.main(tiny(root, max_steps=2, **RESUME_KW))
    return root / "run", result


# ---- the recipe, pinned by hand-computed values

def test_official_defaults():
    c = tt.TrainConfig()
    assert (c.lr, c.beta1, c.beta2, c.grad_clip, c.batch_size) == (2e-4, 0.9, 0.95, 1.0, 16)
    assert (c.mse_weight, c.lpips_weight, c.disc_start, c.disc_weight) == (1.0, 1.0, 20000, 0.5)
    assert not hasattr(c, "disc_adaptive")  # the official recipe has taming's adaptive GAN weight off
    assert (c.rep_loss, c.rep_weight, c.rep_temperature, c.rep_layers) == ("infonce", 0.5, 1.0, 3)
    assert (c.disc_ndf, c.disc_layers) == (64, 3)

    def names(preset, K, **kw):
        return {k: n for k, (n, _) in tt.teacher_names(tt.TrainConfig(preset=preset, **kw), K).items()}
    assert names("dual16", 2) == {"1": "clip_l14"}  # Dual: CLIP ViT-L/14 on branch 1, none on "vis"
    assert names("triple16", 3) == {"1": "dinov2_s14", "2": "clip_b16"}
    assert names("tiny", 2) == {"1": "fmnist_vit"} and names("tiny", 2, data="synthetic") == {}
    d = tt.PatchGAN()
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert abs(sum(p.numel() for p in d.parameters()) / 1e6 - 2.77) < 0.01


def test_gan_gate_and_hinge_by_hand():
    cfg = tt.TrainConfig()
    assert tt.gan_weight(19999, cfg) == 0.0 and tt.gan_weight(20000, cfg) == 0.5
    x, fake = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    disc = lambda img: torch.where(img[:, :1] > 0.5, -0.25, 2.0)  # noqa: E731  D(x) = 2, D(fake) = -0.25
    # 0.5 * 0.5 * (mean relu(1 - 2) + mean relu(1 + (-0.25))) = 0.25 * 0.75
    assert tt.discriminator_loss(disc, x, fake, 20000, cfg).item() == pytest.approx(0.25 * 0.75)
    assert tt.discriminator_loss(disc, x, fake, 19999, cfg).item() == 0.0  # D is not trained before disc_start


def test_generator_loss_by_hand():
    """Every weight and sign of L_G on tiny tensors; the teacher sees the original image; D is not run early."""
    cfg = tt.TrainConfig(rep_temperature=0.5)
    torch.manual_seed(0)
    x, recon = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    aux = {"vq_total": torch.tensor(0.7), "disentangle_loss": torch.tensor(0.2)}
    pred, t_cls = torch.randn(2, 5, 6), torch.randn(2, 6)
    seen, d_calls = [], []

    def teacher(img):
        seen.append(img)
        return t_cls, None

    def disc(img):
        d_calls.append(img)
        return torch.full((2, 1, 2, 2), 3.0)
    lpips = lambda a, b: torch.tensor([0.1, 0.3])  # noqa: E731
    p, t = F.normalize(pred[:, 0], dim=-1), F.normalize(t_cls, dim=-1)
    infonce = -torch.log_softmax(p @ t.T / 0.5, dim=1).diagonal().mean()  # rows: predictions vs all teacher CLS
    base = ((recon - x) ** 2).mean() + 0.2 + 0.7 + 0.5 * infonce
    loss, terms = tt.generator_loss(x, recon, aux, {"1": pred}, {"1": teacher}, 19999, cfg, disc, lpips)
    assert loss.item() == pytest.approx(base.item(), rel=1e-6) and not d_calls and "gan" not in terms
    assert seen[0] is x and terms["vq"].item() == pytest.approx(0.5) and terms["dis"].item() == pytest.approx(0.2)
    loss, terms = tt.generator_loss(x, recon, aux, {"1": pred}, {"1": teacher}, 20000, cfg, disc, lpips)
    assert loss.item() == pytest.approx(base.item() + 0.5 * -3.0, rel=1e-6) and d_calls[0] is recon
    assert terms["gan"].item() == -3.0


def test_infonce_direction_temperature_and_cosine():
    torch.manual_seed(0)
    pred, t = torch.randn(3, 1 + 16, 8), torch.randn(3, 8)
    p, q = F.normalize(pred[:, 0], dim=-1), F.normalize(t, dim=-1)
    logits = p @ q.T / 0.3
    got = tt.representation_loss(pred, t, None, "infonce", 0.3)
    assert got.item() == pytest.approx(F.cross_entropy(logits, torch.arange(3)).item(), rel=1e-6)
    assert got.item() != pytest.approx(F.cross_entropy(logits.T, torch.arange(3)).item(), rel=1e-3)  # not columns
    patch = torch.randn(3, 4, 8)  # a 2x2 teacher grid, resized to the 4x4 latent grid
    up = F.interpolate(patch.transpose(1, 2).reshape(3, 8, 2, 2), size=4, mode="bilinear", align_corners=False)
    pred[:, 1:] = 2 * up.flatten(2).transpose(1, 2)
    assert tt.representation_loss(pred, t, patch, "cosine") < 1e-6
    assert tt.representation_loss(-pred, t, patch, "cosine").item() == pytest.approx(2.0, abs=1e-5)


def test_kmeans_recovers_planted_centres_and_fills_empty_clusters():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    x = centres.repeat_interleave(200, 0) + 0.05 * torch.randn(1000, 8, generator=g)
    found = tt.kmeans(x, 5, seed=1)
    assert (found @ centres.T).max(0).values.min() > 0.99  # every planted centre has a match
    few = tt.kmeans(torch.eye(3).repeat(4, 1), 6)  # 6 clusters, 3 distinct points: empty clusters re-seeded
    assert torch.isfinite(few).all() and torch.allclose(few.norm(dim=1), torch.ones(6))
    assert ((few @ torch.eye(3).T).max(1).values > 0.999).all()


# ---- training runs

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
    assert Image.open(out / "recon_0000008.png").size == (4 * 34 + 2, 8 * 34 + 2)  # orig | recon | 2 sub-codebooks
    assert "held-out PSNR" in (out / "log.txt").read_text()


def test_resume_matches_uninterrupted(tmp_path, two_steps):
    base_dir, _ = two_steps
    tt.main(tiny(tmp_path, "straight", max_steps=4, **RESUME_KW))
    shutil.copytree(base_dir, tmp_path / "resumed")
    tt.main(tiny(tmp_path, "resumed", max_steps=4, resume=True, **RESUME_KW))
    a, b = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True) for n in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4
    for part in ("model", "heads", "disc"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=0, atol=1e-6, msg=f"{part}.{k}")
    for opt in ("opt", "opt_disc"):
        for i, state in a[opt]["state"].items():
            for k, v in state.items():
                torch.testing.assert_close(b[opt]["state"][i][k], v, rtol=0, atol=1e-6, msg=f"{opt}.{i}.{k}")
    assert "resumed from" in (tmp_path / "resumed" / "log.txt").read_text()


def test_checkpoint_round_trip_and_errors(tmp_path, two_steps):
    run_dir, result = two_steps
    ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    for key in ("kind", "config", "model", "train_config", "disc", "opt", "opt_disc", "heads", "step", "rng"):
        assert key in ckpt, key
    assert ckpt["kind"] == "fqgan" and ckpt["step"] == 2 and ckpt["rng"][0].dtype == torch.uint8
    assert {k.split(".")[0] for k in ckpt["heads"]} == {"1", "2"}
    model = FQGAN.from_checkpoint(run_dir / "ckpt.pt")
    for k, v in result["tokenizer"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    (tmp_path / "extra").mkdir()
    torch.save(dict(ckpt, model={**ckpt["model"], "surprise.weight": torch.zeros(1)}), tmp_path / "extra" / "ckpt.pt")
    with pytest.raises(SystemExit, match="does not load as a FQGAN.*surprise.weight"):
        tt.main(tiny(tmp_path, "extra", max_steps=3, resume=True, **RESUME_KW))
    (tmp_path / "far").mkdir()
    torch.save(dict(ckpt, kind="far"), tmp_path / "far" / "ckpt.pt")
    with pytest.raises(SystemExit, match="is a 'far' checkpoint, not a 'fqgan' one"):
        tt.main(tiny(tmp_path, "far", max_steps=3, resume=True, **RESUME_KW))
    with pytest.raises(SystemExit, match="not found"):
        tt.main(tiny(tmp_path, "nothing", resume=True))


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, two_steps, monkeypatch):
    run_dir, _ = two_steps
    shutil.copytree(run_dir, tmp_path / "nan")
    real = tt.generator_loss

    def nan_loss(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        return loss * float("nan"), terms
    monkeypatch.setattr(tt, "generator_loss", nan_loss)
    with pytest.raises(SystemExit, match="NaN/inf"):
        tt.main(tiny(tmp_path, "nan", max_steps=5, resume=True, ckpt_interval=1, **RESUME_KW))
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def _ddp_worker(rank, world, port, kwargs, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    result = tt.main(tt.TrainConfig(**kwargs))
    params = {f"{name}.{k}": v for name in ("tokenizer", "heads", "disc") for k, v in result[name].named_parameters()}
    torch.save(params, Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes_keep_replicas_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kwargs = vars(tiny(tmp_path, max_steps=2, grad_accum=2, batch_size=4))
    mp.spawn(_ddp_worker, args=(2, port, kwargs, str(tmp_path)), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["rng"][0].shape[0] == 2 and ckpt["step"] == 2
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
    Image.fromarray(np.full((40, 48), 40000, np.uint16)).save(root / "gray16.png")  # 16-bit grayscale
    buf = io.BytesIO()
    Image.fromarray(rgb()).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.warns(UserWarning, match="truncated.jpg"):
        result = tt.main(tiny(tmp_path, data=str(tmp_path / "images"), batch_size=7, max_steps=3,
                              teachers=("none", "none"), lpips="none"))
    assert result["step"] == 3 and result["bad_files"] == 3 and np.isfinite(result["psnr"])  # 1 of 7 per step
    assert "skipped unreadable files 3" in (tmp_path / "run" / "log.txt").read_text()
    with Image.open(root / "gray16.png") as img:
        assert img.mode.startswith("I") and np.asarray(to_rgb(img))[0, 0].tolist() == [156, 156, 156]  # 40000/257


# ---- VQ-KD and Cluster

def test_vqkd_stage1_learns_features_and_stage2_freezes_encoder_and_codebook(tmp_path):
    kw = dict(model_overrides="n_codebooks=1", teachers=("clip_tiny",), rep_loss="cosine", lpips="none",
              disc_start=10 ** 9)
    one = tt.main(tiny(tmp_path, "stage1", stage="features", max_steps=12, lr=3e-3, **kw))
    rep = [h["rep0"] for h in one["history"]]
    assert np.mean(rep[-3:]) < np.mean(rep[:3]) - 0.01 and "mse" not in one["history"][0], rep
    torch.manual_seed(0)  # the run's seed: its initial decoder, untouched by stage 1
    init = FQGAN(one["tokenizer"].cfg)
    assert torch.equal(one["tokenizer"].decoder.conv_out.weight, init.decoder.conv_out.weight)
    two = tt.main(tiny(tmp_path, "stage2", stage="decoder", init=str(tmp_path / "stage1" / "ckpt.pt"), max_steps=3,
                       **kw))
    a, b = one["tokenizer"].state_dict(), two["tokenizer"].state_dict()
    for k, v in a.items():
        if k.startswith(("encoder.", "branches.", "quantizers.")) and not k.endswith("codebook_used"):
            assert torch.equal(b[k], v), k  # encoder and codebook bit-identical
    assert not torch.equal(b["decoder.conv_out.weight"], a["decoder.conv_out.weight"])
    assert "mse" in two["history"][0] and "rep0" not in two["history"][0]


def make_teacher(path, width=32):
    torch.manual_seed(0)
    net = P.Classifier(P.ClassifierConfig(net="vit", width=width, patch=8, layers=1, heads=4, mean=0.5, std=0.5))
    with torch.no_grad():  # BatchNorm statistics of a trained net, then frozen
        net(torch.randn(64, 3, 32, 32) * 0.3 + 0.2)
    net.eval()
    torch.save(P.checkpoint_dict(net, "teacher"), path)
    return net


def test_cluster_tokenizer(tmp_path):
    net = make_teacher(tmp_path / "teacher.pt")
    res = tt.main(tiny(tmp_path, "cluster", stage="decoder", init="cluster", teachers=("fmnist_vit",),
                       teacher_paths=(str(tmp_path / "teacher.pt"),), model_overrides="codebook_size=16",
                       kmeans_images=64, lpips="none", disc_start=10 ** 9))
    tok = FQGAN.from_checkpoint(tmp_path / "cluster" / "ckpt.pt")
    assert tok.cfg.encoder == "vit" and tok.grid == 4 and tok.cfg.codebook_dim == 32
    for k, v in net.body.state_dict().items():  # the teacher itself is the encoder, untouched by training
        assert torch.equal(tok.encoder.state_dict()[k], v), k
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    feats = F.normalize(net(x)["patch"], dim=-1)  # (3, 16, 32): the teacher's patch features
    book = tok.quantizers[0].codebook()
    assert torch.equal(tok.encode(x).flatten(1), (feats @ book.T).argmax(-1))  # nearest centroid by cosine
    assert res["step"] == 3 and np.isfinite(res["psnr"])


def test_classifiers_train_and_reload(tmp_path):
    for net in ("teacher", "featnet"):
        res = tc.main(tc.TrainConfig(net=net, epochs=0.01, out=str(tmp_path / f"{net}.pt"), device="cpu"))
        loaded = P.trained_here(net, tmp_path / f"{net}.pt")
        assert 0 <= res["test_acc"] <= 1 and torch.load(tmp_path / f"{net}.pt", weights_only=True)["test_acc"] == \
            res["test_acc"]
        for k, v in res["model"].state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(SystemExit, match="python train_classifier.py --net=teacher"):
        P.trained_here("teacher", tmp_path / "missing.pt")


def test_bad_flags():
    with pytest.raises(SystemExit, match="unknown flag --bogus"):
        parse_config(tt.TrainConfig, ["--bogus=1"])
    with pytest.raises(SystemExit, match="expects a int"):
        parse_config(tt.TrainConfig, ["--max_steps=many"])
    with pytest.raises(SystemExit, match="rep_loss=mse: choose one of infonce, cosine"):
        parse_config(tt.TrainConfig, ["--rep_loss=mse"])
    with pytest.raises(SystemExit, match="--max_steps=-5: must be >= 0"):
        parse_config(tt.TrainConfig, ["--max_steps=-5"])
    with pytest.raises(SystemExit, match="--lr=nan"):
        parse_config(tt.TrainConfig, ["--lr=nan"])
    with pytest.raises(SystemExit, match="model_overrides"):
        tt.parse_overrides("codebook_size")
    assert tt.parse_overrides("ch_mult=1,2,2;codebook_size=64") == {"ch_mult": (1, 2, 2), "codebook_size": 64}
    with pytest.raises(SystemExit, match="one entry per sub-codebook"):
        tt.teacher_names(tt.TrainConfig(teachers=("none",)), 2)
