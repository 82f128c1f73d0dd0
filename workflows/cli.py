"""The ``cm3`` command line: the typer apps and which function answers which command.

The commands themselves live in ``cm3.workflows.commands`` (one module per concern); they parse and
validate, then call the rooms that do the work.
"""

from __future__ import annotations

import sys

import typer

from cm3.workflows.commands.convert import convert_chameleon_command
from cm3.workflows.commands.data import ingest, tokenize, demo_data_serve, demo_data_write_urls, demo
from cm3.workflows.commands.evaluate import eval_caption, eval_text_to_image, eval_vqa
from cm3.workflows.commands.index import build_index_command, search
from cm3.workflows.commands.model import model_init, generate, caption, serve_command
from cm3.workflows.commands.sft import sft_convert, sft_demo
from cm3.workflows.commands.tokenizers import tokenizer_train_vq, tokenizer_train_text, tokenizer_build, clip_train
from cm3.workflows.commands.train import train_command

app = typer.Typer(
    name="cm3",
    help="CM3Leon toolkit: ingest image-caption pairs, index them, train the decoder, generate.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
demo_data_app = typer.Typer(help="The embedded demo data set: captioned synthetic shapes.", no_args_is_help=True)
app.add_typer(demo_data_app, name="demo-data")
tokenizer_app = typer.Typer(help="Train and assemble the image (VQ-GAN) and text (BPE) tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
clip_app = typer.Typer(help="Train a small OpenCLIP model for offline retrieval.", no_args_is_help=True)
app.add_typer(clip_app, name="clip")
sft_app = typer.Typer(help="Build instruction-tuning (SFT) task shards.", no_args_is_help=True)
app.add_typer(sft_app, name="sft")
model_app = typer.Typer(help="Create and inspect CM3 decoder checkpoints.", no_args_is_help=True)
app.add_typer(model_app, name="model")
eval_app = typer.Typer(help="Score a checkpoint on your data: FID, FD-CLIP, CLIP score, CIDEr, BLEU-4, VQA accuracy.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")
convert_app = typer.Typer(help="Convert Chameleon or Anole weights into cm3 checkpoints.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")

app.command()(ingest)
sft_app.command("convert")(sft_convert)
sft_app.command("demo")(sft_demo)
tokenizer_app.command("train-vq")(tokenizer_train_vq)
clip_app.command("train")(clip_train)
tokenizer_app.command("train-text")(tokenizer_train_text)
tokenizer_app.command("build")(tokenizer_build)
app.command()(tokenize)
app.command("build-index")(build_index_command)
app.command()(search)
model_app.command("init")(model_init)
convert_app.command("chameleon")(convert_chameleon_command)
app.command()(generate)
app.command()(caption)
app.command("serve")(serve_command)
demo_data_app.command("serve")(demo_data_serve)
demo_data_app.command("write-urls")(demo_data_write_urls)
app.command()(demo)
app.command("train")(train_command)
eval_app.command("text-to-image")(eval_text_to_image)
eval_app.command("caption")(eval_caption)
eval_app.command("vqa")(eval_vqa)


def main() -> None:
    """Console-script entry point (`cm3`)."""
    app(prog_name="cm3")


if __name__ == "__main__":
    sys.exit(main())
