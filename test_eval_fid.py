"""CPU tests of eval_fid.py: FID Inception parity with pytorch-fid (golden fixture, recipe weights loaded through
pretrained.feature_net), Frechet distance, IS, precision/recall, PSNR/SSIM, codebook stats, the ADM
npz helpers, and the command line: rfid / gfid / stats smoke runs on tiny checkpoints with the random-weight
Inception (PSNR/SSIM by hand, batch-size invariance of the samples, FID of a set against its own stats, a 2-process
gloo run equal to 1 process) and with a tiny random evaluation CNN (--net=fmnist)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import eval_fid as ef
import far
import fqgan
import pretrained as P
from common import parse_config
from conftest import load_fixture, recipe_state_dict, tiny_far, tiny_fqgan
from data import make_dataset
from sample import generate_images, load_generator

HERE = Path(__file__).resolve().parent
FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
CPU = common.Session(rank=0, local_rank=0, world_size=1, device="cpu", master=True)


@pytest.fixture(scope="module")
def fid_fixture():
    return load_fixture("pretrained", "fid_inception")


@pytest.fixture(scope="module")
def fixture_weights(fid_fixture, tmp_path_factory):
    """The fixture's recipe weights plus BN running stats 0/1, saved as a .pth like the real file."""
    meta, _ = fid_fixture
    sd = recipe_state_dict(meta)
    for e in meta["state_dict"]:
        if e["source"] == "bn_running_mean_zero":
            sd[e["key"]] = torch.zeros(e["shape"])
        elif e["source"] == "bn_running_var_one":
            sd[e["key"]] = torch.ones(e["shape"])
    path = tmp_path_factory.mktemp("w") / FID_FILE
    torch.save(sd, path)  # no num_batches_tracked: the loader must accept that
    return path, sd


