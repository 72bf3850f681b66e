"""The ``mlx_qlora`` command line: each command parses its options and calls one function.

Heavy modules (mlx, mlx_lm, transformers) are imported inside the commands so that
``mlx_qlora --help`` answers instantly.
"""
from __future__ import annotations

import sys

import click

from . import __version__
from .errors import UserError


def missing_backend(e: ImportError) -> str | None:
    """The one line for an MLX that imports without its compiled backend (Linux ``pip install``
    without the ``cpu``/``cuda`` extra: ``libmlx.so`` is missing); None for any other ImportError."""
    name, text = e.name or "", str(e)
    if not (name == "mlx" or name.startswith("mlx.") or "libmlx" in text):
        return None
    detail = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return (f"the MLX backend is not installed ({detail}); install it with: pip install 'mlx_qlora[cpu]' "
            "(or 'mlx_qlora[cuda]' on an NVIDIA GPU)")


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(getattr(e, "exit_code", 2))
        except ImportError as e:
            line = missing_backend(e)
            if line is None:
                raise
            click.echo(f"error: {line}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx_qlora")
def main():
    """QLoRA fine-tuning on MLX, export to llama.cpp.

    Pipeline: convert -> train -> fuse / export -> chat / generate / serve.
    """


@main.command()
@click.option("--probe-llama", "probe_gguf", is_flag=False, flag_value="embedded", default=None,
              metavar="[GGUF]", help="measure llama.cpp's extra buffer types (AMX, repacked rows) on this CPU "
                                     "for GGUF (default: the embedded model) and remember the verdict")
def doctor(probe_gguf: str | None):
    """Show the CPU, MLX device, BLAS in use (with measured sgemm GFLOP/s), embedded model, llama.cpp
    (its build and whether its extra buffer types are used)."""
    from .doctor import run_doctor

    run_doctor(probe_gguf)


@main.command()
@click.argument("source", required=False)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Output MLX model directory.")
@click.option("--q-bits", type=int, default=4, show_default=True, help="2, 3, 4, 6 or 8.")
@click.option("--q-group-size", type=int, default=64, show_default=True, help="32, 64 or 128.")
@click.option("--no-quantize", is_flag=True, help="Keep weights unquantized (see --dtype).")
@click.option("--dtype", default=None, help="float16, bfloat16 or float32 for unquantized tensors.")
@click.option("--requantize", is_flag=True, help="GGUF: dequantize and re-quantize even where blocks map exactly.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def convert(source, out_dir, q_bits, q_group_size, no_quantize, dtype, requantize, force):
    """Convert SOURCE (HF hub id, local HF dir, or .gguf file) to an MLX model.

    With no SOURCE (or 'smollm2') the embedded SmolLM2-135M-Instruct GGUF is used.
    """
    from .model.convert import ConvertConfig, run_convert

    run_convert(ConvertConfig(source=source, out_dir=out_dir, q_bits=q_bits, q_group_size=q_group_size,
                              quantize=not no_quantize, dtype=dtype, requantize=requantize, force=force))


@main.command()
@click.option("-o", "--out", "out_dir", default="demo_out", show_default=True, type=click.Path())
@click.option("--steps", default=60, show_default=True, help="QLoRA steps on the WikiSQL sample.")
@click.option("--data", default=None, type=click.Path(), help="JSONL dir (default: bundled WikiSQL sample).")
def demo(out_dir, steps, data):
    """Run the pipeline end to end on the embedded SmolLM2: convert, train, switch, export."""
    from .demo import run_demo

    run_demo(out_dir, steps=steps, data=data)


# ---- train (owner: training engine) -------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("-c", "--config", "config_path", type=click.Path(), default=None, help="YAML recipe (see recipes/).")
@click.option("-m", "--model", default=None, help="MLX model directory (overrides the recipe).")
@click.option("-o", "--out", "out_dir", default=None, help="Adapter/output directory (overrides the recipe).")
@click.option("--resume", is_flag=True, help="Continue from OUT's latest checkpoint.")
@click.option("--nproc", type=int, default=None,
              help="Data-parallel over N local ranks (mlx.launch, ring on loopback); batch_size stays global.")
@click.pass_context
def train(ctx, config_path, model, out_dir, resume, nproc):
    """Fine-tune LoRA adapters: defaults < recipe < flags.

    Any setting can be given as a flag, by dotted path or unique name, e.g.
    --lora.rank 16, --steps 200, --learning_rate 2e-4, --data PATH, --grad_checkpoint.
    Several machines: mlx.launch --hostfile HOSTS -- mlx_qlora train ... (see README).
    """
    extra = list(ctx.args)
    for flag, value in (("--model", model), ("--out_dir", out_dir)):
        if value is not None:
            extra += [flag, value]
    if resume:
        extra += ["--resume"]   # a bare flag: also right when passed on to the ranks' own `train`
    if nproc is not None:
        from .train.launch import LaunchConfig, launch_local

        launch_local(LaunchConfig(nproc=nproc, config_path=config_path, args=extra))
        return
    from .train.config import load_config
    from .train.loop import train as run_train

    run_train(load_config(config_path, extra))


# ---- sweep (owner: apps) -------------------------------------------------------------------
@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(),
              help="Sweep YAML (see recipes/smollm2-sweep.yaml).")
