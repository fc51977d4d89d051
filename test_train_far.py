"""CPU tests of train_far.py and sample.py: code extraction (ten-crop geometry, round trip through the decoder, resume
after a crash, stale codes refused, unreadable images skipped and counted, only the used held-out images encoded,
DDP sharding), FAR training (loss goes down, every head, exact resume, 2-process DDP replicas, a resume checked
before any extraction), checkpoints and the sample.py command line. A random 16 px tokenizer (4x4 grid, 64 codes per
sub-codebook), the synthetic dataset, a few steps: seconds each."""
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
import torchvision.transforms.functional as TF
from PIL import Image

import sample
import train_far as tf
from common import Session, save_checkpoint
from data import adm_crop
from far import FAR
from fqgan import FQGAN, checkpoint_dict, config_from_preset

HERE = Path(__file__).resolve().parent
SINGLE = Session(rank=0, local_rank=0, world_size=1, device="cpu", master=True)


def make_tokenizer(path, seed=0):
    """A random tiny FQGAN (16 px -> 4x4 tokens, K=2, V=64) saved as our own checkpoint."""
    torch.manual_seed(seed)
    tok = FQGAN(config_from_preset("tiny", image_size=16, codebook_size=64, usage_window=256)).eval()
    save_checkpoint(checkpoint_dict(tok), path)
    return tok


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.pt"
    make_tokenizer(path)
    return path


def tiny(tmp_path, tok_path, name="run", **overrides):
    """A TrainConfig for a seconds-long CPU run on synthetic images."""
    kw = dict(tokenizer=str(tok_path), data="synthetic", crops=2, out_dir=str(tmp_path / name), device="cpu",
              batch_size=8, max_steps=4, lr=3e-3, warmup_steps=0, lr_decay="constant", extract_batch=64, val_images=16,
              grid_classes=3, grid_per_class=2, log_interval=1, eval_interval=1000, ckpt_interval=1000)
    return tf.TrainConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory, tok_path):
    """Synthetic codes extracted once (train 256 x 2 views, val 16 of the 64 test images), shared by the tests."""
    root = tmp_path_factory.mktemp("codes")
    tf.main(tiny(root, tok_path, max_steps=0, codes_dir=str(root / "codes")))
    return root / "codes"


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, tok_path, codes_dir):
    """A finished 2-step run with gradient accumulation (its checkpoint is reused by several tests)."""
    root = tmp_path_factory.mktemp("base")
    result = tf.main(tiny(root, tok_path, max_steps=2, grad_accum=2, codes_dir=str(codes_dir)))
    return root / "run", result


def image_folder(root, sizes, broken=()):
    """root/<class>/<i>.png random images of the given (h, w) per class; `broken` = (class, name) truncated files."""
    rng = np.random.default_rng(0)
    for c, hw in sizes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(hw):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    for c, name in broken:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(buf, "PNG")
        (root / c / name).write_bytes(buf.getvalue()[:100])


def test_ten_crop_extraction_round_trip(tmp_path, tok_path):
    root = tmp_path / "images"
    image_folder(root, {"a": [(30, 41), (37, 41)], "b": [(30, 41)]})
    tok = FQGAN.from_checkpoint(tok_path)
    cfg = tiny(tmp_path, tok_path, data=str(root), extract_batch=2)
    codes, labels = tf.extract(tok, tf.code_meta(tok, tok_path), str(root), "train", 10, None, cfg, SINGLE, print)
    assert codes.shape == (3, 10, 2, 16) and codes.dtype == np.int16 and labels.tolist() == [0, 0, 1]
    files = sorted(p.name for p in (tmp_path / "run" / "codes").iterdir())
    assert files == ["train.json", "train.npy", "train_labels.npy"], files  # no partial files or markers left
    for i, path in enumerate(sorted(root.rglob("*.png"))):
        with Image.open(path) as img:
            big = adm_crop(img.convert("RGB"), int(16 * 1.1))  # ADM centre crop to 17 px
        x = torch.from_numpy(np.asarray(big).copy()).permute(2, 0, 1).float() / 127.5 - 1
        crops = torch.stack(TF.ten_crop(x, 16))  # (10, 3, 16, 16): corners + centre, then of the flip
        idx = torch.from_numpy(codes[i].astype(np.int64)).view(10, 2, 4, 4)
        assert torch.equal(tok.encode(crops), idx)
        with torch.no_grad():  # decoding the stored codes == the tokenizer's reconstruction of the same crop
            torch.testing.assert_close(tok.decode_indices(idx), tok(crops)[0], rtol=0, atol=1e-5)


