"""The ``mlx_qlora`` command line: each command parses its options and calls one function.

Heavy modules (mlx, mlx_lm, transformers) are imported inside the commands so that
``mlx_qlora --help`` answers instantly.
"""
from __future__ import annotations

import sys

import click

from . import __version__
from .errors import UserError


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
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
def doctor():
    """Show MLX device, BLAS in use (with measured sgemm GFLOP/s), embedded model, llama.cpp."""
    from .doctor import run_doctor

    run_doctor()


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
    from .convert import ConvertConfig, run_convert

    run_convert(ConvertConfig(source=source, out_dir=out_dir, q_bits=q_bits, q_group_size=q_group_size,
                              quantize=not no_quantize, dtype=dtype, requantize=requantize, force=force))


@main.command()
@click.option("-o", "--out", "out_dir", default="demo_out", show_default=True, type=click.Path())
def demo(out_dir):
    """Run the pipeline end to end on the embedded SmolLM2."""
    from .demo import run_demo

    run_demo(out_dir)


# ---- train (owner: training engine) -------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("-c", "--config", "config_path", type=click.Path(), default=None, help="YAML recipe (see recipes/).")
@click.option("-m", "--model", default=None, help="MLX model directory (overrides the recipe).")
@click.option("-o", "--out", "out_dir", default=None, help="Adapter/output directory (overrides the recipe).")
@click.option("--resume", is_flag=True, help="Continue from OUT's latest checkpoint.")
@click.pass_context
def train(ctx, config_path, model, out_dir, resume):
    """Fine-tune LoRA adapters: defaults < recipe < flags.

    Any setting can be given as a flag, by dotted path or unique name, e.g.
    --lora.rank 16, --steps 200, --learning_rate 2e-4, --data PATH, --grad_checkpoint.
    """
    from .train import train as run_train
    from .train_config import load_config

    extra = list(ctx.args)
    for flag, value in (("--model", model), ("--out_dir", out_dir)):
        if value is not None:
            extra += [flag, value]
    if resume:
        extra += ["--resume", "true"]
    run_train(load_config(config_path, extra))


if __name__ == "__main__":
    main()