@click.option("-o", "--out", "out_dir", default=None, help="Sweep directory (overrides the file's out_dir).")
@click.option("--trials", type=int, default=None, help="Number of trials (overrides the file).")
@click.option("--force", is_flag=True, help="Replace OUT when it holds a different sweep.")
def sweep(config_path, out_dir, trials, force):
    """Search LoRA rank, alpha, targets, layers, learning rate and base bits with Optuna.

    Each trial is a short `train` of the base recipe; rerunning the same command resumes the
    study (finished trials are kept, also after Ctrl-C). Writes results.md/.csv/.png and best.yaml.
    """
    from .apps.sweep import run_sweep
    from .apps.sweep_config import load_sweep

    run_sweep(load_sweep(config_path, out_dir=out_dir, trials=trials, force=force))


# ---- chat / generate / serve (owner: inference) --------------------------------------------
def _engine_options(f):
    """MODEL, adapters and engine choice: shared by chat, generate and serve."""
    for opt in reversed([
        click.argument("model", required=False),
        click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
                     help="Load an adapter (repeatable); all stay loaded and switch without reload."),
        click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "llama.cpp"]),
                     help="auto: llama.cpp on a CPU (on the GGUF convert recorded, one in MODEL, or one "
                          "built losslessly once), else MLX."),
        click.option("--gguf", default=None, type=click.Path(),
                     help="GGUF of MODEL for the llama.cpp engine (default: found or built, see --engine)."),
        click.option("--ctx", "n_ctx", default=4096, show_default=True, help="llama.cpp context, tokens."),
        click.option("--threads", default=None, type=int, help="llama.cpp threads (default: idle cores, at least 1)."),
    ]):
        f = opt(f)
    return f


def _sampling_options(f):
    for opt in reversed([
        click.option("--temperature", "--temp", "temperature", default=0.0, show_default=True,
                     help="0 = greedy."),
        click.option("--top-p", default=1.0, show_default=True),
        click.option("--top-k", default=0, show_default=True, help="0 = off."),
        click.option("--min-p", default=0.0, show_default=True),
        click.option("--repetition-penalty", default=1.0, show_default=True, help="1 = off."),
        click.option("--seed", default=None, type=int),
        click.option("--max-tokens", "-n", default=512, show_default=True),
    ]):
        f = opt(f)
    return f


def _engine_config(model, adapters, engine, gguf, n_ctx, threads):
    from .infer.engines import EngineConfig

    return EngineConfig(model=model, adapters=list(adapters), engine=engine, gguf=gguf, n_ctx=n_ctx,
                        threads=threads)


def _sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed, max_tokens):
    from .infer.generate import SamplingConfig

    return SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed, max_tokens=max_tokens)


@main.command()
@_engine_options
@_sampling_options
@click.option("--system", default=None, help="System prompt.")
@click.option("--use", "active", default=None, metavar="NAME", help="Adapter active at start.")
@click.option("--stats", is_flag=True, help="Print tokens, time to first token and tok/s per answer.")
def chat(model, adapters, engine, gguf, n_ctx, threads, temperature, top_p, top_k, min_p,
         repetition_penalty, seed, max_tokens, system, active, stats):
    """Chat with MODEL (MLX dir, .gguf, or none = embedded SmolLM2); /help inside."""
    from .infer.chat import ChatConfig, run_chat

    run_chat(ChatConfig(engine=_engine_config(model, adapters, engine, gguf, n_ctx, threads),
                        sampling=_sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed,
                                           max_tokens),
                        system=system, adapter=active, stats=stats))


