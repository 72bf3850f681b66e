"""Mean token loss and perplexity of a model (+ adapter) on a JSONL file, scored like training.

Rows are encoded by ``train.data.encode_jsonl`` (same formats, chat template, loss masks and
truncation as ``mlx_qlora train``) and batched by ``train.data.batch_order``/``collate``. The
summed token loss of a batch comes from ``train.loop.make_step_fns(...).loss``, the very function
training validates with: the NumPy engine's forward on CPU (padding-free), MLX elsewhere. So the
eval loss *is* the training loss: mean = sum of token losses / number of loss tokens,
perplexity = exp(mean).

A ``.gguf`` model is scored by llama.cpp (``logits_all``) on the same token ids, each row from
an empty KV cache, with the same masks; that lets an MLX model and its GGUF be compared token
for token.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, require


@dataclass
class LossResult:
    loss: float          # mean nats per loss token
    loss_tokens: int     # tokens the loss is taken on (after masking)
    tokens: int          # input tokens run through the model
    rows: int
    seconds: float       # scoring only (no loading)
    engine: str

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "loss_tokens": self.loss_tokens,
                "tokens": self.tokens, "rows": self.rows, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s, "engine": self.engine}


class MLXScorer:
    """An MLX model directory (+ LoRA adapter): the training loss function, no gradient."""

    def __init__(self, model_dir: str | Path, adapter: str | None = None, weight_cache_mb: float = 1024):
        from ..train.loop import load_base, make_step_fns, prepare_model
        from ..train.lora import load_adapter

        self.model, self.tokenizer = load_base(str(model_dir))
        self.model.freeze()
        prepare_model(self.model)
        if adapter:
            require(Path(adapter).is_dir(), f"--adapter {adapter}: not a directory; give the --out directory "
                                            "of `mlx_qlora train`")
            try:
                load_adapter(self.model, adapter)
            except ValueError as e:   # apply_lora / load_weights on a model of another shape
                raise UserError(f"--adapter {adapter} does not fit model {model_dir} ({e}); "
                                "give the adapter trained on this base model") from None
        self.model.eval()
        said: list[str] = []
        self.fns = make_step_fns(self.model, weight_cache_mb=weight_cache_mb, say=said.append)
        self.engine = "CPU NumPy/BLAS forward" if self.fns.packed else "MLX"

    def __call__(self, batch) -> float:
        """Summed token loss of ``batch`` (a ``train.data.Batch``)."""
        return self.fns.loss(batch)


def gguf_tokenizer(path: str | Path):
    """The Hugging Face tokenizer rebuilt from a GGUF's metadata (tokenizes like llama.cpp)."""
    from ..model.convert.gguf import read_gguf
    from ..model.vocab import tokenizer_from_gguf

    _, meta = read_gguf(Path(path))
    return tokenizer_from_gguf(meta, meta.get("general.architecture", "llama"))


