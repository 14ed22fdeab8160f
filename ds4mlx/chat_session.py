"""``ds4mlx chat``: a conversation whose decode state persists between turns, and the loop
that reads the user's lines (``ds4mlx.terminal.ChatPrompt`` on a terminal, else stdin)."""

from __future__ import annotations

from .cli_output import GracefulInterrupt, Printer, prefill_progress, show_prompt, status, stream_responses


class ChatSession:
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

    def turn(self, text: str, printer: Printer, interrupt: GracefulInterrupt):
        from .encoding import EOS, THINK_END
        from .generate import chat_prompt, stream_generate, think_ids

        user = {"role": "user", "content": text}
        new = chat_prompt(self.tokenizer, text, system=self.system, thinking=self.thinking,
                          reasoning_effort=self.reasoning_effort, context=self.history)
        show_prompt(self.tokenizer, new)
        responses = stream_generate(self.model, self.tokenizer, self.close_ids + new, prompt_cache=self.cache,
                                    max_context=self.ctx, prompt_progress_callback=prefill_progress(),
                                    **self.sampling)
        try:
            last, reasoning, answer = stream_responses(responses, printer, interrupt)
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


CHAT_HELP = "/think, /nothink: thinking on/off   /reset: new conversation   /quit (or Ctrl-D): leave"


def chat_loop(session: "ChatSession", interactive: bool, read_line, ctx: int) -> None:
    from .generate import ContextLengthError, PromptError

    while True:
        line = read_line()
        if line is None:
            break  # Ctrl-D, Ctrl-C twice, or the end of a script's input
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.lower()
            if command in ("/quit", "/exit", "/q"):
                break
            if command in ("/think", "/nothink", "/no-think"):
                session.thinking = command == "/think"
                status(f"[thinking {'on' if session.thinking else 'off'}]")
            elif command == "/reset":
                session.reset()
                status("[new conversation]")
            else:
                status(f"[unknown command {text!r}] {CHAT_HELP}")
            continue
        printer = Printer()
        with GracefulInterrupt() as interrupt:
            try:
                last = session.turn(text, printer, interrupt)
            except ContextLengthError as e:
                status(f"error: {e}; /reset starts a new conversation")
                continue
            except PromptError as e:
                if not interactive:
                    raise  # a script's input: stop with the error
                status(f"error: {e}")
                continue
            except KeyboardInterrupt:
                print(flush=True)
                status("[interrupted: the conversation was reset]")
                continue
        print(flush=True)
        if last is not None:
            why = "interrupted" if interrupt.hit else last.finish_reason
            status(
                f"[prompt {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | "
                f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | "
                f"context {last.context_tokens}/{ctx} | peak {last.peak_memory:.2f} GB | {why}"
                + (f" | {last.draft_stats.format()}]" if last.draft_stats is not None else "]")
            )
