"""The ablation runner (ablate.py): its --quick path end to end on toy budgets (every row and column present and
finite, a resumed run skips finished jobs), the linear probe, the codebook picture and the report helpers."""
import json
import math

import torch
from PIL import Image

import ablate
from common import save_checkpoint
from conftest import tiny_fqgan
from fqgan import checkpoint_dict


def test_linear_probe_toy_data():
    """Separable classes are learnt (~100 %); random labels stay at chance on held-out data."""
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(4, 12, generator=g)
    y = torch.randint(0, 4, (800,), generator=g)
    x = centres[y] + torch.randn(800, 12, generator=g)
    assert ablate.linear_probe(x[:400], y[:400], x[400:], y[400:]) >= 0.99
    noise, labels = torch.randn(1600, 12, generator=g), torch.randint(0, 4, (1600,), generator=g)
    assert abs(ablate.linear_probe(noise[:400], labels[:400], noise[400:], labels[400:]) - 0.25) < 0.06


def test_probe_and_codebook_picture(tmp_path):
    save_checkpoint(checkpoint_dict(tiny_fqgan(2)), tmp_path / "tok.pt")
    acc = ablate.probe(tmp_path / "tok.pt", 32, 16, tmp_path / "book.png", data="synthetic")
    assert len(acc) == 2 and all(0 <= a <= 1 for a in acc)
    with Image.open(tmp_path / "book.png") as img:
        assert img.size == (2 * 320, 360) and len(img.getcolors(1 << 16)) > 3  # two panels, dots in colour


def test_stat_is_mean_and_half_range():
    assert ablate.stat([1.0, 3.0]) == "2 ± 1"
    assert ablate.stat([[1.0, 10.0], [3.0, 10.0]]) == "2 ± 1 / 10 ± 0"


def test_quick_ablation_end_to_end_and_resume(tmp_path):
    cfg = ablate.AblateConfig(out_dir=str(tmp_path / "abl"), quick=True, teacher=str(tmp_path / "teacher.pt"),
                              featnet=str(tmp_path / "featnet.pt"))
    res = ablate.main(cfg)
    names = list(ablate.tokenizer_rows(ablate.AblateConfig(**{**vars(cfg), **ablate.QUICK})))
    assert sorted({r["row"] for r in res["rows"]}) == sorted(names) and len(res["rows"]) == 2 * len(names)
    assert sorted({r["row"] for r in res["heads"]}) == sorted(ablate.HEADS) and len(res["heads"]) == 6
    for r in res["rows"]:
        K = 2 if r["row"].startswith("FQ") else 1
        assert len(r["usage"]) == len(r["perplexity"]) == len(r["probe_acc"]) == len(r["val_ce"]) == K, r
        values = [r["psnr"], r["rfid_fmnist"], r["k0"]["fid_fmnist"], r["k0"]["class_acc"], *r["usage"],
                  *r["perplexity"], *r["probe_acc"], *r["val_ce"]]
        assert all(math.isfinite(v) for v in values), r
    for r in res["heads"]:
        assert all(math.isfinite(r[f"k{k}"][m]) for k in (0, 8) for m in ("fid_fmnist", "class_acc")), r
    report = (tmp_path / "abl" / "results.md").read_text()
    assert all(n in report for n in names) and "nan" not in report and "linear" in report
    assert Image.open(tmp_path / "abl" / "ablation.png").size == (640, 640)
    again = ablate.main(cfg)  # everything done: nothing recomputed
    log = (tmp_path / "abl" / "log.txt").read_text()
    assert f"{len(res['rows'])} of {len(res['rows'])} jobs already done" in log and "6 of 6 jobs already done" in log
    assert again["rows"] == res["rows"] and json.loads((tmp_path / "abl" / "results.json").read_text())["best"]
