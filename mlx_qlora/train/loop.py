"""The training loop: ``train(TrainConfig) -> dict`` (the ``mlx_qlora train`` command calls it).

One optimizer step = ``optim.grad_accum`` micro-batches whose summed token losses and gradients
are divided by their total loss-token count (so accumulation equals one larger batch). Before the
update the loss and gradient norm are checked: a NaN/inf stops the run with the parameters and the
last checkpoint untouched. Dropout randomness is re-seeded from (seed, step), and the batch order
is a function of (seed, epoch), so a resumed run replays exactly what an uninterrupted one does.

Checkpoints (``checkpoints.py``) live in ``out_dir/checkpoints/step_NNNNNNN`` (adapter + optimizer
state + state.json), written to a temp directory and renamed; ``checkpoints/latest`` names the
newest. The current adapter is also kept at ``out_dir/adapters.safetensors`` for other commands.
On the GPU path with one micro-batch and one process the step is one compiled graph
(``mlx_step.make_train_step``) whose update is masked when the loss or norm is not finite.
"""
from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..atomic import remove_stale
from ..errors import UserError, require
from ..model.model_io import check_model_dir
from . import distributed as dist
from .engines import cpu_gemm as cpu_gemm_mod
from .engines import mlx_cpu_kernels, numpy_engine
from .checkpoints import load_checkpoint, save_checkpoint
from .config import OptimConfig, TrainConfig
from .data import Batch, batch_order, collate, load_dataset, padding_waste
from .lora import count_parameters, seed_dropout
from .model_parts import StepFns, grad_checkpoint, output_head  # noqa: F401  (also imported from here)
from . import preference
from .preference_data import load_pairs
from .report import Reporter

CPU_CACHE_LIMIT = 256 * 1024 ** 2   # bytes of freed MLX buffers kept for reuse on CPU


# ---------------------------------------------------------------- model
def load_base(path: str):
    from mlx_lm.utils import load

    p = Path(path).expanduser()
    require(p.exists() or (path.count("/") == 1 and not path.startswith((".", "/", "~"))),
            f"model {path!r} not found: give an MLX model directory (see `mlx_qlora convert`) or a Hugging Face id")
    if p.is_dir():
        check_model_dir(p)  # a damaged config.json or safetensors: one line, not mlx-lm's traceback
    try:
        return load(str(p) if p.exists() else path)
    except FileNotFoundError as e:
        raise UserError(f"model {path!r}: {e}") from None


