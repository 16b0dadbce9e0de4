"""The simulated language model: a tokenizer, a reply, and the estimate a limiter can afford.

Nothing here is a real model. What matters to rate limiting is reproduced:

- the prompt's token count is known exactly only to the model's tokenizer
  (`count_prompt_tokens`); at admission the limiter has only a cheap estimate
  from the text's length (`estimate_prompt_tokens`: characters / 4 rounded
  up, the rule of thumb OpenAI documents, plus the format's overhead), which
  may be a little high or low;
- the reply's length is known only when it ends: at most `max_tokens`, usually
  far fewer (`reply_length`, drawn from the prompt so a run is repeatable).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

#: Tokens the chat format adds per message (role, separators), and to prime the reply.
PER_MESSAGE, REPLY_PRIMING = 4, 3
#: Characters per token of the estimate: OpenAI's rule of thumb for English text.
CHARS_PER_TOKEN = 4
_WORDS = re.compile(r"\w+|[^\w\s]")
_VOCABULARY = (
    "the", "a", "limit", "token", "bucket", "request", "of", "and", "to", "is", "in",
    "rate", "each", "caller", "window", "fleet", "reply", "model", "stream", "cost",
    "settle", "refund", "budget", "minute", "per", "key", "GPU", "that", "it", "we",
)  # fmt: skip


def text_of(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The text of each message: a string content, or the text parts of a list content."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.append(
                " ".join(
                    part["text"]
                    for part in content
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str)
                )
            )
        else:
            out.append("")
    return out


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """What a limiter can count before the model runs, without its tokenizer: the
    text's characters / 4 rounded up, plus the chat format's fixed overhead."""
    chars = sum(len(t) for t in text_of(messages))
    return len(messages) * PER_MESSAGE + math.ceil(chars / CHARS_PER_TOKEN) + REPLY_PRIMING


def _pieces(word: str) -> int:
    """Tokens of one word: a common short word is one, a long one splits every 6 characters."""
    return max(1, math.ceil(len(word) / 6))


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """The prompt's tokens as the model counts them (what `usage.prompt_tokens` reports)."""
    words = sum(_pieces(w) for text in text_of(messages) for w in _WORDS.findall(text))
    return len(messages) * PER_MESSAGE + words + REPLY_PRIMING


def _seed(messages: Sequence[Mapping[str, Any]]) -> bytes:
    joined = "\x00".join(text_of(messages)).encode("utf-8", "replace")
    return hashlib.blake2b(joined, digest_size=16).digest()


def reply_length(messages: Sequence[Mapping[str, Any]]) -> int:
    """How many tokens the model would answer with if nothing stopped it: 8 to ~600,
    mostly short (a skewed draw seeded by the prompt, so the same prompt answers alike)."""
    u = int.from_bytes(_seed(messages)[:8], "big") / 2**64
    return 8 + int(600 * u**2)


def reply(messages: Sequence[Mapping[str, Any]], tokens: int) -> Iterator[str]:
    """The reply's `tokens` tokens (a word and its space each), drawn from the prompt."""
    seed = _seed(messages)
    for i in range(tokens):
        word = _VOCABULARY[(seed[i % len(seed)] + 7 * i) % len(_VOCABULARY)]
        yield word if i == 0 else " " + word
