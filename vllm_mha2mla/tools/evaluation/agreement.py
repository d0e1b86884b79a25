"""``agreement``: does a model answer chat prompts as the first model of the run does?

Every model answers the same held-out chat prompts greedily (at most :data:`MAX_TOKENS`
tokens), each rendered with the model's own chat template (``apply_chat_template`` with the
generation prompt; a tokenizer without a template gets ``"User: …\\nAssistant:"``). The first
model given to ``mha2mla eval`` (e.g. ``original=…``) is the reference; every model, the
reference included (which scores 100% against itself), is compared with it prompt by prompt:

- ``first_sentence_match``: the first sentences are equal after whitespace normalisation
  (:func:`first_sentence`);
- ``rouge_l_f1``: ROUGE-L F-measure (the ``rouge-score`` package, ``rougeL``, no stemming)
  of the answer against the reference's answer;
- ``non_empty``: the answer holds non-whitespace text (absolute, not compared);
- ``echoes_system_prompt``: the answer repeats the chat template's default system prompt
  (:func:`default_system_prompt`, e.g. SmolLM2's "You are a helpful AI assistant named
  SmolLM, trained by Hugging Face"): it contains its first 40 characters, or its ROUGE-L F1
  against it is at least 0.8 (absolute; 0 when the template has no default).

EVAL_PROMPT_SOURCES: the prompts (:func:`agreement_prompts`, set version
:data:`PROMPT_SET_VERSION`) are built only from the HELD-OUT split of the fine-tune's
default corpus (``conversion.recovery.corpus.load_default_corpus(cache_dir).held_out``:
Wikipedia paragraphs of HotpotQA and SQuAD whose :func:`~conversion.recovery.corpus.split_key`
passes :func:`~conversion.recovery.corpus.is_held_out`), which recovery never trains on.
The builder drops any document that is not held out, so the guarantee does not depend on
its caller; recovery data that must stay disjoint from the evaluation can call
:func:`agreement_prompts` itself and compare (:data:`EVAL_PROMPT_SOURCES` says the same in
data). This module never imports vLLM (nor does anything it imports).
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Sequence

from conversion.recovery.corpus import is_held_out, split_key

PROMPT_SET_VERSION = 1
DEFAULT_COUNT = 200
MAX_TOKENS = 128
ECHO_PREFIX_CHARS = 40
ECHO_ROUGE = 0.8
EVAL_PROMPT_SOURCES = {
    "version": PROMPT_SET_VERSION,
    "corpus": "conversion.recovery.corpus.load_default_corpus(cache_dir).held_out",
    "rule": "is_held_out(split_key(doc)); documents that are not held out are dropped",
    "kinds": ["question about a paragraph's article title (no context)",
              "instruction over a held-out paragraph (summarise, explain, list, title, rewrite, topic)",
              "explain a held-out paragraph's first sentence"],
}

Messages = list[dict]

_TITLE_QUESTIONS = (
    "Tell me about {title}.",
    "What do you know about {title}?",
    "Write one sentence about {title}.",
    "What is {title} known for?",
)
_PARAGRAPH_INSTRUCTIONS = (
    "Summarize this paragraph in one sentence.\n\n{text}",
    "Explain this paragraph in simple words.\n\n{text}",
    "What is the main topic of the following text?\n\n{text}",
    "List three facts from this text.\n\n{text}",
    "Give this paragraph a short title.\n\n{text}",
    "Rewrite this paragraph in plain English.\n\n{text}",
    "{text}\n\nWhat is this text about?",
)
_SENTENCE_INSTRUCTIONS = (
    "Explain what this sentence means: {sentence}",
    "Is the following statement about a person, a place, a thing or an event? {sentence}",
)
_MIN_CHARS, _MAX_CHARS = 150, 1000


def _title_and_text(doc: str) -> tuple[str | None, str]:
    """HotpotQA documents are ``"Title\\nText"``; SQuAD contexts have no title line."""
    first, sep, rest = doc.partition("\n")
    if sep and len(first) <= 80 and rest.strip():  # "Love Don't Run (song)" -> "Love Don't Run"
        return re.sub(r"\s*\([^()]*\)$", "", first.strip()) or first.strip(), rest.strip()
    return None, doc.strip()


def _first_text_sentence(text: str) -> str:
    match = re.search(r"(?<=[a-z\)][.!?])\s+(?=[A-Z])", text)
    return text[:match.start()] if match else text


def agreement_prompts(held_out_docs: Sequence[str], count: int = DEFAULT_COUNT, seed: int = 0) -> list[Messages]:
    """``count`` single-turn chat prompts (``[{"role": "user", "content": …}]``) built from
    held-out corpus documents; the same list for the same documents whatever their order.

    Documents are ordered by content hash then shuffled with ``seed``; each makes at most one
    prompt, the kinds taking turns (a question about the article's title without context, an
    instruction over the paragraph, an explanation of its first sentence) so that any prefix
    (``--limit``) mixes them. Paragraphs of 150–1,000 characters only (they fit a 2K context
    with the answer)."""
    docs = sorted({d for d in held_out_docs if is_held_out(split_key(d))},
                  key=lambda d: hashlib.sha1(d.encode("utf-8")).hexdigest())
    random.Random(seed).shuffle(docs)
    rng = random.Random(seed + 1)
    out: list[Messages] = []
    for doc in docs:
        if len(out) >= count:
            break
        title, text = _title_and_text(doc)
        if not _MIN_CHARS <= len(text) <= _MAX_CHARS:
            continue
        kind = len(out) % 3
        if kind == 0 and title:
            content = rng.choice(_TITLE_QUESTIONS).format(title=title)
        elif kind == 2:
            sentence = _first_text_sentence(text)
            content = rng.choice(_SENTENCE_INSTRUCTIONS).format(sentence=sentence) if len(sentence) >= 40 \
                else rng.choice(_PARAGRAPH_INSTRUCTIONS).format(text=text)
        else:
            content = rng.choice(_PARAGRAPH_INSTRUCTIONS).format(text=text)
        out.append([{"role": "user", "content": content}])
    if count and not out:
        raise ValueError("no held-out document of 150-1,000 characters to build agreement prompts from")
    return out


# --- rendering ------------------------------------------------------------------------------------

def has_chat_template(hf_tokenizer) -> bool:
    return bool(getattr(hf_tokenizer, "chat_template", None))


def render(hf_tokenizer, messages: Messages) -> str:
    """The prompt text as the model sees it in chat (generation prompt included)."""
    if has_chat_template(hf_tokenizer):
        return hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def default_system_prompt(hf_tokenizer) -> str | None:
    """The system prompt the chat template inserts when the conversation has none, found by
    rendering with and without an explicit system message; None when there is none."""
    if not has_chat_template(hf_tokenizer):
        return None
    user = [{"role": "user", "content": "\x01USER\x01"}]
    mark = "\x01SYSTEM\x01"
    try:
        plain = hf_tokenizer.apply_chat_template(user, tokenize=False)
        with_system = hf_tokenizer.apply_chat_template([{"role": "system", "content": mark}] + user, tokenize=False)
    except Exception:  # a template that refuses system messages has no default either
        return None
    if with_system.count(mark) != 1:
        return None
    before, after = with_system.split(mark)
    match = re.fullmatch(re.escape(before) + "(.+?)" + re.escape(after), plain, re.S)
    return (match.group(1).strip() or None) if match else None


# --- scoring --------------------------------------------------------------------------------------

def _squash(text: str) -> str:
    return " ".join(text.split())


def first_sentence(text: str) -> str:
    """The first sentence of the first non-empty line, whitespace normalised: up to the first
    ``.``, ``!`` or ``?`` that ends a word not made of digits (a list's "1." does not end one)."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = _squash(line)
    match = re.search(r"(?<![\s\d])[.!?]+(?=\s|$)", line)
    return line[:match.end()] if match else line


_SCORER = None


def rouge_l_f1(prediction: str, target: str) -> float:
    """ROUGE-L F-measure (``rouge-score``); 1.0 for texts equal after whitespace normalisation
    (two empty answers agree)."""
    global _SCORER
    if _squash(prediction) == _squash(target):
        return 1.0
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as exc:
            from vllm_mha2mla.tools.evaluation import EvaluationError

            raise EvaluationError("the agreement task needs rouge-score: pip install 'rouge-score>=0.1.2' "
                                  "(or the package's eval extra)") from exc
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_SCORER.score(target, prediction)["rougeL"].fmeasure)


