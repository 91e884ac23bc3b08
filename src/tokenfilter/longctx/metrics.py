"""LongBench's English metrics, re-implemented from their published definitions.

Every scorer takes ``(prediction, ground_truth, **kwargs)`` and returns a number in [0, 1]; a sample's
score is the maximum over its ground truths (:func:`score_sample`), a task's score the mean over its
samples, reported x100 as LongBench does.

Differences from LongBench's code, on purpose (no extra dependencies):
- ROUGE-L is the standard LCS F-measure (beta = 1) over lower-cased alphanumeric tokens (the
  tokenization of Google's ``rouge-score``), where LongBench calls the ``rouge`` package (summary-level
  LCS over '.'-split sentences, case-sensitive).
- Edit similarity is the Indel similarity ``2 * LCS / (len(a) + len(b))`` over characters (what
  ``fuzz.ratio`` computes), not rounded to whole percents.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """LongBench / SQuAD English normalization: lower case, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (the overlap counted with multiplicity)."""
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: object) -> float:
    """QA F1 over the normalized whitespace tokens of prediction and answer."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    if len(b) > len(a):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else (prev[j] if prev[j] > cur[j - 1] else cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_tokens(text: str) -> list[str]:
    """Lower case, every run of non-alphanumeric characters is a separator (``rouge-score``'s tokenizer)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l_score(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F1: ``2PR / (P + R)`` with ``P = LCS / len(pred)``, ``R = LCS / len(ref)`` over rouge tokens."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(ground_truth)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_: object) -> float:
    """LongBench classification: the classes named in the prediction (dropping those that are a strict
    substring of the right one); 1/len(named) if the right class is among them, else 0."""
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(named) if ground_truth in named else 0.0


def retrieval_score(prediction: str, ground_truth: str, **_: object) -> float:
    """LongBench passage retrieval (English): the fraction of the numbers in the prediction equal to the
    right paragraph's number (``"Paragraph 19"`` -> 19); 0 when the prediction has no number."""
    match = re.search(r"Paragraph (\d+)", ground_truth)
    target = match.group(1) if match else ground_truth.strip()
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth: str, **_: object) -> float:
    """LongBench passage count: the fraction of the numbers in the prediction equal to the answer."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(ground_truth).strip() for n in numbers) / len(numbers) if numbers else 0.0


def first_code_line(prediction: str) -> str:
    """LongBench's code post-processing: the first line that is not a comment or a markdown fence."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def edit_similarity(a: str, b: str) -> float:
    """Indel similarity ``2·LCS(a, b) / (len(a) + len(b))`` (``fuzz.ratio`` / 100); 0 if either is empty."""
    if not a or not b:
        return 0.0
    return 2 * _lcs_length(a, b) / (len(a) + len(b))


def code_sim_score(prediction: str, ground_truth: str, **_: object) -> float:
    """LongBench code completion: edit similarity of the first code line of the prediction to the answer."""
    return edit_similarity(first_code_line(prediction), ground_truth)


def contains_answer(prediction: str, answer: str) -> float:
    """Needle scoring: 1 if the normalized answer occurs in the normalized prediction, else 0."""
    needle = normalize_answer(answer)
    return float(bool(needle) and needle in normalize_answer(prediction))


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "rouge_l": rouge_l_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def score_sample(metric: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] = ()) -> float:
    """The best score of ``prediction`` over the ground-truth ``answers`` (LongBench's rule)."""
    fn = METRICS[metric]
    return max((fn(prediction, gt, all_classes=all_classes) for gt in answers), default=0.0)
