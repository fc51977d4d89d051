"""Shared test set-up: one torch thread per process, the golden fixtures of fixtures/ (official FQGAN / FAR numbers and
pretrained-network reference numbers) with their weight recipe, and tiny models.

The fixtures store no weights: every float tensor is rebuilt from its state-dict key by a fixed recipe
(fixtures/official/README.md section 2), and the inputs an npz does not hold are rebuilt by the recipe of its README
(section 3). A missing fixture fails the test; it never skips.
"""
import gzip
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from far import FAR, PRESETS, FARConfig
from fqgan import FQGAN, config_from_preset

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Tiny tensors gain nothing from a second thread, and on a shared 2-core machine two threads per process were
# measured several times slower than one.
torch.set_num_threads(1)


REBUILT_X = {"llamagen_vq16": 256, "fqgan_dual_ds16": 256, "fqgan_triple_ds16": 256, "fqgan_dual_ds8": 256,
             "dinov2_tiny518_at224": 224, "dinov2_tiny518_reg4_at224": 224}  # inputs the npz files leave out


def load_fixture(group, name):
    """Return (meta dict, arrays dict) of fixtures/<group>/<name>.{json.gz,npz}; fail loudly if absent."""
    base = FIXTURES / group / name
    if not base.with_suffix(".json.gz").exists():
        pytest.fail(f"golden fixture {base}.json.gz not found: the fixtures/ folder of the repository is incomplete")
    meta = json.loads(gzip.decompress(base.with_suffix(".json.gz").read_bytes()))
    arrays = {}
    if base.with_suffix(".npz").exists():  # real_checkpoint_layouts has no arrays
        with np.load(base.with_suffix(".npz")) as z:
            arrays = {k: z[k] for k in z.files}
    if name in REBUILT_X:  # README section 3: torch.rand(1, 3, S, S) from a seed-0 CPU generator, * 2 - 1
        S = REBUILT_X[name]
        arrays["x"] = (torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(0)) * 2 - 1).numpy()
    return meta, arrays


def recipe_tensor(key, shape):
    """The fixtures' deterministic weight for one state-dict entry (seeded by crc32 of its key)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    shape = tuple(shape)
    if len(shape) == 1 and key.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))


def recipe_state_dict(meta, check=True):
    """Rebuild a fixture's reference state dict (reference key names) and verify the stored checksums."""
    sd = {}
    for e in meta["state_dict"]:
        if e.get("alias_of"):
            continue
        key = e.get("recipe_key", e["key"])
        if e["dtype"].startswith("float") and e.get("source", "recipe") == "recipe":
            t = recipe_tensor(key, e["shape"])
            if check and "check" in e:
                assert abs(t.double().sum().item() - e["check"]["sum"]) <= 1e-6 * max(1.0, e["check"]["abs_sum"]), key
            sd[e["key"]] = t
    return sd


def tiny_fqgan(K=2, seed=0, **overrides):
    """The tiny tokenizer preset (32 px -> 8x8 tokens, V=512) with K sub-codebooks, seeded."""
    torch.manual_seed(seed)
    return FQGAN(config_from_preset("tiny", n_codebooks=K, **overrides))


def tiny_far(K=2, seed=0, random_head=True, **overrides):
    """A tiny FAR (V=64, 4x4 grid, 10 classes, no dropout) in eval mode; random (not zero) output layers so that
    logits are informative."""
    torch.manual_seed(seed)
    cfg = dict(PRESETS["tiny"], n_codebooks=K, codebook_size=64, block_size=16, num_classes=10, class_dropout=0.0,
               token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    model = FAR(FARConfig(**{**cfg, **overrides}))
    if random_head:
        for out in model.lm_head:
            torch.nn.init.normal_(out.weight, std=0.2)
    return model.eval()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The torch hub cache in tmp_path and no network: -> the list of URLs a download tried (each fails)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    tried = []

    def no_network(url, dst, *args, **kwargs):
        tried.append(url)
        raise OSError("offline")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tried