def echoes_system_prompt(answer: str, system_prompt: str | None) -> bool:
    if not system_prompt or not answer.strip():
        return False
    return system_prompt[:ECHO_PREFIX_CHARS] in answer or rouge_l_f1(answer, system_prompt) >= ECHO_ROUGE


def score_answers(prompts: Sequence[Messages], answers: Sequence[str], reference: Sequence[str] | None,
                  system_prompt: str | None) -> tuple[dict, list[dict]]:
    """Metrics of ``answers`` against the reference model's (``None``: this model is the
    reference) and one record per prompt with both answers."""
    from vllm_mha2mla.tools.evaluation import EvaluationError
    from vllm_mha2mla.tools.evaluation.multiple_choice import mean_stderr

    reference = list(answers) if reference is None else list(reference)
    if len(reference) != len(answers):
        raise EvaluationError(f"agreement: {len(answers)} answers against {len(reference)} reference answers "
                              "(every model must get the same prompts: same --limit)")
    columns: dict[str, list[float]] = {"first_sentence_match": [], "rouge_l_f1": [], "non_empty": [],
                                       "echoes_system_prompt": []}
    records = []
    for i, (messages, answer, ref) in enumerate(zip(prompts, answers, reference, strict=True)):
        row = {"first_sentence_match": float(first_sentence(answer) == first_sentence(ref)),
               "rouge_l_f1": rouge_l_f1(answer, ref), "non_empty": float(bool(answer.strip())),
               "echoes_system_prompt": float(echoes_system_prompt(answer, system_prompt))}
        for key, value in row.items():
            columns[key].append(value)
        records.append({"id": i, "prompt": messages[-1]["content"], "answer": answer, "reference": ref, **row})
    metrics: dict = {}
    for key, values in columns.items():
        metrics[key] = sum(values) / len(values) if values else float("nan")
        metrics[f"{key}_stderr"] = mean_stderr(values)
    metrics["n"] = len(records)
    return metrics, records
