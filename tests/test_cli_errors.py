"""Bad input: exit code 2, one line naming the problem and the fix, no traceback, no output left."""
import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import tiny
from mlx_qlora.cli import main


def run_cli(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    return result.exit_code, result.output


def assert_one_line_error(code, output, *needles):
    assert code == 2, output
    lines = [l for l in output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_path(tmp_path):
    code, out = run_cli("convert", tmp_path / "nope", "-o", tmp_path / "o")
    assert_one_line_error(code, out, "nope")
    assert not (tmp_path / "o").exists()


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    code, out = run_cli("convert", tmp_path / "empty", "-o", tmp_path / "o")
    assert_one_line_error(code, out, "config.json")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path):
    src = tiny.write_hf_dir(tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (src / "config.json").write_text(json.dumps(cfg))
    code, out = run_cli("convert", src, "-o", tmp_path / "o")
    assert_one_line_error(code, out, "gpt_neox", "llama", "qwen2")


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_gguf(tmp_path, tiny_hf_llama, keep):
    g = tiny.write_gguf(tiny_hf_llama, tmp_path / "m.gguf", "Q4_1")
    data = g.read_bytes()
    g.write_bytes(data[: int(len(data) * keep)])
    code, out = run_cli("convert", g, "-o", tmp_path / "o")
    assert_one_line_error(code, out, "m.gguf", "truncated")
    assert not (tmp_path / "o").exists()


def test_corrupt_gguf_header(tmp_path):
    g = tmp_path / "bad.gguf"
    g.write_bytes(b"GGUF" + b"\xff" * 64)
    code, out = run_cli("convert", g, "-o", tmp_path / "o")
    assert_one_line_error(code, out, "bad.gguf")


def test_corrupt_safetensors(tmp_path, tiny_hf_llama):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf_llama, src)
    st = src / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    code, out = run_cli("convert", src, "-o", tmp_path / "o")
    assert_one_line_error(code, out, "model.safetensors")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,needle", [("--q-bits", 5, "--q-bits 5"), ("--q-group-size", 48, "--q-group-size 48"),
                                               ("--dtype", "float8", "--dtype float8")])
def test_unknown_quantization_setting(tmp_path, tiny_hf_llama, flag, value, needle):
    code, out = run_cli("convert", tiny_hf_llama, "-o", tmp_path / "o", flag, value)
    assert_one_line_error(code, out, needle)


def test_existing_output_is_not_clobbered(tmp_path, tiny_hf_llama):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    code, out = run_cli("convert", tiny_hf_llama, "-o", out_dir)
    assert_one_line_error(code, out, "--force")
    assert (out_dir / "keep.txt").read_text() == "precious"


def test_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    code, out = run_cli("convert", "HuggingFaceTB/SmolLM2-135M-Instruct", "-o", tmp_path / "o")
    assert_one_line_error(code, out, "HuggingFaceTB/SmolLM2-135M-Instruct", "local directory")


def test_real_process_prints_no_traceback(tmp_path):
    """The installed console script, not just click's runner, keeps errors to one line."""
    p = subprocess.run([sys.executable, "-m", "mlx_qlora.cli", "convert", str(tmp_path / "missing"),
                        "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr + p.stdout
