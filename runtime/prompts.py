"""AUTOMATIC1111's prompt editing and alternation, and its composable "AND".

    prompt_schedule("a [cat:dog:0.5] in a [red|blue] box", 10)
    -> [(1, "a cat in a red box"), (2, "a cat in a blue box"), ..., (10, "a dog in a blue box")]

Syntax (A1111's `modules/prompt_parser.py`):

- ``[from:to:when]`` gives `from` up to step `when`, then `to`; ``[to:when]`` adds `to` after
  `when`; ``[from::when]`` removes `from` after it. `when` with a "." is a fraction of the steps
  (``0.5``), without one a step number (``5``); whitespace may stand around it.
- ``[a|b|c]`` alternates every step (step 1 a, step 2 b, ...); an empty option is empty text.
- ``(x)``, ``(x:w)`` and ``[x]`` are emphasis, left in the text (`text.parse_prompt_attention`
  reads them later); brackets and colons that form nothing are text; a ``|`` outside an
  alternation, or a lone trailing backslash, makes the whole prompt plain text, as it does in
  A1111 (whose parser then fails and keeps the prompt as it is).

Where a construct stands directly beside a bracket or colon that belongs to nothing
("[a:b:5]]", "x:[a:b:5](" at the top level), A1111's parser (lark's Earley parser, ambiguity
resolved in hash-set order) reads it either way depending on the Python process's hash seed;
sdrt always reads the construct.

A schedule is a list of (end_at_step, text): the text is used while the step (counted from 1,
A1111's CFG denoiser counts from 0 and compares ``step <= end``) is at most end_at_step.

Composable diffusion ("a cat AND a dog:0.5") is not supported: `composable_prompt` gives the
text A1111 conditions on for a prompt without "AND" and with weight 1, and an error otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

__all__ = ["prompt_schedule", "composable_prompt", "entry_at_call", "text_at_call"]

# A1111's terminals: plain text runs over anything but \[]():| (a backslash escapes any character
# but a newline); a number is lark's SIGNED_NUMBER.
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_WHITESPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"[+-]?(?:(?:\d+[eE][+-]?\d+|(?:\d+\.(?:\d+)?|\.\d+)(?:[eE][+-]?\d+)?)|\d+)")
_STRAY = "[]():"


@dataclass
class _Scheduled:
    before: list | None
    after: list
    when: str


@dataclass
class _Alternate:
    options: list  # each a list of nodes, or None for an empty option


class _Fail(Exception):
    pass


def _prompt(s: str, i: int) -> tuple[list, int]:
    """A `prompt` of the grammar from i: text, whitespace and bracket constructs, up to the first
    character that none of them can take (':', '|', a closing bracket, the end, or a bracket that
    forms nothing)."""
    nodes: list = []
    n = len(s)
    while i < n:
        m = _PLAIN.match(s, i)
        if m:
            nodes.append(m.group(0))
            i = m.end()
            continue
        c = s[i]
        if c in "([":
            try:
                node, i = (_round if c == "(" else _square)(s, i)
            except _Fail:
                return nodes, i
            nodes.extend(node) if isinstance(node, list) else nodes.append(node)
            continue
        return nodes, i
    return nodes, i


def _expect(s: str, i: int, c: str) -> int:
    if i < len(s) and s[i] == c:
        return i + 1
    raise _Fail


def _round(s: str, i: int) -> tuple[list, int]:
    """Emphasis "(" prompt ")" or "(" prompt ":" prompt ")": kept as text."""
    a, j = _prompt(s, i + 1)
    if j < len(s) and s[j] == ":":
        b, k = _prompt(s, j + 1)
        return ["(", *a, ":", *b, ")"], _expect(s, k, ")")
    return ["(", *a, ")"], _expect(s, j, ")")


def _square(s: str, i: int):
    """"[" prompt "]" (emphasis, kept as text), an alternation or a scheduled edit."""
    a, j = _prompt(s, i + 1)
    c = s[j] if j < len(s) else ""
    if c == "]":
        return ["[", *a, "]"], j + 1
    if c == "|":
        options = [a]
        while j < len(s) and s[j] == "|":
            b, j = _prompt(s, j + 1)
            options.append(b)
        return _Alternate([o or None for o in options]), _expect(s, j, "]")
    if c == ":":
        end = _when(s, j + 1)  # [to:when]
        if end is not None:
            return _Scheduled(None, a, end[0]), end[1]
        b, k = _prompt(s, j + 1)  # [from:to:when]
        if k < len(s) and s[k] == ":":
            end = _when(s, k + 1)
            if end is not None:
                return _Scheduled(a, b, end[0]), end[1]
    raise _Fail


def _when(s: str, i: int):
    """':' [whitespace] NUMBER [whitespace] ']' from just after the colon: (number, end) or None."""
    m = _WHITESPACE.match(s, i)
    i = m.end() if m else i
    m = _NUMBER.match(s, i)
    if not m:
        return None
    j = m.end()
    w = _WHITESPACE.match(s, j)
    j = w.end() if w else j
    if j < len(s) and s[j] == "]":
        return m.group(0), j + 1
    return None


def _parse(prompt: str) -> list | None:
    """The prompt's constructs, or None where A1111's parser fails (the prompt is then plain)."""
    nodes: list = []
    i, n = 0, len(prompt)
    while i < n:
        part, i = _prompt(prompt, i)
        nodes.extend(part)
        if i < n:
            if prompt[i] not in _STRAY:
                return None  # '|' outside an alternation, or a backslash at the end or before a newline
            nodes.append(prompt[i])
            i += 1
    return nodes


def _step_of(when: str, steps: int) -> int:
    v = float(when)
    if "." in when:
        v *= steps
    try:
        return min(steps, int(v))
    except OverflowError:
        raise InputError(f"prompt editing step {when!r} is not a finite number") from None


def _walk(nodes, visit) -> None:
    for node in nodes:
        visit(node)
        if isinstance(node, _Scheduled):
            _walk(node.before or [], visit)
            _walk(node.after, visit)
        elif isinstance(node, _Alternate):
            for o in node.options:
                _walk(o or [], visit)


def _text(nodes, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            part = (node.before or []) if step <= _step_of(node.when, steps) else node.after
            out.append(_text(part, step, steps))
        else:
            out.append(_text(node.options[(step - 1) % len(node.options)] or [], step, steps))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The texts of `prompt` over `steps` steps: [(end_at_step, text), ...], ends ascending, the
    last one `steps` (A1111's get_learned_conditioning_prompt_schedules)."""
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
    nodes = _parse(prompt)
    if nodes is None:
        return [(steps, prompt)]
    ends = {steps}

    def collect(node):
        if isinstance(node, _Scheduled):
            t = _step_of(node.when, steps)
            if t >= 1:
                ends.add(t)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))

    _walk(nodes, collect)
    return [(t, _text(nodes, t, steps)) for t in sorted(ends)]


