"""Bad input through the real entry points (subprocesses): every case ends in exit status 1 and ONE line on stderr
that names the problem and the fix, never a traceback (--debug shows one); checks that can run before expensive work
run first; files a user made are never left half-written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import atomic_write, save_checkpoint, session
from far import checkpoint_dict as far_checkpoint
from fqgan import checkpoint_dict as fqgan_checkpoint
from conftest import tiny_far, tiny_fqgan

HERE = Path(__file__).resolve().parent


class Evil:
    def __reduce__(self):  # what a malicious pickle does: run a command when loaded
        return os.system, ("echo pwned",)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad checkpoints: a tokenizer, a FAR on it, and broken variants."""
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_fqgan(2, codebook_size=64, image_size=16)
    save_checkpoint(fqgan_checkpoint(tok), root / "tok.pt")
    far = tiny_far(2, block_size=16)
    save_checkpoint(far_checkpoint(far, tokenizer=str(root / "tok.pt")), root / "far.pt")
    (root / "empty.pt").write_bytes(b"")
    (root / "truncated.pt").write_bytes((root / "far.pt").read_bytes()[:3000])
    ckpt = far_checkpoint(far, tokenizer=str(root / "tok.pt"))
    ckpt["model"]["agg.weight"] = torch.zeros(5, 5)
    torch.save(ckpt, root / "shape.pt")
    torch.save({"kind": "far", "model": Evil()}, root / "evil.pt")
    return root


def run(script, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, script, *map(str, flags)], cwd=HERE, capture_output=True, text=True,
                          timeout=300, env=env)


def one_line_error(p, *words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


CASES = [  # (script, flags, words the one line must contain)
    ("train_tokenizer.py", ["--model_overrides=image_size=30"], ["not divisible by the downsampling", "multiple of"]),
    ("train_tokenizer.py", ["--preset=huge"], ["--preset=huge", "choose one of"]),
    ("train_tokenizer.py", ["--max_steps=-5"], ["--max_steps=-5", ">= 0"]),
    ("train_tokenizer.py", ["--lr=nan"], ["--lr=nan"]),
    ("train_tokenizer.py", ["--bogus=1"], ["unknown flag --bogus"]),
    ("train_tokenizer.py", ["--data=synthetic", "--teachers=none,fmnist_vit", "--teacher_paths=auto,{root}/no.pt"],
     ["not found", "python train_classifier.py --net=teacher"]),
    ("train_far.py", ["--tokenizer={root}/missing.pt"], ["missing.pt", "not found"]),
    ("train_far.py", ["--tokenizer={root}/far.pt"], ["'far' checkpoint, not a 'fqgan' one", "train_tokenizer.py"]),
    ("train_far.py", ["--crops=3"], ["--crops=3", "choose one of"]),
    ("sample.py", ["--ckpt={root}/missing.pt"], ["missing.pt", "not found"]),
    ("sample.py", ["--ckpt={root}/far.pt", "--classes=a,b"], ["--classes=a,b", "class ids in [0, 9]"]),
    ("sample.py", ["--ckpt={root}/far.pt", "--classes=3,12"], ["class ids in [0, 9]"]),
    ("sample.py", ["--per_class=0"], ["--per_class=0", "> 0"]),
    ("sample.py", ["--cfg_schedule=foo"], ["unknown flag --cfg_schedule"]),
    ("sample.py", ["--temperature=0"], ["--temperature=0", "> 0"]),
    ("sample.py", ["--top_p=1.5"], ["--top_p=1.5", "<= 1"]),
    ("sample.py", ["--ckpt={root}/empty.pt"], ["cannot be read", "empty, truncated"]),
    ("sample.py", ["--ckpt={root}/truncated.pt"], ["cannot be read", "empty, truncated"]),
    ("sample.py", ["--ckpt={root}/tok.pt"], ["'fqgan' checkpoint, not a 'far' one", "train_far.py"]),
    ("sample.py", ["--ckpt={root}/shape.pt"], ["does not load as a FAR", "agg.weight"]),
    ("sample.py", ["--ckpt={root}/evil.pt"], ["not a trusted checkpoint of ours"]),
    ("sample.py", ["--device=tpu"], ["--device=tpu", "choose auto, cpu or cuda"]),
    ("eval_fid.py", ["--mode=gfid", "--net=random"], ["--mode=gfid needs --ckpt"]),
    ("eval_fid.py", ["--mode=rfid", "--net=random", "--samples={root}/tok.pt"],
     ["tok.pt: expected the keys ['arr_0']", "npz"]),
    ("eval_fid.py", ["--mode=rfid", "--net=fmnist", "--net_path={root}/none.pt"],
     ["python train_classifier.py --net=featnet"]),
    ("train_classifier.py", ["--net=resnet"], ["--net=resnet", "choose one of teacher, featnet"]),
]


@pytest.mark.parametrize("script, flags, words", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_line(files, script, flags, words):
    line = one_line_error(run(script, *[f.format(root=files) for f in flags]), *words)
    assert "weights_only" not in line  # the safe loader's refusal never suggests the unsafe one


def test_debug_shows_the_traceback(files):
    p = run("sample.py", f"--ckpt={files}/empty.pt", "--debug")
    assert p.returncode == 1 and "Traceback" in p.stderr


def test_far_resume_checks_the_checkpoint_before_extracting(files, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes((files / "shape.pt").read_bytes())
    p = run("train_far.py", f"--tokenizer={files}/tok.pt", "--data=synthetic", f"--out_dir={tmp_path}/run",
            "--resume=true")
    one_line_error(p, "does not load as a FAR", "agg.weight")
    assert not (tmp_path / "run" / "codes").exists()  # no image was encoded


def test_killed_writes_leave_no_half_file_and_stale_temps_are_cleaned(tmp_path):
    target = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, target)
    (tmp_path / ".ckpt.pt.tmp4242").write_bytes(b"x" * 1000)  # what a write killed mid-way leaves

    def dies(f):
        f.write(b"partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies)
    assert torch.load(target, weights_only=True) == {"step": 1}  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left behind, old one removed


def test_session_threads(monkeypatch):
    """One torch thread per process by default (several share the cores); all_cores keeps torch's setting (a job
    that runs alone: train_classifier.py); OMP_NUM_THREADS, when set, always wins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        with session("cpu"):
            assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        with session("cpu", all_cores=True):
            assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        with session("cpu"):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # the test session's setting (conftest)
