"""A1111's prompt editing, alternation and composable AND (sdrt.runtime.prompts).

The table holds prompts with the schedules AUTOMATIC1111 v1.10.1's
get_learned_conditioning_prompt_schedules gives them (checked by hand, and against A1111's own
function with lark 1.1.2, its pinned parser): its docstring examples, the cases of the bug report
and edge cases of the grammar. The property tests derive the schedule of generated prompts from
the documented rules alone.
"""

from __future__ import annotations

import random

import pytest

from sdrt.runtime.errors import InputError
from sdrt.runtime.prompts import composable_prompt, prompt_schedule, text_at_call

TABLE = [
    ('a [cat:dog:0.5] b', 10, [(5, 'a cat b'), (10, 'a dog b')]),
    ('a [cat:dog:5] b', 10, [(5, 'a cat b'), (10, 'a dog b')]),
    ('[cat::0.3]', 10, [(3, 'cat'), (10, '')]),
    ('[cat:0.3]', 10, [(3, ''), (10, 'cat')]),
    ('[fe|]male', 4, [(1, 'female'), (2, 'male'), (3, 'female'), (4, 'male')]),
    ('[fe|||]male', 8, [(1, 'female'), (2, 'male'), (3, 'male'), (4, 'male'), (5, 'female'), (6, 'male'), (7, 'male'), (8, 'male')]),
    ('test', 10, [(10, 'test')]),
    ('a [b:3]', 10, [(3, 'a '), (10, 'a b')]),
    ('a [b: 3]', 10, [(3, 'a '), (10, 'a b')]),
    ('a [[[b]]:2]', 10, [(2, 'a '), (10, 'a [[b]]')]),
    ('[(a:2):3]', 10, [(3, ''), (10, '(a:2)')]),
    ('a [b : c : 1] d', 10, [(1, 'a b  d'), (10, 'a  c  d')]),
    ('a[b:[c:d:2]:1]e', 10, [(1, 'abe'), (2, 'ace'), (10, 'ade')]),
    ('a [unbalanced', 10, [(10, 'a [unbalanced')]),
    ('a [b:.5] c', 10, [(5, 'a  c'), (10, 'a b c')]),
    ('((a][:b:c [d:3]', 10, [(3, '((a][:b:c '), (10, '((a][:b:c d')]),
    ('[a|(b:1.1)]', 4, [(1, 'a'), (2, '(b:1.1)'), (3, 'a'), (4, '(b:1.1)')]),
    ('a [cat:dog:0.5 ] b', 10, [(5, 'a cat b'), (10, 'a dog b')]),
    ('a [cat:dog:\t2\t] b', 10, [(2, 'a cat b'), (10, 'a dog b')]),
    ('[cat:dog:1e1]', 20, [(10, 'cat'), (20, 'dog')]),
    ('[cat:dog:1.0]', 10, [(10, 'cat')]),
    ('[cat:dog:1]', 10, [(1, 'cat'), (10, 'dog')]),
    ('[cat:dog:0]', 10, [(10, 'dog')]),
    ('[cat:dog:-3]', 10, [(10, 'dog')]),
    ('[cat:dog:0.05]', 10, [(10, 'dog')]),
    ('[cat:dog:12]', 10, [(10, 'cat')]),
    ('[cat:dog:5.]', 10, [(10, 'cat')]),
    ('x | y', 5, [(5, 'x | y')]),
    ('[a:b:2] x | y', 5, [(5, '[a:b:2] x | y')]),
    ('a\\', 5, [(5, 'a\\')]),
    ('a \\[b:c:2\\]', 5, [(5, 'a \\[b:c:2\\]')]),
    ('[a|b] [c:d:3]', 5, [(1, 'a c'), (2, 'b c'), (3, 'a c'), (4, 'b d'), (5, 'a d')]),
    ('[a:b:c:3]', 5, [(5, '[a:b:c:3]')]),
    ('[a:5:6]', 10, [(6, 'a'), (10, '5')]),
    ('[(x:1.2):(y:0.8):4]', 10, [(4, '(x:1.2)'), (10, '(y:0.8)')]),
    ('[a|b|c]', 7, [(1, 'a'), (2, 'b'), (3, 'c'), (4, 'a'), (5, 'b'), (6, 'c'), (7, 'a')]),
    ('[a|[b:c:2]]', 4, [(1, 'a'), (2, 'b'), (3, 'a'), (4, 'c')]),
    ('[[a|b]:c:3]', 5, [(1, 'a'), (2, 'b'), (3, 'a'), (4, 'c'), (5, 'c')]),
    ('(a [b:c:2])', 5, [(2, '(a b)'), (5, '(a c)')]),
    ('[a:b:2]x)', 5, [(2, 'ax)'), (5, 'bx)')]),
    ('[a:b:2] [c|d] e', 4, [(1, 'a c e'), (2, 'a d e'), (3, 'b c e'), (4, 'b d e')]),
    ('a:1.2', 5, [(5, 'a:1.2')]),
    ('[:2]', 5, [(2, ''), (5, '')]),
    ('[a::2]', 5, [(2, 'a'), (5, '')]),
    ('[::2]', 5, [(2, ''), (5, '')]),
    ('[|]', 3, [(1, ''), (2, ''), (3, '')]),
    ('[a|]', 3, [(1, 'a'), (2, ''), (3, 'a')]),]


