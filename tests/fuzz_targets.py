"""Fuzz targets and the mutation strategy shared by tests/test_fuzz.py (a short run) and
bench/fuzz.py (10,000 inputs per target).

Each target takes a file's bytes, lays them out the way the reader expects them (a .gguf file,
a model or adapter directory, a data directory) and runs the reader. The contract: it returns,
or it raises ``UserError`` with a one-line message; any other exception is a crash. Inputs are
real files (the tiny model written by gguf-py and safetensors, WikiSQL rows) mutated by
hypothesis: bit flips, byte and integer overwrites (the integers that break parsers: 0, -1,
2**31, 2**63...), cuts, inserted and deleted runs, duplicated chunks. Mutations land in the
parsed part of a file (GGUF metadata and tensor infos, safetensors header) four times in five.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hypothesis import strategies as st

import tiny
from mlx_qlora.errors import UserError

INTERESTING = [0, 1, 2, 7, 8, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1]
WIKISQL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikisql" / "train.jsonl"


@dataclass
class Seed:
    data: bytes
    hot: int   # bytes at the start that the reader parses (the rest is tensor data)


@st.composite
def mutated(draw, seeds: list[Seed]) -> bytes:
    seed = draw(st.sampled_from(seeds))
    data = bytearray(seed.data)
    for _ in range(draw(st.integers(1, 6))):
        end = max(1, min(len(data), seed.hot) if draw(st.integers(0, 4)) else len(data))
        pos = draw(st.integers(0, end - 1))
        op = draw(st.sampled_from(["flip", "byte", "int", "cut", "insert", "delete", "dup"]))
        if op == "flip" and data:
            data[pos % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos % len(data)] = draw(st.integers(0, 255))
        elif op == "int":
            width = draw(st.sampled_from([4, 8]))
            v = draw(st.sampled_from(INTERESTING)) % (1 << (8 * width))
            data[pos:pos + width] = v.to_bytes(width, "little")
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "dup":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 256))]
    return bytes(data)


class Targets:
    """The seeds (written once into ``root``) and one call per reader."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hf = tiny.write_hf_dir(self.root / "hf", hidden=32, intermediate=64, layers=1)
        self.gguf = tiny.write_gguf(self.hf, self.root / "m.gguf", "Q4_1")
        self.adapter = self._adapter(self.root / "adapter")
        self._tok = None

    # ---- seeds
    def seeds(self, name: str) -> list[Seed]:
        if name == "gguf":
            return [Seed(self.gguf.read_bytes(), _gguf_data_start(self.gguf))]
        if name in ("safetensors", "adapter"):
            p = self.hf / "model.safetensors" if name == "safetensors" else self.adapter / "adapters.safetensors"
            return [Seed(p.read_bytes(), 8 + struct.unpack("<Q", p.read_bytes()[:8])[0])]
        if name == "jsonl":
            rows = WIKISQL.read_text().splitlines()[:6] if WIKISQL.exists() else [
                json.dumps({"text": f"Q: row {i}\nA: SELECT x FROM t WHERE id = {i}"}) for i in range(6)]
            chat = [json.dumps({"messages": [{"role": "user", "content": "Q: which id?"},
                                             {"role": "assistant", "content": f"SELECT id FROM t{i}"}]}) for i in range(4)]
            comp = [json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) for i in range(4)]
            return [Seed(("\n".join(r) + "\n").encode(), 1 << 30) for r in (rows, chat, comp)]
        raise KeyError(name)

    # ---- targets: return normally or raise UserError
    def gguf_reader(self, data: bytes) -> None:
        from mlx_qlora.model.convert.gguf import gguf_config, read_gguf

        with tempfile.TemporaryDirectory(dir=self.root) as d:
            path = Path(d) / "f.gguf"
            path.write_bytes(data)
            reader, meta = read_gguf(path)
            gguf_config(meta, {t.name for t in reader.tensors})

    def safetensors_reader(self, data: bytes) -> None:
        """The weights of a model directory (what convert reads)."""
        from mlx_qlora.model.convert.hf import read_hf_dir

        with tempfile.TemporaryDirectory(dir=self.root) as d:
            model = Path(shutil.copytree(self.hf, Path(d) / "hf"))
            (model / "model.safetensors").write_bytes(data)
            read_hf_dir(model)

    def adapter_reader(self, data: bytes) -> None:
        """An adapter's weights (what fuse, export, chat and serve read)."""
        from mlx_qlora.train.adapter_files import read_adapter

        with tempfile.TemporaryDirectory(dir=self.root) as d:
            adapter = Path(shutil.copytree(self.adapter, Path(d) / "adapter"))
            (adapter / "adapters.safetensors").write_bytes(data)
            read_adapter(adapter)

    def jsonl_loader(self, data: bytes) -> None:
        from mlx_qlora.train.config import DataConfig
        from mlx_qlora.train.data import load_dataset

        with tempfile.TemporaryDirectory(dir=self.root) as d:
            (Path(d) / "train.jsonl").write_bytes(data)
            load_dataset(DataConfig(train=d, max_seq_len=64), self.tokenizer())

    def tokenizer(self):
        if self._tok is None:
            from mlx_lm.tokenizer_utils import load as load_tokenizer

            self._tok = load_tokenizer(self.hf)
        return self._tok

    def _adapter(self, out: Path) -> Path:
        import numpy as np
        from safetensors.numpy import save_file

        out.mkdir()
        tensors = {f"model.layers.0.self_attn.{m}.lora_{ab}": np.full((32, 4) if ab == "a" else (4, 32), 0.01, np.float32)
                   for m in ("q_proj", "v_proj") for ab in "ab"}
        save_file(tensors, str(out / "adapters.safetensors"), metadata={"format": "mlx"})
        (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "scale": 2.0, "rank": 4}))
        return out

    def by_name(self) -> dict[str, tuple[Callable[[bytes], None], str]]:
        return {"gguf": (self.gguf_reader, "gguf"), "safetensors": (self.safetensors_reader, "safetensors"),
                "adapter": (self.adapter_reader, "adapter"), "jsonl": (self.jsonl_loader, "jsonl")}


def check_line(e: UserError) -> None:
    assert str(e) and "\n" not in str(e), repr(str(e))


def run(target: Callable[[bytes], None], data: bytes) -> str:
    """"ok" or "error" (a one-line UserError); anything else propagates as the crash it is."""
    try:
        target(data)
    except UserError as e:
        check_line(e)
        return "error"
    return "ok"


def _gguf_data_start(path: Path) -> int:
    import gguf

    return int(gguf.GGUFReader(str(path)).data_offset)
