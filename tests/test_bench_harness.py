"""The benchmark harness: timing, derived figures, JSON and PNG output (on the CPU)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import harness  # noqa: E402


def test_run_writes_json_and_png(tmp_path):
    args = harness.parse_args("test", ["--quick", "--out", str(tmp_path)])
    args.name = "bench_test"
    x = torch.randn(64, 64)
    cases = [harness.Case(op="matmul", label="64x64", shape=dict(n=64), backend="reference",
                          fn=lambda: x @ x, bytes_moved=3 * x.numel() * 4, flops=2 * 64 ** 3)]
    rows = harness.run(cases, args)
    data = json.loads((tmp_path / "bench_test.json").read_text())
    assert data["rows"][0]["op"] == "matmul" and data["meta"]["quick"] is True
    assert rows[0]["iters"] == args.iters and rows[0]["median_us"] > 0
    assert rows[0]["gbps"] == pytest.approx(3 * 64 * 64 * 4 / (rows[0]["median_us"] * 1e-6) / 1e9)
    assert rows[0]["p10_us"] <= rows[0]["median_us"] <= rows[0]["p90_us"]
    assert (tmp_path / "bench_test.png").read_bytes()[:4] == b"\x89PNG"


def test_peak_table_lookup(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert harness.device_peaks()["gbps"] == 3350
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert harness.device_peaks()["gbps"] == 2000
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Mystery GPU")
    assert harness.device_peaks()["gbps"] is None


def test_bench_presets_come_from_the_layer_table():
    from moe_kernels.presets import PRESETS

    assert not hasattr(harness, "MODEL_PRESETS")  # one table: moe_kernels.presets.PRESETS
    assert set(harness.QUICK_PRESETS) <= set(PRESETS)
    for name, config in PRESETS.items():
        preset = harness.bench_preset(name)
        assert 1 <= preset["k"] <= preset["experts"] and preset["hidden"] > 0 and preset["inter"] > 0
        assert (preset["experts"], preset["k"], preset["hidden"]) == (
            config["num_experts"], config["k"], config["hidden_size"])
        assert preset["routing"]["scoring"] == config["scoring"]
        assert preset["bias"] == bool(config.get("selection_bias"))
    v3 = harness.bench_preset("deepseek_v3")
    assert v3["routing"]["num_groups"] == 8 and v3["bias"] and v3["routing"]["scaling_factor"] == 2.5
    assert harness.bench_preset("switch")["capacity_factor"] == 1.25
    assert harness.bench_preset("mixtral", num_experts=4)["experts"] == 4
