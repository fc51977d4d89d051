"""CPU tests of eval_fid.py: FID Inception parity with pytorch-fid (golden fixture, recipe weights loaded through the
user's loader), Frechet distance, IS, precision/recall, PSNR/SSIM, codebook stats, the ADM npz helpers, and the
command line (rfid / gfid / stats smoke runs on tiny checkpoints with the random-weight Inception, batch-size
invariance of the samples, FID of a set against its own stats, a 2-process gloo run equal to 1 process)."""
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
from conftest import load_fixture, recipe_state_dict

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Two oversubscribed threads on a shared 2-core machine run the Inception several times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def fid_fixture():
    return load_fixture('pretrained', 'fid_inception')


@pytest.fixture(scope='module')
def fixture_weights(fid_fixture, tmp_path_factory):
    """The fixture's recipe weights plus BN running stats 0/1, saved as a .pth like the real file."""
    meta, _ = fid_fixture
    sd = recipe_state_dict(meta)
    for e in meta['state_dict']:
        if e['source'] == 'bn_running_mean_zero':
            sd[e['key']] = torch.zeros(e['shape'])
        elif e['source'] == 'bn_running_var_one':
            sd[e['key']] = torch.ones(e['shape'])
    path = tmp_path_factory.mktemp('w') / ef.FID_WEIGHTS_NAME
    torch.save(sd, path)  # no num_batches_tracked: the loader must accept that
    return path, sd


def test_inception_matches_pytorch_fid(fid_fixture, fixture_weights):
    meta, arr = fid_fixture
    model = ef.fid_inception(path=str(fixture_weights[0]))
    assert [k for k, _ in model.state_dict().items()] == [e['key'] for e in meta['state_dict']]
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in ['Conv2d_1a_3x3', 'Conv2d_4a_3x3', 'Mixed_5b', 'Mixed_6a', 'Mixed_6e', 'Mixed_7a', 'Mixed_7c']]
    seen['x299'] = []
    hooks.append(model.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, i: seen.__setitem__('x299', i[0])))
    with torch.no_grad():
        pool, logits_unbiased = model(torch.from_numpy(arr['x']))
        logits = model.fc(pool)
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(pool.numpy(), arr['pool'], rtol=0, atol=1e-6)
    np.testing.assert_allclose(logits_unbiased.numpy(), arr['logits_unbiased'], rtol=0, atol=2e-6)
    np.testing.assert_allclose(logits.numpy(), arr['logits'], rtol=0, atol=2e-6)
    x299 = seen.pop('x299')
    assert x299.shape == (2, 3, 299, 299)
    np.testing.assert_allclose(x299[:, :, 140:160, 140:160].numpy(), arr['x299_crop'], rtol=0, atol=1e-6)
    np.testing.assert_allclose(x299[:, :, :10, :10].numpy(), arr['x299_corner'], rtol=0, atol=1e-6)
    np.testing.assert_allclose(x299.double().sum(dim=(2, 3)).numpy(), arr['x299_chansum'], rtol=1e-6)
    for name, out in seen.items():
        np.testing.assert_allclose(out.mean(dim=(2, 3)).numpy(), arr[f'chanmean_{name}'], rtol=0, atol=2e-6,
                                   err_msg=name)


def test_loader_strict_and_num_batches_tracked(fixture_weights, tmp_path):
    _, sd = fixture_weights
    full = ef.FIDInceptionV3().state_dict()
    with_nbt = {**sd, **{k: v for k, v in full.items() if k.endswith('num_batches_tracked')}}
    torch.save(with_nbt, tmp_path / 'a.pth')
    ef.fid_inception(path=str(tmp_path / 'a.pth'))  # accepted with num_batches_tracked too
    bad = dict(sd)
    del bad['Mixed_6b.branch7x7_2.conv.weight']
    bad['fc.extra'] = torch.zeros(1)
    bad['fc.bias'] = torch.zeros(1000)
    torch.save(bad, tmp_path / 'b.pth')
    with pytest.raises(RuntimeError) as e:
        ef.fid_inception(path=str(tmp_path / 'b.pth'))
    for key in ['Mixed_6b.branch7x7_2.conv.weight', 'fc.extra', 'fc.bias']:
        assert key in str(e.value)


