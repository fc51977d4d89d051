"""Tests of the tokenizer (fqgan.py): golden parity with the official FQGAN / LlamaGen numbers, then properties.

Run: python -m pytest -q
"""
import math

import numpy as np
import pytest
import torch

import fqgan
from conftest import load_fixture, recipe_state_dict
from fqgan import FQGAN, checkpoint_dict, config_from_preset, disentangle_loss

torch.set_num_threads(min(2, torch.get_num_threads()))
TOKENIZER_FIXTURES = ["llamagen_vq16", "fqgan_dual_ds16", "fqgan_triple_ds16", "fqgan_dual_ds8"]


# ---- golden parity


@pytest.mark.parametrize("name", TOKENIZER_FIXTURES)
def test_official_parity(name, tmp_path):
    meta, a = load_fixture("official", name)
    tol = meta["recommended_tolerances"]
    path = tmp_path / "official.pt"
    torch.save({"model": recipe_state_dict(meta)}, path)  # the layout of the released checkpoints
    model = FQGAN.from_checkpoint(path)  # the loader a user calls: infers the config, loads strictly
    assert sum(p.numel() for p in model.parameters()) == meta["n_parameters"]
    K = model.cfg.n_codebooks
    assert K == len(meta["branch_order"])
    x = torch.from_numpy(a["x"])

    model.train()  # losses are recorded from a train-mode forward; dropout is 0 so recon is the same as eval
    with torch.no_grad():
        trunk = model.encoder(x)
        if "trunk" in a:
            np.testing.assert_allclose(trunk.numpy(), a["trunk"], rtol=0, atol=tol["trunk"]["atol"])
        z = torch.stack([b(trunk) for b in model.branches])  # (K, B, D, h, w)
        recon, aux = model(x)
    np.testing.assert_allclose(z.numpy(), a["z_prequant"], rtol=0, atol=tol["z_prequant"]["atol"])

    # indices: equal wherever the recorded argmin margin is >= 1e-4 (the listed fragile positions may flip)
    idx = aux["indices"].transpose(0, 1).numpy()  # (K, B, h, w)
    robust = a["margin"] >= 1e-4
    assert (idx[robust] == a["indices"][robust]).all()
    assert (~robust).sum() == len(meta["fragile_positions"])

    # margin (second-best minus best official distance) from our own pre-quant codes
    zn = torch.nn.functional.normalize(z.permute(0, 1, 3, 4, 2), dim=-1)  # (K, B, h, w, D)
    for k, q in enumerate(model.quantizers):
        e = q.codebook().detach()
        d = zn[k].pow(2).sum(-1, keepdim=True) + e.pow(2).sum(1) - 2 * zn[k] @ e.t()  # (B, h, w, V)
        two = d.topk(2, dim=-1, largest=False).values
        np.testing.assert_allclose((two[..., 1] - two[..., 0]).numpy(), a["margin"][k], atol=tol["margin"]["atol"])

    quant = aux["quant"].numpy().reshape(1, K, -1, *idx.shape[-2:])  # (B, K, D, h, w)
    same = torch.from_numpy(idx == a["indices"]).permute(1, 0, 2, 3).unsqueeze(2).expand(quant.shape).numpy()
    ref_quant = a["quant"].reshape(quant.shape)
    np.testing.assert_allclose(quant[same], ref_quant[same], rtol=0, atol=tol["quant"]["atol"])
    np.testing.assert_allclose(recon.numpy(), a["recon"], rtol=0, atol=tol["recon"]["atol"])
    for term in ("vq_loss", "commit_loss", "entropy_loss"):
        np.testing.assert_allclose(aux[term].numpy(), a[term], rtol=tol[term]["rtol"], err_msg=term)
    if "disentangle_loss" in a:
        np.testing.assert_allclose(aux["disentangle_loss"].item(), a["disentangle_loss"], rtol=1e-5)
        model.eval()
        with torch.no_grad():
            codes, _ = model.quantize(x)
        value = model.cfg.disentangle_weight * disentangle_loss(codes).item()
        np.testing.assert_allclose(value, a["disentangle_loss_eval"], rtol=1e-5)

    # decoding the RECORDED indices reproduces the official decode-from-indices path
    with torch.no_grad():
        rec = model.decode_indices(torch.from_numpy(a["indices"]).transpose(0, 1))
    np.testing.assert_allclose(rec.numpy(), a["recon_from_indices"], rtol=0, atol=tol["recon_from_indices"]["atol"])


@pytest.fixture(scope="module")
def dual_sd():
    meta, _ = load_fixture("official", "fqgan_dual_ds16")
    return recipe_state_dict(meta, check=False)


