"""CPU tests of pretrained.py: parity of CLIP / DINOv2 / LPIPS with the golden fixtures of fixtures/pretrained (recipe
weights written to files and read back through the user-facing loaders), strict loading of the real checkpoint layouts
on the meta device, one-line errors for missing weight files (never a download), the Teacher preprocessing, and the
small Classifier networks trained here (forward, checkpoints, Teacher / FeatureNet wrappers). The FID Inception is
tested in test_eval_fid.py."""
import warnings
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrained as P
from common import save_checkpoint
from conftest import load_fixture, recipe_state_dict

T = torch.from_numpy


def close(got, want, atol, rtol=0.0, what=""):
    """Assert got (tensor) matches a fixture array within atol + rtol*|want|, reporting the max error."""
    got, want = got.detach().float(), T(np.asarray(want)).float()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert torch.allclose(got, want, atol=atol, rtol=rtol), f"{what}: max abs err {err:.3g}"


def capture(modules):
    """Forward hooks collecting each module's output, in call order."""
    outs = []
    for m in modules:
        m.register_forward_hook(lambda mod, inp, out: outs.append(out))
    return outs


# ---- CLIP

def test_clip_tiny_parity(tmp_path):
    meta, a = load_fixture("pretrained", "clip_vit_tiny")
    assert meta["constructor_kwargs"] == P.CLIP_PRESETS["tiny"][0]
    sd = {"visual." + k: v for k, v in recipe_state_dict(meta).items()}  # the OpenAI file layout
    sd["token_embedding.weight"], sd["logit_scale"] = torch.zeros(10, 4), torch.ones([])  # text tower: ignored
    torch.save(sd, tmp_path / "clip_tiny.pt")
    model = P.clip_vit("tiny", path=tmp_path / "clip_tiny.pt")
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    tol = meta["recommended_tolerances"]
    blocks, ln_pre = capture(model.transformer.resblocks), capture([model.ln_pre])
    with torch.no_grad():
        out = model(T(a["x"]))
        for k, got in [("embedding", out["embedding"]), ("cls_pre_ln_post", out["cls"]),
                       ("cls_ln_post", model.ln_post(out["cls"])), ("patch_tokens_ln_post", out["patch"]),
                       ("tokens_pre_ln_post", blocks[-1]), ("ln_pre_out", ln_pre[0]),
                       ("block_out", torch.stack(blocks))]:
            close(got, a[k], tol[k]["atol"], what=k)
        out = model(T(a["b2_x"]))  # batch of 2 catches (L, N, C) / (N, L, C) mix-ups
        for k, got in [("b2_embedding", out["embedding"]), ("b2_cls_pre_ln_post", out["cls"]),
                       ("b2_patch_tokens_ln_post", out["patch"])]:
            close(got, a[k], tol[k]["atol"], what=k)


def test_torchscript_archive_and_fp16(tmp_path):
    """OpenAI ships CLIP as TorchScript with fp16 weights: both must read back, then load as float32 tensors."""
    class Holder(nn.Module):
        def forward(self, x):
            return x

    root = Holder()
    root.visual = nn.Module()
    root.visual.proj = nn.Parameter(torch.randn(4, 3).half())
    with warnings.catch_warnings():  # torch.jit is deprecated; only the test writes an archive
        warnings.simplefilter("ignore")
        torch.jit.trace(root, torch.zeros(1)).save(str(tmp_path / "ts.pt"))
    sd = P.read_state_dict(tmp_path / "ts.pt")
    assert list(sd) == ["visual.proj"] and sd["visual.proj"].dtype == torch.float16
    lin = P.load_weights(nn.Linear(3, 4, bias=False), {"visual.weight": sd["visual.proj"]}, "ts.pt", prefix="visual.")
    assert lin.weight.dtype == torch.float32 and torch.equal(lin.weight, sd["visual.proj"].float())
    assert not lin.weight.requires_grad and not lin.training


def test_strict_loading_names_bad_keys():
    meta, _ = load_fixture("pretrained", "clip_vit_tiny")
    sd = {"visual." + k: v for k, v in recipe_state_dict(meta, check=False).items()}
    del sd["visual.ln_post.bias"]
    sd["visual.extra.weight"] = torch.zeros(3)
    sd["visual.proj"] = torch.zeros(64, 31)
    with pytest.raises(SystemExit) as e:
        P.load_weights(P.CLIPVision(P.CLIPConfig(**P.CLIP_PRESETS["tiny"][0])), sd, "clip_tiny.pt", prefix="visual.")
    msg = str(e.value)
    assert msg.startswith("clip_tiny.pt (keys under 'visual.'): ")
    for key in ['"ln_post.bias"', '"extra.weight"', "size mismatch for proj", "[64, 31]", "[64, 32]"]:
        assert key in msg, key


# ---- DINOv2