def test_missing_weights_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    calls = []

    def offline(url, dst, *a, **k):
        calls.append(url)
        raise OSError('network unreachable')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(FileNotFoundError) as e:
        ef.fid_inception()  # default: never fetches
    msg = str(e.value)
    assert calls == [] and 'download=False' in msg and '--download=true' in msg
    assert '\n' not in msg and ef.FID_WEIGHTS_NAME in msg and str(tmp_path) in msg and ef.FID_WEIGHTS_URL in msg
    with pytest.raises(FileNotFoundError, match='download failed: OSError'):
        ef.fid_inception(download=True)
    assert calls == [ef.FID_WEIGHTS_URL]
    with pytest.raises(FileNotFoundError, match='download=False'):
        ef.fid_inception(path=str(tmp_path / 'nowhere.pth'))


def test_images_to_features_random_init():
    torch.manual_seed(0)
    model = ef.fid_inception(random_init=True)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    pool, logits = ef.images_to_features(model, images, batch_size=2)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and pool.dtype == np.float32
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(images[2:]).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(pool[2:], ref.numpy(), atol=1e-5)
    again = ef.fid_inception(random_init=True)  # fixed seed: the same network in every process and run
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert pool.std() > 0.01  # He init: features are not vanishingly small


# ---- Frechet distance


@pytest.mark.parametrize('case', ['fd', 'fd_rankdef'])
def test_frechet_matches_pytorch_fid(fid_fixture, case):
    _, arr = fid_fixture
    for s in '12':
        mu, sigma = ef.feature_stats(arr[f'{case}_{"AB"[int(s) - 1]}'].astype(np.float64))
        np.testing.assert_allclose(mu, arr[f'{case}_mu{s}'], rtol=0, atol=1e-10)
        np.testing.assert_allclose(sigma, arr[f'{case}_sigma{s}'], rtol=0, atol=1e-10)
    fd = ef.frechet_distance(arr[f'{case}_mu1'], arr[f'{case}_sigma1'], arr[f'{case}_mu2'], arr[f'{case}_sigma2'])
    assert fd == pytest.approx(float(arr[f'{case}_value']), rel=1e-6)


