"""bench.py on its micro preset (CPU): every figure of every line is printed, finite and positive; bench_official.py
without the official code."""
import math
import re
import subprocess
import sys

import bench


def test_bench_micro_prints_every_figure():
    lines = "\n".join(bench.main(bench.BenchConfig(preset="micro", repeats=1, device="cpu")))
    for what in ("tokenizer train step", "tokenizer encode / decode", "FAR train step", "tokens/s",
                 "FAR sampling", "batch 1,", "batch 2,", "images/s", "sub-tokens/s", "first call", "peak RSS"):
        assert what in lines, (what, lines)
    rates = re.findall(r"(\d[\d,]*\.?\d*) (?:img|images|tokens|sub-tokens)/s", lines)
    numbers = [float(x.replace(",", "")) for x in rates]
    assert len(numbers) >= 7 and all(math.isfinite(n) and n > 0 for n in numbers), lines


def test_bench_sweep_runs_both_train_steps_per_batch():
    lines = bench.main(bench.BenchConfig(preset="micro", repeats=1, device="cpu", sweep="2,3"))
    assert [re.search(r"^(tokenizer|FAR) train step \(tiny, batch (\d)\)", x).groups() for x in lines] == \
        [("tokenizer", "2"), ("FAR", "2"), ("tokenizer", "3"), ("FAR", "3")], lines
    assert all("peak RSS" in x for x in lines)


def test_bench_official_without_a_checkout_is_one_line(tmp_path):
    """bench_official.py needs the official code, which this project does not ship: a clear one-line error."""
    out = subprocess.run([sys.executable, "bench_official.py", f"--official={tmp_path}"], capture_output=True,
                         text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: --official=") and "git clone https://github.com/showlab/FQGAN" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run([sys.executable, "bench_official.py", f"--official={tmp_path}", "--what=far,gan"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "--what=far,gan: choose among far, tokenizer, quantizer" in out.stderr
