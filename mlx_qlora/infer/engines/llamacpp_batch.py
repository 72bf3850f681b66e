"""Many prompts at once through llama.cpp: one context, several sequence ids, grammar per sequence.

``BatchDecoder`` keeps ``parallel`` slots busy (continuous batching): every ``llama_decode`` step
carries one new token for each slot that is generating, so the weights are read once per step for
all of them. A new row's prompt (after the shared prefix: chat template + instruction, evaluated
once on sequence 0 and copied to each slot with ``llama_memory_seq_cp``) runs in pieces of at most
PROMPT_CHUNK tokens: with ``prefill="own"`` (default) in calls of its own, the row then taking
its first token and joining the same step (a row missing from a step splits it, see below);
"even" in the step's call, every row filling its prompt feeding the same count; "wave" as even,
the next ``parallel`` rows started together once every slot is free. A finished row's sequence
is dropped.

Same answers at any ``parallel`` and any prefill: a row's logits are the floats it gets alone
(tests/test_extract.py, test_extract_batching.py). What that rests on, in ggml's CPU code paths:
- each sequence has its own KV stream (``kv_unified = false``): a row's keys and values sit in the
  same cells whatever runs beside it (in one unified cache the rows' cells interleave and the SIMD
  sums group them differently: near-ties broke the other way on ~1 row in 4);
- matmuls give each token's column the same floats in a batch of any size for Q4_x and Q8_0 weights
  (ggml's dot product per output; llamafile's tinyBLAS, taken from 2 tokens on, sums Q8_0/Q4_0
  blocks the same way). F16/BF16/F32 weights do not: tinyBLAS (>= 2 tokens) and ggml's dot product
  (1 token) sum in other orders, so with them no micro-batch holds one token or one output of
  several, and prompts run in calls of their own (``float_weights``; drafts are not covered there);
  with llama.cpp's AMX buffer type (an AMX CPU and the build of scripts/llama_cpp_wheel.py) Q4_x/Q8_0
  matmuls take a VNNI kernel for one token and AMX tiles for more: the tests above hold there too
  (int8 block products exact in int32, the blocks' scaled sums added in the same order);
- flash attention runs one query at a time (one_chunk) below 64 queries per stream: hence prompt
  pieces of at most 63 tokens (from 64 it takes a tiled kernel with other sums);
- a single query of a single stream over >= 512 KV cells (a row past SPLIT_KV_POS) takes a split-KV
  kernel: a row must never be alone in a micro-batch with one token. llama.cpp cuts a multi-stream
  call into micro-batches of equal tokens per stream over runs of consecutive sequence ids, so the
  items go in sequence order, free streams between rows get a throwaway token (``_fillers``), and a
  lone row gets one beside it (at --parallel 1 the spare stream, sequence ``parallel + 1``).
The prefix copy is a copy of the stream (llama.cpp copies whole streams only), a few MB per row.

Output is constrained by llama.cpp's own grammar sampler (``llama_sampler_init_grammar``) fed the
GBNF that ``LlamaGrammar.from_json_schema`` writes. Decoding is greedy; as llama.cpp's common
sampler does, the argmax token is first checked alone against the grammar and only when the
grammar rejects it is the whole vocabulary filtered, which keeps the grammar off the hot path.

With a ``Drafter`` (``drafts.py``) a step also carries each row's draft after its last token and
keeps the drafted tokens that the argmax confirms: the same tokens, bit-identical logits (a row's
positions are evaluated one query row at a time in the CPU attention, while its tokens in a
micro-batch stay under ggml's 64-query tile), fewer steps.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from ...errors import require
from ..generate import common_prefix


# Prompt tokens of one row per llama_decode call, at most: under ggml's 64-query flash-attention
# tile (GGML_FA_TILE_Q, ops.cpp), so every prompt token runs the per-query CPU kernel whatever else
# shares its call, and a row's logits do not depend on how its prompt was cut into calls.
PROMPT_CHUNK = 63
# A row's position from which llama.cpp's KV window (used cells padded to 256) reaches 512 cells,
# where one query of one stream alone takes ggml's split-KV attention (sums split by thread)
SPLIT_KV_POS = 256
# Where rows' prompts run: "own" = each in calls of its own before the step; "even" = in the step's
# call, beside the generating rows' tokens, every row that fills its prompt feeding the same count
# (llama.cpp cuts a call into micro-batches of equal tokens per sequence: one count, two micro-
# batches); "wave" = even, and new rows start only when every slot is free, longest prompt first, so
# the rows still feeding their prompt are one run of consecutive sequence ids (a micro-batch takes
# one such run: bench/batch_shapes.py counts the micro-batches of each)
PREFILL = ("own", "even", "wave")


def schema_to_gbnf(schema: dict) -> str:
    """GBNF for a JSON schema, by llama-cpp-python's converter (``LlamaGrammar.from_json_schema``)."""
    from ..structured import llamacpp_grammar

    return llamacpp_grammar(schema)._grammar