def test_unreadable_images_are_skipped_and_counted(tmp_path, tok_path):
    root = tmp_path / "images"
    image_folder(root, {"a": [(20, 20)] * 2, "b": [(20, 20)] * 2}, broken=[("a", "1b.png"), ("b", "0b.png")])
    tok = FQGAN.from_checkpoint(tok_path)
    cfg = tiny(tmp_path, tok_path, data=str(root), extract_batch=3)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        codes, labels = tf.extract(tok, tf.code_meta(tok, tok_path), str(root), "train", 1, None, cfg, SINGLE, print)
    assert labels.tolist() == [0, 0, -1, 1, -1, 1]  # sorted: a/0 a/1 a/1b(broken) b/0 b/0b(broken) b/1
    good = codes[labels >= 0].reshape(4, -1)
    assert len({row.tobytes() for row in good}) == 4  # no duplicated rows: each label has its own image
    for row, name in zip(good, ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]):
        with Image.open(root / name) as img:
            x = torch.from_numpy(np.asarray(adm_crop(img.convert("RGB"), 16)).copy()).permute(2, 0, 1) / 127.5 - 1
        assert np.array_equal(tok.encode(x[None].float()).flatten().numpy(), row)
    assert '"unreadable": 2' in (tmp_path / "run" / "codes" / "train.json").read_text()


def test_extraction_resumes_after_a_crash(tmp_path, tok_path):
    tok = FQGAN.from_checkpoint(tok_path)
    meta = tf.code_meta(tok, tok_path)
    cfg = tiny(tmp_path, tok_path, extract_batch=32)
    ref, ref_labels = tf.extract(tok, meta, "synthetic", "train", 2, None, tiny(tmp_path, tok_path, "ref"), SINGLE,
                                 print)
    encode, calls = tok.encode, []

    def crash_on_third_call(x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return encode(x)

    tok.encode = crash_on_third_call
    with pytest.raises(RuntimeError, match="killed"):
        tf.extract(tok, meta, "synthetic", "train", 2, None, cfg, SINGLE, print)
    out = tmp_path / "run" / "codes"
    assert not (out / "train.npy").exists() and not (out / "train.json").exists()  # never a half-written final file
    assert (out / "train.npy.partial").exists() and '"done": 2' in (out / "train.progress0.json").read_text()
    del tok.encode
    lines = []
    codes, labels = tf.extract(tok, meta, "synthetic", "train", 2, None, cfg, SINGLE, lines.append)
    assert any("resuming: rank 0 has 2/8 chunks" in line for line in lines), lines
    assert np.array_equal(codes, ref) and np.array_equal(labels, ref_labels)
    assert not (out / "train.npy.partial").exists() and not (out / "train.progress0.json").exists()


def test_stale_codes_are_refused_and_only_used_images_encoded(tmp_path, tok_path, codes_dir):
    other = make_tokenizer(tmp_path / "other.pt", seed=1)
    with pytest.raises(SystemExit, match="do not match this run.*fingerprint"):
        tf.main(tiny(tmp_path, tmp_path / "other.pt", codes_dir=str(codes_dir)))
    tok = FQGAN.from_checkpoint(tok_path)
    with pytest.raises(SystemExit, match="crops"):
        tf.extract(tok, tf.code_meta(tok, tok_path), "synthetic", "train", 1, None,
                   tiny(tmp_path, tok_path, "x", codes_dir=str(codes_dir)), SINGLE, print)
    assert tf.fingerprint(other) != tf.fingerprint(tok)
    assert tf.code_meta(tok, tok_path)["fingerprint"] == tf.code_meta(FQGAN.from_checkpoint(tok_path), "x")[
        "fingerprint"]  # the path does not matter, the weights do
    assert np.load(codes_dir / "val.npy").shape == (16, 1, 2, 16)  # --val_images=16 of the 64 held-out images


@pytest.mark.parametrize("head", ["ar", "linear", "mlp"])
def test_training_lowers_the_loss(tmp_path, tok_path, codes_dir, head):
    steps = 25 if head == "ar" else 10
    result = tf.main(tiny(tmp_path, tok_path, max_steps=steps, batch_size=16, eval_interval=steps, head=head,
                          codes_dir=str(codes_dir)))
    hist = result["history"]
    assert len(hist) == steps and result["step"] == steps and all(np.isfinite(h["loss"]) for h in hist)
    first, last = np.mean([h["loss"] for h in hist[:3]]), np.mean([h["loss"] for h in hist[-3:]])
    assert abs(hist[0]["loss"] - np.log(64)) < 0.01 and last < first - 0.1, [round(h["loss"], 3) for h in hist]
    assert len(result["val_ce"]) == 2 and np.mean(result["val_ce"]) < np.log(64) - 0.05
    assert result["model"].cfg.head == head
    out = tmp_path / "run"
    assert "val CE" in (out / "log.txt").read_text()
    assert Image.open(out / f"samples_{steps:07d}.png").size == (2 * 18 + 2, 3 * 18 + 2)  # rows = 3 classes


def test_resume_matches_uninterrupted(tmp_path, tok_path, codes_dir, two_steps):
    base_dir, _ = two_steps
    tf.main(tiny(tmp_path, tok_path, "straight", max_steps=4, grad_accum=2, codes_dir=str(codes_dir)))
    shutil.copytree(base_dir, tmp_path / "resumed")
    tf.main(tiny(tmp_path, tok_path, "resumed", max_steps=4, grad_accum=2, resume=True, codes_dir=str(codes_dir)))
    a, b = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True) for n in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    for i, state in a["opt"]["state"].items():
        for k, v in state.items():
            assert torch.equal(b["opt"]["state"][i][k], v), (i, k)
    assert "resumed from" in (tmp_path / "resumed" / "log.txt").read_text()