@main.command()
@_engine_options
@_sampling_options
@click.option("-p", "--prompt", default=None, help="Prompt text ('-' or absent: read stdin).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--use", "active", default=None, metavar="NAME", help="Adapter to answer with.")
@click.option("--raw", is_flag=True, help="No chat template: continue the prompt text as is.")
@click.option("--stats", is_flag=True, help="Print timings to stderr.")
def generate(model, adapters, engine, gguf, n_ctx, threads, temperature, top_p, top_k, min_p,
             repetition_penalty, seed, max_tokens, prompt, system, active, raw, stats):
    """One answer from MODEL to --prompt (or stdin), streamed to stdout."""
    from .infer.chat import GenerateConfig, run_generate

    run_generate(GenerateConfig(engine=_engine_config(model, adapters, engine, gguf, n_ctx, threads),
                                prompt=prompt, system=system, adapter=active, raw=raw, stats=stats,
                                sampling=_sampling(temperature, top_p, top_k, min_p, repetition_penalty,
                                                   seed, max_tokens)))


@main.command()
@_engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 exposes it).")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="MLX_QLORA_API_KEY",
              help="Require 'Authorization: Bearer KEY' (env MLX_QLORA_API_KEY).")
@click.option("--max-tokens", "max_tokens", default=512, show_default=True, help="Default per request.")
@click.option("--max-tokens-limit", default=4096, show_default=True, help="Most tokens one request may ask for.")
def serve(model, adapters, engine, gguf, n_ctx, threads, host, port, api_key, max_tokens, max_tokens_limit):
    """OpenAI-compatible HTTP server; the request's `model` picks base or an adapter."""
    from .infer.serve import ServeConfig, run_serve

    run_serve(ServeConfig(engine=_engine_config(model, adapters, engine, gguf, n_ctx, threads),
                          host=host, port=port, api_key=api_key, max_tokens=max_tokens,
                          max_tokens_limit=max_tokens_limit))
# ---- end chat / generate / serve ----------------------------------------------------------


# --- fuse / export (export engineer) ---------------------------------------------------------
@main.command()
@click.argument("model")
@click.argument("adapter")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Output MLX model directory.")
@click.option("--dequantize", is_flag=True, help="Write float weights instead of re-quantizing with the base's settings.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def fuse(model, adapter, out_dir, dequantize, force):
    """Merge ADAPTER (a LoRA directory from train) into MODEL (its MLX base) -> OUT."""
    from .export.fuse import FuseConfig, run_fuse

    run_fuse(FuseConfig(model=model, adapter=adapter, out_dir=out_dir, dequantize=dequantize, force=force))


@main.command()
@click.argument("model")
@click.option("--adapter", default=None, help="LoRA adapter directory: merged in, or exported alone.")
@click.option("--to", "to", type=click.Choice(["gguf", "peft"]), default="gguf", show_default=True)
@click.option("--type", "type_", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]), default=None,
              help="GGUF tensor type [default: q4_1 for a 4-bit model (blocks copied exactly), else f16].")
@click.option("--adapter-only", is_flag=True, help="GGUF: write a llama.cpp LoRA file (llama-cli --lora).")
@click.option("--base-gguf", default=None, help="With --adapter-only: the base GGUF the Modelfile's FROM names.")
@click.option("--no-modelfile", is_flag=True, help="Do not write an Ollama Modelfile beside the GGUF.")
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Output .gguf file or PEFT directory.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def export(model, adapter, to, type_, adapter_only, base_gguf, no_modelfile, out, force):
    """Export MODEL (+ --adapter) to llama.cpp GGUF, or the adapter to Hugging Face PEFT."""
    from .export import ExportConfig, run_export

    run_export(ExportConfig(model=model, out=out, to=to, type=type_, adapter=adapter, adapter_only=adapter_only,
                            base_gguf=base_gguf, modelfile=not no_modelfile, force=force))


@main.command("import-peft")
@click.argument("peft_dir")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Output adapter directory.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def import_peft(peft_dir, out_dir, force):
    """Convert a Hugging Face PEFT LoRA adapter into an mlx_qlora adapter (for chat or more training)."""
    from .export.peft import run_import_peft

    run_import_peft(peft_dir, out_dir, force=force)
# --- end fuse / export -----------------------------------------------------------------------


# --- eval (owner: evaluation) ----------------------------------------------------------------
@main.command("eval")
@click.argument("model")
@click.option("--adapter", default=None, help="LoRA adapter directory (from train).")
@click.option("--data", default=None, help="JSONL file, or a directory with test.jsonl / valid.jsonl.")
@click.option("--split", default="test", show_default=True, help="test, valid or train (with a data directory).")
@click.option("-c", "--config", "recipe", default=None, type=click.Path(), help="Recipe: its data settings and task: block.")
@click.option("--task", default=None, help="exact-match or json-fields: generate (greedy) and score the answers.")
@click.option("--answer-prefix", default=None, help="Text rows: the reference follows the last occurrence, e.g. 'A:'.")
@click.option("--answer", default=None, type=click.Choice(["json", "compact"]),
              help="json-fields: the rows' answers are JSON or compact lines (prepare-reviews --answer compact).")