@pytest.mark.parametrize("name", ["dinov2_tiny", "dinov2_tiny_reg4", "dinov2_tiny518_at224",
                                  "dinov2_tiny518_reg4_at224"])
def test_dinov2_parity(name, tmp_path):
    meta, a = load_fixture("pretrained", name)
    kw = meta["constructor_kwargs"]
    assert kw["ffn_layer"] == "mlp" and kw["block_chunks"] == 0  # the only layout we implement
    cfg = P.DINOv2Config(**{f.name: kw[f.name] for f in fields(P.DINOv2Config)})
    path = tmp_path / "dino.pth"
    torch.save(recipe_state_dict(meta), path)  # plain state dict, as the facebookresearch files
    if name == "dinov2_tiny":  # through the user-facing builder
        assert cfg == P.DINOv2Config(**P.DINOV2_PRESETS["tiny"])
        model = P.dinov2("tiny", path=path)
    else:
        model = P.load_weights(P.DINOv2(cfg), P.read_state_dict(path), str(path))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    tol = meta["recommended_tolerances"]
    blocks = capture(model.blocks)
    x = T(a["x"])
    with torch.no_grad():
        close(model.interpolate_pos_encoding(*x.shape[-2:]), a["pos_embed_used"], tol["pos_embed_used"]["atol"],
              what="pos_embed_used")
        out = model(x)
    got = {"x_norm_clstoken": out["cls"], "x_norm_patchtokens": out["patch"], "x_prenorm": out["prenorm"],
           "block_out": torch.stack(blocks)}
    if cfg.num_register_tokens:
        got["x_norm_regtokens"] = out["reg"]
    for k, v in got.items():
        close(v, a[k], tol[k]["atol"], what=k)


# ---- real checkpoint layouts (meta device: no memory, no weights)

@pytest.fixture(scope="module")
def layouts():
    return load_fixture("pretrained", "real_checkpoint_layouts")[0]


def _layout_dict(entry):
    return {e["key"]: torch.empty(e["shape"], device="meta") for e in entry["state_dict"]}


@pytest.mark.parametrize("name", ["ViT-B/16", "ViT-L/14"])
def test_clip_real_layout(name, layouts):
    entry = layouts[f"clip_{name}"]
    kwargs, fname = P.CLIP_PRESETS[name]
    assert kwargs == entry["constructor"] and fname in P.WEIGHT_URLS
    with torch.device("meta"):
        model = P.CLIPVision(P.CLIPConfig(**kwargs))
    sd = _layout_dict(entry)
    assert {"visual." + k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in sd.items()}
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]
    P.load_weights(model, sd, fname, prefix=entry["checkpoint_prefix"])  # the real file's keys load strictly


@pytest.mark.parametrize("name", ["vits14", "vitb14", "vits14_reg", "vitb14_reg"])
def test_dinov2_real_layout(name, layouts):
    entry = layouts[f"dinov2_{name}"]
    cfg = P.DINOv2Config(**P.DINOV2_PRESETS[name])
    hub = entry["hub_kwargs"]
    assert {k: getattr(cfg, k) for k in hub if hasattr(cfg, k)} == {k: v for k, v in hub.items() if hasattr(cfg, k)}
    with torch.device("meta"):
        model = P.DINOv2(cfg)
    sd = _layout_dict(entry)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]
    P.load_weights(model, sd, name, prefix=entry["checkpoint_prefix"])


# ---- missing weight files: one-line error naming the file, the place and the fix; never a download in tests

@pytest.mark.parametrize("build, fname, where, fix", [
    (lambda tmp: P.clip_vit("ViT-L/14"), "ViT-L-14.pt", "checkpoints", "--download=true"),
    (lambda tmp: P.dinov2("vits14_reg"), "dinov2_vits14_reg4_pretrain.pth", "checkpoints", "--download=true"),
    (lambda tmp: P.lpips_vgg(), "vgg16-397923af.pth", "checkpoints", "--lpips_vgg_path=..."),
    (lambda tmp: P.lpips_vgg(vgg_path=tmp / "v.pth"), "vgg16-397923af.pth", "v.pth", "given as --lpips_vgg_path"),
    (lambda tmp: P.teacher("clip_b16", download=True), "ViT-B-16.pt", "checkpoints", "failed (OSError)"),
    (lambda tmp: P.feature_net("inception"), "pt_inception-2015-12-05-6726825d.pth", "checkpoints", "--net_path"),
])
def test_missing_file_one_line_error(build, fname, where, fix, tmp_path, offline_hub):
    tried = offline_hub
    with pytest.raises(SystemExit) as e:
        build(tmp_path)
    msg = str(e.value)
    path = tmp_path / "checkpoints" / fname if where == "checkpoints" else tmp_path / where
    assert "\n" not in msg and fname in msg and str(path) in msg and fix in msg, msg
    assert tried == ([P.WEIGHT_URLS[fname]] if "failed" in msg else [])


