"""python -m moe_kernels.demo, and every preset's layer building at small sizes."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moe_kernels
from moe_kernels import demo
from moe_kernels.layer import MoE
from moe_kernels.presets import PRESETS, scaled_config


@pytest.mark.parametrize("preset", ["deepseek_v3", "gpt_oss"])
def test_demo_matches_the_reference(preset, capsys):
    assert demo.main(["--preset", preset, "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert f"preset {preset}" in out and "PASS" in out
    assert f"backend {demo.best_backend()}" in out and "max |y - y_ref|" in out and "tolerance" in out


def test_demo_reports_a_mismatch(monkeypatch, capsys):
    monkeypatch.setattr(demo, "FORWARD_RTOL", -1.0)  # no output can be within a negative tolerance
    assert demo.main(["--preset", "mixtral", "--tokens", "2"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_demo_runs_as_a_module():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(moe_kernels.__file__).resolve().parent.parent)] + sys.path))
    result = subprocess.run([sys.executable, "-m", "moe_kernels.demo", "--preset", "olmoe", "--tokens", "4"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout


def test_demo_rejects_an_unknown_preset():
    with pytest.raises(SystemExit):
        demo.main(["--preset", "no_such_model"])


def test_every_preset_builds_at_scaled_sizes():
    start = time.perf_counter()
    for name in PRESETS:
        sizes = scaled_config(name)
        layer = MoE.from_preset(name, **sizes)
        assert (layer.hidden_size, layer.num_experts, layer.k) == (
            sizes["hidden_size"], sizes["num_experts"], sizes["k"])
        x = torch.randn(3, sizes["hidden_size"]).to(torch.bfloat16)
        with moe_kernels.use_backend("reference"), torch.no_grad():
            y = layer(x)
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y.float()).all()
    assert time.perf_counter() - start < 20  # every preset, built and run once: well under a second each
