"""`cm3 convert`: other projects' checkpoints as cm3 checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cm3.workflows.commands.common import fail


def convert_chameleon_command(
    src: Path = typer.Argument(..., help="Meta's Chameleon release folder, or a Hugging Face Chameleon/Anole folder."),
    out: Path = typer.Option(..., help="The cm3 checkpoint folder to write (must not exist)."),
    vqgan: Optional[Path] = typer.Option(None, help="VQ-GAN checkpoint (Meta's tokenizer/vqgan.ckpt): needed for a "
                                                   "Hugging Face folder, which has no VQ decoder."),
    vqgan_config: Optional[Path] = typer.Option(None, help="Its config (Meta's tokenizer/vqgan.yaml)."),
    model_size: Optional[str] = typer.Option(None, help="Meta's release: which models/SIZE (7b, 30b), if several."),
    dtype: Optional[str] = typer.Option(None, help="Store the weights as float32, bfloat16 or float16 (default: as "
                                                  "read)."),
) -> None:
    """Convert Chameleon or Anole weights into a cm3 checkpoint (decoder + Chameleon's tokenizer), keeping
    Chameleon's token ids; then `cm3 generate`, `cm3 caption` and `cm3 train --init` use it.

    Examples:

      cm3 convert chameleon ~/chameleon --out ckpt/chameleon-7b

      cm3 convert chameleon ~/Anole-7b-v0.1-hf --vqgan ~/chameleon/tokenizer/vqgan.ckpt \\
          --vqgan-config ~/chameleon/tokenizer/vqgan.yaml --out ckpt/anole-7b
    """
    import torch

    from cm3.model.chameleon import ConversionError, convert_chameleon

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        fail(f"--dtype {dtype!r}: expected one of {sorted(dtypes)}")
    try:
        result = convert_chameleon(src, out, vqgan=vqgan, vqgan_config=vqgan_config, model_size=model_size,
                                   dtype=dtypes.get(dtype), progress=lambda line: typer.echo(line, err=True))
    except (ConversionError, FileNotFoundError) as err:
        fail(str(err))
    c = result.config
    typer.echo(f"{out}: {c.n_layers} layers, d_model {c.d_model}, vocab {c.vocab_size} ({result.source_format} "
               f"source), {result.total_bytes / 2**30:.2f} GiB in {result.shards} shard(s)")
