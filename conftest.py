"""Shared pytest helpers: locate the golden fixtures and rebuild their weights from key names.

The fixtures in ../shared/fixtures store no weights: every float tensor is rebuilt from its state-dict key by a fixed
recipe (../shared/fixtures/official/README.md section 2). A missing fixture fails the test; it never skips.
"""
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(os.environ.get("FQGAN_SHARED", Path(__file__).resolve().parent.parent / "shared"))


def load_fixture(group, name):
    """Return (meta dict, arrays dict) of ../shared/fixtures/<group>/<name>.{json,npz}; fail loudly if absent."""
    base = SHARED / "fixtures" / group / name
    if not base.with_suffix(".json").exists():
        pytest.fail(f"golden fixture {base}.json not found: put the shared folder beside the repo or set FQGAN_SHARED")
    meta = json.loads(base.with_suffix(".json").read_text())
    with np.load(base.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
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
