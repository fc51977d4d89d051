"""Tests for far.py (CPU, fast): golden parity with the official FAR (../shared/fixtures/official/far_*_tiny),
causality of backbone and head, KV-cache decode == full forward, CFG, initial loss, checkpoints, a few AdamW steps."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import load_fixture, recipe_state_dict
from far import FAR, PRESETS, FARConfig, checkpoint_dict, load_official_state_dict, sample_logits

GOLDEN = ["far_dual_tiny", "far_triple_tiny"]


@pytest.fixture(autouse=True)
def one_thread():
    """Token-by-token decoding is many tiny ops: on a shared 2-core machine one thread is ~10x faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def golden(name):
    """(meta, arrays, model in eval mode) with the fixture's recipe weights loaded through the official-key loader."""
    meta, arr = load_fixture("official", name)
    a = meta["model_args"]
    cfg = FARConfig(n_codebooks=arr["codes"].shape[0], codebook_size=a["vocab_size"], block_size=a["block_size"],
                    n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["dim"], head_layers=a["ar_n_layer"],
                    num_classes=a["num_classes"], token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    model = FAR(cfg)
    load_official_state_dict(model, recipe_state_dict(meta), name)
    return meta, {k: torch.from_numpy(v) for k, v in arr.items()}, model.eval()


def tiny(K=2, seed=0, **kw):
    """Tiny FAR (V=64, 4x4 grid, 10 classes) with random (not zero) output layers so logits are informative."""
    torch.manual_seed(seed)
    cfg = dict(PRESETS["tiny"], n_codebooks=K, codebook_size=64, block_size=16, num_classes=10, class_dropout=0.0,
               token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    model = FAR(FARConfig(**{**cfg, **kw}))
    for out in model.lm_head:
        torch.nn.init.normal_(out.weight, std=0.2)
    return model.eval()


def close(a, b, atol):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return
    err = (a.double() - b.double()).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


# ---- golden parity with the official code

@pytest.mark.parametrize("name", GOLDEN)
def test_golden_training_forward(name):
    meta, arr, model = golden(name)
    tol = {k: v["atol"] for k, v in meta["recommended_tolerances"].items() if "atol" in v}
    assert sum(p.numel() for p in model.parameters()) == meta["n_parameters"]
    idx = arr["codes"].permute(1, 0, 2)  # (K, B, T) -> (B, K, T)
    with torch.no_grad():
        close(model.backbone(idx, arr["labels"]), arr["backbone_out"], tol["backbone_out"])
        logits, loss = model(idx, arr["labels"], targets=idx)  # (B, K, T, V)
    B, K, T, V = logits.shape
    ce = F.cross_entropy(logits.flatten(0, 2), idx.flatten(), reduction="none").view(B, K, T).transpose(0, 1)
    close(ce, arr["ce_per_position"], tol["ce_per_position"])
    close(ce.mean((1, 2)), arr["ce"], tol["ce"])
    close(loss, arr["loss"], tol["loss"])
    close(logits[:, :, arr["logit_positions"]].transpose(0, 1), arr["logits_sel"], tol["logits_sel"])


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_rescoring(name):
    """Teacher-forced re-scoring of the official greedy CFG samples: argmax of u + 2(c - u) reproduces them."""
    meta, arr, model = golden(name)
    samples = arr["gen_samples"]  # (K, T)
    with torch.no_grad():
        logits, _ = model(samples[None].repeat(2, 1, 1), torch.tensor([3, 1000]))  # (2, K, T, V)
    c, u = logits
    guided = u + 2.0 * (c - u)  # (K, T, V)
    sure = arr["gen_top2_gap"] >= 1e-3
    assert torch.equal(guided.argmax(-1)[sure], samples[sure])
    close(guided[:, :2].transpose(0, 1), arr["gen_logits_first2"], meta["recommended_tolerances"]["gen_logits_first2"]
          ["atol"])


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_kv_cache_decode(name):
    """Free-running greedy CFG decode with KV caches: identical samples (a divergence may only start at a fragile
    step, top-2 gap < 1e-3) and the first CFG logits within tolerance."""
    meta, arr, model = golden(name)
    out, logits = model.generate(torch.tensor([3]), cfg_scale=2.0, top_k=1, return_logits=True,
                                 generator=torch.Generator().manual_seed(0))
    close(logits[0, :, :2].transpose(0, 1), arr["gen_logits_first2"],
          meta["recommended_tolerances"]["gen_logits_first2"]["atol"])
    diff = (out[0] != arr["gen_samples"]).T.nonzero()  # (n, 2) as (t, k), in decode order
    if len(diff):
        t, k = diff[0].tolist()
        fragile = {(meta["subtoken_order"].index(f["subtoken"]), f["position"]) for f in meta["fragile_positions"]}
        assert (k, t) in fragile, f"decode diverged at sub-token {k}, position {t}, which is not a fragile step"


def test_official_loader_names_every_problem():
    meta, _, model = golden("far_dual_tiny")
    sd = recipe_state_dict(meta, check=False)
    with pytest.raises(ValueError, match="layers.0.attention.kv_cache.k_cache"):
        load_official_state_dict(FAR(model.cfg), {**sd, "layers.0.attention.kv_cache.k_cache": torch.zeros(1)})
    bad = {k: v for k, v in sd.items() if k != "norm.weight"}
    bad["output_2.weight"] = torch.zeros(10, 128)
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\].*lm_head.1.weight \(10, 128\)"):
        load_official_state_dict(FAR(model.cfg), bad)


# ---- properties of the model (tiny preset)

@pytest.mark.parametrize("K", [1, 2, 3])
def test_causality(K):
    """A changed sub-token k at position t changes no logit of earlier positions nor of sub-tokens <= k at t."""
    model, V = tiny(K), 64
    idx, labels = torch.randint(0, V, (2, K, 16)), torch.tensor([1, 4])
    with torch.no_grad():
        base, _ = model(idx, labels)
        for k, t in [(0, 5), (K - 1, 9), (K // 2, 0), (0, 15)]:
            idx2 = idx.clone()
            idx2[:, k, t] = (idx2[:, k, t] + 1) % V
            new, _ = model(idx2, labels)
            close(new[:, :, :t], base[:, :, :t], 1e-6)
            close(new[:, :k + 1, t], base[:, :k + 1, t], 1e-6)
            if k < K - 1:  # the head sees sub-token k: later sub-tokens of position t must react (test not vacuous)
                assert (new[:, k + 1:, t] - base[:, k + 1:, t]).abs().max() > 1e-4
            if t < 15:
                assert (new[:, :, t + 1:] - base[:, :, t + 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("K", [1, 3])
def test_kv_cache_generation_matches_full_forward(K):
    """Guided logits of the cached decode == u + s_t (c - u) from the full forward on the sampled tokens."""
    model = tiny(K)
    labels = torch.tensor([1, 7])
    out, logits = model.generate(labels, cfg_scale=3.0, cfg_schedule="linear", return_logits=True,
                                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, K, 16) and out.dtype == torch.long and 0 <= out.min() and out.max() < 64
    with torch.no_grad():
        full, _ = model(out.repeat(2, 1, 1), torch.tensor([1, 7, 10, 10]))  # (4, K, T, V): cond then null
    c, u = full.chunk(2)
    s = 1 + 2.0 * torch.arange(16) / 15  # linear schedule: 1 at position 0 -> 3 at position T-1
    close(logits, u + s[:, None] * (c - u), 5e-5)


def test_cfg_scale_one_is_conditional():
    model, labels = tiny(), torch.tensor([2, 9])
    out, logits = model.generate(labels, cfg_scale=1.0, top_k=1, return_logits=True)
    with torch.no_grad():
        cond, _ = model(out, labels)
    close(logits, cond, 1e-5)
    assert torch.equal(out, cond.argmax(-1))
    # the doubled (guided) path at scale 1: the linear schedule starts at s = 1 at position 0
    out, logits = model.generate(labels, cfg_scale=4.0, cfg_schedule="linear", top_k=1, return_logits=True)
    with torch.no_grad():
        cond, _ = model(out, labels)
    close(logits[:, :, 0], cond[:, :, 0], 1e-5)


def test_sampling_independent_of_batch_split():
    """With one generator per row, an image depends only on its own seed, not on its batch companions."""
    model = tiny()
    both = model.generate(torch.tensor([2, 5]), cfg_scale=2.0, top_p=0.9,
                          generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = model.generate(torch.tensor([5]), cfg_scale=2.0, top_p=0.9, generator=[torch.Generator().manual_seed(2)])
    assert torch.equal(both[1:], alone)


def test_sample_logits_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    assert set(sample_logits(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample_logits(logits, top_k=1, generator=g).tolist()) == {0}


def test_initial_loss_is_log_vocab():
    torch.manual_seed(0)
    model = FAR(FARConfig(**PRESETS["tiny"], n_codebooks=2, codebook_size=64, block_size=16, num_classes=10))
    idx = torch.randint(0, 64, (3, 2, 16))
    logits, loss = model(idx, torch.tensor([0, 5, 10]), targets=idx)
    assert logits.shape == (3, 2, 16, 64) and logits.dtype == torch.float32
    assert abs(loss.item() - math.log(64)) < 1e-6


def test_class_dropout_uses_null_label():
    model = tiny(class_dropout=1.0)
    idx = torch.randint(0, 64, (2, 2, 16))
    with torch.no_grad():
        dropped, _ = model.train()(idx, torch.tensor([3, 4]))
        null, _ = model.eval()(idx, torch.tensor([10, 10]))
    close(dropped, null, 1e-6)


def test_checkpoint_round_trip(tmp_path):
    model, ema = tiny(), tiny(seed=1)
    idx, labels = torch.randint(0, 64, (2, 2, 16)), torch.tensor([1, 2])
    torch.save(checkpoint_dict(model, step=7), tmp_path / "a.pt")
    loaded = FAR.from_checkpoint(tmp_path / "a.pt")
    assert loaded.cfg == model.cfg and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(idx, labels)[0], model(idx, labels)[0])
    torch.save(checkpoint_dict(model, ema=ema.state_dict()), tmp_path / "b.pt")  # 'ema' preferred when present
    assert torch.equal(FAR.from_checkpoint(tmp_path / "b.pt").lm_head[0].weight, ema.lm_head[0].weight)
    assert torch.equal(FAR.from_checkpoint(tmp_path / "b.pt", prefer_ema=False).lm_head[0].weight,
                       model.lm_head[0].weight)
    torch.save({**checkpoint_dict(model), "kind": "fqgan"}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="kind='fqgan', not 'far'"):
        FAR.from_checkpoint(tmp_path / "c.pt")
    ckpt = checkpoint_dict(model)
    ckpt["model"]["blocks.0.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "d.pt")
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.extra'\]"):
        FAR.from_checkpoint(tmp_path / "d.pt")


def test_adamw_steps_lower_loss():
    torch.manual_seed(0)
    model = FAR(FARConfig(**PRESETS["tiny"], n_codebooks=2, codebook_size=64, block_size=16, num_classes=10,
                          class_dropout=0.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)).train()
    opt = model.configure_optimizer(weight_decay=0.05, lr=3e-3, betas=(0.9, 0.95), device_type="cpu")
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert all((p.dim() >= 2) == (id(p) in decayed) for p in model.parameters())
    idx, labels = torch.randint(0, 64, (4, 2, 16)), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(8):
        _, loss = model(idx, labels, targets=idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_compile_close_to_fp32():
    model = tiny().cuda()
    idx, labels = torch.randint(0, 64, (2, 2, 16), device="cuda"), torch.tensor([1, 4], device="cuda")
    with torch.no_grad():
        ref, _ = model(idx, labels)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = torch.compile(model)(idx, labels, targets=idx)
            out = model.generate(labels, cfg_scale=2.0, generator=torch.Generator("cuda").manual_seed(0))
    assert logits.dtype == torch.float32 and torch.isfinite(loss) and out.shape == (2, 2, 16)
    close(logits, ref, 0.15)