def prepare_model(model: nn.Module) -> None:
    """CPU: fp16/bf16 arrays to fp32 (CPU half matmuls are slow) and the dequant fast path."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return
    # MLX keeps freed buffers for reuse up to the memory limit; with fp32 weights dequantized and
    # dropped per layer that cache, not live arrays, dominated the peak RSS (7B: +3-4 GiB).
    mx.set_cache_limit(CPU_CACHE_LIMIT)
    halves = (mx.float16, mx.bfloat16)
    model.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype in halves else a, model.parameters()))
    mlx_cpu_kernels.accelerate(model)


def make_loss(model: nn.Module):
    """loss(model, inputs, targets, index, with_grad) -> summed cross-entropy over loss tokens."""
    head = output_head(model)
    # The head is frozen: dequantize it once (fp32, vocab x dim; 113 MB for SmolLM2) instead of
    # every step (~0.3 s per step on CPU for a 49k x 576 8-bit embedding).
    weight = mlx_cpu_kernels.dense_weight(head) if head is not None else None
    if weight is not None:
        mx.eval(weight)

    def loss(model, inputs, targets, index, with_grad=True):
        if head is not None:
            h = model.model(inputs)
            h = h.reshape(-1, h.shape[-1])[index]
            return mlx_cpu_kernels.fused_cross_entropy(h, head, targets.reshape(-1)[index], with_grad=with_grad,
                                                weight=weight)
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[index]
        return mlx_cpu_kernels.plain_cross_entropy(logits, targets.reshape(-1)[index])

    return loss


def _arrays(b: Batch):
    return mx.array(b.inputs), mx.array(b.targets), mx.array(b.loss_index)


def make_step_fns(model: nn.Module, grad_checkpointing: bool = False, use_cpu_engine: bool = True,
                  weight_cache_mb: float = 1024, say=print, batch_shape=None, base_matmul: str = "auto",
                  cpu_gemm: str = "auto"):
    """The step functions for this device (``StepFns``).

    On CPU the NumPy/BLAS engine (``numpy_engine``) when it covers the model, else MLX autodiff
    (the fast-path kernels of ``mlx_cpu_kernels``; Metal/CUDA always take this path, with the
    frozen 4-bit products as ``base_matmul`` says: see ``dequant_gemm``); the CPU engine's frozen
    products in fp32 or bf16 as ``cpu_gemm`` says (``cpu_gemm.choose``). Losses and gradients
    are of the summed token loss; the caller divides by the loss-token count.
    """
    if mlx_cpu_kernels.on_cpu() and use_cpu_engine:
        why = numpy_engine.unsupported(model)
        if why is None:
            gemm = cpu_gemm_mod.choose(cpu_gemm)
            eng = numpy_engine.CpuEngine(model, grad_checkpointing, weight_cache_mb,
                                         bf16=cpu_gemm_mod.load_library()[0] if gemm.bf16 else None)
            say(f"engine: CPU NumPy/BLAS, padding-free; GEMMs: {gemm.reason}; {eng.cached_mb:,.1f} MiB of "
                f"{gemm.path} weight cache (cpu_weight_cache_mb={weight_cache_mb}){eng.kernels_note()}")
            return StepFns(eng.loss_and_grad, eng.loss, True)
        say(f"engine: MLX autodiff (the CPU engine does not cover {why})")
    if not mlx_cpu_kernels.on_cpu():   # Metal / CUDA (or CPU kernels off): compiled, chunked loss
        from . import memory_plan
        from .engines import dequant_gemm, mlx_step

        head = output_head(model)
        dense = dequant_gemm.resolve(base_matmul)
        if memory_plan.choose_checkpointing(model, head, grad_checkpointing, batch_shape, say, dense):
            grad_checkpoint(model)
        return StepFns(*mlx_step.make_device_step(model, head, dense=dense), False,
                       partial(mlx_step.make_train_step, model, head, dense=dense))
    if grad_checkpointing:
        grad_checkpoint(model)
    loss_fn = make_loss(model)
    value_and_grad = nn.value_and_grad(model, loss_fn)

    def grad_fn(b: Batch, seed):
        seed_dropout(seed)
        loss, g = value_and_grad(model, *_arrays(b))
        mx.eval(loss, g)
        return loss.item(), g

    def eval_fn(b: Batch):
        loss = loss_fn(model, *_arrays(b), with_grad=False)
        mx.eval(loss)
        return loss.item()

    return StepFns(grad_fn, eval_fn, False)


# ---------------------------------------------------------------- optimizer
def build_optimizer(o: OptimConfig, steps: int) -> optim.Optimizer:
    peak, end = o.learning_rate, o.learning_rate * o.min_lr_ratio
    decay = max(steps - o.warmup_steps, 1)
    if o.schedule == "cosine":
        main = optim.cosine_decay(peak, decay, end)
    elif o.schedule == "linear":
        main = optim.linear_schedule(peak, end, decay)
    else:
        main = optim.linear_schedule(peak, peak, 1)
    if o.warmup_steps:
        # Step 0 already learns (peak / warmup), reaching the peak after warmup_steps.
        main = optim.join_schedules([optim.linear_schedule(peak / o.warmup_steps, peak, o.warmup_steps), main],
                                    [o.warmup_steps])
    return optim.AdamW(learning_rate=main, betas=[o.beta1, o.beta2], eps=o.eps, weight_decay=o.weight_decay)


# ---------------------------------------------------------------- loop
def evaluate(eval_fn, examples, batch_size: int, max_batches: int, seed: int,
             world: dist.World | None = None, collate=collate) -> float:
    """Mean token loss over (up to ``max_batches``) validation batches (each rank: its share)."""
    world = world or dist.World()
    order = batch_order([len(e.tokens) for e in examples], batch_size, seed, 0)
    if max_batches:
        order = order[:max_batches]
    total, n = 0.0, 0
    for idx in map(world.share, order):
        if idx:
            b = collate([examples[i] for i in idx])
            total, n = total + eval_fn(b), n + b.n_loss
    total, n = dist.sum_numbers(world, [total, n], "the validation all_sum")
    return total / max(n, 1)


def train(cfg: TrainConfig) -> dict:
    """Fine-tune LoRA adapters on ``cfg.model``; returns the summary (also printed)."""
    started = time.perf_counter()  # start-up is timed apart from the steps (report.Reporter)
    out = Path(cfg.out_dir)  # made once model, data and checkpoint are known good: bad input leaves none
    world = dist.init_world()   # one rank of N under mlx.launch (train/distributed.py), else 1 of 1
    model, tokenizer = load_base(cfg.model)
    prepare_model(model)
    pref = cfg.method != "sft"   # dpo / orpo: pairs, losses and reference in train/preference.py
    if pref:
        ds = load_pairs(cfg.data, tokenizer, cfg.preference, cfg.seed)
    else:
        ds = load_dataset(cfg.data, tokenizer, cfg.seed)
    mx.random.seed(cfg.seed)
    start = preference.start_adapter(model, cfg)   # LoRA applied, fresh or from init_adapter; its weights (DPO's reference)
    optimizer = build_optimizer(cfg.optim, cfg.steps)
    state = {"step": 0, "epoch": 0, "batch_index": 0, "seed": cfg.seed}
    if cfg.resume and world.main:
        state = load_checkpoint(out, model, optimizer)
    state = dist.sync_start(world, model, optimizer, state)   # rank 0's adapter, optimizer and position
    dist.agree(world, json.dumps([cfg.to_dict(), [len(e.tokens) for e in ds.train + ds.valid]]), "the recipe or data")
    if cfg.resume:
        require(state["step"] < cfg.steps, f"--resume: the checkpoint is at step {state['step']}, not below "
                                           f"steps={cfg.steps}; raise --steps to train further")
    out.mkdir(parents=True, exist_ok=True)
    for d in (out, out / "checkpoints"):  # half-written temporaries of a killed run
        remove_stale(d)
    rep = Reporter(out, cfg.steps, state["step"], progress=cfg.progress, started=started, ranks=world.size,
                   write=world.main)
    trainable, total = count_parameters(model)
    rep.print(f"model {cfg.model}: {total / 1e6:.2f}M parameters, trainable {trainable:,} ({100 * trainable / total:.3f}%)")
    if cfg.init_adapter:
        rep.print(f"starting from adapter {cfg.init_adapter} (rank {cfg.lora.rank}, its targets and layers)")
    if pref:
        fns = preference.make_step_fns(model, cfg, ds, start, world, rep.print)
    else:
        fns = make_step_fns(model, cfg.grad_checkpoint, cfg.cpu_engine, cfg.cpu_weight_cache_mb, rep.print,
                            batch_shape=(cfg.batch_size, cfg.data.max_seq_len), base_matmul=cfg.base_matmul,
                            cpu_gemm=cfg.cpu_gemm)
    batch_of = getattr(ds, "collate", collate)   # pairs: chosen and rejected rows in one batch
    grad_fn, eval_fn, packed = fns.grad, fns.loss, fns.packed
    from .engines.mlx_step import make_scale_clip, make_update

    # scaling, clipping and the AdamW update compiled (one fused kernel per tensor instead of ~10 ops
    # each) on the GPU path and beside the CPU engine, where the uncompiled update of the LoRA
    # tensors was ~45 ms of a ~600 ms step (2-core Xeon); the same bits (tests/test_train_compiled_update.py)
    compiled = packed or not mlx_cpu_kernels.on_cpu()
    update = make_update(model, optimizer) if compiled else partial(optimizer.update, model)
    scale_clip = make_scale_clip(cfg.optim.max_grad_norm, compiled=compiled)
    # one micro-batch, one process: the whole optimizer step as one compiled graph (mlx_step)
    whole = fns.whole_step and cfg.optim.grad_accum == 1 and world.size == 1
    train_step = fns.whole_step(optimizer, cfg.optim.max_grad_norm) if whole else None
    waste = "no padding (the CPU engine packs rows)" if packed else \
        f"padding waste {100 * padding_waste(ds.train, cfg.batch_size, cfg.seed):.1f}% with length bucketing"
    rep.print(f"data: {len(ds.train)} train / {len(ds.valid)} valid rows ({ds.fmt}), {waste}")
    if ds.truncated or ds.dropped:
        rep.print(f"[yellow]warning: {ds.truncated} row(s) longer than max_seq_len={cfg.data.max_seq_len} tokens were "
                  f"truncated{f', {ds.dropped} dropped (no loss token left)' if ds.dropped else ''}; raise data.max_seq_len to keep them")
    if world.size > 1:
        rep.print(f"data parallel: {world.size} ranks ({world.backend}), each takes 1/{world.size} of every "
                  f"global batch of {cfg.batch_size} rows")
    if world.main:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    lengths = [len(e.tokens) for e in ds.train]
    order = batch_order(lengths, cfg.batch_size, cfg.seed, state["epoch"])
    last_ckpt = None
    watchdog, my_tokens = dist.Watchdog(world), 0

    def validate(step: int) -> None:
        t = time.perf_counter()
        loss = evaluate(eval_fn, ds.valid, cfg.batch_size, cfg.eval_batches, cfg.seed, world, batch_of)
        rep.valid(step, loss, time.perf_counter() - t, fns.metrics("valid") if fns.metrics else None)

    if state["step"] == 0:
        validate(0)

    def next_batch():
        nonlocal order
        if state["batch_index"] >= len(order):
            state["epoch"] += 1
            state["batch_index"] = 0
            order = batch_order(lengths, cfg.batch_size, cfg.seed, state["epoch"])
        idx = world.share(order[state["batch_index"]])
        state["batch_index"] += 1
        return batch_of([ds.train[i] for i in idx]) if idx else None

    def accumulated(t_step: float):
        """``grad_accum`` micro-batches on this rank, summed over ranks, / loss tokens and clipped:
        (gradients, loss sum, loss tokens, tokens, grad norm, this rank's tokens)."""
        grads, loss_sum, n_loss, n_tok = None, 0.0, 0, 0
        for micro in range(cfg.optim.grad_accum):
            b = next_batch()
            if b is None:   # a last short batch left this rank no row
                grads = grads or tree_map(mx.zeros_like, model.trainable_parameters())
                continue
            # dropout masks are a function of (seed, step, micro-batch, rank), so resuming replays them
            loss, g = grad_fn(b, (cfg.seed, state["step"], micro * world.size + world.rank))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads)
            loss_sum, n_loss, n_tok = loss_sum + loss, n_loss + b.n_loss, n_tok + b.real_tokens
        mine = n_tok
        grads, (loss_sum, n_loss, n_tok) = dist.sum_step(world, grads, [loss_sum, n_loss, n_tok],
                                                         f"the gradient all_sum of step {state['step'] + 1}",
                                                         watchdog, time.perf_counter() - t_step)
        grads, norm = scale_clip(grads, n_loss)
        return grads, loss_sum, n_loss, n_tok, norm.item(), mine

    try:
        while state["step"] < cfg.steps:
            t_step = time.perf_counter()
            pos = (state["epoch"], state["batch_index"])
            if train_step is not None:   # loss, gradient, clipping and update: one graph (not kept if NaN)
                b = next_batch()
                loss_sum, norm = train_step(b, (cfg.seed, state["step"], 0))
                grads, n_loss, n_tok = None, b.n_loss, b.real_tokens
                my_tokens += n_tok
            else:
                grads, loss_sum, n_loss, n_tok, norm, mine = accumulated(t_step)
                my_tokens += mine
            n_tok = int(n_tok)
            mean_loss = loss_sum / n_loss
            if not (math.isfinite(mean_loss) and math.isfinite(norm)):
                state["epoch"], state["batch_index"] = pos
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise UserError(f"loss became {mean_loss} (grad norm {norm}) at step {state['step'] + 1}: "
                                f"training stopped, {where}; lower optim.learning_rate or set optim.max_grad_norm")
            if grads is not None:   # the per-micro-batch path: its update, compiled apart
                update(grads)
                mx.eval(model.trainable_parameters(), optimizer.state)
            state["step"] += 1
            step = state["step"]
            rep.step(step, mean_loss, n_tok, optimizer.learning_rate.item(),  # the rate this step used
                     time.perf_counter() - t_step, fns.metrics("train") if fns.metrics else None)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                validate(step)
            if ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps) and world.main:
                last_ckpt = save_checkpoint(out, model, optimizer, state, cfg, cfg.keep_checkpoints)
    except KeyboardInterrupt:
        rep.close()
        if not world.main:
            raise
        path = save_checkpoint(out, model, optimizer, state, cfg, cfg.keep_checkpoints)
        rep.print(f"interrupted at step {state['step']}: adapter saved to {out} (checkpoint {path.name}); "
                  f"continue with --resume")
        raise
    except BaseException:
        rep.close()
        raise
    validate(state["step"])
    per_rank = [t / max(s, 1e-9) for t, s in dist.gather_numbers(world, [my_tokens, rep.train_s])]
    summary = rep.summary(out / "adapters.safetensors", per_rank if world.size > 1 else None)
    summary.update(trainable=trainable, steps=state["step"], out_dir=str(out))
    if world.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

