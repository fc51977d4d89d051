"""CPU tests of eval_fid.py: FID Inception parity with pytorch-fid (golden fixture, recipe weights loaded through the
user's loader), Frechet distance, IS, precision/recall, PSNR/SSIM, codebook stats and the ADM npz helpers."""
import numpy as np
import pytest
import torch

import eval_fid as ef
from conftest import load_fixture, recipe_state_dict


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

    def offline(url, dst, *a, **k):
        raise OSError('network unreachable')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(FileNotFoundError) as e:
        ef.fid_inception()
    msg = str(e.value)
    assert '\n' not in msg and ef.FID_WEIGHTS_NAME in msg and str(tmp_path) in msg and ef.FID_WEIGHTS_URL in msg
    with pytest.raises(FileNotFoundError, match='download=False'):
        ef.fid_inception(path=str(tmp_path / 'nowhere.pth'), download=False)


def test_images_to_features_random_init():
    torch.manual_seed(0)
    model = ef.fid_inception(random_init=True)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    pool, logits = ef.images_to_features(model, images, batch_size=2)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and pool.dtype == np.float32
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(images[2:]).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(pool[2:], ref.numpy(), atol=1e-5)


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
    ef.save_npz(str(tmp_path / 'imgs.npz'), images)  # images only: no stats to read
    with pytest.raises(ValueError, match='mu and sigma'):
        ef.load_ref_stats(str(tmp_path / 'imgs.npz'))
