"""Tests of the generator (far.py): golden parity with the official FAR (fixtures/official/far_*_tiny), then, for
each head ('ar', 'linear', 'mlp'), causality and KV-cache decode == full forward; CFG, seeded inverse-CDF sampling,
initial loss, class dropout, checkpoints, the optimizer and the recipe defaults, on tiny models.

Run: python3 -m pytest -q test_far.py
"""
import functools
import math
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

import common
import far
from conftest import load_fixture, recipe_state_dict, tiny_far
from far import (FAR, PRESETS, FARConfig, LinearCrossEntropy, build_rope, checkpoint_dict, load_official_state_dict,
                 sample_logits)

GOLDEN = ["far_dual_tiny", "far_triple_tiny"]
HEADS = ["ar", "linear", "mlp"]


@functools.lru_cache(maxsize=None)
def golden(name):
    """(meta, arrays, model in eval mode) with the fixture's recipe weights loaded through the official-key loader."""
    meta, arr = load_fixture("official", name)
    a = meta["model_args"]
    cfg = FARConfig(n_codebooks=arr["codes"].shape[0], codebook_size=a["vocab_size"], block_size=a["block_size"],
                    n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["dim"], head_layers=a["ar_n_layer"],
                    num_classes=a["num_classes"], token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    model = FAR(cfg)
    load_official_state_dict(model, recipe_state_dict(meta))
    return meta, {k: torch.from_numpy(v) for k, v in arr.items()}, model.eval()


def close(a, b, atol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


def rand_codes(B, K, V=64, T=16, seed=0):
    return torch.randint(0, V, (B, K, T), generator=torch.Generator().manual_seed(seed))


# ---- golden parity with the official code

@pytest.mark.parametrize("name", GOLDEN)
def test_golden_training_forward(name):
    meta, arr, model = golden(name)
    tol = {k: v["atol"] for k, v in meta["recommended_tolerances"].items() if "atol" in v}
    assert sum(p.numel() for p in model.parameters()) == meta["n_parameters"]
    idx = arr["codes"].permute(1, 0, 2)  # (K, B, T) -> (B, K, T)
    with torch.no_grad():
        close(model.backbone(idx, arr["labels"]), arr["backbone_out"], tol["backbone_out"])
        logits, none = model(idx, arr["labels"])  # (B, K, T, V)
        no_logits, ce = model(idx, arr["labels"], targets=idx)  # (K,)
    assert none is None and no_logits is None and logits.dtype == torch.float32 and ce.shape == (len(idx[0]),)
    B, K, T, V = logits.shape
    ce_pos = F.cross_entropy(logits.flatten(0, 2), idx.flatten(), reduction="none").view(B, K, T).transpose(0, 1)
    close(ce_pos, arr["ce_per_position"], tol["ce_per_position"])
    close(ce, arr["ce"], tol["ce"])
    close(ce_pos.mean((1, 2)), arr["ce"], tol["ce"])
    close(ce.mean(), arr["loss"], tol["loss"])
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
    """Free-running greedy CFG decode through generate(): identical samples (a divergence may only start at a
    fragile step, top-2 gap < 1e-3) and the first CFG logits within tolerance."""
    meta, arr, model = golden(name)
    out, logits = model.generate(torch.tensor([3]), cfg_scale=2.0, top_k=1, return_logits=True, seeds=[0])
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
    fresh = FAR(model.cfg)
    load_official_state_dict(fresh, {"model": sd})  # a checkpoint dict holding the state dict under 'model' works
    assert torch.equal(fresh.wte[1].weight, sd["tok_embeddings_2.weight"])
    assert torch.equal(fresh.head_blocks[0].attn.wqkv.weight, sd["ar_head.0.attention.wqkv.weight"])
    with pytest.raises(RuntimeError, match=r"Unexpected key.*layers\.0\.attention\.kv_cache\.k_cache"):
        load_official_state_dict(FAR(model.cfg), {**sd, "layers.0.attention.kv_cache.k_cache": torch.zeros(1)})
    bad = {k: v for k, v in sd.items() if k != "norm.weight"}
    bad["output_2.weight"] = torch.zeros(10, 128)
    with pytest.raises(RuntimeError) as err:
        load_official_state_dict(FAR(model.cfg), bad)
    assert 'Missing key(s) in state_dict: "norm.weight"' in str(err.value)
    assert "size mismatch for lm_head.1.weight" in str(err.value)


# ---- per head: causality and cached decoding


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("head", HEADS)
def test_causality(head, K):
    """Changing sub-token k at position t changes no logit of earlier positions, nor (ar head) of sub-tokens <= k
    at t, nor (linear / mlp heads: sub-tokens of one position are independent) any logit at t; later ones react."""
    model, V = tiny_far(K, head=head), 64
    idx, labels = rand_codes(2, K), torch.tensor([1, 4])
    with torch.no_grad():
        base, _ = model(idx, labels)
        for k, t in [(0, 5), (K - 1, 9), (K // 2, 0), (0, 15)]:
            idx2 = idx.clone()
            idx2[:, k, t] = (idx2[:, k, t] + 1) % V
            new, _ = model(idx2, labels)
            close(new[:, :, :t], base[:, :, :t], 1e-6)
            fixed = k + 1 if head == "ar" else K
            close(new[:, :fixed, t], base[:, :fixed, t], 1e-6)
            if fixed < K:  # the AR head sees sub-token k: later sub-tokens of position t must react
                assert (new[:, k + 1:, t] - base[:, k + 1:, t]).abs().max() > 1e-4
            if t < 15:
                assert (new[:, :, t + 1:] - base[:, :, t + 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("head", HEADS)
def test_kv_cache_generation_matches_full_forward(head, K):
    """Guided logits of the cached decode == u + s (c - u) from the full forward on the sampled tokens."""
    model = tiny_far(K, head=head)
    labels = torch.tensor([1, 7])
    out, logits = model.generate(labels, cfg_scale=3.0, return_logits=True, seeds=[0, 1])
    assert out.shape == (2, K, 16) and out.dtype == torch.long and 0 <= out.min() and out.max() < 64
    assert logits.shape == (2, K, 16, 64) and logits.dtype == torch.float32
    with torch.no_grad():
        full, _ = model(out.repeat(2, 1, 1), torch.tensor([1, 7, 10, 10]))  # (4, K, T, V): cond then null
    c, u = full.chunk(2)
    close(logits, u + 3.0 * (c - u), 5e-5)
    assert all(b.attn.cache_k is None for b in list(model.blocks) + list(model.head_blocks))  # caches released


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_independent_heads_are_per_subtoken_classifiers(head):
    """linear: logits_k = norm(h) @ lm_head[k].weight.T; mlp: lm_head[k](gelu(mlps[k] linear(norm(h)))), with
    norm the final RMSNorm and h the backbone output; neither has head blocks."""
    K = 3
    model = tiny_far(K, head=head)
    assert len(model.head_blocks) == 0 and len(model.mlps) == (K if head == "mlp" else 0)
    idx, labels = rand_codes(2, K), torch.tensor([0, 9])
    with torch.no_grad():
        logits, _ = model(idx, labels)
        h = model.backbone(idx, labels)
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * model.norm.weight
        for k in range(K):
            z = n if head == "linear" else F.gelu(n @ model.mlps[k][0].weight.T + model.mlps[k][0].bias)
            close(logits[:, k], z @ model.lm_head[k].weight.T, 1e-5)


def test_cfg_scale_one_is_conditional():
    model, labels = tiny_far(), torch.tensor([2, 9])
    out, logits = model.generate(labels, cfg_scale=1.0, top_k=1, return_logits=True)
    with torch.no_grad():
        cond, _ = model(out, labels)
    close(logits, cond, 1e-5)
    assert torch.equal(out, cond.argmax(-1))


def test_sampling_depends_only_on_own_seed():
    """An image's uniforms come from torch.Generator().manual_seed(seed): it is the same alone or in a batch, and
    each token is sample_logits of its guided logits at its uniform (inverse CDF)."""
    model = tiny_far()
    filters = dict(temperature=0.9, top_k=40, top_p=0.9)
    both, logits = model.generate(torch.tensor([2, 5]), cfg_scale=2.0, seeds=[1, 2], return_logits=True, **filters)
    alone = model.generate(torch.tensor([5]), cfg_scale=2.0, seeds=[2], **filters)
    assert torch.equal(both[1:], alone)
    assert not torch.equal(model.generate(torch.tensor([5]), cfg_scale=2.0, seeds=[3], **filters), alone)
    for b, seed in enumerate([1, 2]):
        u = torch.rand(16, 2, generator=torch.Generator().manual_seed(seed))  # (T, K)
        redraw = sample_logits(logits[b].transpose(0, 1).reshape(32, 64), u.reshape(32), **filters)
        assert torch.equal(redraw, both[b].T.reshape(32))


# ---- sample_logits

PROBS = torch.tensor([0.05, 0.5, 0.3, 0.15])


def draw(u, **kw):
    u = torch.as_tensor(u, dtype=torch.float32).reshape(-1)
    return sample_logits(PROBS.log().expand(len(u), -1), u, **kw).tolist()


def test_sample_logits_filters_and_edges():
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    assert draw([0.0, below_one]) == [0, 3]  # the first and the last token of the CDF
    assert draw([0.0, 0.5, below_one], top_k=2) == [1, 1, 2]  # filtered tokens (0 and 3) never come out
    assert draw([0.0, 0.5, below_one], top_p=0.7) == [1, 1, 2]  # nucleus {1, 2}: mass 0.5 < 0.7 <= 0.8
    assert draw([0.0, below_one], top_p=0.4) == [1, 1]  # the top token always stays
    assert draw([0.0, 0.5, below_one], top_k=1) == [1, 1, 1]  # greedy
    assert draw([0.0, 0.5, below_one], temperature=1e-3) == [1, 1, 1]  # near-zero temperature is greedy too


@pytest.mark.parametrize("kw, expected", [({}, PROBS), (dict(top_k=2), torch.tensor([0, 0.625, 0.375, 0])),
                                          (dict(temperature=2.0), PROBS.sqrt() / PROBS.sqrt().sum())])
def test_sample_logits_inverse_cdf_matches_probabilities(kw, expected):
    """Evenly spaced uniforms land in each token's CDF interval in exact proportion to its probability; random
    uniforms match it statistically."""
    n = 2000
    counts = torch.bincount(torch.tensor(draw((torch.arange(n) + 0.5) / n, **kw)), minlength=4)
    assert (counts - expected * n).abs().max() <= 1, counts
    freq = torch.bincount(torch.tensor(draw(torch.rand(n, generator=torch.Generator().manual_seed(0)), **kw)),
                          minlength=4) / n
    assert (freq - expected).abs().max() < 0.03, freq  # 3 sigma of a binomial at p = 0.5, n = 2000 is 0.034


# ---- training-side properties


@pytest.mark.parametrize("head", HEADS)
def test_initial_loss_is_log_vocab(head):
    torch.manual_seed(0)
    model = FAR(FARConfig(**PRESETS["tiny"], n_codebooks=2, codebook_size=64, block_size=16, num_classes=10,
                          head=head))
    idx, labels = rand_codes(3, 2), torch.tensor([0, 5, 10])
    logits, _ = model(idx, labels)
    assert logits.shape == (3, 2, 16, 64) and logits.dtype == torch.float32 and logits.abs().max() == 0
    _, ce = model(idx, labels, targets=idx)
    close(ce, torch.full((2,), math.log(64)), 1e-6)


def test_linear_cross_entropy_equals_plain_path():
    """The chunked fused linear + CE: same loss and gradients as F.cross_entropy(F.linear(z, W), y), across chunks
    (V = 2**16 -> 64 rows per chunk, N = 150 -> 3 chunks); no gradient work without autograd."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(150, 8, generator=g, requires_grad=True)
    w = torch.randn(2 ** 16, 8, generator=g, requires_grad=True)
    y = torch.randint(2 ** 16, (150,), generator=g)
    ref = F.cross_entropy(F.linear(z, w), y)
    loss = LinearCrossEntropy.apply(z, w, y, True)
    for a, b in zip(torch.autograd.grad(3 * loss, (z, w)), torch.autograd.grad(3 * ref, (z, w))):
        close(a, b, 1e-5)
    close(loss, ref, 1e-5)
    with torch.no_grad():
        close(LinearCrossEntropy.apply(z, w, y, False), ref, 1e-5)


@pytest.mark.parametrize("head", HEADS)
def test_training_loss_and_gradients_equal_logits_path(head, monkeypatch):
    """model(idx, labels, targets=idx) (fused CE, RMSNorm and SwiGLU recomputed in the backward) has the loss and the
    parameter gradients of the plain path: CE of the returned logits, nothing recomputed."""
    model = tiny_far(2, head=head)
    idx, labels = rand_codes(3, 2), torch.tensor([0, 5, 10])
    _, ce = model(idx, labels, targets=idx)
    grads = torch.autograd.grad(ce.mean(), list(model.parameters()))
    monkeypatch.setattr(far, "recompute", lambda fn, *args: fn(*args))
    logits, _ = model(idx, labels)
    ref = torch.stack([F.cross_entropy(logits[:, k].flatten(0, 1), idx[:, k].flatten()) for k in range(2)])
    close(ce, ref, 1e-5)
    for a, b in zip(grads, torch.autograd.grad(ref.mean(), list(model.parameters()))):
        close(a, b, 1e-5)


def test_class_dropout_uses_null_label():
    model = tiny_far(class_dropout=1.0)
    idx = rand_codes(2, 2)
    with torch.no_grad():
        dropped, _ = model.train()(idx, torch.tensor([3, 4]))
        null, _ = model.eval()(idx, torch.tensor([10, 10]))
    close(dropped, null, 1e-6)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_far(3, head="mlp")
    idx, labels = rand_codes(2, 3), torch.tensor([1, 2])
    torch.save(checkpoint_dict(model, step=7), tmp_path / "a.pt")
    with torch.no_grad():
        ref = model(idx, labels)[0]
        for source in (tmp_path / "a.pt", torch.load(tmp_path / "a.pt", weights_only=True)):
            loaded = FAR.from_checkpoint(source)
            assert loaded.cfg == model.cfg and not loaded.training
            assert torch.equal(loaded(idx, labels)[0], ref)
    with pytest.raises(AssertionError, match="kind='fqgan', not 'far'"):
        FAR.from_checkpoint({**checkpoint_dict(model), "kind": "fqgan"})
    ckpt = checkpoint_dict(model)
    ckpt["model"]["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*blocks\.0\.extra"):
        FAR.from_checkpoint(ckpt)


def test_adamw_decays_matrices_and_lowers_loss():
    model = tiny_far(2).train()
    opt = common.adamw(model, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05, device_type="cpu")
    decayed, plain = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert {"cls_emb.weight", "wte.0.weight", "agg.weight", "lm_head.1.weight", "blocks.0.attn.wqkv.weight"} <= names
    assert all(id(p) in plain for n, p in model.named_parameters() if n in ("agg.bias", "norm.weight"))
    idx, labels = rand_codes(4, 2), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(8):
        _, ce = model(idx, labels, targets=idx)
        loss = ce.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_recipe_defaults():
    cfg = FARConfig()
    assert (cfg.class_dropout, cfg.token_dropout, cfg.resid_dropout, cfg.ffn_dropout) == (0.1, 0.1, 0.1, 0.1)
    assert (cfg.head, cfg.head_layers, cfg.rope_base, cfg.norm_eps, cfg.multiple_of) == ("ar", 3, 10000.0, 1e-5, 256)
    assert "cls_rope" not in {f.name for f in fields(FARConfig)}
    rope = build_rope(FARConfig(**PRESETS["tiny"], block_size=16))
    assert rope.shape == (17, 8, 2) and rope[0].abs().max() == 0  # class token: cos = sin = 0
    with pytest.raises(ValueError, match="head='moe': choose"):
        FARConfig(head="moe")


def test_compiled_decode_equals_eager():
    """generate(compile=True) (torch.compile of the static decode step, CPU inductor) == eager, token for token."""
    model = tiny_far(2)
    kw = dict(cfg_scale=2.0, top_p=0.9, seeds=[4, 5], return_logits=True)
    eager, eager_logits = model.generate(torch.tensor([1, 8]), **kw)
    compiled, compiled_logits = model.generate(torch.tensor([1, 8]), compile=True, **kw)  # ~30 s cold, 3 s cached
    assert torch.equal(compiled, eager)
    close(compiled_logits, eager_logits, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_compile_close_to_fp32():
    """bf16 autocast + torch.compile (CUDA graph decode) stay close to fp32; compared teacher-forced, so a near-tie
    that flips one sampled token cannot fail the test."""
    model = tiny_far().cuda()
    idx, labels = rand_codes(2, 2).cuda(), torch.tensor([1, 4], device="cuda")
    with torch.no_grad():
        ref, _ = model(idx, labels)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = torch.compile(model)(idx, labels)
            out = model.generate(labels, cfg_scale=2.0, seeds=[0, 1])
            fast, fast_logits = model.generate(labels, cfg_scale=2.0, seeds=[0, 1], compile=True, return_logits=True)
        full, _ = model(fast.repeat(2, 1, 1), torch.tensor([1, 4, 10, 10], device="cuda"))  # fp32, cond then null
    assert logits.dtype == fast_logits.dtype == torch.float32 and out.shape == fast.shape == (2, 2, 16)
    close(logits, ref, 0.15)
    c, u = full.chunk(2)
    close(fast_logits, u + 2.0 * (c - u), 0.5)  # bf16 error of c and u, amplified by the guidance (2c - u)
