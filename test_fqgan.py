"""Tests of the tokenizer (fqgan.py): golden parity with the official FQGAN / LlamaGen numbers (fixtures/official),
the official-checkpoint loader, then properties and recipe pins on the tiny preset.

Run: python3 -m pytest -q test_fqgan.py
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fqgan
from conftest import load_fixture, recipe_state_dict, tiny_fqgan
from fqgan import FQGAN, FQGANConfig, NearestCode, checkpoint_dict, config_from_preset, disentangle_loss, distances

TOKENIZER_FIXTURES = ["llamagen_vq16", "fqgan_dual_ds16", "fqgan_triple_ds16", "fqgan_dual_ds8"]


def rand_images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- golden parity


@pytest.mark.parametrize("name", TOKENIZER_FIXTURES)
def test_official_parity(name):
    """An official-layout checkpoint ({'model': state dict}, official key names) loaded by FQGAN.from_checkpoint
    reproduces every recorded array of the official code."""
    meta, a = load_fixture("official", name)
    tol = meta["recommended_tolerances"]
    model = FQGAN.from_checkpoint({"model": recipe_state_dict(meta)})  # infers the config, loads strictly
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == meta["n_parameters"]
    K = model.cfg.n_codebooks
    assert K == len(meta["branch_order"])
    x = torch.from_numpy(a["x"])

    # one forward (eval mode, losses on: the recorded train-mode losses are the same numbers since dropout is 0);
    # hooks record the trunk and each branch's pre-quantization output from inside that forward
    seen = {}
    model.encoder.register_forward_hook(lambda m, i, out: seen.update(trunk=out))
    for k, branch in enumerate(model.branches):
        branch.register_forward_hook(lambda m, i, out, k=k: seen.update({k: out}))
    with torch.no_grad():
        recon, aux = model(x, with_losses=True)
    if "trunk" in a:  # not stored for ds8
        np.testing.assert_allclose(seen["trunk"].numpy(), a["trunk"], rtol=0, atol=tol["trunk"]["atol"])
    z = torch.stack([seen[k] for k in range(K)])  # (K, B, D, h, w)
    np.testing.assert_allclose(z.numpy(), a["z_prequant"], rtol=0, atol=tol["z_prequant"]["atol"])

    # indices: equal wherever the recorded argmin margin is >= 1e-4 (the listed fragile positions may flip)
    idx = aux["indices"].transpose(0, 1).numpy()  # (K, B, h, w)
    robust = a["margin"] >= 1e-4
    assert (idx[robust] == a["indices"][robust]).all()
    assert (~robust).sum() == len(meta["fragile_positions"])

    # margin (second-best minus best official distance) from our own pre-quant codes
    zn = F.normalize(z.permute(0, 1, 3, 4, 2), dim=-1)  # (K, B, h, w, D)
    for k, q in enumerate(model.quantizers):
        e = q.codebook().detach()
        d = zn[k].pow(2).sum(-1, keepdim=True) + e.pow(2).sum(1) - 2 * zn[k] @ e.t()  # (B, h, w, V)
        two = d.topk(2, dim=-1, largest=False).values
        np.testing.assert_allclose((two[..., 1] - two[..., 0]).numpy(), a["margin"][k], atol=tol["margin"]["atol"])

    quant = aux["quant"].numpy().reshape(1, K, -1, *idx.shape[-2:])  # (B, K, D, h, w)
    same = torch.from_numpy(idx == a["indices"]).permute(1, 0, 2, 3).unsqueeze(2).expand(quant.shape).numpy()
    np.testing.assert_allclose(quant[same], a["quant"].reshape(quant.shape)[same], rtol=0, atol=tol["quant"]["atol"])
    np.testing.assert_allclose(recon.numpy(), a["recon"], rtol=0, atol=tol["recon"]["atol"])
    for term in ("vq_loss", "commit_loss", "entropy_loss"):
        np.testing.assert_allclose(aux[term].numpy(), a[term], rtol=tol[term]["rtol"], err_msg=term)
    if "disentangle_loss" in a:  # train- and eval-mode values are the same number
        for ref in ("disentangle_loss", "disentangle_loss_eval"):
            np.testing.assert_allclose(aux["disentangle_loss"].item(), a[ref], rtol=tol[ref]["rtol"], err_msg=ref)

    # the RECORDED indices: their codes equal the recorded quant everywhere (fragile positions too), and decoding
    # them reproduces the official decode-from-indices path
    recorded = torch.from_numpy(a["indices"]).transpose(0, 1)  # (B, K, h, w)
    with torch.no_grad():
        codes = model.indices_to_codes(recorded)
        rec = model.decode_indices(recorded)
    np.testing.assert_allclose(codes.numpy(), a["quant"], rtol=0, atol=tol["quant"]["atol"])
    np.testing.assert_allclose(rec.numpy(), a["recon_from_indices"], rtol=0, atol=tol["recon_from_indices"]["atol"])


@pytest.fixture(scope="module")
def dual_sd():
    meta, _ = load_fixture("official", "fqgan_dual_ds16")
    return recipe_state_dict(meta, check=False)


def test_official_loader_skips_training_heads_and_names_mismatches(dual_sd):
    cfg = fqgan.config_from_official(dual_sd)
    assert (cfg.n_codebooks, cfg.image_size, cfg.adapter_layers, cfg.ch_mult) == (2, 256, 6, (1, 1, 2, 2, 4))
    model = FQGAN(cfg)
    sd = dict(dual_sd, **{"sem_feat_pred.upscale.0.weight": torch.zeros(1024, 8)})
    assert fqgan.load_official_state_dict(model, sd) == ["sem_feat_pred.upscale.0.weight"]
    # official names land on ours; the float usage window becomes our int64 one
    assert torch.equal(model.quantizers[1].embedding.weight, dual_sd["quantize_sem.embedding.weight"])
    assert torch.equal(model.branches[1].adapter.positional_embedding,
                       dual_sd["encoder.semantic_head.0.positional_embedding"])
    assert torch.equal(model.branches[0].quant_conv.weight, dual_sd["quant_conv_vis.weight"])
    assert model.quantizers[0].codebook_used.dtype == torch.long
    with pytest.raises(RuntimeError, match=r"Unexpected key.*encoder\.bogus"):
        fqgan.load_official_state_dict(model, dict(dual_sd, **{"encoder.bogus": torch.zeros(1)}))
    broken = {k: v for k, v in dual_sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(RuntimeError, match=r"Missing key.*decoder\.conv_out\.bias"):
        fqgan.load_official_state_dict(model, broken)
    with pytest.raises(RuntimeError, match=r"size mismatch for post_quant_conv\.weight"):
        fqgan.load_official_state_dict(model, dict(dual_sd, **{"post_quant_conv.weight": torch.zeros(256, 8, 1, 1)}))


def test_official_checkpoint_prefers_ema_and_rejects_junk(dual_sd, tmp_path):
    """A released file may hold both 'ema' and 'model': 'ema' wins unless prefer_ema=False."""
    other = dict(dual_sd, **{"decoder.conv_out.bias": torch.zeros(3)})
    ckpt = {"ema": dual_sd, "model": other}
    assert torch.equal(FQGAN.from_checkpoint(ckpt).decoder.conv_out.bias, dual_sd["decoder.conv_out.bias"])
    assert torch.equal(FQGAN.from_checkpoint(ckpt, prefer_ema=False).decoder.conv_out.bias, torch.zeros(3))
    torch.save({"model": {"weight": torch.zeros(3)}}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not an FQGAN/LlamaGen tokenizer state dict"):
        FQGAN.from_checkpoint(tmp_path / "junk.pt")


# parameter counts on the meta device; vq16 / dual16 / triple16 equal the official models' counts
PRESET_PARAMETERS = {"tiny": 1_171_283, "vq16": 71_883_403, "vq8": 70_109_835, "dual16": 111_294_355,
                     "triple16": 131_657_883, "dual8": 110_307_219, "triple8": 131_063_963}


def test_presets_have_counts():
    assert set(PRESET_PARAMETERS) == set(fqgan.PRESETS)


@pytest.mark.parametrize("preset", sorted(fqgan.PRESETS))
def test_presets_build(preset):
    with torch.device("meta"):
        model = FQGAN(config_from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == PRESET_PARAMETERS[preset]


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="not divisible by the downsampling 4.*use a multiple of 4"):
        config_from_preset("tiny", image_size=30)
    with pytest.raises(ValueError, match="encoder must be 'cnn' or 'vit'.*got 'resnet'"):
        config_from_preset("tiny", encoder="resnet")
    with pytest.raises(ValueError, match="unknown tokenizer preset 'huge'"):
        config_from_preset("huge")


# ---- properties on the tiny preset


@pytest.mark.parametrize("K", [1, 2, 3])
def test_shapes(K):
    model = tiny_fqgan(K, adapter_layers=0 if K == 1 else 1)
    x = rand_images(2)
    recon, aux = model(x)  # train mode: losses on
    h = model.grid
    assert recon.shape == x.shape and aux["quant"].shape == (2, K * 8, h, h)
    assert aux["indices"].shape == (2, K, h, h) and aux["indices"].max() < model.cfg.codebook_size
    for term in ("vq_loss", "commit_loss", "entropy_loss", "perplexity", "usage"):
        assert aux[term].shape == (K,), term
    assert torch.isfinite(aux["vq_total"]) and (aux["usage"] > 0).all() and (aux["perplexity"] >= 1).all()
    assert model.encode(x).shape == (2, K, h, h)
    assert model.decode_indices(model.encode(x)).shape == x.shape
    assert "vq_total" not in model.codes(x, with_losses=False)


def test_straight_through_gradient_reaches_trunk_and_every_adapter():
    model = tiny_fqgan(3)
    recon, _ = model(rand_images(2))
    ((recon - 0.5) ** 2).mean().backward()  # reconstruction only: gradients must pass the quantizer
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    for branch, quantizer in zip(model.branches, model.quantizers):
        assert branch.adapter.transformer[0].attn.in_proj_weight.grad.abs().sum() > 0
        assert branch.quant_conv.weight.grad.abs().sum() > 0
        assert quantizer.embedding.weight.grad is None  # the codebook moves only through vq_loss


def test_decode_indices_equals_forward_and_keep_zeroes_codes():
    model = tiny_fqgan(2).eval()
    x = rand_images(2)
    with torch.no_grad():
        recon, aux = model(x)
        torch.testing.assert_close(model.decode(model.codes(x)["quant"]), recon, rtol=0, atol=0)
        again = model.decode_indices(aux["indices"])
        only_vis = model.decode_indices(aux["indices"], keep=[0])
        codes = model.indices_to_codes(aux["indices"], keep=[0])
    torch.testing.assert_close(again, recon, rtol=0, atol=1e-5)
    assert (only_vis - recon).abs().max() > 1e-3
    # kept branch: unit codebook vectors (the straight-through codes); dropped branch: exactly zero
    assert codes[:, 8:].abs().max() == 0 and codes[:, :8].norm(dim=1).sub(1).abs().max() < 1e-5
    torch.testing.assert_close(codes[:, :8], aux["quant"][:, :8], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.decode(codes), only_vis, rtol=0, atol=1e-5)


def test_disentanglement_values():
    e = torch.eye(8)
    a = e[0].view(1, 8, 1, 1).expand(2, 8, 4, 4)
    b = e[1].view(1, 8, 1, 1).expand(2, 8, 4, 4)
    assert disentangle_loss([a, b]).item() == 0.0  # orthogonal codes
    assert math.isclose(disentangle_loss([a, 3 * a]).item(), 1.0, rel_tol=1e-6)  # cosine, not dot product
    assert math.isclose(disentangle_loss([a, a, b]).item(), 1 / 3, rel_tol=1e-6)  # mean over the 3 pairs
    assert disentangle_loss([a]).item() == 0.0  # K = 1: nothing to disentangle


def test_disentangle_formula_in_codes():
    """aux['disentangle_loss'] = 0.1 * mean over pairs of mean over positions of the squared cosine of the codes."""
    model = tiny_fqgan(3)
    _, aux = model(rand_images(2))
    q = aux["quant"].detach().split(8, dim=1)  # K x (B, D, h, w)
    cos2 = [((q[i] * q[j]).sum(1) / (q[i].norm(dim=1) * q[j].norm(dim=1))).pow(2).mean()
            for i, j in [(0, 1), (0, 2), (1, 2)]]
    torch.testing.assert_close(aux["disentangle_loss"].detach(), 0.1 * sum(cos2) / 3, rtol=1e-5, atol=0)


def test_few_steps_lower_reconstruction_loss():
    model = tiny_fqgan(2)
    x = rand_images(4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(8):
        recon, aux = model(x)
        mse = F.mse_loss(recon, x)
        (mse + aux["vq_total"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mse.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_round_trip(tmp_path):
    model = tiny_fqgan(2).eval()
    ckpt = checkpoint_dict(model, step=3)
    assert ckpt["kind"] == "fqgan" and ckpt["step"] == 3
    torch.save(ckpt, tmp_path / "ckpt.pt")
    x = rand_images(1)
    with torch.no_grad():
        ref = model(x)[0]
        for source in (tmp_path / "ckpt.pt", torch.load(tmp_path / "ckpt.pt", weights_only=True)):
            loaded = FQGAN.from_checkpoint(source)
            assert loaded.cfg == model.cfg and not loaded.training
            torch.testing.assert_close(loaded(x)[0], ref, rtol=0, atol=0)
    bad = checkpoint_dict(model)
    bad["config"]["codebook_size"] = 256
    with pytest.raises(RuntimeError, match=r"size mismatch for quantizers\.0\.embedding\.weight"):
        FQGAN.from_checkpoint(bad)
    extra = checkpoint_dict(model)
    extra["model"]["decoder.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*decoder\.extra"):
        FQGAN.from_checkpoint(extra)


def test_wrong_input_size_is_named():
    with pytest.raises(AssertionError, match="takes 32x32 images"):
        tiny_fqgan(2)(torch.zeros(1, 3, 16, 16))


# ---- the ViT-trunk (Cluster) tokenizer


def test_vit_trunk_tokenizer():
    """encoder='vit': branches are identities, so each sub-code is the l2-normalised trunk feature snapped to the
    nearest (cosine) entry of its codebook; the trunk may be frozen and the rest still trains."""
    model = tiny_fqgan(2, encoder="vit", vit_layers=1)
    assert isinstance(model.encoder, fqgan.ViT)
    assert all(isinstance(b, torch.nn.Identity) for b in model.branches)
    x = rand_images(2)
    recon, aux = model(x)
    assert recon.shape == x.shape and aux["quant"].shape == (2, 16, 8, 8) and aux["indices"].shape == (2, 2, 8, 8)
    with torch.no_grad():
        z = F.normalize(model.encoder(x), dim=1)  # (B, D, h, w), D = codebook_dim = trunk width
        assert z.shape == (2, 8, 8, 8)
        for k, q in enumerate(model.quantizers):
            e = q.codebook()
            idx = torch.einsum("bdhw,vd->bhwv", z, e).argmax(-1)  # nearest by cosine
            assert torch.equal(aux["indices"][:, k], idx)
            torch.testing.assert_close(aux["quant"][:, 8 * k:8 * k + 8].detach(), e[idx].permute(0, 3, 1, 2),
                                       rtol=0, atol=1e-6)
    model.zero_grad(set_to_none=True)
    model.encoder.requires_grad_(False)
    recon, aux = model(x)
    (F.mse_loss(recon, x) + aux["vq_total"]).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.decoder.conv_in.weight.grad.abs().sum() > 0
    assert all(q.embedding.weight.grad.abs().sum() > 0 for q in model.quantizers)


# ---- recipe pins


def test_recipe_defaults():
    cfg = FQGANConfig()
    assert (cfg.beta, cfg.entropy_ratio, cfg.entropy_temperature, cfg.disentangle_weight) == (0.25, 0.03, 0.01, 0.1)
    assert (cfg.codebook_size, cfg.codebook_dim, cfg.n_codebooks, cfg.encoder) == (16384, 8, 2, "cnn")


def official_entropy(d, temperature):
    """The official (LlamaGen) compute_entropy_loss on logits = -d / temperature, written out."""
    logits = -d / temperature
    p = F.softmax(logits, dim=-1)
    h_sample = (-(p * F.log_softmax(logits + 1e-5, dim=-1)).sum(-1)).mean()
    p_avg = p.mean(0)
    h_avg = -(p_avg * torch.log(p_avg + 1e-5)).sum()
    return h_sample - h_avg


@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_nearest_code_matches_official_formula(temperature):
    """The chunked NearestCode (V = 2**16 -> 64 rows per chunk, N = 150 -> 3 chunks): argmin, entropy loss and its
    gradients to z and the codebook equal autograd through the official formula on the full (N, V) distances (fp64)."""
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(150, 8, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    e = F.normalize(torch.randn(2 ** 16, 8, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()  # (N, V), as the official quantizer
    loss, idx = NearestCode.apply(z, e, temperature)
    ref = official_entropy(d, temperature)
    zf, ef = z.detach().float(), e.detach().float()
    assert torch.equal(idx, d.argmin(1))
    assert torch.equal(distances(zf, ef), zf.pow(2).sum(1, keepdim=True) + ef.pow(2).sum(1) - 2 * zf @ ef.t())
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)
    for ours, official in zip(torch.autograd.grad(3 * loss, (z, e)), torch.autograd.grad(3 * ref, (z, e))):
        torch.testing.assert_close(ours, official, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        assert NearestCode.apply(z, e, 0.0)[0] == 0 and torch.equal(NearestCode.apply(z, e, 0.0)[1], idx)


def test_quantizer_losses_by_hand():
    """Codes (1, 0), (0, 1), (-1, 0); z = (3, 4) -> unit (0.6, 0.8) -> code 1, z = (-4, 3) -> (-0.8, 0.6) -> code 2.
    vq_loss = mean((q - sg z)^2) = (0.36 + 0.04 + 0.04 + 0.36) / 4 = 0.2 moves only the codebook; commit_loss =
    0.25 * mean((sg q - z)^2) = 0.05 moves only z; the entropy term is 0.03 x the official formula on d = 2 - 2 cos."""
    quantizer = fqgan.Quantizer(FQGANConfig(codebook_size=3, codebook_dim=2, usage_window=4))
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    z = torch.tensor([[3.0, -4.0], [4.0, 3.0]]).view(1, 2, 1, 2).requires_grad_()  # (B, D, h, w)
    q, stats = quantizer(z, with_losses=True)
    assert stats["indices"].tolist() == [[[1, 2]]]
    torch.testing.assert_close(q.detach(), torch.tensor([[0.0, -1.0], [1.0, 0.0]]).view(1, 2, 1, 2), rtol=0, atol=1e-7)
    torch.testing.assert_close(stats["vq_loss"], torch.tensor(0.2), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats["commit_loss"], torch.tensor(0.05), rtol=1e-6, atol=0)
    d = torch.tensor([[0.8, 0.4, 3.2], [3.6, 0.8, 0.4]])  # 2 - 2 cos
    torch.testing.assert_close(stats["entropy_loss"], 0.03 * official_entropy(d, 0.01), rtol=1e-5, atol=1e-7)
    w = quantizer.embedding.weight
    g_w, g_z = torch.autograd.grad(stats["vq_loss"], [w, z], allow_unused=True, retain_graph=True)
    assert g_z is None and (g_w.abs().sum(1) > 0).tolist() == [False, True, True]  # only the chosen codes move
    g_w, g_z = torch.autograd.grad(stats["commit_loss"], [w, z], allow_unused=True, retain_graph=True)
    assert g_w is None and g_z.abs().sum() > 0
    g_w, g_z = torch.autograd.grad(q.sum(), [w, z], allow_unused=True)  # straight-through: identity onto unit z
    assert g_w is None and g_z.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_compile_matches_fp32_on_cuda():
    model = tiny_fqgan(2).cuda().eval()
    x = rand_images(4).cuda()
    with torch.no_grad():
        ref, aux = model(x)
        fast = torch.compile(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, aux16 = fast(x)
    assert (aux16["indices"] == aux["indices"]).float().mean() > 0.95  # fp32 distances even under bf16
    assert (out.float() - ref).abs().mean() < 2e-2