class LlamaCppScorer:
    """A GGUF through llama.cpp: logits of every position, cross-entropy on the loss tokens."""

    def __init__(self, gguf: str | Path, n_ctx: int = 2048, threads: int | None = None):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise UserError("scoring a .gguf needs llama-cpp-python: pip install 'mlx_qlora[llama]'") from None
        from ..infer.engines.llamacpp import default_threads
        from ..model.llama_load import open_llama

        self.path = Path(gguf)
        threads = threads or default_threads()
        self.llm = open_llama(self.path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                              n_threads=threads, n_threads_batch=threads)
        self.n_ctx = self.llm.n_ctx()
        self.engine = f"llama.cpp ({threads} thread{'s' * (threads > 1)})"

    def row_losses(self, ids: np.ndarray, cols: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Token losses of one row: ``ids`` its inputs, ``cols`` the loss positions, ``targets``
        the token predicted at each of them."""
        require(len(ids) <= self.n_ctx, f"a row has {len(ids)} tokens, the llama.cpp context {self.n_ctx}; "
                                        "lower --max-seq-len")
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        logits = np.asarray(self.llm.scores[cols], np.float64)
        top = logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        return lse - logits[np.arange(len(cols)), targets]

    def __call__(self, batch) -> float:
        t = batch.inputs.shape[1]
        row, col = np.divmod(batch.loss_index, t)
        total = 0.0
        for i, n in enumerate(batch.lengths):
            sel = row == i
            if sel.any():
                total += float(self.row_losses(batch.inputs[i, :n], col[sel], batch.targets[i, col[sel]]).sum())
        return total

    def close(self):
        self.llm.close()


def score(examples: list, batch_loss, batch_size: int = 4, engine: str = "", progress=None) -> LossResult:
    """Mean token loss of ``examples`` with ``batch_loss(batch) -> summed token loss``; batches are
    the ones training's validation builds (``batch_order`` with seed 0)."""
    from ..train.data import batch_order, collate

    order = batch_order([len(e.tokens) for e in examples], batch_size, 0, 0)
    total, n_loss, n_tok = 0.0, 0, 0
    t0 = time.perf_counter()
    for k, idx in enumerate(order):
        b = collate([examples[i] for i in idx])
        total += batch_loss(b)
        n_loss, n_tok = n_loss + b.n_loss, n_tok + b.real_tokens
        if progress is not None:
            progress(k + 1, len(order), total / max(n_loss, 1))
    require(n_loss > 0, "no loss token in the data: every row is masked out")
    return LossResult(total / n_loss, n_loss, n_tok, len(examples), time.perf_counter() - t0, engine)


def load_examples(data_cfg, tokenizer, max_rows: int | None = None, say=print) -> list:
    """The rows of ``data_cfg.train`` encoded as training encodes them (the first ``max_rows``)."""
    from ..train.data import encode_jsonl

    examples, fmt, counts = encode_jsonl(data_cfg.train, tokenizer, data_cfg)
    if max_rows:
        examples = examples[:max_rows]
    note = ""
    if counts["truncated"] or counts["dropped"]:
        note = (f"; {counts['truncated']} row(s) truncated to max_seq_len={data_cfg.max_seq_len}, "
                f"{counts['dropped']} dropped (no loss token left)")
    say(f"data: {data_cfg.train}: {len(examples)} rows ({fmt}){note}")
    return examples


def make_scorer(model: str, adapter: str | None = None, n_ctx: int = 2048):
    """(scorer, tokenizer) for an MLX model directory (+ adapter) or a .gguf file."""
    if str(model).endswith(".gguf"):
        require(not adapter, "--adapter with a .gguf model is not supported: merge it first "
                             "(mlx_qlora export MODEL_DIR --adapter DIR -o model.gguf)")
        return LlamaCppScorer(model, n_ctx=n_ctx), gguf_tokenizer(model)
    scorer = MLXScorer(model, adapter)
    return scorer, scorer.tokenizer


def evaluate_loss(cfg, say=print) -> LossResult:
    """``mlx_qlora eval MODEL --data ...`` without a task: loss, perplexity, tokens, tok/s."""
    if str(cfg.model).endswith(".gguf"):
        tokenizer = gguf_tokenizer(cfg.model)
        examples = load_examples(cfg.data_cfg, tokenizer, cfg.max_rows, say)
        n_ctx = max(len(e.tokens) for e in examples) + 1
        scorer, _ = make_scorer(cfg.model, cfg.adapter, n_ctx=max(n_ctx, 64))
    else:
        scorer, tokenizer = make_scorer(cfg.model, cfg.adapter)
        examples = load_examples(cfg.data_cfg, tokenizer, cfg.max_rows, say)
    res = score(examples, scorer, cfg.batch_size, scorer.engine)
    what = f"{cfg.model}" + (f" + adapter {cfg.adapter}" if cfg.adapter else "")
    say(f"{what} on {cfg.data_cfg.train} ({res.engine}):")
    say(f"  loss {res.loss:.4f} nats/token   perplexity {res.perplexity:.3f}   "
        f"{res.loss_tokens:,} loss tokens of {res.tokens:,} ({res.rows} rows)   "
        f"{res.tokens_per_s:,.0f} tok/s ({res.seconds:.1f} s)")
    return res