def test_inception_matches_pytorch_fid(fid_fixture, fixture_weights):
    meta, arr = fid_fixture
    model = P.feature_net("inception", path=str(fixture_weights[0]))
    assert isinstance(model, P.FIDInceptionV3) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == [e["key"] for e in meta["state_dict"]]
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in ["Conv2d_1a_3x3", "Conv2d_4a_3x3", "Mixed_5b", "Mixed_6a", "Mixed_6e", "Mixed_7a", "Mixed_7c"]]
    hooks.append(model.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, i: seen.__setitem__("x299", i[0])))
    with torch.no_grad():
        pool, logits_unbiased = model(torch.from_numpy(arr["x"]))
        logits = model.fc(pool)
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(pool.numpy(), arr["pool"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(logits_unbiased.numpy(), arr["logits_unbiased"], rtol=0, atol=2e-6)
    np.testing.assert_allclose(logits.numpy(), arr["logits"], rtol=0, atol=2e-6)
    x299 = seen.pop("x299")
    assert x299.shape == (2, 3, 299, 299)
    np.testing.assert_allclose(x299[:, :, 140:160, 140:160].numpy(), arr["x299_crop"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(x299[:, :, :10, :10].numpy(), arr["x299_corner"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(x299.double().sum(dim=(2, 3)).numpy(), arr["x299_chansum"], rtol=1e-6)
    assert len(seen) == 7
    for name, out in seen.items():
        np.testing.assert_allclose(out.mean(dim=(2, 3)).numpy(), arr[f"chanmean_{name}"], rtol=0, atol=2e-6,
                                   err_msg=name)


def test_loader_strict_and_num_batches_tracked(fixture_weights, tmp_path):
    _, sd = fixture_weights
    full = P.FIDInceptionV3().state_dict()
    with_nbt = {**sd, **{k: v for k, v in full.items() if k.endswith("num_batches_tracked")}}
    torch.save(with_nbt, tmp_path / "a.pth")
    P.feature_net("inception", path=str(tmp_path / "a.pth"))  # accepted with num_batches_tracked too
    bad = dict(sd)
    del bad["Mixed_6b.branch7x7_2.conv.weight"]
    bad["fc.extra"] = torch.zeros(1)
    bad["fc.bias"] = torch.zeros(1000)
    torch.save(bad, tmp_path / "b.pth")
    with pytest.raises(SystemExit) as e:
        P.feature_net("inception", path=str(tmp_path / "b.pth"))
    assert str(e.value).startswith(f"{tmp_path / 'b.pth'} (keys under ''): ")
    for key in ['"Mixed_6b.branch7x7_2.conv.weight"', '"fc.extra"', "size mismatch for fc.bias"]:
        assert key in str(e.value), key


def test_missing_weights_one_line_error(tmp_path, offline_hub):
    calls = offline_hub
    url = P.WEIGHT_URLS[FID_FILE]
    with pytest.raises(SystemExit) as e:
        P.feature_net("inception")  # default: never fetches
    msg = str(e.value)
    assert calls == [] and "--download=true" in msg and "--net_path=..." in msg and url in msg
    assert "\n" not in msg and str(tmp_path / "checkpoints" / FID_FILE) in msg
    with pytest.raises(SystemExit, match=f"downloading {FID_FILE} .* failed \\(OSError\\)") as e:
        P.feature_net("inception", download=True)
    assert calls == [url] and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="nowhere.pth: given as --net_path"):  # a given path: no download
        P.feature_net("inception", path=str(tmp_path / "nowhere.pth"), download=True)
    assert calls == [url]


def test_features_random_init():
    """--net=random: fixed He-init weights, the same in every process, the caller's RNG untouched."""
    torch.manual_seed(5)
    model = P.feature_net("random")
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = ef.features(model, images, CPU)
    pool, logits = out["feats"], out["logits"]
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and pool.dtype == np.float32
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(images[2:]).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(pool[2:], ref.numpy(), atol=1e-5)
    again = P.feature_net("random")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert pool.std() > 0.01  # He init: features are not vanishingly small


# ---- Frechet distance


@pytest.mark.parametrize("case", ["fd", "fd_rankdef"])
def test_frechet_matches_pytorch_fid(fid_fixture, case):
    _, arr = fid_fixture
    for s in "12":
        mu, sigma = ef.feature_stats(arr[f'{case}_{"AB"[int(s) - 1]}'].astype(np.float64))
        np.testing.assert_allclose(mu, arr[f"{case}_mu{s}"], rtol=0, atol=1e-10)
        np.testing.assert_allclose(sigma, arr[f"{case}_sigma{s}"], rtol=0, atol=1e-10)
    fd = ef.frechet_distance(arr[f"{case}_mu1"], arr[f"{case}_sigma1"], arr[f"{case}_mu2"], arr[f"{case}_sigma2"])
    assert fd == pytest.approx(float(arr[f"{case}_value"]), rel=1e-6)


def test_frechet_properties():
    x = np.random.default_rng(0).standard_normal((500, 8))
    mu, sigma = ef.feature_stats(x)
    assert abs(ef.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    fds = [ef.frechet_distance(mu, sigma, *ef.feature_stats(x + s)) for s in (0.1, 0.5, 1.0)]
    assert fds == sorted(fds) and fds[0] > 0
    np.testing.assert_allclose(fds, [8 * s ** 2 for s in (0.1, 0.5, 1.0)], rtol=1e-6)  # pure shift: ||d||^2
    y = 2 * x  # pure scale: tr S1 + tr S2 - 2 tr sqrt(S1 S2) = (1 - 2)^2 tr S1, plus the shifted mean
    assert ef.frechet_distance(mu, sigma, *ef.feature_stats(y)) == pytest.approx(np.trace(sigma) + mu @ mu, rel=1e-6)


def test_fid_from_features():
    rng = np.random.default_rng(0)
    for n, dim in [(20, 64), (10, 64), (80, 16)]:  # N <= D: the exact N x N path; N > D: frechet_distance
        x, y = rng.standard_normal((n, dim)), 1.3 * rng.standard_normal((30, dim)) + 0.2
        mu, sigma = ef.feature_stats(y)
        want = ef.frechet_distance(*ef.feature_stats(x), mu, sigma)
        assert ef.fid_from_features(x, mu, sigma) == pytest.approx(want, rel=1e-6)
        assert abs(ef.fid_from_features(x, *ef.feature_stats(x))) < 1e-5


# ---- Inception score, precision / recall


def test_inception_score():
    assert ef.inception_score(np.zeros((40, 1008)), splits=4) == pytest.approx((1.0, 0.0))  # uniform predictions
    n = 10
    probs = np.eye(1008)[np.arange(100) % n]  # confident, spread evenly over n classes
    mean, std = ef.inception_score(np.where(probs > 0, 0.0, -np.inf), splits=1)  # logits whose softmax is probs
    assert mean == pytest.approx(n) and std == 0
    mean, _ = ef.inception_score(np.eye(1008)[np.arange(100) % n] * 50, splits=2)  # near one-hot logits
    assert mean == pytest.approx(n, rel=1e-3)


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((60, 16)).astype(np.float32)
    assert ef.precision_recall(real, real.copy(), k=3, batch_size=16) == (1.0, 1.0)
    assert ef.precision_recall(real, real + 100, k=3) == (0.0, 0.0)
    # fakes collapsed onto a few reals: high precision, low recall
    p, r = ef.precision_recall(real, np.repeat(real[:2], 30, axis=0) + 1e-3, k=3)
    assert p == 1.0 and r < 0.2


# ---- PSNR, SSIM, codebook stats


def test_psnr():
    a = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1, :, :8] = 1.0  # half the pixels off by 1 -> MSE 0.5 -> 10 log10(2) dB
    np.testing.assert_allclose(ef.psnr(a, b).numpy(), [20.0, 10 * np.log10(2)], rtol=1e-12)
    assert torch.isinf(ef.psnr(a, a)).all()


def test_ssim():
    x = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(ef.ssim(x, x).numpy(), 1.0, rtol=1e-12)
    s = ef.ssim(x, x.flip(0))
    assert torch.allclose(s, ef.ssim(x.flip(0), x)) and (s < 0.5).all()
    # constant images: only the luminance term is left, (2 a b + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.7, 0.01 ** 2
    const = lambda v: torch.full((1, 3, 16, 16), v, dtype=torch.float64)  # noqa: E731
    got = ef.ssim(const(a), const(b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-10)
    # one window by hand: an 11x11 image has a single valid position (population stats, Gaussian weights)
    y = torch.rand(1, 1, 11, 11, generator=torch.Generator().manual_seed(1)).double()
    z = (y + 0.2 * torch.rand(1, 1, 11, 11, generator=torch.Generator().manual_seed(2)).double()).clamp(0, 1)
    g = torch.exp(-(torch.arange(11.0, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(g, g) / g.sum() ** 2
    my, mz = (w * y).sum(), (w * z).sum()
    vy, vz, cyz = (w * (y - my) ** 2).sum(), (w * (z - mz) ** 2).sum(), (w * (y - my) * (z - mz)).sum()
    c2 = 0.03 ** 2
    ref = (2 * my * mz + c1) * (2 * cyz + c2) / ((my ** 2 + mz ** 2 + c1) * (vy + vz + c2))
    assert ef.ssim(y, z).item() == pytest.approx(ref.item(), rel=1e-10)


def test_codebook_stats():
    counts = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [0, 4, 0, 0, 0, 0, 0, 0]])  # 0: 4 of 8 used evenly; 1: collapsed
    usage, ppl = ef.codebook_stats(counts)
    np.testing.assert_allclose(usage, [0.5, 0.125])
    np.testing.assert_allclose(ppl, [4.0, 1.0])
    usage, ppl = ef.codebook_stats([[3, 1]])  # perplexity = exp(entropy) of (3/4, 1/4)
    assert usage[0] == 1.0 and ppl[0] == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))


# ---- ADM npz files


def test_npz_round_trip_and_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "samples.npz"
    common.save_npz(path, arr_0=images)
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # temp file renamed away
    np.testing.assert_array_equal(ef.load_npz_images(str(path)), images)
    with np.load(path) as z:
        assert z.files == ["arr_0"]
    common.save_npz(path, arr_0=images, arr_1=np.array([3, 1, 4, 1, 5]))  # class-conditional samples: ADM labels
    with np.load(path) as z:
        assert z.files == ["arr_0", "arr_1"] and z["arr_1"].tolist() == [3, 1, 4, 1, 5]
    np.testing.assert_array_equal(ef.load_npz_images(str(path)), images)
    np.savez(tmp_path / "bad.npz", arr_0=images.astype(np.float32))
    np.savez(tmp_path / "gray.npz", arr_0=images[..., 0])
    np.savez(tmp_path / "nokey.npz", images=images)
    (tmp_path / "text.npz").write_text("hello")
    np.save(tmp_path / "single.npy", images)
    for name in ["bad.npz", "gray.npz", "nokey.npz", "text.npz", "single.npy", "absent.npz"]:
        with pytest.raises(SystemExit) as e:
            ef.load_npz_images(str(tmp_path / name))
        msg = str(e.value.code)
        assert "\n" not in msg and msg.startswith(str(tmp_path / name)), msg


def test_load_ref_stats(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((10, 4)).astype(np.float32)
    mu, sigma = ef.feature_stats(feats)
    common.save_npz(tmp_path / "ours.npz", mu=mu, sigma=sigma, features=feats, net="random")  # as --mode=stats
    ours = ef.load_ref_stats(str(tmp_path / "ours.npz"))
    assert set(ours) == {"mu", "sigma", "images", "features", "net"}
    assert ours["net"] == "random" and ours["images"] is None
    np.testing.assert_array_equal(ours["sigma"], sigma)
    np.testing.assert_array_equal(ours["features"], feats)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)  # ADM reference batch layout
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu.astype(np.float32), sigma=sigma, mu_s=mu, sigma_s=sigma)
    adm = ef.load_ref_stats(str(tmp_path / "adm.npz"))
    assert adm["mu"].dtype == adm["sigma"].dtype == np.float64 and adm["features"] is None and adm["net"] is None
    np.testing.assert_array_equal(adm["images"], images)
    common.save_npz(tmp_path / "imgs.npz", arr_0=images)  # images only: no stats to read
    with pytest.raises(SystemExit) as e:
        ef.load_ref_stats(str(tmp_path / "imgs.npz"))
    assert str(e.value.code).startswith(str(tmp_path / "imgs.npz")) and "['mu', 'sigma']" in str(e.value.code)


# ---- command line: smoke runs on tiny checkpoints, random-weight Inception, 32 px synthetic images


def run(*flags, net="random"):
    return ef.main(parse_config(ef.EvalConfig, ["--device=cpu", f"--net={net}", *map(str, flags)]))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny tokenizer (K=2, V=512, 8x8 grid), a FAR that matches it (10 classes), a tiny random evaluation CNN, and
    reference stats of 4 synthetic images."""
    root = tmp_path_factory.mktemp("ckpt")
    common.save_checkpoint(fqgan.checkpoint_dict(tiny_fqgan(K=2)), root / "tok.pt")
    gen = tiny_far(K=2, codebook_size=512, block_size=64)  # random output layers: labels and seeds matter
    common.save_checkpoint(far.checkpoint_dict(gen, tokenizer=str(root / "tok.pt")), root / "far.pt")
    torch.manual_seed(0)
    featnet = P.Classifier(P.ClassifierConfig(net="cnn", width=16)).eval()
    common.save_checkpoint(P.checkpoint_dict(featnet, "featnet"), root / "featnet.pt")
    res = run("--mode=stats", "--data=synthetic", "--image_size=32", "--max_images=4", f"--out={root / 'ref.npz'}",
              f"--save_npz={root / 'ref_images.npz'}")
    assert res["num_images"] == 4 and res["features_kept"] == 4 and res["stats"] == str(root / "ref.npz")
    return root


RFID_FLAGS = ["--mode=rfid", "--data=synthetic", "--max_images=4", "--batch_size=1"]  # batch 1: bitwise vs 2 procs


@pytest.fixture(scope="module")
def rfid_1proc(ckpts):
    return run(*RFID_FLAGS, f"--ckpt={ckpts / 'tok.pt'}", f"--save_npz={ckpts / 'recon.npz'}")


def test_rfid_smoke(ckpts, rfid_1proc):
    res = rfid_1proc
    saved = json.loads((ckpts / "tok.pt.rfid.json").read_text())  # default: next to the checkpoint
    assert saved["rfid"] == res["rfid"] and saved["num_images"] == 4 and saved["world_size"] == 1
    assert "RANDOM" in saved["warning"] and saved["net"] == "random" and "TensorFlow" in saved["note"]
    assert np.isfinite(res["rfid"]) and res["rfid"] > 0 and 0 < res["psnr"] < 60 and -1 < res["ssim"] < 1
    assert len(res["usage"]) == len(res["perplexity"]) == 2 and res["codebook_size"] == 512
    assert all(0 < u <= 1 for u in res["usage"]) and all(1 <= p <= 512 for p in res["perplexity"])
    # usage / perplexity by hand from the tokenizer's codes of the same 4 images
    x = make_dataset("synthetic", 32, "test").images[:4].expand(-1, 3, -1, -1)
    with torch.no_grad():
        idx = fqgan.FQGAN.from_checkpoint(str(ckpts / "tok.pt")).encode(x)  # (4, K, 8, 8)
    counts = np.stack([np.bincount(idx[:, k].flatten().numpy(), minlength=512) for k in range(2)])
    usage, ppl = ef.codebook_stats(counts)
    np.testing.assert_allclose(res["usage"], usage)
    np.testing.assert_allclose(res["perplexity"], ppl, rtol=1e-12)
    recon = ef.load_npz_images(str(ckpts / "recon.npz"))
    assert recon.shape == (4, 32, 32, 3)
    # PSNR / SSIM by hand: originals are the synthetic test split, reconstructions as saved (uint8)
    a = ((x.double() + 1) / 2).clamp(0, 1)
    b = torch.from_numpy(recon).permute(0, 3, 1, 2).double() / 255
    assert res["psnr"] == pytest.approx(ef.psnr(a, b).mean().item(), rel=1e-9)
    assert res["ssim"] == pytest.approx(ef.ssim(a, b).mean().item(), rel=1e-9)
    # the same reconstructions scored from the npz, against the cached stats of the originals
    again = run(*RFID_FLAGS, f"--samples={ckpts / 'recon.npz'}", f"--ref={ckpts / 'ref.npz'}",
                f"--out={ckpts / 'again.json'}")
    assert again["rfid"] == pytest.approx(res["rfid"], rel=1e-4)
    assert again["psnr"] == pytest.approx(res["psnr"], rel=1e-12) and "usage" not in again
    assert again["ssim"] == pytest.approx(res["ssim"], rel=1e-12)
    assert json.loads((ckpts / "again.json").read_text())["rfid"] == again["rfid"]


def test_rfid_two_processes_match_one(ckpts, rfid_1proc):
    out = ckpts / "rfid2.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval_fid.py",
           *RFID_FLAGS, f"--ckpt={ckpts / 'tok.pt'}", "--device=cpu", "--net=random", f"--out={out}"]
    p = subprocess.run(cmd, cwd=HERE, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2
    for key in ("rfid", "psnr", "ssim", "usage", "perplexity", "num_images"):
        assert two[key] == pytest.approx(rfid_1proc[key], rel=1e-9, abs=1e-12), key


def test_gfid_smoke_and_batch_invariance(ckpts):
    flags = ["--mode=gfid", f"--ckpt={ckpts / 'far.pt'}", f"--ref={ckpts / 'ref.npz'}", "--num_samples=5", "--seed=7"]
    a = run(*flags, "--batch_size=2", f"--save_npz={ckpts / 'g2.npz'}")
    b = run(*flags, "--batch_size=3", f"--save_npz={ckpts / 'g3.npz'}", f"--out={ckpts / 'g3.json'}")
    for res in (a, b):
        assert {"fid", "is", "is_std", "precision", "recall", "warning"} <= set(res) and res["num_images"] == 5
        assert np.isfinite(res["fid"]) and res["is"] >= 1 and 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
        assert "class_acc" not in res  # only the evaluation CNN has the dataset's classes
    assert json.loads((ckpts / "far.pt.gfid.json").read_text())["fid"] == a["fid"]
    with np.load(ckpts / "g2.npz") as z2, np.load(ckpts / "g3.npz") as z3:
        images, labels = z2["arr_0"], z2["arr_1"]
        assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, z3["arr_0"])  # image i: label i and image_seed(7, i), any batch size
        np.testing.assert_array_equal(labels, z3["arr_1"])
    np.testing.assert_array_equal(labels, torch.randint(10, (5,), generator=torch.Generator().manual_seed(7)).numpy())
    assert len({im.tobytes() for im in images}) == 5
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-4)
    # the per-image seed rule of sample.py: image 3 alone, from its label and image_seed(7, 3)
    gen, tok = load_generator(str(ckpts / "far.pt"))
    one = generate_images(gen, tok, labels[3:4], [common.image_seed(7, 3)], 2.0, 1.0, 0, 1.0)
    assert np.abs(one[0].astype(int) - images[3]).max() <= 1  # the decoder may move a pixel by 1 with the batch


def test_fid_against_own_stats(ckpts, fixture_weights):
    # stats made from an ADM npz of the same images a dataset run cached: the same mu; scoring that npz gives FID 0
    res = run("--mode=stats", f"--data={ckpts / 'ref_images.npz'}", f"--out={ckpts / 'ref2.npz'}", "--batch_size=3")
    assert res["num_images"] == 4
    ref, ref2 = ef.load_ref_stats(str(ckpts / "ref.npz")), ef.load_ref_stats(str(ckpts / "ref2.npz"))
    assert ref2["net"] == "random" and ref2["features"].shape == (4, 2048)
    np.testing.assert_allclose(ref2["mu"], ref["mu"], rtol=1e-4, atol=1e-6)
    res = run("--mode=gfid", f"--samples={ckpts / 'ref_images.npz'}", f"--ref={ckpts / 'ref.npz'}",
              f"--out={ckpts / 'self.json'}")
    assert abs(res["fid"]) < 1e-4 and res["precision"] == res["recall"] == 1.0
    # a reference made with --net=random, scored with the (fixture-weight) Inception: flagged as not comparable
    res = run("--mode=gfid", f"--samples={ckpts / 'ref_images.npz'}", f"--ref={ckpts / 'ref.npz'}",
              f"--out={ckpts / 'mixed.json'}", f"--net_path={fixture_weights[0]}", net="inception")
    assert "not comparable" in res["warning"] and "--net=random" in res["warning"] and "RANDOM" not in res["warning"]


def test_net_fmnist_smoke(ckpts):
    """--net=fmnist with a tiny random evaluation CNN: metric keys *_fmnist, and class_acc of the samples."""
    fm = [f"--net_path={ckpts / 'featnet.pt'}"]
    res = run("--mode=rfid", "--data=synthetic", "--max_images=4", f"--ckpt={ckpts / 'tok.pt'}",
              f"--out={ckpts / 'fm_rfid.json'}", *fm, net="fmnist")
    assert "rfid" not in res and np.isfinite(res["rfid_fmnist"]) and res["rfid_fmnist"] >= 0
    assert "FID-FMNIST" in res["note"] and "warning" not in res
    stats = run("--mode=stats", "--data=synthetic", "--image_size=32", "--max_images=16",
                f"--out={ckpts / 'fm_ref.npz'}", *fm, net="fmnist")
    assert stats["num_images"] == 16 and ef.load_ref_stats(str(ckpts / "fm_ref.npz"))["features"].shape == (16, 16)
    res = run("--mode=gfid", f"--ckpt={ckpts / 'far.pt'}", f"--ref={ckpts / 'fm_ref.npz'}", "--num_samples=6",
              "--is_splits=2", f"--save_npz={ckpts / 'fm_g.npz'}", f"--out={ckpts / 'fm_gfid.json'}", *fm, net="fmnist")
    for key in ("fid_fmnist", "is_fmnist", "is_std_fmnist", "precision_fmnist", "recall_fmnist", "class_acc"):
        assert key in res and np.isfinite(res[key]), key
    assert not {"fid", "is", "precision", "recall"} & set(res) and 0 <= res["class_acc"] <= 1
    with np.load(ckpts / "fm_g.npz") as z:  # class accuracy by hand: argmax of the CNN's logits vs the labels
        _, logits = ef.features(P.feature_net("fmnist", str(ckpts / "featnet.pt")), z["arr_0"], CPU).values()
        assert res["class_acc"] == pytest.approx(float((logits.argmax(1) == z["arr_1"]).mean()))
    # an Inception reference (2048-d) under --net=fmnist: refused before any image is made, not after the run
    with pytest.raises(SystemExit, match=f"{ckpts / 'ref.npz'} holds 2048-d statistics but --net=fmnist gives 16-d"):
        run("--mode=gfid", f"--ckpt={ckpts / 'far.pt'}", f"--ref={ckpts / 'ref.npz'}", *fm, net="fmnist")


def test_cli_errors(ckpts, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="--out"):
        run("--mode=stats", "--data=synthetic", "--image_size=32")
    with pytest.raises(SystemExit, match="image_size"):
        run("--mode=stats", "--data=synthetic", f"--out={tmp_path / 's.npz'}")
    with pytest.raises(SystemExit, match="--ckpt"):
        run("--mode=gfid")
    with pytest.raises(SystemExit, match="choose one of"):
        run("--mode=fid")
    with pytest.raises(SystemExit, match="--net=resnet: choose one of inception, fmnist, random"):
        run(net="resnet")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(SystemExit, match="--download=true"):  # no weights, no download: a one-line exit
        run(f"--ckpt={ckpts / 'tok.pt'}", net="inception")
    monkeypatch.chdir(tmp_path)  # no out/featnet/ckpt.pt here
    with pytest.raises(SystemExit, match="python train_classifier.py --net=featnet"):
        run(f"--ckpt={ckpts / 'tok.pt'}", net="fmnist")


def test_cli_entry_point_one_line_error(tmp_path):
    """The script itself: a user's mistake ends in one 'error: ...' line and exit status 1, no traceback."""
    p = subprocess.run([sys.executable, "eval_fid.py", "--mode=gfid", "--net=random", "--device=cpu",
                        f"--samples={tmp_path / 'absent.npz'}"], cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "absent.npz" in lines[0]