def test_official_loader_skips_training_heads_and_names_mismatches(dual_sd, tmp_path):
    cfg = fqgan.config_from_official(dual_sd)
    assert (cfg.n_codebooks, cfg.image_size, cfg.adapter_layers, cfg.ch_mult) == (2, 256, 6, (1, 1, 2, 2, 4))
    sd = dict(dual_sd, **{"sem_feat_pred.upscale.0.weight": torch.zeros(1024, 8)})
    model = FQGAN(cfg)
    assert fqgan.load_official_state_dict(model, sd) == ["sem_feat_pred.upscale.0.weight"]
    with pytest.raises(ValueError, match="encoder.bogus"):
        fqgan.load_official_state_dict(model, dict(dual_sd, **{"encoder.bogus": torch.zeros(1)}))
    broken = {k: v for k, v in dual_sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):
        fqgan.load_official_state_dict(model, broken)
    with pytest.raises(ValueError, match="shape mismatch.*post_quant_conv.weight"):
        fqgan.load_official_state_dict(model, dict(dual_sd, **{"post_quant_conv.weight": torch.zeros(256, 8, 1, 1)}))
    # an EMA entry is preferred over 'model', as a released checkpoint may carry both
    torch.save({"ema": dual_sd, "model": {}}, tmp_path / "ema.pt")
    assert FQGAN.from_checkpoint(tmp_path / "ema.pt").cfg.n_codebooks == 2
    torch.save({"model": {"weight": torch.zeros(3)}}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not an FQGAN/LlamaGen tokenizer"):
        FQGAN.from_checkpoint(tmp_path / "junk.pt")


@pytest.mark.parametrize("preset", sorted(fqgan.PRESETS))
def test_presets_build(preset):
    with torch.device("meta"):
        model = FQGAN(config_from_preset(preset))
    n = sum(p.numel() for p in model.parameters())
    expected = {"vq16": 71_883_403, "dual16": 111_294_355, "triple16": 131_657_883}  # official counts
    assert n == expected.get(preset, n)


# ---- properties on the tiny preset


def tiny(K=2, **kw):
    torch.manual_seed(0)
    return FQGAN(config_from_preset("tiny", n_codebooks=K, **kw))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_shapes(K):
    model = tiny(K, adapter_layers=0 if K == 1 else 1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, aux = model(x)
    h = model.grid
    assert recon.shape == x.shape and aux["quant"].shape == (2, K * 8, h, h)
    assert aux["indices"].shape == (2, K, h, h) and aux["indices"].max() < model.cfg.codebook_size
    for term in ("vq_loss", "commit_loss", "entropy_loss", "perplexity", "usage"):
        assert aux[term].shape == (K,), term
    assert torch.isfinite(aux["vq_total"]) and (aux["usage"] > 0).all() and (aux["perplexity"] >= 1).all()
    assert model.encode(x).shape == (2, K, h, h)
    assert model.decode_indices(model.encode(x)).shape == x.shape


def test_straight_through_gradient_reaches_trunk_and_every_adapter():
    model = tiny(3)
    recon, aux = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    ((recon - 0.5) ** 2).mean().backward()  # reconstruction only: gradients must pass the quantizer
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    for branch in model.branches:
        assert branch.adapter.transformer[0].attn.in_proj_weight.grad.abs().sum() > 0
        assert branch.quant_conv.weight.grad.abs().sum() > 0


def test_decode_indices_equals_forward():
    model = tiny(2).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        recon, aux = model(x)
        again = model.decode_indices(aux["indices"])
        only_vis = model.decode_indices(aux["indices"], keep=[0])
    torch.testing.assert_close(again, recon, rtol=0, atol=1e-5)
    assert (only_vis - recon).abs().max() > 1e-3
    codes = model.indices_to_codes(aux["indices"], keep=[0])
    assert codes[:, 8:].abs().max() == 0 and codes[:, :8].norm(dim=1).sub(1).abs().max() < 1e-5


def test_disentanglement_values():
    e = torch.eye(8)
    a = e[0].view(1, 8, 1, 1).expand(2, 8, 4, 4)
    b = e[1].view(1, 8, 1, 1).expand(2, 8, 4, 4)
    assert disentangle_loss([a, b]).item() == 0.0  # orthogonal codes
    model = tiny(2)
    assert math.isclose(model.cfg.disentangle_weight * disentangle_loss([a, a]).item(), 0.1, rel_tol=1e-6)
    assert math.isclose(disentangle_loss([a, a, b]).item(), 1 / 3, rel_tol=1e-6)  # mean over the 3 pairs
    assert disentangle_loss([a]).item() == 0.0  # K = 1: nothing to disentangle


def test_few_steps_lower_reconstruction_loss():
    model = tiny(2)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(8):
        recon, aux = model(x)
        mse = torch.nn.functional.mse_loss(recon, x)
        (mse + aux["vq_total"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mse.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_round_trip(tmp_path):
    model = tiny(2).eval()
    torch.save(checkpoint_dict(model, step=3), tmp_path / "ckpt.pt")
    loaded = FQGAN.from_checkpoint(tmp_path / "ckpt.pt")  # weights_only=True inside
    assert loaded.cfg == model.cfg
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])
    torch.save({"kind": "far", "config": {}, "model": {}}, tmp_path / "far.pt")
    with pytest.raises(ValueError, match="'far' checkpoint, not a tokenizer"):
        FQGAN.from_checkpoint(tmp_path / "far.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        FQGAN.from_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        FQGAN.from_checkpoint(tmp_path / "garbage.pt")


def test_wrong_input_size_is_named():
    with pytest.raises(AssertionError, match="32px"):
        tiny(2)(torch.zeros(1, 3, 16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_compile_matches_fp32_on_cuda():
    model = tiny(2).cuda().eval()
    x = torch.rand(4, 3, 32, 32, device="cuda") * 2 - 1
    with torch.no_grad():
        ref, aux = model(x)
        fast = torch.compile(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, aux16 = fast(x)
    assert (aux16["indices"] == aux["indices"]).float().mean() > 0.95  # fp32 distances even under bf16
    assert (out.float() - ref).abs().mean() < 2e-2
