"""Bad input to every command: exit 2, one line naming the value and the fix, no traceback, and no
file written or changed. Each case builds its inputs, then runs the command through click's runner
(a subprocess only where the process itself must be changed: a missing MLX backend, a file size
limit). docs/reliability.md lists these cases with the line each prints (bench/bad_inputs_table.py)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

import tiny
from lora_fixtures import ATTN, write_adapter
from subproc import child_env
from mlx_qlora.cli import main

ROOT = Path(__file__).resolve().parent.parent
GOOD_ROWS = "".join(json.dumps({"text": f"row {i}: the quick brown fox jumps"}) + "\n" for i in range(8))


@dataclass
class Env:
    """What the cases build on: the tiny model in every form, a good adapter and a work directory."""
    tmp: Path
    hf: Path          # tiny llama, Hugging Face directory
    q4: Path          # the same as a 4-bit MLX directory
    gguf: Path        # the same as a Q4_1 GGUF
    adapter: Path     # a good adapter for q4
    other_hf: Path    # a tiny llama with other shapes (hidden 32)

    def copy_hf(self) -> Path:
        return Path(shutil.copytree(self.hf, self.tmp / "hf"))

    def data(self, content: bytes | str) -> Path:
        d = self.tmp / "data"
        d.mkdir(exist_ok=True)
        (d / "train.jsonl").write_bytes(content.encode() if isinstance(content, str) else content)
        return d

    def gguf_bytes(self, edit: Callable[[bytearray], None]) -> Path:
        data = bytearray(self.gguf.read_bytes())
        edit(data)
        out = self.tmp / "bad.gguf"
        out.write_bytes(bytes(data))
        return out

    def existing(self, name: str) -> Path:
        (self.tmp / name).write_text("precious")
        return self.tmp / name

    def recipe(self, text: str) -> Path:
        p = self.tmp / "recipe.yaml"
        p.write_text(text)
        return p

    def train(self, *extra, data: Path | None = None, model: Path | None = None) -> list:
        return ["train", "--model", model or self.q4, "--data", data or self.good_data(), "--out", self.tmp / "run",
                "--steps", "1", "--no-progress", *extra]

    def good_data(self) -> Path:
        d = self.tmp / "good"
        d.mkdir(exist_ok=True)
        (d / "train.jsonl").write_text(GOOD_ROWS)
        return d

    def peft(self, hf_dir: Path, config: dict | str | None = None) -> Path:
        """A PEFT LoRA directory for the model in ``hf_dir`` (q_proj of layer 0)."""
        import numpy as np
        from safetensors.numpy import save_file

        hidden = json.loads((hf_dir / "config.json").read_text())["hidden_size"]
        d = self.tmp / "peft"
        d.mkdir()
        key = "base_model.model.model.layers.0.self_attn.q_proj"
        save_file({f"{key}.lora_A.weight": np.zeros((4, hidden), np.float32),
                   f"{key}.lora_B.weight": np.zeros((hidden, 4), np.float32)}, str(d / "adapter_model.safetensors"))
        cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
               "base_model_name_or_path": str(hf_dir)} if config is None else config
        (d / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        return d

    def imported(self, hf_dir: Path) -> Path:
        from mlx_qlora.export.peft import run_import_peft

        return run_import_peft(str(self.peft(hf_dir)), str(self.tmp / "imported"))


def _set(offset: int, fmt: str, value):
    return lambda b: b.__setitem__(slice(offset, offset + struct.calcsize(fmt)), struct.pack(fmt, value))


def _tensor_offset_pos(gguf_path: Path) -> int:
    """Byte position of the first tensor's data offset (the last part of its tensor-info record)."""
    import gguf

    t = gguf.GGUFReader(str(gguf_path)).tensors[0]
    return int(t.field.offset) + sum(int(p.nbytes) for p in t.field.parts[:-1])


def _flip(pos: int, mask: int):
    def edit(b):
        b[pos] ^= mask
    return edit


