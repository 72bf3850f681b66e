"""The demo (what `make demo` runs) works end to end on the embedded model, in a few steps."""
import json

import pytest

pytestmark = [pytest.mark.real, pytest.mark.llamacpp]


def test_demo_pipeline(tmp_path, smollm2_gguf):
    pytest.importorskip("llama_cpp")
    from mlx_qlora.demo import run_demo

    r = run_demo(tmp_path / "demo", steps=4)
    assert json.loads((tmp_path / "demo" / "smollm2-mlx" / "config.json").read_text())["rope_theta"] == 100000.0
    metrics = [json.loads(l) for l in (tmp_path / "demo" / "adapter-wikisql" / "metrics.jsonl").read_text().splitlines()]
    valid = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(valid) >= 2 and valid[-1] < valid[0]  # even 4 steps move the loss on WikiSQL
    assert (tmp_path / "demo" / "adapter-wikisql" / "adapters.safetensors").exists()
    assert set(r["answers"]) == {"base", "sql"} and r["exported_answer"]
    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.cpu:  # found the GGUF convert recorded, no flag
        assert r["engine"] == "llama.cpp"
    assert (tmp_path / "demo" / "smollm2-wikisql.q4_1.gguf").stat().st_size > 50e6
