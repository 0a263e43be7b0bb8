"""Rewards and evaluation metrics (docs/reference.md section 4).

Two families:

- Training verifier: `boxed_answer` pulls the last `\\boxed{...}` out of the final response,
  `normalize_math` applies MATH-style normalization, and `verify` compares against the ground
  truths (1.0 on any exact match, else 0.0).
- Evaluation: SQuAD-style `normalize_answer` with `em`, `sub_em` and token `f1` (max over gold
  answers), `answer_is_extract` for the released "the answer is ..." format, and RULER's
  `string_match_all`.

A missing, empty or blank prediction scores 0 on every metric: the empty string is a substring of
every gold answer, so it must be guarded explicitly.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

BOX_WINDOW = 300  # the verifier only looks at the last 300 characters of a response

_BOX_OPENERS = ("\\boxed", "\\fbox")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)
_YES_NO = ("yes", "no", "noanswer")


def _as_list(golds: str | Sequence[str]) -> list[str]:
    """A single gold string or a sequence of them -> list of str."""
    if isinstance(golds, str):
        return [golds]
    return [str(g) for g in golds]


def _blank(pred: str | None) -> bool:
    return pred is None or not str(pred).strip()


# ----------------------------------------------------------------------------- boxed answers


def _match_braces(text: str, open_pos: int) -> str | None:
    """Content between text[open_pos] == '{' and its matching '}', or None if unclosed."""
    depth = 0
    for i in range(open_pos, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
    return None


def boxed_answer(text: str | None) -> str | None:
    """Inner text of the LAST `\\boxed{...}` / `\\boxed ...` / `\\fbox{...}` in the last 300 chars.

    Braces are matched, so nested braces (`\\boxed{\\frac{1}{2}}`) are kept whole. The space form
    `\\boxed 5` runs to the next `$` or the end of the text. A last box that is never closed (the
    response was cut) yields None rather than falling back to an earlier box. Case is preserved.
    """
    if not text:
        return None
    tail = text[-BOX_WINDOW:]
    start = max(tail.rfind(opener) for opener in _BOX_OPENERS)
    if start < 0:
        return None
    opener = next(o for o in _BOX_OPENERS if tail.startswith(o, start))
    pos = start + len(opener)
    # Skip blanks between the command and its argument: `\boxed {x}` and `\boxed x`.
    arg = pos
    while arg < len(tail) and tail[arg] in " \t":
        arg += 1
    if arg < len(tail) and tail[arg] == "{":
        return _match_braces(tail, arg)
    if arg == pos:  # `\boxedx` or `\boxed` at the very end: not a box
        return None
    inner = tail[arg:].split("$", 1)[0].strip()
    return inner or None


def normalize_math(s: str) -> str:
    """MATH-style normalization used by the training verifier (lower-cased)."""
    s = s.replace("\n", "").replace("\\!", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("\\%", "")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace(" ", "")
    return s.lower()


def verify(response: str | None, ground_truths: str | Sequence[str]) -> float:
    """1.0 if the normalized boxed answer equals any normalized ground truth, else 0.0.

    The response tail is lower-cased before extraction (as in the released verifier); ground
    truths are lower-cased and normalized the same way. No box (or an empty one) scores 0.0.
    """
    if not response:
        return 0.0
    box = boxed_answer(response[-BOX_WINDOW:].lower())
    if box is None:
        return 0.0
    pred = normalize_math(box)
    if not pred:
        return 0.0
    for gt in _as_list(ground_truths):
        if pred == normalize_math(gt.lower()):
            return 1.0
    return 0.0


def answer_is_extract(text: str | None) -> str | None:
    """Text after the LAST "the answer is" (case-insensitive), or None if the phrase is absent.

    Surrounding whitespace, a leading colon and trailing periods are stripped, so
    "Therefore, the answer is: Paris." -> "Paris".
    """
    if not text:
        return None
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    ans = text[matches[-1].end() :].strip()
    if ans.startswith(":"):
        ans = ans[1:].strip()
    return ans.rstrip(".").strip()


# ----------------------------------------------------------------------------- SQuAD metrics


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower-case, drop punctuation, drop articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def em(pred: str | None, golds: str | Sequence[str]) -> float:
    """Exact match after normalization, max over golds."""
    if _blank(pred):
        return 0.0
    p = normalize_answer(pred)
    if not p:
        return 0.0
    return max((float(p == normalize_answer(g)) for g in _as_list(golds)), default=0.0)


def sub_em(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if a normalized gold is contained in the normalized prediction or vice versa."""
    if _blank(pred):
        return 0.0
    p = normalize_answer(pred)
    if not p:
        return 0.0
    best = 0.0
    for g in _as_list(golds):
        gn = normalize_answer(g)
        if gn and (gn in p or p in gn):  # an empty gold would be "in" everything
            best = 1.0
    return best


def _f1_single(pred_norm: str, gold_norm: str) -> float:
    # yes / no / noanswer are classes, not token bags: they must match exactly.
    if (pred_norm in _YES_NO or gold_norm in _YES_NO) and pred_norm != gold_norm:
        return 0.0
    p_toks, g_toks = pred_norm.split(), gold_norm.split()
    same = sum((collections.Counter(p_toks) & collections.Counter(g_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_toks), same / len(g_toks)
    return 2 * precision * recall / (precision + recall)


def f1(pred: str | None, golds: str | Sequence[str]) -> float:
    """Token-level F1 after normalization, max over golds (yes/no/noanswer: exact only)."""
    if _blank(pred):
        return 0.0
    p = normalize_answer(pred)
    if not p:
        return 0.0
    return max((_f1_single(p, normalize_answer(g)) for g in _as_list(golds)), default=0.0)


def string_match_all(pred: str | None, refs: str | Sequence[str]) -> float:
    """RULER metric: fraction of reference strings contained in the prediction, case-insensitive."""
    refs = _as_list(refs)
    if _blank(pred) or not refs:
        return 0.0
    p = pred.lower()
    return sum(1.0 for r in refs if r.lower() in p) / len(refs)