def _header_only_gguf(env: Env, vocab: bool = True, heads: int | None = None) -> Path:
    """A GGUF with the tiny llama's hyper-parameters (and no tensors), optionally broken."""
    cfg = json.loads((env.hf / "config.json").read_text())
    path = env.tmp / "bad.gguf"
    w = tiny._gguf_writer(path, {**cfg, "num_attention_heads": cfg["num_attention_heads"] if heads is None else heads,
                                 "num_key_value_heads": cfg["num_key_value_heads"] if heads is None else 1})
    if vocab:
        w.add_vocab_size(cfg["vocab_size"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _safetensors(env: Env, edit: Callable[[bytes], bytes]) -> Path:
    src = env.copy_hf()
    st = src / "model.safetensors"
    st.write_bytes(edit(st.read_bytes()))
    return src


def _config(env: Env, edit: Callable[[dict], object]) -> Path:
    src = env.copy_hf()
    cfg = json.loads((src / "config.json").read_text())
    new = edit(cfg)
    (src / "config.json").write_text(new if isinstance(new, str) else json.dumps(cfg if new is None else new))
    return src


def _model(env: Env, name: str, content: bytes | int) -> Path:
    """A copy of the 4-bit model with one file replaced by ``content`` (or cut to that many bytes)."""
    m = Path(shutil.copytree(env.q4, env.tmp / "model"))
    (m / name).write_bytes((m / name).read_bytes()[:content] if isinstance(content, int) else content)
    return m


def _adapter(env: Env, edit: Callable[[Path], None]) -> Path:
    ad = Path(shutil.copytree(env.adapter, env.tmp / "adapter"))
    edit(ad)
    return ad


def _read_only_out(env: Env) -> Path:
    """A directory nobody may create files in: a 0555 directory, or (root ignores modes) /sys."""
    if os.geteuid() == 0:
        return Path("/sys/mlx_qlora_test/out")
    ro = env.tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "out"


def _busy_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    _busy_port.sock = s  # keep it bound while the case runs
    return s.getsockname()[1]


# (id, build args from env, substrings the one line must contain)
CASES = [
    # ---- train: JSONL data
    ("jsonl-malformed", lambda e: e.train(data=e.data('{"text": "a"}\n{"text": "b"\n')), ["line 2", "not valid JSON"]),
    ("jsonl-empty", lambda e: e.train(data=e.data("")), ["train.jsonl", "is empty"]),
    ("jsonl-blank-lines", lambda e: e.train(data=e.data("\n \n\n")), ["is empty"]),
    ("jsonl-non-utf8", lambda e: e.train(data=e.data(b'{"text": "caf\xe9"}\n')), ["line 1", "UTF-8"]),
    ("jsonl-huge-line", lambda e: e.train(data=e.data('{"text": "' + "x" * (9 << 20) + '"}\n')),
     ["line 1", "MiB", "split"]),
    ("jsonl-wrong-key", lambda e: e.train(data=e.data('{"text": "a b c d"}\n{"txt": "x"}\n')),
     ["line 2", "missing key 'text'", "txt"]),
    ("jsonl-not-object", lambda e: e.train(data=e.data("[1, 2]\n")), ["line 1", "expected a JSON object"]),
    ("jsonl-unknown-format", lambda e: e.train(data=e.data('{"input": "x"}\n')), ["cannot tell the format", "input"]),
    ("jsonl-bad-role", lambda e: e.train(data=e.data('{"messages": [{"role": "bot", "content": "x"}]}\n')),
     ["unknown role 'bot'"]),
    ("jsonl-text-not-string", lambda e: e.train(data=e.data('{"text": 5}\n')), ["'text' must be a string"]),
    ("data-missing", lambda e: e.train(data=e.tmp / "nope.jsonl"), ["nope.jsonl", "not found"]),
    # ---- train: recipe and flags
    ("recipe-misspelt-key", lambda e: ["train", "-c", e.recipe("optim:\n  learning_rat: 1e-4\n")],
     ["optim.learning_rat", "did you mean optim.learning_rate"]),
    ("recipe-misspelt-top", lambda e: ["train", "-c", e.recipe("step: 10\n")], ["unknown setting step", "did you mean steps"]),
    ("recipe-unknown-key", lambda e: ["train", "-c", e.recipe("lora:\n  zzz: 1\n")], ["lora.zzz", "known keys"]),
    ("recipe-bad-yaml", lambda e: ["train", "-c", e.recipe("lora: [1, 2\n")], ["recipe.yaml", "not valid YAML"]),
    ("recipe-wrong-type", lambda e: ["train", "-c", e.recipe("lora:\n  rank: eight\n")], ["lora.rank='eight'", "positive integer"]),
    ("recipe-not-mapping", lambda e: ["train", "-c", e.recipe("- 1\n- 2\n")], ["expected a mapping"]),
    ("flag-misspelt", lambda e: e.train("--lora.rnak", "4"), ["--lora.rnak", "did you mean --lora.rank"]),
    ("resume-nothing", lambda e: e.train("--resume"), ["--resume", "no checkpoint"]),
    # ---- convert: GGUF
    ("gguf-empty", lambda e: ["convert", e.gguf_bytes(lambda b: b.clear()), "-o", e.tmp / "out"], ["bad.gguf"]),
    ("gguf-truncated", lambda e: ["convert", e.gguf_bytes(lambda b: b.__delitem__(slice(len(b) // 2, None))),
                                  "-o", e.tmp / "out"], ["bad.gguf", "truncated"]),
    ("gguf-wrong-magic", lambda e: ["convert", e.gguf_bytes(_set(0, "4s", b"GGML")), "-o", e.tmp / "out"],
     ["bad.gguf", "magic"]),
    ("gguf-wrong-version", lambda e: ["convert", e.gguf_bytes(_set(4, "<I", 99)), "-o", e.tmp / "out"],
     ["bad.gguf", "version 99"]),
    ("gguf-absurd-tensor-count", lambda e: ["convert", e.gguf_bytes(_set(8, "<Q", 1 << 60)), "-o", e.tmp / "out"],
     ["bad.gguf", "tensor count"]),
    ("gguf-absurd-kv-count", lambda e: ["convert", e.gguf_bytes(_set(16, "<Q", 1 << 62)), "-o", e.tmp / "out"],
     ["bad.gguf", "metadata count"]),
    ("gguf-absurd-offset", lambda e: ["convert", e.gguf_bytes(_set(_tensor_offset_pos(e.gguf), "<Q", 1 << 50)),
                                      "-o", e.tmp / "out"], ["bad.gguf"]),
    ("gguf-bit-flip-key-length", lambda e: ["convert", e.gguf_bytes(_flip(24 + 5, 0x10)), "-o", e.tmp / "out"],
     ["bad.gguf"]),
    ("gguf-no-vocabulary", lambda e: ["convert", _header_only_gguf(e, vocab=False), "-o", e.tmp / "out"],
     ["vocab_size", "download it again"]),  # found by bench/fuzz.py (was a KeyError)
    ("gguf-uneven-heads", lambda e: ["convert", _header_only_gguf(e, heads=3), "-o", e.tmp / "out"],
     ["num_attention_heads 3", "do not divide evenly"]),
    # ---- convert: Hugging Face directory
    ("safetensors-truncated", lambda e: ["convert", _safetensors(e, lambda d: d[:1000]), "-o", e.tmp / "out"],
     ["model.safetensors", "download it again"]),
    ("safetensors-header-length", lambda e: ["convert", _safetensors(e, lambda d: struct.pack("<Q", 1 << 40) + d[8:]),
                                             "-o", e.tmp / "out"], ["model.safetensors"]),
    ("safetensors-header-json", lambda e: ["convert", _safetensors(e, lambda d: d[:8] + b"#" + d[9:]),
                                           "-o", e.tmp / "out"], ["model.safetensors"]),
    ("config-missing-field", lambda e: ["convert", _config(e, lambda c: c.pop("hidden_size") and None), "-o", e.tmp / "out"],
     ["config.json", "hidden_size"]),
    ("config-wrong-type", lambda e: ["convert", _config(e, lambda c: c.update(num_hidden_layers="two")),
                                     "-o", e.tmp / "out"], ["config.json", "num_hidden_layers"]),
    ("config-not-object", lambda e: ["convert", _config(e, lambda c: [c]), "-o", e.tmp / "out"],
     ["config.json", "JSON object"]),
    ("config-bad-json", lambda e: ["convert", _config(e, lambda c: "{"), "-o", e.tmp / "out"], ["config.json"]),
    ("convert-bad-bits", lambda e: ["convert", e.hf, "-o", e.tmp / "out", "--q-bits", "5"], ["--q-bits 5"]),
    ("convert-read-only-out", lambda e: ["convert", e.hf, "-o", _read_only_out(e)], ["cannot write", "writable"]),
    # ---- an MLX model directory (what train, generate, chat, serve, fuse and export read)
    ("model-config-not-object", lambda e: e.train(model=_model(e, "config.json", b"[1]")), ["config.json", "JSON object"]),
    ("model-config-bad-json", lambda e: ["export", _model(e, "config.json", b"{"), "-o", e.tmp / "m.gguf"],
     ["config.json", "not valid JSON"]),
    ("model-safetensors-truncated", lambda e: ["generate", _model(e, "model.safetensors", 3000), "-p", "hi", "--engine", "mlx"],
     ["model.safetensors", "re-create it"]),
    # ---- adapters: fuse / export / generate / import-peft
    ("adapter-other-shapes", lambda e: ["fuse", e.q4, write_adapter(e.tmp / "ad", converted_other(e)), "-o", e.tmp / "out"],
     ["another base model"]),
    ("adapter-corrupt-weights", lambda e: ["fuse", e.q4, _adapter(e, lambda a: (a / "adapters.safetensors").write_bytes(b"x" * 20)),
                                           "-o", e.tmp / "out"], ["adapters.safetensors"]),
    ("adapter-config-not-object", lambda e: ["fuse", e.q4, _adapter(e, lambda a: (a / "adapter_config.json").write_text("[]")),
                                             "-o", e.tmp / "out"], ["adapter_config.json", "JSON object"]),
    ("adapter-missing-files", lambda e: ["export", e.q4, "--adapter", e.tmp, "-o", e.tmp / "out.gguf"],
     ["lacks adapter_config.json"]),
    ("peft-other-base", lambda e: ["fuse", e.q4, e.imported(e.other_hf), "-o", e.tmp / "out"], ["another base model"]),
    ("peft-bad-json", lambda e: ["import-peft", e.peft(e.hf, "{r: 4"), "-o", e.tmp / "out"],
     ["adapter_config.json", "not valid JSON"]),
    ("peft-missing-r", lambda e: ["import-peft", e.peft(e.hf, {"peft_type": "LORA", "lora_alpha": 8}), "-o", e.tmp / "out"],
     ["adapter_config.json", "'r'"]),
    ("generate-missing-model", lambda e: ["generate", e.tmp / "nomodel", "-p", "hi", "--engine", "mlx"],
     ["nomodel", "does not exist"]),
    ("generate-bad-adapter-spec", lambda e: ["generate", e.q4, "--adapter", "base=" + str(e.adapter), "-p", "hi"],
     ["bad adapter name"]),
    ("serve-port-busy", lambda e: ["serve", e.q4, "--port", _busy_port()], ["cannot listen", "--port"]),
    ("export-exists", lambda e: ["export", e.q4, "-o", e.existing("m.gguf")], ["already exists", "--force"]),
    ("convert-exists", lambda e: ["convert", e.hf, "-o", e.existing("model")], ["already exists", "--force"]),
]


def converted_other(env: Env) -> Path:
    out = env.tmp / "other_mlx"
    if not out.exists():
        from mlx_qlora.model.convert import ConvertConfig, run_convert

        run_convert(ConvertConfig(source=str(env.other_hf), out_dir=str(out), q_group_size=32))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_hf_llama, tiny_llama_q4):
    d = tmp_path_factory.mktemp("bad_inputs_base")
    q4 = tiny_llama_q4
    return {"hf": tiny_hf_llama, "q4": q4, "gguf": tiny.write_gguf(tiny_hf_llama, d / "m.gguf", "Q4_1"),
            "adapter": write_adapter(d / "adapter", q4, targets=ATTN),
            "other_hf": tiny.write_hf_dir(d / "other_hf", hidden=32, intermediate=64)}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_dir()}


def assert_one_line_error(code, output, needles):
    lines = [l for l in output.strip().splitlines() if l.strip()]
    assert code == 2, output[-3000:]
    assert "Traceback" not in output
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, base, tmp_path):
    name, build, needles = case
    env = Env(tmp=tmp_path, **base)
    args = [str(a) for a in build(env)]
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        pytest.fail("".join(traceback.format_exception(result.exception))[-700:])
    line = assert_one_line_error(result.exit_code, result.output, needles)
    after = snapshot(tmp_path)
    assert after == before, f"{name} wrote or changed: {sorted(set(after.items()) ^ set(before.items()))}"
    if os.environ.get("MLX_QLORA_BAD_INPUT_LOG"):  # bench/bad_inputs_table.py collects the lines
        short = [(str(tmp_path), "$T")] + [(str(v), k.upper()) for k, v in base.items()]

        def shorten(text):
            for long, name in short:
                text = text.replace(long, name)
            return text

        with open(os.environ["MLX_QLORA_BAD_INPUT_LOG"], "a") as f:
            f.write(json.dumps({"case": name, "command": shorten("mlx_qlora " + " ".join(args))[:120],
                                "line": shorten(line)}) + "\n")


# ---- cases that need their own process ------------------------------------------------------
NO_BACKEND = '''
import sys
class _NoBackend:
    """Makes ``import mlx.core`` fail the way a Linux mlx without mlx[cpu] does."""
    def find_spec(self, name, path=None, target=None):
        if name == "mlx.core":
            raise ImportError("libmlx.so: cannot open shared object file: No such file or directory", name=name)
sys.meta_path.insert(0, _NoBackend())
'''


def _cli_process(args, env_extra=None, preexec=None, cwd=None, front=()):
    env = child_env(*front, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", "from mlx_qlora.cli import entry; entry()", *map(str, args)],
                          capture_output=True, text=True, env=env, preexec_fn=preexec, cwd=cwd, timeout=300)


@pytest.mark.parametrize("command", ["convert", "train"])
def test_missing_mlx_backend_names_the_extra(command, tiny_hf_llama, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_BACKEND)
    args = {"convert": ["convert", tiny_hf_llama, "-o", tmp_path / "out"],
            "train": ["train", "--model", tiny_hf_llama, "--data", tmp_path, "--out", tmp_path / "run"]}[command]
    p = _cli_process(args, front=[tmp_path / "site"])
    line = assert_one_line_error(p.returncode, p.stderr + p.stdout, ["pip install 'mlx_qlora[cpu]'", "libmlx.so"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists(), line


def _fsize_limit(n_bytes):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


@pytest.mark.parametrize("command", ["convert", "export"])
def test_full_disk_is_one_line_and_leaves_nothing(command, base, tmp_path):
    """RLIMIT_FSIZE below the output's size: the write fails like a full disk would."""
    out = tmp_path / ("out" if command == "convert" else "m.gguf")
    args = {"convert": ["convert", base["hf"], "-o", out],
            "export": ["export", base["q4"], "-o", out, "--no-modelfile"]}[command]
    size = (base["q4"] / "model.safetensors").stat().st_size
    p = _cli_process(args, preexec=_fsize_limit(size // 3), cwd=tmp_path)
    assert_one_line_error(p.returncode, p.stderr + p.stdout, ["cannot write", "free space"])
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)
