"""CPU tests of pretrained.py against the golden fixtures in ../shared/fixtures/pretrained (no downloads)."""
import json
import warnings
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrained as P
from conftest import SHARED, load_fixture, recipe_state_dict

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
    """OpenAI ships CLIP as TorchScript with fp16 weights: both must read back as float32 tensors."""
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
    lin = nn.Linear(3, 4, bias=False)
    P.load_state_dict_strict(lin, {"visual.weight": sd["visual.proj"]}, prefix="visual.")
    assert lin.weight.dtype == torch.float32 and torch.equal(lin.weight, sd["visual.proj"].float())


def test_strict_loading_names_bad_keys():
    meta, _ = load_fixture("pretrained", "clip_vit_tiny")
    sd = {"visual." + k: v for k, v in recipe_state_dict(meta, check=False).items()}
    del sd["visual.ln_post.bias"]
    sd["visual.extra.weight"] = torch.zeros(3)
    sd["visual.proj"] = torch.zeros(64, 31)
    with pytest.raises(ValueError) as e:
        P.load_state_dict_strict(P.CLIPVision(P.CLIPConfig(**P.CLIP_PRESETS["tiny"][0])), sd, prefix="visual.")
    for key in ["under 'visual.'", "ln_post.bias", "extra.weight", "proj (64, 31) vs ours (64, 32)"]:
        assert key in str(e.value)


# ---- DINOv2

@pytest.mark.parametrize("name", ["dinov2_tiny", "dinov2_tiny_reg4", "dinov2_tiny518_at224",
                                  "dinov2_tiny518_reg4_at224"])
def test_dinov2_parity(name, tmp_path):
    meta, a = load_fixture("pretrained", name)
    kw = meta["constructor_kwargs"]
    assert kw["ffn_layer"] == "mlp" and kw["block_chunks"] == 0  # the only layout we implement
    cfg = P.DINOv2Config(**{f.name: kw[f.name] for f in fields(P.DINOv2Config)})
    torch.save(recipe_state_dict(meta), tmp_path / "dino.pth")  # plain state dict, as the facebookresearch files
    if name == "dinov2_tiny":  # through the user-facing builder
        assert cfg == P.DINOv2Config(**P.DINOV2_PRESETS["tiny"])
        model = P.dinov2("tiny", path=tmp_path / "dino.pth")
    else:
        model = P.frozen(P.load_state_dict_strict(P.DINOv2(cfg), P.read_state_dict(tmp_path / "dino.pth")))
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

def _layout_dict(entry):
    return {e["key"]: torch.empty(e["shape"], device="meta") for e in entry["state_dict"]}


@pytest.mark.parametrize("name", ["ViT-B/16", "ViT-L/14"])
def test_clip_real_layout(name):
    entry = json.loads((SHARED / "fixtures/pretrained/real_checkpoint_layouts.json").read_text())[f"clip_{name}"]
    kwargs, fname = P.CLIP_PRESETS[name]
    assert kwargs == entry["constructor"] and fname in P.WEIGHT_URLS
    with torch.device("meta"):
        model = P.CLIPVision(P.CLIPConfig(**kwargs))
    sd = _layout_dict(entry)
    assert {"visual." + k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in sd.items()}
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]
    P.load_state_dict_strict(model, sd, prefix=entry["checkpoint_prefix"])  # the real file's keys load strictly


@pytest.mark.parametrize("name", ["vits14", "vitb14", "vits14_reg", "vitb14_reg"])
def test_dinov2_real_layout(name):
    entry = json.loads((SHARED / "fixtures/pretrained/real_checkpoint_layouts.json").read_text())[f"dinov2_{name}"]
    cfg = P.DINOv2Config(**P.DINOV2_PRESETS[name])
    hub = entry["hub_kwargs"]
    assert {k: getattr(cfg, k) for k in hub if hasattr(cfg, k)} == {k: v for k, v in hub.items() if hasattr(cfg, k)}
    with torch.device("meta"):
        model = P.DINOv2(cfg)
    sd = _layout_dict(entry)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]
    P.load_state_dict_strict(model, sd, prefix=entry["checkpoint_prefix"])


# ---- missing weight files: one-line error, never a download in tests

@pytest.mark.parametrize("build, fname, where", [
    (lambda tmp: P.clip_vit("ViT-L/14"), "ViT-L-14.pt", "checkpoints"),
    (lambda tmp: P.dinov2("vits14_reg"), "dinov2_vits14_reg4_pretrain.pth", "checkpoints"),
    (lambda tmp: P.lpips_vgg(), "vgg16-397923af.pth", "checkpoints"),
    (lambda tmp: P.lpips_vgg(vgg_path=tmp / "v.pth"), "vgg16-397923af.pth", "v.pth"),  # explicit path, absent
    (lambda tmp: P.teacher("clip:ViT-B/16", download=True), "ViT-B-16.pt", "checkpoints"),  # download fails
])
def test_missing_file_one_line_error(build, fname, where, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    tried = []

    def no_network(url, dst, *args, **kwargs):
        tried.append(url)
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FileNotFoundError) as e:
        build(tmp_path)
    msg = str(e.value)
    path = tmp_path / "checkpoints" / fname if where == "checkpoints" else tmp_path / where
    assert "\n" not in msg and fname in msg and str(path) in msg
    assert tried == ([P.WEIGHT_URLS[fname]] if "failed" in msg else [])


# ---- Teacher wrapper

@pytest.mark.parametrize("spec", ["clip:tiny", "dinov2:tiny"])
def test_teacher_preprocessing(spec):
    torch.manual_seed(0)
    t = P.teacher(spec)
    t.train()  # a training loop calling .train() must not unfreeze the teacher
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    cls, patch = t(x)
    mean, std = (P.CLIP_MEAN, P.CLIP_STD) if spec.startswith("clip") else (P.IMAGENET_MEAN, P.IMAGENET_STD)
    y = F.interpolate(x * 0.5 + 0.5, size=(t.size, t.size))  # official: default nearest
    ref = t.net((y - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    patch_size = t.net.cfg.patch_size
    assert cls.shape == (2, t.width) and patch.shape == (2, (t.size // patch_size) ** 2, t.width)
    assert torch.equal(cls, ref["cls"]) and torch.equal(patch, ref["patch"])
    assert not torch.equal(P.Teacher(t.net, mode="bilinear")(x)[0], cls)


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
    with pytest.raises(ValueError, match="lin4.model.1.weight"):  # a lin file with a key missing must not load
        del lins["lin4.model.1.weight"]
        P.load_state_dict_strict(m.lins, lins)


def test_lpips_tiny_loss_behaviour():
    torch.manual_seed(0)
    m = P.lpips_vgg("tiny")
    m.train()
    x0, x1 = torch.rand(2, 3, 32, 32) * 2 - 1, (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    d = m(x0, x1)
    assert d.shape == (2,) and (d > 0).all() and torch.equal(d, m(x0, x1))  # deterministic, no dropout
    d.sum().backward()
    assert x1.grad.abs().sum() > 0 and all(p.grad is None for p in m.parameters())
    assert torch.allclose(m(x0, x0), torch.zeros(2))