def entry_at_call(schedule: list[tuple[int, str]], call: int) -> int:
    """Index of the entry used at the model call with index `call` (0 first): A1111's CFG
    denoiser takes the first entry whose end_at_step >= call, the first entry when none is."""
    return next((k for k, (end, _) in enumerate(schedule) if call <= end), 0)


def text_at_call(schedule: list[tuple[int, str]], call: int) -> str:
    """The text used at the model call with index `call` (see entry_at_call)."""
    return schedule[entry_at_call(schedule, call)][1]


_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def composable_prompt(prompt: str) -> str:
    """The text A1111 conditions on for `prompt`, which must be a single sub-prompt of weight 1:
    A1111 splits prompts at the word AND and reads a trailing ":number" as a sub-prompt's weight
    (composable diffusion), which sdrt does not support. "a cat:1" is "a cat"."""
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
    parts = _AND.split(prompt)
    m = _WEIGHT.search(parts[0])
    weight = float(m.group(2)) if m and m.group(2) is not None else 1.0
    if len(parts) > 1 or weight != 1.0:
        what = "the word AND" if len(parts) > 1 else f"a trailing weight ':{m.group(2)}'"
        raise InputError(
            f"prompt {prompt!r} uses composable diffusion ({what}), which sdrt does not support; "
            "write 'and' in lower case, or drop the ':weight' at the end (use (text:weight) for emphasis)"
        )
    return m.group(1) if m else prompt