def test_frechet_properties():
    x = np.random.default_rng(0).standard_normal((500, 8))
    mu, sigma = ef.feature_stats(x)
    assert abs(ef.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    fds = [ef.frechet_distance(mu, sigma, *ef.feature_stats(x + s)) for s in (0.1, 0.5, 1.0)]
    assert fds == sorted(fds) and fds[0] > 0
    np.testing.assert_allclose(fds, [8 * s ** 2 for s in (0.1, 0.5, 1.0)], rtol=1e-6)  # pure shift: ||d||^2


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
    mean, std = ef.inception_score(probs, splits=1, is_probs=True)
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
    idx = torch.tensor([[0, 1], [1, 1], [2, 1], [3, 1]])  # (M=4, K=2): codebook 0 uses 4 of 8 evenly, 1 collapses
    counts = ef.index_histogram(idx, 8)
    assert counts.shape == (2, 8) and counts.sum() == 8
    usage, ppl = ef.codebook_stats(counts)
    np.testing.assert_allclose(usage, [0.5, 0.125])
    np.testing.assert_allclose(ppl, [4.0, 1.0])


# ---- ADM npz files


def test_npz_round_trip_and_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / 'samples.npz'
    ef.save_npz(str(path), images)
    assert [p.name for p in tmp_path.iterdir()] == ['samples.npz']  # temp file renamed away
    np.testing.assert_array_equal(ef.load_npz_images(str(path)), images)
    with np.load(path) as z:
        assert z.files == ['arr_0']
    ef.save_npz(str(path), images, labels=[3, 1, 4, 1, 5])  # class-conditional samples: labels as arr_1 (ADM)
    with np.load(path) as z:
        assert z.files == ['arr_0', 'arr_1'] and z['arr_1'].tolist() == [3, 1, 4, 1, 5]
    np.savez(tmp_path / 'bad.npz', arr_0=images.astype(np.float32))
    np.savez(tmp_path / 'nokey.npz', images=images)
    (tmp_path / 'text.npz').write_text('hello')
    np.save(tmp_path / 'single.npy', images)
    for name in ['bad.npz', 'nokey.npz', 'text.npz', 'single.npy']:
        with pytest.raises(ValueError) as e:
            ef.load_npz_images(str(tmp_path / name))
        assert '\n' not in str(e.value) and name in str(e.value)


def test_load_ref_stats(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((10, 4)).astype(np.float32)
    mu, sigma = ef.feature_stats(feats)
    ef.save_ref_stats(str(tmp_path / 'ours.npz'), mu, sigma, features=feats)
    ours = ef.load_ref_stats(str(tmp_path / 'ours.npz'))
    assert set(ours) == {'mu', 'sigma', 'features'}
    np.testing.assert_array_equal(ours['sigma'], sigma)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)  # ADM reference batch layout
    np.savez(tmp_path / 'adm.npz', arr_0=images, mu=mu.astype(np.float32), sigma=sigma, mu_s=mu, sigma_s=sigma)
    adm = ef.load_ref_stats(str(tmp_path / 'adm.npz'))
    assert set(adm) == {'mu', 'sigma', 'images'} and adm['mu'].dtype == np.float64
    np.testing.assert_array_equal(adm['images'], images)
    ef.save_ref_stats(str(tmp_path / 'tagged.npz'), mu, sigma, inception='random')
    assert ef.load_ref_stats(str(tmp_path / 'tagged.npz'))['inception'] == 'random'
    ef.save_npz(str(tmp_path / 'imgs.npz'), images)  # images only: no stats to read
    with pytest.raises(ValueError, match='mu and sigma'):
        ef.load_ref_stats(str(tmp_path / 'imgs.npz'))


# ---- command line: smoke runs on tiny checkpoints, random-weight Inception, 32 px synthetic images


def run(*flags):
    return ef.main(ef.parse_config(ef.EvalConfig, ['--device=cpu', '--inception=random', *map(str, flags)]))


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """Tiny tokenizer (K=2, V=512, 8x8 grid), a FAR that matches it, and reference stats of 4 synthetic images."""
    root = tmp_path_factory.mktemp('ckpt')
    torch.manual_seed(0)
    tok = fqgan.FQGAN(fqgan.config_from_preset('tiny'))
    common.save_checkpoint(fqgan.checkpoint_dict(tok), root / 'tok.pt')
    gen = far.FAR(far.FARConfig(**far.PRESETS['tiny'], n_codebooks=2, codebook_size=512, block_size=64))
    for out in gen.lm_head:  # zero-init outputs would sample uniformly; random ones make labels and seeds matter
        torch.nn.init.normal_(out.weight, std=0.5)
    common.save_checkpoint(far.checkpoint_dict(gen, tokenizer=str(root / 'tok.pt')), root / 'far.pt')
    res = run('--mode=stats', '--data=synthetic', '--image_size=32', '--max_images=4', f'--out={root / "ref.npz"}',
              f'--save_npz={root / "ref_images.npz"}')
    assert res['num_images'] == 4 and res['features_kept'] == 4
    return root


RFID_FLAGS = ['--mode=rfid', '--data=synthetic', '--max_images=4', '--batch_size=1']  # batch 1: bitwise vs 2 procs


@pytest.fixture(scope='module')
def rfid_1proc(ckpts):
    return run(*RFID_FLAGS, f'--ckpt={ckpts / "tok.pt"}', f'--save_npz={ckpts / "recon.npz"}')


def test_rfid_smoke(ckpts, rfid_1proc):
    res = rfid_1proc
    saved = json.loads((ckpts / 'tok.pt.rfid.json').read_text())  # default: next to the checkpoint
    assert saved['rfid'] == res['rfid'] and saved['num_images'] == 4 and saved['world_size'] == 1
    assert 'RANDOM' in saved['warning'] and saved['inception'] == 'random' and 'TensorFlow' in saved['note']
    assert np.isfinite(res['rfid']) and res['rfid'] > 0 and 0 < res['psnr'] < 60 and -1 < res['ssim'] < 1
    assert len(res['usage']) == len(res['perplexity']) == 2 and res['codebook_size'] == 512
    assert all(0 < u <= 1 for u in res['usage']) and all(1 <= p <= 512 for p in res['perplexity'])
    recon = ef.load_npz_images(str(ckpts / 'recon.npz'))
    assert recon.shape == (4, 32, 32, 3)
    # PSNR / SSIM by hand: originals are the synthetic test split, reconstructions as saved (uint8)
    x = (common.make_dataset('synthetic', 32, train=False).images[:4].double() + 1) / 2
    y = torch.from_numpy(recon).permute(0, 3, 1, 2).double() / 255
    assert res['psnr'] == pytest.approx(ef.psnr(x, y).mean().item(), rel=1e-9)
    assert res['ssim'] == pytest.approx(ef.ssim(x, y).mean().item(), rel=1e-9)
    # the same reconstructions scored from the npz, against the cached stats of the originals
    again = run(*RFID_FLAGS, f'--samples={ckpts / "recon.npz"}', f'--ref={ckpts / "ref.npz"}',
                f'--out={ckpts / "again.json"}')
    assert again['rfid'] == pytest.approx(res['rfid'], rel=1e-4)
    assert again['psnr'] == pytest.approx(res['psnr'], rel=1e-12) and 'usage' not in again
    assert again['ssim'] == pytest.approx(res['ssim'], rel=1e-12)


def test_rfid_two_processes_match_one(ckpts, rfid_1proc):
    out = ckpts / 'rfid2.json'
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR')}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'eval_fid.py',
           *RFID_FLAGS, f'--ckpt={ckpts / "tok.pt"}', '--device=cpu', '--inception=random', f'--out={out}']
    p = subprocess.run(cmd, cwd=HERE, env={**env, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two['world_size'] == 2
    for key in ('rfid', 'psnr', 'ssim', 'usage', 'perplexity', 'num_images'):
        assert two[key] == pytest.approx(rfid_1proc[key], rel=1e-9, abs=1e-12), key


def test_gfid_smoke_and_batch_invariance(ckpts):
    flags = ['--mode=gfid', f'--ckpt={ckpts / "far.pt"}', f'--ref={ckpts / "ref.npz"}', '--num_samples=5',
             '--seed=7']
    a = run(*flags, '--batch_size=2', f'--save_npz={ckpts / "g2.npz"}')
    b = run(*flags, '--batch_size=3', f'--save_npz={ckpts / "g3.npz"}', f'--out={ckpts / "g3.json"}')
    for res in (a, b):
        assert {'fid', 'is', 'is_std', 'precision', 'recall', 'warning'} <= set(res) and res['num_images'] == 5
        assert np.isfinite(res['fid']) and res['is'] >= 1 and 0 <= res['precision'] <= 1 and 0 <= res['recall'] <= 1
    assert json.loads((ckpts / 'far.pt.gfid.json').read_text())['fid'] == a['fid']
    with np.load(ckpts / 'g2.npz') as z2, np.load(ckpts / 'g3.npz') as z3:
        assert z2['arr_0'].shape == (5, 32, 32, 3) and z2['arr_0'].dtype == np.uint8
        np.testing.assert_array_equal(z2['arr_0'], z3['arr_0'])  # image i: label i and seed 7 + i, any batch size
        np.testing.assert_array_equal(z2['arr_1'], z3['arr_1'])
        labels = torch.randint(1000, (5,), generator=torch.Generator().manual_seed(7)).numpy()
        np.testing.assert_array_equal(z2['arr_1'], labels)
        assert len({im.tobytes() for im in z2['arr_0']}) == 5
    assert b['fid'] == pytest.approx(a['fid'], rel=1e-4)


def test_fid_against_own_stats(ckpts, fixture_weights):
    # stats made from an ADM npz of the same images a dataset run cached: the same mu; scoring that npz gives FID 0
    res = run('--mode=stats', f'--data={ckpts / "ref_images.npz"}', f'--out={ckpts / "ref2.npz"}', '--batch_size=3')
    assert res['num_images'] == 4
    ref, ref2 = ef.load_ref_stats(str(ckpts / 'ref.npz')), ef.load_ref_stats(str(ckpts / 'ref2.npz'))
    assert ref2['inception'] == 'random' and ref2['features'].shape == (4, 2048)
    np.testing.assert_allclose(ref2['mu'], ref['mu'], rtol=1e-4, atol=1e-6)
    res = run('--mode=gfid', f'--samples={ckpts / "ref_images.npz"}', f'--ref={ckpts / "ref.npz"}',
              f'--out={ckpts / "self.json"}')
    assert abs(res['fid']) < 1e-4 and res['precision'] == res['recall'] == 1.0
    # a reference made with random weights, scored with real ones: flagged as not comparable
    res = run('--mode=gfid', f'--samples={ckpts / "ref_images.npz"}', f'--ref={ckpts / "ref.npz"}',
              f'--out={ckpts / "mixed.json"}', f'--inception={fixture_weights[0]}')
    assert 'not comparable' in res['warning'] and 'RANDOM' not in res['warning']


def test_cli_errors(ckpts, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match='--out'):
        run('--mode=stats', '--data=synthetic', '--image_size=32')
    with pytest.raises(SystemExit, match='image_size'):
        run('--mode=stats', '--data=synthetic', f'--out={tmp_path / "s.npz"}')
    with pytest.raises(SystemExit, match='--ckpt'):
        run('--mode=gfid')
    with pytest.raises(SystemExit, match='choose one of'):
        run('--mode=fid')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    with pytest.raises(SystemExit, match='--download=true'):  # no weights, no download: a one-line exit
        ef.main(ef.parse_config(ef.EvalConfig, ['--device=cpu', f'--ckpt={ckpts / "tok.pt"}']))