@dataclass
class Job:
    key: object                       # the caller's handle (a row index)
    prompt: list[int]
    gbnf: str | None = None           # this job's own grammar (default: the decoder's)
    schema: dict | None = None        # the JSON schema ``gbnf`` was made from (for forced drafts)
    tokens: list[int] = field(default_factory=list)
    finish: str = "stop"              # "stop" (end of grammar / eos) or "length"


class _Slot:
    def __init__(self, seq: int, grammar):
        self.seq, self.grammar, self.job = seq, grammar, None
        self.pos = 0                  # KV position of the row's last token (not evaluated yet)
        self.todo: list[int] = []     # prompt tokens not evaluated yet, from KV position ``next``
        self.next = 0
        self.drafts = None            # RowDrafts of the row, when the decoder drafts


class BatchDecoder:
    """Greedy, grammar-constrained decoding of many prompts over one llama.cpp model."""

    def __init__(self, llm, gbnf: str, prefix: list[int], parallel: int = 4, max_tokens: int = 512,
                 slot_tokens: int = 1024, n_threads: int = 1, n_batch: int = 512, drafter=None,
                 prefill: str = "own"):
        import llama_cpp as lc

        self.lc, self.llm = lc, llm
        self.parallel, self.max_tokens, self.n_batch = parallel, max_tokens, n_batch
        require(prefill in PREFILL, f"prefill {prefill!r}: use one of {', '.join(PREFILL)}")
        self.prefill = prefill
        self.vocab = lc.llama_model_get_vocab(llm.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.prefix = list(prefix)
        self.slot_tokens = slot_tokens
        p = lc.llama_context_default_params()
        per_seq = -(-(len(self.prefix) + slot_tokens + max_tokens + 16) // 256) * 256   # cells per stream
        # sequence 0 (the prefix) + one stream per slot + the companion's (see _run)
        p.n_ctx = per_seq * (parallel + 2)
        p.n_batch = p.n_ubatch = n_batch
        p.n_seq_max = parallel + 2
        self.companion = parallel + 1
        # F16/BF16/F32 matmuls take llamafile's tinyBLAS from 2 tokens (or outputs) on and ggml's dot
        # product for 1, which sum in other orders: with such weights no micro-batch may hold one
        # token or one output of several (a companion keeps a lone row company, every free slot
        # between rows is filled), and prompts run in calls of their own (whose last piece has one
        # output at any --parallel), so --parallel N stays bit-identical to --parallel 1
        desc = ctypes.create_string_buffer(256)
        lc.llama_model_desc(llm.model, desc, 256)
        self.float_weights = desc.value.decode(errors="replace").split()[-1:] in (["F16"], ["BF16"], ["F32"])
        if self.float_weights:
            self.prefill = "own"
        p.n_threads = p.n_threads_batch = n_threads
        p.kv_unified = False
        p.no_perf = True
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp logs context sizes to stderr
            self.ctx = lc.llama_init_from_model(llm.model, p)
        require(bool(self.ctx), f"llama.cpp could not create a context of {p.n_ctx} tokens for "
                                f"{parallel} sequences; lower --parallel or --max-tokens")
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(n_batch + parallel + 1, 0, 1)   # + fillers (_fillers)
        self.eog = lambda t: lc.llama_vocab_is_eog(self.vocab, t)
        self.slots = []
        for s in range(1, parallel + 1):
            g = lc.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
            require(bool(g), "llama.cpp could not parse the grammar made from the JSON schema; simplify the schema")
            self.slots.append(_Slot(s, g))
        # the vocabulary as a candidate array, for the (rare) steps where the argmax is rejected
        self._cand = (lc.llama_token_data * self.n_vocab)()
        self._cand_np = np.ctypeslib.as_array(self._cand)
        self._cand_np["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self._one = (lc.llama_token_data * 1)()
        self.tokens_evaluated = len(self.prefix)  # prompt tokens actually run (the shared prefix once)
        from .drafts import DraftCounts

        self.drafter, self.counts = drafter, DraftCounts()
        if self.prefix:
            self._run([(t, i, 0, False) for i, t in enumerate(self.prefix)])

    def set_lora(self, handle, scale: float = 1.0) -> None:
        """Apply a LoRA adapter (loaded on the model by ``LlamaCppEngine``) to this context."""
        lc = self.lc
        rc = lc.llama_set_adapters_lora(self.ctx, (lc.llama_adapter_lora_p_ctypes * 1)(handle), 1,
                                        (ctypes.c_float * 1)(scale))
        require(rc == 0, f"llama.cpp refused the adapter (code {rc})")
        lc.llama_memory_clear(self.mem, True)  # the prefix was computed without it
        if self.prefix:
            self._run([(t, i, 0, False) for i, t in enumerate(self.prefix)])

    # --- llama.cpp calls ----------------------------------------------------------------------
    def _run(self, items: list[tuple[int, int, int, bool]]) -> dict[int, np.ndarray]:
        """Decode (token, pos, seq, want_logits) items in chunks; returns {item index: logits}."""
        lc, b, out = self.lc, self.batch, {}
        for start in range(0, len(items), self.n_batch):
            chunk = items[start:start + self.n_batch]
            fill = self._fillers(chunk)
            batch = sorted(chunk + fill, key=lambda it: it[2])   # stable: a row's tokens stay in order
            for i, (tok, pos, seq, want) in enumerate(batch):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = seq
            b.n_tokens = len(batch)
            rc = lc.llama_decode(self.ctx, b)
            for _, _, seq, _ in fill:
                lc.llama_memory_seq_rm(self.mem, seq, -1, -1)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} (context full?)")
            where = {id(it): i for i, it in enumerate(batch)}
            for i, it in enumerate(chunk):
                if it[3]:
                    ptr = lc.llama_get_logits_ith(self.ctx, where[id(it)])
                    out[start + i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return out

    def _fillers(self, chunk) -> list[tuple[int, int, int, bool]]:
        """Tokens on free streams (position 0, dropped after the call) that keep every row of a call
        in one first micro-batch. llama.cpp's micro-batches of a multi-stream call take runs of
        consecutive sequence ids, so a free slot between two rows splits the call; a row left alone
        with one token past SPLIT_KV_POS would then take ggml's split-KV attention, which it never
        meets beside other rows (and does at --parallel 1: there the spare stream keeps it company).
        Gaps are filled when short (1-2 slots) or when a row of the call is past SPLIT_KV_POS."""
        seqs = sorted({seq for _, _, seq, _ in chunk})
        free = lambda s: s == self.companion or (1 <= s <= self.parallel and self.slots[s - 1].job is None)
        long = self.float_weights or any(pos >= SPLIT_KV_POS for _, pos, _, _ in chunk)
        gaps = []
        for a, b in zip(seqs, seqs[1:]):   # a gap of 1-2 free slots costs less than a micro-batch more
            if 1 < b - a <= 3 or (b - a > 1 and long):
                gaps += [s for s in range(a + 1, b) if free(s)]
        lo, hi = seqs[0], seqs[-1]
        want = False
        if len(chunk) == 1 and (chunk[0][1] >= SPLIT_KV_POS or self.float_weights):
            gaps += [s for s in (hi + 1, lo - 1) if free(s)][:1]
            want = chunk[0][3]   # float weights: two outputs, as in any step of several rows
        return [(chunk[0][0], 0, s, want) for s in gaps]

    def _pick(self, slot: _Slot, logits: np.ndarray) -> int:
        lc = self.lc
        tok = int(np.argmax(logits))
        one = self._one
        one[0].id, one[0].logit, one[0].p = tok, float(logits[tok]), 0.0
        arr = lc.llama_token_data_array(one, 1, -1, False)
        lc.llama_sampler_apply(slot.grammar, ctypes.byref(arr))
        if not np.isfinite(one[0].logit):     # rejected: filter the whole vocabulary
            self._cand_np["logit"] = logits
            arr = lc.llama_token_data_array(self._cand, self.n_vocab, -1, False)
            lc.llama_sampler_apply(slot.grammar, ctypes.byref(arr))
            tok = int(np.argmax(self._cand_np["logit"]))
            require(np.isfinite(self._cand_np["logit"][tok]), "the grammar allows no token here (a bug)")
        lc.llama_sampler_accept(slot.grammar, tok)
        return tok

    def _start(self, slot: _Slot, job: Job) -> None:
        """Give ``job`` to ``slot``: the shared prefix copied in, the rest of its prompt queued."""
        lc = self.lc
        lc.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        # the whole prefix stream or nothing (cross-stream copies are whole-buffer copies)
        keep = len(self.prefix) if self.prefix and len(job.prompt) > len(self.prefix) and \
            common_prefix(job.prompt, self.prefix) == len(self.prefix) else 0
        if keep:
            lc.llama_memory_seq_cp(self.mem, 0, slot.seq, -1, -1)
        if job.gbnf is not None:
            lc.llama_sampler_free(slot.grammar)
            slot.grammar = lc.llama_sampler_init_grammar(self.vocab, job.gbnf.encode(), b"root")
            require(bool(slot.grammar), "llama.cpp could not parse a row's grammar; simplify the schema")
        else:
            lc.llama_sampler_reset(slot.grammar)
        slot.job, slot.pos = job, len(job.prompt)
        slot.todo, slot.next = job.prompt[keep:], keep
        if self.drafter is not None:   # lookup copies from the row's own text, not the shared prefix
            slot.drafts = self.drafter.row(job.prompt[len(self.prefix) if keep else 0:], job.schema)
        self.tokens_evaluated += len(slot.todo)

    def _prompt_counts(self, budget: int) -> dict[int, int]:
        """{slot seq: prompt tokens it feeds this step} for rows whose prompt is not all evaluated:
        the same count for all (even, wave), at most PROMPT_CHUNK each and ``budget`` in all."""
        filling = [s for s in self.slots if s.job is not None and s.todo]
        if not filling:
            return {}
        n = max(1, min(PROMPT_CHUNK, budget // len(filling)))
        n = min(n, min(len(s.todo) for s in filling))
        if n == 2:   # the 2nd token would be a micro-batch of one token per row: alone where rows are apart
            n = 1
        return {s.seq: n for s in filling[:max(1, budget // n)]}

    def _feed(self, slot: _Slot, n: int) -> list[tuple[int, int, int, bool]]:
        """The next ``n`` prompt tokens of ``slot`` as items (logits at the prompt's last token)."""
        chunk, done = slot.todo[:n], n == len(slot.todo)
        items = [(t, slot.next + i, slot.seq, done and i == n - 1) for i, t in enumerate(chunk)]
        slot.todo, slot.next = slot.todo[n:], slot.next + n
        return items

    # --- the loop -----------------------------------------------------------------------------
    def check(self, prompt: list[int]) -> str | None:
        """Why a prompt cannot run here (too long, empty), or None."""
        if not prompt:
            return "empty prompt"
        if len(prompt) > len(self.prefix) + self.slot_tokens:
            return (f"the prompt is {len(prompt)} tokens; at most {len(self.prefix) + self.slot_tokens} fit "
                    f"(shorten the text)")
        return None

    def run(self, jobs: Iterable[Job], on_done: Callable[[Job], None] | None = None) -> Iterator[Job]:
        """Decode every job; yields each one when finished (not in input order).

        A step evaluates, for every generating row, its last token and then the row's draft (see
        ``drafts.py``), all in one ``llama_decode``; the logits at each position are checked in order
        against the grammar-constrained argmax, and a drafted token is kept only while it is that
        argmax, so the row writes what one token per step would have written."""
        todo = iter(jobs)
        exhausted = False
        while True:
            if self.prefill != "wave":
                for slot in self.slots:
                    if slot.job is None and not exhausted:
                        job = next(todo, None)
                        if job is None:
                            exhausted = True
                        else:
                            self._start(slot, job)
            elif not exhausted and all(s.job is None for s in self.slots):
                # a wave: the next `parallel` rows, longest prompt on the lowest sequence id, so the
                # rows still feeding prompt tokens are always a run of consecutive ids (one micro-batch)
                wave = [j for j in (next(todo, None) for _ in self.slots) if j is not None]
                exhausted = len(wave) < len(self.slots)
                for slot, job in zip(self.slots, sorted(wave, key=lambda j: -len(j.prompt))):
                    self._start(slot, job)
            started = 0   # rows whose prompt ran in calls of their own this step
            if self.prefill == "own":   # each prompt in calls of its own, before the step
                for slot in [s for s in self.slots if s.job is not None and s.todo]:
                    while slot.todo:   # pieces of at most PROMPT_CHUNK, the last one at least 2
                        n = min(len(slot.todo), PROMPT_CHUNK)
                        n -= len(slot.todo) - n == 1
                        part = self._feed(slot, n)
                        got = self._run(part)
                    started += 1
                    # its first token now, so it joins this step: no gap in the step's sequence ids
                    done = self._advance(slot, [got[len(part) - 1]], [], [], 0)
                    if done is not None:
                        yield done
            drafts = {}
            for slot in self.slots:
                if slot.job is not None and not slot.todo:
                    draft, forced = slot.drafts.propose() if slot.drafts is not None else ([], [])
                    # a draft past --max-tokens could never be kept
                    drafts[slot.seq] = draft[:max(0, self.max_tokens - len(slot.job.tokens) - 1)], forced
            feeds = self._prompt_counts(self.n_batch - sum(len(d) + 1 for d, _ in drafts.values()))
            items: list[tuple[int, int, int, bool]] = []
            pending = []  # (slot, index of its last token in items, its draft, which are forced)
            ends = []     # (slot, index of its prompt's last token in items)
            for slot in self.slots:   # in sequence order: a micro-batch takes consecutive ids
                if slot.seq in drafts:
                    draft, forced = drafts[slot.seq]
                    pending.append((slot, len(items), draft, forced))
                    items += [(t, slot.pos + i, slot.seq, True)
                              for i, t in enumerate([slot.job.tokens[-1], *draft])]
                elif slot.seq in feeds:
                    done = feeds[slot.seq] == len(slot.todo)
                    items += self._feed(slot, feeds[slot.seq])
                    if done:
                        ends.append((slot, len(items) - 1))
            if not items:
                if started or any(sl.job is not None for sl in self.slots) or not exhausted:
                    continue
                return
            logits = self._run(items)
            self.counts.steps += bool(pending)
            # (slot, logits per position, draft, forced, 1 when the row's last token was fed this step)
            steps = [(slot, [logits[at + j] for j in range(len(draft) + 1)], draft, forced, 1)
                     for slot, at, draft, forced in pending] + [(slot, [logits[i]], [], [], 0) for slot, i in ends]
            for step in steps:
                done = self._advance(*step)
                if done is not None:
                    yield done

    def _advance(self, slot: _Slot, row_logits, draft, forced, fed) -> Job | None:
        """Pick the row's tokens from the logits at its positions of this step (a drafted token kept
        while it is the argmax); the row's job when it is finished (its slot then free), else None."""
        job, start = slot.job, slot.pos
        kept, finished = 0, False
        for j, lg in enumerate(row_logits):
            tok = self._pick(slot, lg)
            finished = self._take(slot, tok)
            if finished or j == len(draft) or tok != draft[j]:
                self.counts.sampled += not finished or job.finish == "length"
                break
            kept += 1
            self.counts.forced += forced[j]
            self.counts.lookup += not forced[j]
        self.counts.rejected += len(draft) - kept
        if finished:
            slot.job = slot.drafts = None
            self.lc.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            return job
        slot.pos = start + fed + kept        # where the row's new last token goes
        if kept < len(draft):   # the cells of the drafts thrown away
            self.lc.llama_memory_seq_rm(self.mem, slot.seq, slot.pos, -1)
        return None

    def _take(self, slot: _Slot, tok: int) -> bool:
        """Append ``tok`` to the slot's row; True when the row is finished."""
        job = slot.job
        if self.eog(tok):
            job.finish = "stop"
            return True
        job.tokens.append(tok)
        if slot.drafts is not None:
            slot.drafts.accept(tok)
        if len(job.tokens) >= self.max_tokens:
            job.finish = "length"
            return True
        return False

    def text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def close(self) -> None:
        lc = self.lc
        for slot in self.slots:
            lc.llama_sampler_free(slot.grammar)
        self.slots = []
        if self.ctx:
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ctx)
            self.ctx = None