@click.option("--max-rows", type=int, default=None, help="Score the first N rows (default: all).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--max-seq-len", type=int, default=None, help="Tokens per row (default: the recipe's, else 2048).")
@click.option("--engine", default="auto", show_default=True, help="--task generation: auto, mlx or llama.cpp.")
@click.option("--quant-sweep", is_flag=True, help="Perplexity, size and tok/s across quantizations: a table + PNG.")
@click.option("--bits", default="16,8,6,4,3,2", show_default=True, help="--quant-sweep: MLX bit widths ('none' to skip).")
@click.option("--group-size", type=int, default=64, show_default=True, help="--quant-sweep: MLX group size.")
@click.option("--gguf-types", default="f16,q8_0,q4_1,q4_0", show_default=True,
              help="--quant-sweep: GGUF types scored by llama.cpp ('none' to skip).")
@click.option("-o", "--out", default=None, type=click.Path(), help="--quant-sweep: output directory.")
@click.option("--force", is_flag=True, help="--quant-sweep: replace OUT's table and models.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Also write the results as JSON.")
def eval_(model, adapter, data, split, recipe, task, answer_prefix, answer, max_rows, batch_size, max_seq_len, engine,
          quant_sweep, bits, group_size, gguf_types, out, force, json_out):
    """Loss and perplexity of MODEL (+ --adapter) on --data, a task metric (--task), or the
    quantization table (--quant-sweep). MODEL: an MLX model directory or a .gguf (llama.cpp)."""
    from .eval.config import EvalConfig, parse_list
    from .eval.run import run_eval

    run_eval(EvalConfig(model=model, adapter=adapter, data=data, split=split, recipe=recipe, task=task,
                        answer_prefix=answer_prefix, answer=answer, max_rows=max_rows, batch_size=batch_size,
                        max_seq_len=max_seq_len, engine=engine, quant_sweep=quant_sweep,
                        bits=parse_list(bits, int, "--bits"), group_size=group_size,
                        gguf_types=parse_list(gguf_types, str.lower, "--gguf-types"), out=out, force=force,
                        json_out=json_out))
# --- end eval --------------------------------------------------------------------------------


# --- make-pairs (owner: preference tuning) ---------------------------------------------------
@main.command("make-pairs")
@click.argument("model")
@click.option("--adapter", default=None, help="LoRA adapter directory (the SFT one) that answers.")
@click.option("--data", required=True, help="Training rows (completions or chat JSONL, or a directory's train.jsonl).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Pairs JSONL for `train --method dpo`.")
@click.option("--max-rows", type=int, default=0, show_default=True, help="Answer the first N rows (0: all).")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="Per answer.")
@click.option("--engine", default="auto", show_default=True, help="auto, mlx or llama.cpp.")
@click.option("--force", is_flag=True, help="Replace OUT.")
def make_pairs(model, adapter, data, out, max_rows, max_tokens, engine, force):
    """Preference pairs from MODEL's own wrong answers on training rows: chosen = the reference,
    rejected = the model's greedy answer (rows it answers right are skipped)."""
    from .apps.pairs import make_pairs as run

    run(model, data, out, adapter=adapter, max_rows=max_rows, max_tokens=max_tokens, engine=engine, force=force)


# ---- extract / prepare-reviews (owner: apps, issue 11) -------------------------------------
@main.command("prepare-reviews")
@click.option("--data", default="../shared/data/mams", show_default=True, type=click.Path(),
              help="Folder with the MAMS-ATSA train.xml and val.xml.")
@click.option("-o", "--out", "out_dir", default="runs/mams", show_default=True, type=click.Path())
@click.option("--schema", default=None, type=click.Path(), help="JSON schema whose description is the instruction.")
@click.option("--force", is_flag=True, help="Replace files in OUT.")
@click.option("--answer", default="json", show_default=True, type=click.Choice(["json", "compact"]),
              help="What the model learns to write: the schema's JSON, or one line per item (compact).")
