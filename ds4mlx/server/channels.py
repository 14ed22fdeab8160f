"""Streaming the completion as reasoning and answer deltas that add up to ``parse_completion``'s.

The engine streams the completion text as ``ds4mlx.generate`` builds it (reasoning closed by
``</think>``, the answer, maybe a DSML tool-call block). A delta is only sent once no later text
can change its meaning: a suffix that may begin ``</think>`` or the tool-call block (and trailing
newlines, which the parser drops before a block) waits. ``finish`` reconciles with the parser's
result, so a stream adds up to exactly the non-streaming answer.
"""

from __future__ import annotations

import logging
from typing import Optional

from .. import encoding

log = logging.getLogger("ds4mlx.server")


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ChannelSplitter:
    def __init__(self, thinking: bool, max_tool_calls: Optional[int] = None) -> None:
        self.thinking = thinking
        self.max_tool_calls = max_tool_calls  # 1 when the request turns parallel tool calls off
        self.mode = "thinking" if thinking else "chat"
        self.text = ""
        self.sent_reasoning = ""
        self.sent_content = ""

    def _views(self) -> tuple[str, str]:
        """The reasoning and answer text that is safe to send now."""
        t = self.text
        content = t
        if self.thinking:
            if encoding.THINK_START.startswith(t):
                return "", ""  # may still become the tolerated leading "<think>"
            if t.startswith(encoding.THINK_START):
                t = t[len(encoding.THINK_START):]
            end = t.find(encoding.THINK_END)
            if end < 0:
                return t[: len(t) - _partial_suffix(t, encoding.THINK_END)], ""
            reasoning, content = t[:end], t[end + len(encoding.THINK_END):]
        else:
            reasoning = ""
        block = content.find(encoding.TOOL_CALLS_START)
        if block >= 0:
            content = content[:block]
        else:
            content = content[: len(content) - _partial_suffix(content, encoding.TOOL_CALLS_START)]
        return reasoning, content.rstrip("\n")

    def feed(self, delta: str) -> tuple[str, str]:
        """New text from the engine -> ``(reasoning delta, answer delta)`` to send now."""
        self.text += delta
        reasoning, content = self._views()
        return self._advance(reasoning, content)

    def _advance(self, reasoning: str, content: str) -> tuple[str, str]:
        dr = dc = ""
        if len(reasoning) > len(self.sent_reasoning) and reasoning.startswith(self.sent_reasoning):
            dr = reasoning[len(self.sent_reasoning):]
            self.sent_reasoning = reasoning
        if len(content) > len(self.sent_content) and content.startswith(self.sent_content):
            dc = content[len(self.sent_content):]
            self.sent_content = content
        return dr, dc

    def finish(self) -> tuple[str, str, dict]:
        """The last deltas and the parsed message (``parse_completion``'s, tool calls included)."""
        message = encoding.parse_completion(self.text, self.mode)
        if self.max_tool_calls is not None:  # the calls after the allowed ones are dropped unseen
            message["tool_calls"] = message["tool_calls"][: self.max_tool_calls]
        reasoning, content = message["reasoning_content"], message["content"]
        if not (reasoning.startswith(self.sent_reasoning) and content.startswith(self.sent_content)):
            log.warning("streamed text differs from the parsed completion")
        dr, dc = self._advance(reasoning, content)
        return dr, dc, message


def parse_answer(text: str, thinking: bool, max_tool_calls: Optional[int] = None) -> dict:
    """A whole completion's message, as a stream of it ends with (non-streaming answers)."""
    splitter = ChannelSplitter(thinking, max_tool_calls)
    splitter.feed(text)
    return splitter.finish()[2]


def finish_reason_openai(result_finish: str, message: Optional[dict]) -> str:
    if message and message.get("tool_calls"):
        return "tool_calls"
    return "length" if result_finish == "length" else "stop"