def test_checkpoint_round_trip(two_steps, tok_path):
    run_dir, result = two_steps
    ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    for key in ("kind", "config", "model", "tokenizer", "tokenizer_fingerprint", "train_config", "opt", "step", "rng"):
        assert key in ckpt, key
    assert ckpt["kind"] == "far" and ckpt["step"] == 2 and ckpt["tokenizer"] == str(Path(tok_path).resolve())
    assert (ckpt["config"]["n_codebooks"], ckpt["config"]["codebook_size"], ckpt["config"]["block_size"]) == (2, 64, 16)
    far = FAR.from_checkpoint(run_dir / "ckpt.pt")
    for k, v in result["model"].state_dict().items():
        assert torch.equal(far.state_dict()[k], v), k
    far2, tok = sample.load_generator(run_dir / "ckpt.pt")
    assert not far2.training and tok.grid == 4
    a = sample.generate_images(far2, tok, [0, 1, 2], [5, 6, 7], cfg_scale=1.5)
    b = sample.generate_images(far2, tok, [2], [7], cfg_scale=1.5)  # an image depends only on its (label, seed)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8 and np.abs(a[2:].astype(int) - b).max() <= 1


def test_wrong_checkpoints_fail_before_any_extraction(tmp_path, tok_path, two_steps):
    run_dir, _ = two_steps
    with pytest.raises(SystemExit, match="'fqgan' checkpoint, not a 'far' one"):
        sample.load_generator(tok_path)
    (tmp_path / "run").mkdir()
    torch.save(torch.load(tok_path, weights_only=True), tmp_path / "run" / "ckpt.pt")
    with pytest.raises(SystemExit, match="'fqgan' checkpoint, not a 'far' one"):
        tf.main(tiny(tmp_path, tok_path, resume=True))
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    ckpt["model"]["agg.weight"] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    with pytest.raises(SystemExit, match="does not load as a FAR.*agg.weight"):
        tf.main(tiny(tmp_path, tok_path, resume=True))
    assert not (tmp_path / "run" / "codes").exists()  # refused before encoding a single image
    with pytest.raises(SystemExit, match="is a .far. checkpoint, not a .fqgan. one"):
        tf.main(tiny(tmp_path, run_dir / "ckpt.pt", "other"))
    with pytest.raises(SystemExit, match="not found: pass --tokenizer"):
        sample.load_generator(run_dir / "ckpt.pt", tokenizer=str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match="crops"):
        tf.TrainConfig(crops=3)


def test_sample_cli(tmp_path, two_steps):
    run_dir, _ = two_steps
    run = subprocess.run([sys.executable, "sample.py", f"--ckpt={run_dir / 'ckpt.pt'}", "--per_class=1"], cwd=HERE,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert Image.open(run_dir / "samples.png").size == (1 * 18 + 2, 10 * 18 + 2)  # 10 classes, one image each
    npz = tmp_path / "s.npz"
    cfg = sample.SampleConfig(ckpt=str(run_dir / "ckpt.pt"), classes="0,3", per_class=3, batch_size=4, top_k=10,
                              top_p=0.9, out=str(tmp_path / "g.png"), npz=str(npz))
    images, labels = sample.main(cfg)
    with np.load(npz) as z:
        assert z["arr_0"].shape == (6, 16, 16, 3) and z["arr_0"].dtype == np.uint8
        assert np.array_equal(z["arr_0"], images) and z["arr_1"].tolist() == [0, 0, 0, 3, 3, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.npz"]  # temp file renamed away
    again, _ = sample.main(sample.SampleConfig(**{**vars(cfg), "batch_size": 1, "npz": ""}))
    assert np.abs(again.astype(int) - images).max() <= 1  # same codes; the decoder's batch-size float noise only


def _ddp_worker(rank, world, port, kwargs, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    result = tf.main(tf.TrainConfig(**kwargs))
    torch.save(dict(result["model"].named_parameters()), Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes(tmp_path, tok_path, codes_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kwargs = vars(tiny(tmp_path, tok_path, max_steps=2, batch_size=4, extract_batch=32))  # sharded extraction too
    mp.spawn(_ddp_worker, args=(2, port, kwargs, str(tmp_path)), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in p0.items():
        assert torch.equal(v, p1[k]), f"replicas differ at {k}"
    for split in ("train", "val"):  # both ranks wrote their chunks into one file: same as one process
        assert np.array_equal(np.load(tmp_path / "run" / "codes" / f"{split}.npy"), np.load(codes_dir / f"{split}.npy"))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["rng"][0].shape[0] == 2 and ckpt["step"] == 2
    assert "world size 2" in (tmp_path / "run" / "log.txt").read_text()