def prepare_reviews(data, out_dir, schema, force, answer):
    """MAMS reviews (XML) -> train/valid prompt-completion JSONL and review JSONL for extract."""
    from .apps.reviews import PrepareConfig
    from .apps.reviews import prepare_reviews as run

    for name, n in run(PrepareConfig(data=data, out_dir=out_dir, schema=schema, force=force, answer=answer)).items():
        click.echo(f"{out_dir}/{name}: {n} rows")


@main.command()
@click.argument("model", required=False)
@click.option("--adapter", default=None, type=click.Path(), help="LoRA adapter directory (or LoRA GGUF).")
@click.option("--input", "input_", required=True, type=click.Path(), help="JSONL (one object per line) or plain text.")
@click.option("--output", required=True, type=click.Path(), help="JSONL; an existing one is resumed.")
@click.option("--schema", default=None, type=click.Path(), help="JSON schema file [default: recipes/schemas/aspects.json].")
@click.option("--text-field", default="text", show_default=True, help="JSONL key holding the text.")
@click.option("--parallel", default=32, show_default=True, help="Rows decoded together (llama.cpp).")
@click.option("--price-per-hour", type=float, default=None,
              help="USD/hour of this machine [default: the VM in recipes/api_prices.json, $0.09/h].")
@click.option("--max-tokens", default=512, show_default=True, help="Output tokens per row at most.")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "llama.cpp"]))
@click.option("--gguf", default=None, type=click.Path(), help="GGUF of MODEL for the llama.cpp engine.")
@click.option("--threads", default=None, type=int, help="llama.cpp threads (default: idle cores, at least 1).")
@click.option("--span-field", default=None, help="String fields of this name must be spans of the row's text "
              "(e.g. term: aspect terms copied exactly); none: no field [default: the schema's fields marked "
              '"x-span-of-text": true, aspects.json\'s term].')
@click.option("--answer", default="json", show_default=True, type=click.Choice(["json", "compact"]),
              help="What the model writes: the schema's JSON, or one line per item (compact; a model trained by "
              "prepare-reviews --answer compact), expanded into the JSON.")
@click.option("--drafts", default="off", show_default=True, type=click.Choice(["off", "schema", "all"]),
              help="llama.cpp: tokens drafted and checked in one step, same answers: off = one token per row "
              "per step (fastest on a CPU); schema = the schema's forced tokens; all = also copies from the text.")
@click.option("--prefill", default="own", show_default=True, type=click.Choice(["own", "even", "wave"]),
              help="llama.cpp: where new rows' prompts run, same answers: own = calls of their own; even = in the "
              "decode step's call; wave = even, rows started `--parallel` at a time.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run on a Ray cluster: local (start one here), HEAD:6379, or ray://HEAD:10001.")
@click.option("--ray-workers", type=int, default=None,
              help="With --ray: model copies (actors) [default: the cluster's CPUs / --threads].")
@click.option("--shard-rows", type=int, default=None, help="With --ray: rows per shard [default: 64].")
def extract(model, adapter, input_, output, schema, text_field, parallel, price_per_hour, max_tokens, engine, gguf,
            threads, span_field, answer, drafts, prefill, no_progress, ray_address, ray_workers, shard_rows):
    """Run MODEL over every row of --input; each output line gets a schema-valid "result" or an "error"."""
    from .apps.extract import ExtractConfig, run_extract
    from .errors import require

    require(ray_address is not None or (ray_workers is None and shard_rows is None),
            "--ray-workers / --shard-rows go with --ray ADDRESS (e.g. --ray local); add it or drop them")
    cfg = ExtractConfig(model=model, input=input_, output=output, adapter=adapter, schema=schema,
                        text_field=text_field, parallel=parallel, price_per_hour=price_per_hour,
                        max_tokens=max_tokens, engine=engine, gguf=gguf, threads=threads,
                        span_field=span_field, answer=answer, drafts=drafts, prefill=prefill, progress=not no_progress)
    if ray_address is None:
        run_extract(cfg)
        return
    from .apps.extract_ray import DEFAULT_SHARD_ROWS, run_extract_ray

    run_extract_ray(cfg, ray_address, ray_workers, DEFAULT_SHARD_ROWS if shard_rows is None else shard_rows)


# Commands that compute with MLX and NumPy only: their process keeps torch out (lean_imports).
TORCH_FREE = {"train", "chat", "generate", "serve"}


def entry():
    """The console script: ``main``, with torch hidden from the commands that never use it."""
    if len(sys.argv) > 1 and sys.argv[1] in TORCH_FREE:
        from .lean_imports import hide_torch
        hide_torch()
    main()


if __name__ == "__main__":
    entry()