@pytest.mark.parametrize("prompt,steps,want", TABLE, ids=[repr(p)[:40] for p, _, _ in TABLE])
def test_schedule_table(prompt, steps, want):
    assert prompt_schedule(prompt, steps) == want


def _switch_step(when: str, steps: int) -> int:
    """The documented rule: a number with "." is a fraction of the steps, else a step; capped
    at steps, truncated."""
    v = float(when) * steps if "." in when else float(when)
    return min(steps, int(v))


@pytest.mark.parametrize("seed", range(4))
def test_schedule_edit_property(seed):
    rng = random.Random(seed)
    words = ["cat", "a dog", "(red:1.2) hat", "[small]", "", "x y z"]
    for _ in range(300):
        a, b, pre, post = (rng.choice(words) for _ in range(4))
        when = rng.choice(["0.5", "0.25", "3", "7", "0.9", "1", "15", ".3", "2.", "-1", "0"])
        steps = rng.randint(1, 30)
        ws1, ws2 = rng.choice(["", " ", "\t"]), rng.choice(["", " "])
        prompt = f"{pre} [{a}:{b}:{ws1}{when}{ws2}] {post}"
        k = _switch_step(when, steps)
        before, after = f"{pre} {a} {post}", f"{pre} {b} {post}"
        want = [(k, before), (steps, after)] if 1 <= k < steps else [(steps, before if k >= steps else after)]
        assert prompt_schedule(prompt, steps) == want, prompt


@pytest.mark.parametrize("seed", range(3))
def test_alternation_property(seed):
    rng = random.Random(seed)
    for _ in range(100):
        options = [rng.choice(["a", "b c", "", "(d)"]) for _ in range(rng.randint(2, 5))]
        steps = rng.randint(1, 12)
        got = prompt_schedule("x [" + "|".join(options) + "] y", steps)
        assert got == [(t, f"x {options[(t - 1) % len(options)]} y") for t in range(1, steps + 1)]


def test_plain_prompts_have_one_entry():
    rng = random.Random(5)
    chars = "ab (c:1.2) [d] \\( , BREAK"
    for _ in range(200):
        p = "".join(rng.choice(chars) for _ in range(rng.randint(0, 20)))
        if "[" in p and "]" in p:
            continue
        assert prompt_schedule(p, 9) == [(9, p)]


def test_text_at_call_counts_like_a1111():
    """A1111's CFG denoiser counts model calls from 0 and takes the first entry with
    call <= end_at_step (the first entry past the end)."""
    sched = [(5, "cat"), (10, "dog")]
    assert [text_at_call(sched, i) for i in range(12)] == ["cat"] * 6 + ["dog"] * 5 + ["cat"]


@pytest.mark.parametrize("prompt,text", [("a cat", "a cat"), ("a cat:1", "a cat"), ("a cat : 1.0  ", "a cat"),
                                         ("a cat ", "a cat"), ("(cat:1.5)", "(cat:1.5)"), ("ANDROID and", "ANDROID and"),
                                         ("a cat:1.)", "a cat:1.)")])
def test_composable_single_prompt(prompt, text):
    assert composable_prompt(prompt) == text


@pytest.mark.parametrize("prompt", ["a cat AND a dog", "a cat:1.5", "cat :0.5", "x AND", "a cat:-1", "AND"])
def test_composable_is_refused(prompt):
    with pytest.raises(InputError, match="composable") as e:
        composable_prompt(prompt)
    assert "\n" not in str(e.value)


def test_bad_input():
    with pytest.raises(InputError):
        prompt_schedule(None, 5)
    with pytest.raises(InputError, match="finite"):
        prompt_schedule("[a:b:1e999]", 5)
