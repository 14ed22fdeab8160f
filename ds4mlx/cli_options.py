"""The options the CLI commands share (typer ``Annotated`` types), so each reads the same
everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", show_default=False,
    help="A local directory or .gguf file, a Hugging Face repo id, or 'demo' (a tiny built-in model).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate per answer.")]
TempOpt = Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature (0: greedy).")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1: off).")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Keep the k most likely tokens (0: off).")]
MinPOpt = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0,
                                        help="Drop tokens below this fraction of the top probability.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "--system-prompt", help="System prompt.")]
ThinkOpt = Annotated[Optional[bool], typer.Option(
    "--think/--no-think", show_default=False, help="Reason before answering (default) or answer directly.")]
ThinkMaxOpt = Annotated[bool, typer.Option(
    "--think-max", help="Think Max: the maximum reasoning effort preamble (DeepSeek wants --ctx >= 384K).")]
ExpertsOpt = Annotated[Optional[int], typer.Option(
    "--experts-per-token", min=1, show_default=False,
    help="Routed experts per token (default: the file's value; 4 runs the 4Expert variant).")]
CtxOpt = Annotated[int, typer.Option("--ctx", min=1, help="Context length: prompt plus generated tokens.")]
MemoryOpt = Annotated[bool, typer.Option(
    "--ignore-memory-limit", help="Load even when the memory check says the model will not fit.")]
GGUFFileOpt = Annotated[Optional[str], typer.Option(
    "--gguf-file", show_default=False,
    help="One .gguf file of the --model Hub repo (or directory), as llama.cpp's --hf-file; "
         "--model REPO:FILE.gguf says the same.")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Also show the model's path and shape, load time and the formatted prompt.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", help="Only the answer: no progress, reasoning or statistics (mlx-lm's --verbose False).")]
DraftOpt = Annotated[Optional[str], typer.Option(
    "--draft", show_default=False, help="Speculative decoding: 'mtp' drafts with the model's MTP block.")]
NumDraftOpt = Annotated[int, typer.Option("--num-draft-tokens", min=1, max=3, help="Drafts per verify forward.")]
LayersSplitOpt = Annotated[Optional[str], typer.Option(
    "--layers-split", show_default=False,
    help="Under mlx.launch: layers per process, e.g. 3,2 (default: balanced by bytes).")]
MtpGgufOpt = Annotated[Optional[Path], typer.Option(
    "--mtp-gguf", show_default=False, help="ds4's separate MTP GGUF (default: found beside the .gguf model).")]