# ---- Teacher wrapper

@pytest.mark.parametrize("name", ["clip_tiny", "dinov2_tiny"])
def test_teacher_preprocessing(name):
    torch.manual_seed(0)
    t = P.teacher(name)
    t.train()  # a training loop calling .train() must not unfreeze the teacher
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    cls, patch = t(x)
    mean, std = (P.CLIP_MEAN, P.CLIP_STD) if name.startswith("clip") else (P.IMAGENET_MEAN, P.IMAGENET_STD)
    norm = lambda y: (y - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # noqa: E731
    ref = t.net(norm(F.interpolate(x * 0.5 + 0.5, size=(t.size, t.size))))  # official: default nearest
    assert cls.shape == (2, t.width) and patch.shape == (2, (t.size // t.net.cfg.patch_size) ** 2, t.width)
    assert torch.equal(cls, ref["cls"]) and torch.equal(patch, ref["patch"])
    bilinear = t.net(norm(F.interpolate(x * 0.5 + 0.5, size=(t.size, t.size), mode="bilinear")))
    assert not torch.allclose(bilinear["cls"], cls)  # the resize mode matters: the test would see another one
    with pytest.raises(SystemExit, match="unknown teacher 'clip:tiny'"):
        P.teacher("clip:tiny")


# ---- the classifiers trained here (train_classifier.py): random tiny ones

def tiny_classifier(net, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(net=net, width=32, layers=1, heads=2) if net == "vit" else dict(net=net, width=16)
    return P.Classifier(P.ClassifierConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("net, tokens, width", [("vit", 16, 32), ("cnn", 64, 64)])  # vit: 32 / patch 8; cnn: 2x s2
def test_classifier_forward_shapes(net, tokens, width):
    model = tiny_classifier(net)
    out = model(torch.randn(3, 3, 32, 32))
    D = model.cfg.width
    assert out["cls"].shape == (3, D) and out["patch"].shape == (3, tokens, width) and out["logits"].shape == (3, 10)
    if net == "vit":  # no class token: the mean of the tokens
        assert torch.allclose(out["cls"], out["patch"].mean(1))
    else:  # a hidden layer on the flattened conv map
        assert torch.allclose(out["cls"], model.hidden(out["patch"].transpose(1, 2).flatten(1)))
    assert torch.allclose(out["logits"], model.fc(out["cls"]))


@pytest.mark.parametrize("net, kind", [("vit", "teacher"), ("cnn", "featnet")])
def test_classifier_checkpoint_round_trip(net, kind, tmp_path):
    model = tiny_classifier(net)
    model(torch.randn(4, 3, 32, 32))  # train mode: the cnn's BatchNorm running stats move off 0 / 1
    model.eval()
    save_checkpoint(P.checkpoint_dict(model, kind, test_acc=0.5), tmp_path / "ckpt.pt")
    back = P.trained_here(kind, str(tmp_path / "ckpt.pt"))
    assert back.cfg == model.cfg and not back.training and not any(p.requires_grad for p in back.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x)["logits"], model(x)["logits"])
    other = "featnet" if kind == "teacher" else "teacher"
    with pytest.raises(SystemExit, match=f"is a '{kind}' checkpoint, not a '{other}' one"):
        P.trained_here(other, str(tmp_path / "ckpt.pt"))


@pytest.mark.parametrize("kind, build", [("teacher", lambda: P.teacher("fmnist_vit")),
                                         ("featnet", lambda: P.feature_net("fmnist")),
                                         ("featnet", lambda: P.trained_here("featnet"))])
def test_trained_here_missing_names_the_command(kind, build, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default paths are relative: an empty folder has none
    with pytest.raises(SystemExit) as e:
        build()
    msg = str(e.value.code)
    assert "\n" not in msg and P.TRAINED_HERE[kind] in msg and f"python train_classifier.py --net={kind}" in msg


def test_teacher_over_classifier_is_identity_preprocessing(tmp_path):
    """mean = std = 0.5 (the IU teacher): x*0.5+0.5 then (x-0.5)/0.5 is the identity on [-1, 1] images, exactly on
    dyadic pixel values; teacher('fmnist_vit', path) gives the same network from its checkpoint."""
    model = tiny_classifier("vit", mean=0.5, std=0.5).eval()
    x = torch.randint(0, 257, (2, 3, 32, 32)) / 128 - 1  # k/128 - 1: every step of the preprocessing is exact
    ref = model(x)
    t = P.Teacher(model)
    assert t.size == 32 and t.width == 32
    cls, patch = t(x)
    assert torch.equal(cls, ref["cls"]) and torch.equal(patch, ref["patch"])
    save_checkpoint(P.checkpoint_dict(model, "teacher"), tmp_path / "teacher.pt")
    t2 = P.teacher("fmnist_vit", path=str(tmp_path / "teacher.pt"))
    assert isinstance(t2.net, P.Classifier) and t2.size == 32
    cls2, patch2 = t2(x)
    assert torch.equal(cls2, cls) and torch.equal(patch2, patch)
    y = torch.rand(1, 3, 48, 48) * 2 - 1  # another size: nearest resize to 32
    assert torch.equal(t2(y)[0], model(F.interpolate(y * 0.5 + 0.5, size=(32, 32)) * 2 - 1)["cls"])


def test_feature_net_fmnist(tmp_path):
    """--net=fmnist: [0, 1] images -> (penultimate features (B, width), logits (B, 10)); other sizes resized."""
    model = tiny_classifier("cnn").eval()
    save_checkpoint(P.checkpoint_dict(model, "featnet"), tmp_path / "featnet.pt")
    net = P.feature_net("fmnist", str(tmp_path / "featnet.pt"))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        f, logits = net(x)
        ref = model((x - model.cfg.mean) / model.cfg.std)
        assert f.shape == (3, 16) and logits.shape == (3, 10)
        assert torch.allclose(f, ref["cls"]) and torch.allclose(logits, ref["logits"])
        f28, logits28 = net(torch.rand(2, 3, 28, 28))  # Fashion-MNIST's own size
    assert f28.shape == (2, 16) and logits28.shape == (2, 10) and torch.isfinite(f28).all()
    save_checkpoint(P.checkpoint_dict(tiny_classifier("vit"), "teacher"), tmp_path / "teacher.pt")
    with pytest.raises(SystemExit, match="not a 'featnet' one"):  # the teacher is no evaluation network
        P.feature_net("fmnist", str(tmp_path / "teacher.pt"))


# ---- LPIPS

def test_lpips_parity(tmp_path):
    meta, a = load_fixture("pretrained", "lpips_vgg")
    rebuilt = recipe_state_dict(meta)  # LPIPS keys net.sliceK.N.*; the recipe is seeded with the torchvision names
    vgg = {e["recipe_key"]: rebuilt[e["key"]] for e in meta["state_dict"] if "recipe_key" in e}
    vgg["classifier.0.weight"], vgg["classifier.0.bias"] = torch.zeros(8, 4), torch.zeros(8)  # unused head
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    lins = {k: T(a[k]) for k in meta["lin_wheel_file_keys"]}
    torch.save(lins, tmp_path / "vgg.pth", _use_new_zipfile_serialization=False)  # the wheel's legacy format
    m = P.lpips_vgg(vgg_path=tmp_path / "vgg16-397923af.pth", lin_path=tmp_path / "vgg.pth")
    assert torch.equal(m.shift, T(a["scaling_layer.shift"])) and torch.equal(m.scale, T(a["scaling_layer.scale"]))
    for k in range(5):
        assert torch.equal(m.lins[f"lin{k}"].model[1].weight, lins[f"lin{k}.model.1.weight"])
    tol = meta["recommended_tolerances"]
    x0, x1 = T(a["x0"]), T(a["x1"])
    with torch.no_grad():
        close((x0 - m.shift) / m.scale, a["x0_scaled"], tol["x0_scaled"]["atol"], what="x0_scaled")
        taps = m.taps(x0)
        close(taps[4], a["vgg_x0_relu5_3"], tol["vgg_x0_relu5_3"]["atol"], what="relu5_3")
        for k in range(5):
            close(taps[k].mean(dim=(2, 3)), a[f"vgg_x0_chanmean_{k}"], tol["vgg_x0_chanmean_*"]["atol"], what=f"tap{k}")
        d, per_layer = m(x0, x1, per_layer=True)
    close(d, a["d"], tol["d"]["atol"], what="d")
    close(per_layer.T, a["per_layer"], tol["per_layer"]["atol"], tol["per_layer"]["rtol"], what="per_layer")
    del lins["lin4.model.1.weight"]  # a lin file missing a key must not load
    with pytest.raises(SystemExit, match=r'(?s)^vgg.pth .*"lin4.model.1.weight"'):
        P.load_weights(m.lins, lins, "vgg.pth")


def test_lpips_tiny_loss_behaviour():
    torch.manual_seed(0)
    m = P.lpips_vgg("tiny")
    m.train()
    assert not m.training
    x0, x1 = torch.rand(2, 3, 32, 32) * 2 - 1, (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    d = m(x0, x1)
    assert d.shape == (2,) and (d > 0).all() and torch.equal(d, m(x0, x1))  # deterministic, no dropout
    d.sum().backward()
    assert x1.grad.abs().sum() > 0 and all(p.grad is None for p in m.parameters())
    assert torch.allclose(m(x0, x0), torch.zeros(2))
    assert torch.allclose(m(x0, x1), m(x1, x0))  # symmetric
