"""Tasks by name: what ``--tasks`` accepts.

A task turns a tokenizer into requests and scores the results (:class:`Prepared`). Names:
the multiple-choice suite (``arc_easy`` … ``sciq``, ``mmlu``), perplexity (``wikipedia``: the
held-out split of the fine-tune's default corpus; ``essays``: Paul Graham's essays, out of
that domain), long context (``passkey``, ``niah``, ``niah_multikey``, ``niah_multivalue``,
``variable_tracking``, ``longqa``), behaviour (``triviaqa`` and ``nq_open``:
generative exact match; ``lambada``: the greedy last word; ``commonsense_qa``,
``social_iqa``, ``copa``: multiple choice; ``agreement``: greedy chat answers compared with
the first model's), groups (``mc``, ``ppl``, ``long``, ``behaviour``, ``all``), and paths:
``FILE.jsonl`` is a user's multiple-choice task, ``FILE.txt``/``.md`` text to measure
perplexity on; both are reported under the file's stem.

``all`` is ``mc`` + ``ppl`` + ``long``, as before ``behaviour`` existed (``behaviour``
generates tens of thousands of answers; ask for it by name: ``--tasks all,behaviour``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from conversion.recovery.corpus import ensure_default_corpus, load_default_corpus
from vllm_mha2mla.tools.evaluation import (
    EvaluationError, agreement, generative, long_context, longqa, multiple_choice, perplexity,
)
from vllm_mha2mla.tools.evaluation.datasets import mmlu_subjects, read_lambada, read_split
from vllm_mha2mla.tools.evaluation.requests import Generate, Request, Result


@dataclass(frozen=True)
class Settings:
    limit: int | None = None
    """Items per task (documents for perplexity); None: all."""
    max_model_len: int = 2048
    ppl_window: int = 2048
    lengths: tuple[int, ...] = long_context.LENGTHS
    depths: tuple[float, ...] = long_context.DEPTHS
    per_cell: int = 10
    seed: int = 0
    cache_dir: Path | None = None


@dataclass
class Prepared:
    requests: list[Request]
    score: Callable[..., tuple[dict, list[dict]]]
    """``score(results)``; an ``agreement`` task's is ``score(results, reference)`` with the
    first model's answers (None for the first model itself)."""
    notes: list[str] = field(default_factory=list)


class Tokenizer:
    """The model's tokenizer as the tasks use it: plain text → ids (no special tokens, as the
    harness), ids → text, and the end-of-text id that opens rolling windows."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        eot = hf_tokenizer.eos_token_id
        self.eot = eot if eot is not None else (hf_tokenizer.bos_token_id or 0)
        self._memo: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        return list(ids) if ids is not None else self.hf(text, add_special_tokens=False).input_ids

    def warm(self, texts: Sequence[str]) -> None:
        """Tokenizes ``texts`` in one batched call (the fast tokenizer's parallel path) and
        remembers them for :meth:`encode`: tens of thousands of choices take seconds, not minutes."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        for start in range(0, len(todo), 4096):
            batch = todo[start:start + 4096]
            for text, ids in zip(batch, self.hf(batch, add_special_tokens=False).input_ids):
                self._memo[text] = ids

    def forget(self) -> None:
        self._memo.clear()

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice" | "perplexity" | "long_context" | "generative" | "agreement"
    metrics: tuple[str, ...]
    """Shown in the table, the first in the plot."""
    prepare: Callable[[Tokenizer, Settings], Prepared]


def _flatten(per_item: list[list[Request]]) -> tuple[list[Request], list[int]]:
    """One request list for the engines, and how many requests each item contributed."""
    return [r for reqs in per_item for r in reqs], [len(reqs) for reqs in per_item]


def _regroup(results: list[Result], sizes: list[int]) -> list[list[Result]]:
    out, at = [], 0
    for size in sizes:
        out.append(results[at:at + size])
        at += size
    return out


def _limit(items: list, settings: Settings) -> list:
    return items if settings.limit is None else items[: settings.limit]


def _mc_prepare(load: Callable[[Settings], list[multiple_choice.Item]]):
    def prepare(tok: Tokenizer, settings: Settings) -> Prepared:
        items = _limit(load(settings), settings)
        tok.warm([text for item in items for i in range(item.num_choices) for text in _pair_texts(*item.pair(i))])
        requests, sizes = _flatten([multiple_choice.item_requests(item, tok.encode, tok.eot,
                                                                  settings.max_model_len - 1)  # + 1 output
                                    for item in items])

        def score(results: list[Result]) -> tuple[dict, list[dict]]:
            return multiple_choice.score_items(items, _regroup(results, sizes))

        tok.forget()
        return Prepared(requests, score)

    return prepare


def _pair_texts(context: str, continuation: str) -> tuple[str, str]:
    """The two strings ``encode_pair`` tokenizes (context without trailing spaces, and whole)."""
    stripped = context.rstrip()
    return stripped, stripped + context[len(stripped):] + continuation


def _split_task(folder: str, fmt: Callable[[dict], multiple_choice.Item]):
    return _mc_prepare(lambda s: [fmt(row) for row in read_split(folder, s.cache_dir)])


def _mmlu_items(settings: Settings) -> list[multiple_choice.Item]:
    """All subjects' validation items, interleaved subject by subject so a --limit samples all."""
    per_subject = [[multiple_choice.mmlu(row) for row in read_split(f"hails/mmlu_no_train/{s}/validation",
                                                                     settings.cache_dir)]
                   for s in mmlu_subjects(settings.cache_dir)]
    out = []
    for i in range(max(map(len, per_subject))):
        out += [items[i] for items in per_subject if i < len(items)]
    return out


def _lambada_prepare(tok: Tokenizer, settings: Settings) -> Prepared:
    items = _limit([multiple_choice.lambada(row) for row in read_lambada(settings.cache_dir)], settings)
    tok.warm([text for item in items for text in _pair_texts(*item.pair(0))])
    requests, sizes = _flatten([multiple_choice.item_requests(item, tok.encode, tok.eot, settings.max_model_len - 1)
                                for item in items])

    def score(results: list[Result]) -> tuple[dict, list[dict]]:
        return multiple_choice.score_greedy(items, _regroup(results, sizes))

    tok.forget()
    return Prepared(requests, score)


def _qa_prepare(folder: str, fmt: Callable[[dict], generative.QAItem]):
    """Greedy answers of at most ``generative.MAX_TOKENS`` tokens after ``generative.FEWSHOT``
    solved examples (the split's first items, not scored), scored by exact match."""
    def prepare(tok: Tokenizer, settings: Settings) -> Prepared:
        every = [fmt(row) for row in read_split(folder, settings.cache_dir)]
        shots, items = every[:generative.FEWSHOT], _limit(every[generative.FEWSHOT:], settings)
        prompts = [generative.fewshot_prompt(shots, item) for item in items]
        budget = settings.max_model_len - generative.MAX_TOKENS
        tok.warm(prompts)
        requests: list[Request] = [Generate(tuple(tok.encode(prompt)[-budget:]), generative.MAX_TOKENS)
                                   for prompt in prompts]
        tok.forget()

        def score(results: list[Result]) -> tuple[dict, list[dict]]:
            return generative.score_items(items, [tok.decode(ids) for ids in results])

        return Prepared(requests, score, [f"{generative.FEWSHOT}-shot (the split's first items, not scored), greedy, "
                                          f"at most {generative.MAX_TOKENS} tokens, cut at the line end or a "
                                          "clause-ending . or ,; SQuAD-normalised exact match"])

    return prepare


def _agreement_prepare(tok: Tokenizer, settings: Settings) -> Prepared:
    """The held-out chat prompts in this model's chat template; answers kept for the report and
    compared with the first model's by :func:`agreement.score_answers`."""
    prompts = _limit(agreement.agreement_prompts(_corpus(settings.cache_dir).held_out), settings)
    budget = settings.max_model_len - agreement.MAX_TOKENS
    if budget < 16:
        raise EvaluationError(f"agreement: max_model_len {settings.max_model_len} leaves no room for a prompt "
                              f"and a {agreement.MAX_TOKENS}-token answer")
    requests: list[Request] = []
    shortened = cut = 0
    for messages in prompts:
        ids = tok.encode(agreement.render(tok.hf, messages))
        shortened += len(ids) > budget
        while len(ids) > budget and len(messages[-1]["content"]) > 200:  # shorten the user's text, keep its form
            content = messages[-1]["content"]
            messages = messages[:-1] + [{**messages[-1], "content": content[:3 * len(content) // 4].rsplit(" ", 1)[0]}]
            ids = tok.encode(agreement.render(tok.hf, messages))
        if len(ids) > budget:
            ids, cut = ids[-budget:], cut + 1
        requests.append(Generate(tuple(ids), agreement.MAX_TOKENS))
    system = agreement.default_system_prompt(tok.hf)
    notes = [f"prompt set v{agreement.PROMPT_SET_VERSION}: {len(prompts)} held-out prompts, greedy, at most "
             f"{agreement.MAX_TOKENS} tokens; reference: the first model",
             "chat template: " + ("the model's" if agreement.has_chat_template(tok.hf) else
                                  "none (plain 'User: …\\nAssistant:')"),
             f"default system prompt: {system!r}"]
    if shortened or cut:
        notes.append(f"{shortened} prompts' user text shortened ({cut} then cut on the left) to fit "
                     f"max_model_len {settings.max_model_len}")

    def score(results: list[Result], reference: list[str] | None = None) -> tuple[dict, list[dict]]:
        return agreement.score_answers(prompts, [tok.decode(ids) for ids in results], reference, system)

    return Prepared(requests, score, notes)


def _ppl_prepare(load: Callable[[Settings], list[str]]):
    def prepare(tok: Tokenizer, settings: Settings) -> Prepared:
        docs = _limit(load(settings), settings)
        window = min(settings.ppl_window, settings.max_model_len - 2)  # + the token before + 1 output
        tok.warm(docs)
        requests, sizes = _flatten([perplexity.rolling_windows(tok.encode(doc), tok.eot, window) for doc in docs])

        def score(results: list[Result]) -> tuple[dict, list[dict]]:
            grouped = _regroup(results, sizes)
            records = [{"logprob": sum(r.logprob for r in g), "tokens": sum(r.tokens for r in g)} for g in grouped]
            return perplexity.perplexity_metrics(docs, grouped), records

        tok.forget()
        return Prepared(requests, score, [f"rolling windows of {window} tokens"])

    return prepare


@functools.lru_cache(maxsize=2)
def _corpus(cache_dir: Path | None):
    """The default corpus, parsed once per run (wikipedia, essays and the haystack all read it)."""
    return load_default_corpus(cache_dir)


def _held_out_wikipedia(settings: Settings) -> list[str]:
    return _corpus(settings.cache_dir).held_out


def _essays(settings: Settings) -> list[str]:
    """The essays as documents of 2,000–8,000 characters (<= ~1,800 tokens), cut at line ends.

    The essays' paragraphs are single lines (a blank line separates essays, not paragraphs),
    so documents are cut at line ends within an essay; cutting at blank lines gave whole essays
    of up to 78k characters, and ``--limit 10`` then scored 68k tokens of essays alone."""
    docs, current = [], ""
    for essay in _corpus(settings.cache_dir).out_of_domain[0].split("\n\n"):
        for i, line in enumerate(line for line in essay.split("\n") if line.strip()):
            current = f"{current}{chr(10) * (2 if i == 0 else 1)}{line}" if current else line
            if len(current) >= 8000:
                docs.append(current)
                current = ""
        if len(current) >= 2000:  # an essay's tail ends its document unless it is short
            docs.append(current)
            current = ""
    return docs + ([current] if current else [])


def _haystack(settings: Settings) -> list[str]:
    return _essay_sentences(settings.cache_dir)


@functools.lru_cache(maxsize=2)
def _essay_sentences(cache_dir: Path | None) -> list[str]:
    return long_context.essay_sentences(_corpus(cache_dir).out_of_domain[0])


@functools.lru_cache(maxsize=2)
def _longqa_questions(cache_dir: Path | None) -> list[longqa.Question]:
    return longqa.load_questions(ensure_default_corpus(cache_dir))


def _longqa_items(tok: Tokenizer, settings: Settings, lengths, per_cell: int) -> list[long_context.Item]:
    """A chat model reads the question in its chat template (see :mod:`.longqa`), a base model RULER's text."""
    template = (lambda text: agreement.render(tok.hf, [{"role": "user", "content": text}])) \
        if agreement.has_chat_template(tok.hf) else longqa.base_template
    return longqa.longqa_items(tok.encode, _longqa_questions(settings.cache_dir), _corpus(settings.cache_dir).held_out,
                               lengths, settings.depths, per_cell, settings.seed, template)


_LONG_ITEMS: dict[str, Callable[..., list[long_context.Item]]] = {
    # (tokenizer, settings, lengths, per_cell) -> items
    "passkey": lambda tok, s, lengths, k: long_context.passkey_items(tok.encode, lengths, s.depths, k, s.seed),
    "niah": lambda tok, s, lengths, k: long_context.niah_items(tok.encode, _haystack(s), lengths, s.depths, k,
                                                               s.seed),
    "niah_multikey": lambda tok, s, lengths, k: long_context.niah_multikey_items(tok.encode, _haystack(s), lengths,
                                                                                 s.depths, k, s.seed),
    "niah_multivalue": lambda tok, s, lengths, k: long_context.niah_multivalue_items(tok.encode, _haystack(s),
                                                                                     lengths, s.depths, k, s.seed),
    "variable_tracking": lambda tok, s, lengths, k: long_context.variable_tracking_items(tok.encode, lengths,
                                                                                         s.depths, k, s.seed),
    "longqa": _longqa_items,
}
_LONG_UNITS: dict[str, Callable[[Settings], list[str]]] = {
    # the filler units whose token counts the builders read: tokenized in one batched call first
    **dict.fromkeys(("niah", "niah_multikey", "niah_multivalue"),
                    lambda s: [" " + sentence for sentence in _haystack(s)]),
    "longqa": lambda s: [longqa.unit_text(d) for d in _corpus(s.cache_dir).held_out],
}
_LONG_NOTES = {
    "niah_multikey": [f"{long_context.MULTIKEY_NEEDLES} needles with different keys, one asked for; acc: its value "
                      "in the answer; wrong_needle: another key's value without it"],
    "niah_multivalue": [f"{long_context.MULTIVALUE_VALUES} values for one key, all asked for; acc: all present; "
                        "recall: the share present"],
    "variable_tracking": [f"{long_context.VT_CHAINS} chains of {long_context.VT_HOPS + 1} variables, one asked for; "
                          "acc: all its variables named; recall: the share named"],
    "longqa": ["held-out HotpotQA/SQuAD questions (every gold paragraph held out) among held-out distractor "
               "paragraphs; acc: a SQuAD-normalised gold answer in the answer"],
}


def _lc_prepare(kind: str):
    def prepare(tok: Tokenizer, settings: Settings) -> Prepared:
        lengths = [n for n in settings.lengths if n <= settings.max_model_len]
        notes = [f"lengths {sorted(set(settings.lengths) - set(lengths))} skipped: longer than max_model_len "
                 f"{settings.max_model_len}"] if len(lengths) < len(settings.lengths) else []
        notes += _LONG_NOTES.get(kind, [])
        if kind == "longqa":
            notes.append("prompt: " + ("the user's turn in the model's chat template"
                                       if agreement.has_chat_template(tok.hf) else "RULER's base template"))
        per_cell = settings.per_cell
        cells = len(lengths) * len(settings.depths)
        if settings.limit is not None and cells:
            per_cell = max(1, min(per_cell, settings.limit // cells))
        tok.warm(_LONG_UNITS[kind](settings) if kind in _LONG_UNITS else [])
        try:
            items = _LONG_ITEMS[kind](tok, settings, lengths, per_cell)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from exc
        finally:
            tok.forget()
        over = sorted({i.length for i in items if len(i.request.token_ids) + i.request.max_tokens > i.length})
        if over:
            raise EvaluationError(f"{kind}: lengths {over} cannot hold the task's instructions, needles, question "
                                  "and answer; ask for longer --lengths")

        def score(results: list[Result]) -> tuple[dict, list[dict]]:
            return long_context.score_items(items, [tok.decode(ids) for ids in results])

        return Prepared([item.request for item in items], score, notes)

    return prepare


_ACC_NORM = ("acc", "acc_norm")
_PPL = ("token_perplexity", "bits_per_byte")
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", "multiple_choice", _ACC_NORM, _split_task("ai2_arc/ARC-Easy/validation", multiple_choice.arc)),
    Task("arc_challenge", "multiple_choice", _ACC_NORM,
         _split_task("ai2_arc/ARC-Challenge/validation", multiple_choice.arc)),
    Task("hellaswag", "multiple_choice", _ACC_NORM, _split_task("hellaswag/none/validation", multiple_choice.hellaswag)),
    Task("piqa", "multiple_choice", _ACC_NORM, _split_task("piqa/plain_text/validation", multiple_choice.piqa)),
    Task("winogrande", "multiple_choice", ("acc",),
         _split_task("winogrande/winogrande_xl/validation", multiple_choice.winogrande)),
    Task("boolq", "multiple_choice", ("acc",), _split_task("boolq/none/validation", multiple_choice.boolq)),
    Task("openbookqa", "multiple_choice", _ACC_NORM,
         _split_task("openbookqa/main/validation", multiple_choice.openbookqa)),
    Task("sciq", "multiple_choice", _ACC_NORM, _split_task("sciq/none/validation", multiple_choice.sciq)),
    Task("mmlu", "multiple_choice", ("acc",), _mc_prepare(_mmlu_items)),
    Task("wikipedia", "perplexity", _PPL, _ppl_prepare(_held_out_wikipedia)),
    Task("essays", "perplexity", _PPL, _ppl_prepare(_essays)),
    Task("passkey", "long_context", ("acc",), _lc_prepare("passkey")),
    Task("niah", "long_context", ("acc",), _lc_prepare("niah")),
    Task("niah_multikey", "long_context", ("acc", "wrong_needle"), _lc_prepare("niah_multikey")),
    Task("niah_multivalue", "long_context", ("acc", "recall"), _lc_prepare("niah_multivalue")),
    Task("variable_tracking", "long_context", ("acc", "recall"), _lc_prepare("variable_tracking")),
    Task("longqa", "long_context", ("acc",), _lc_prepare("longqa")),
    Task("triviaqa", "generative", ("exact_match",),
         _qa_prepare("trivia_qa/rc.wikipedia.nocontext/validation", generative.triviaqa)),
    Task("nq_open", "generative", ("exact_match",), _qa_prepare("nq_open/none/validation", generative.nq_open)),
    Task("lambada", "multiple_choice", ("acc", "perplexity"), _lambada_prepare),
    Task("commonsense_qa", "multiple_choice", ("acc",),
         _split_task("tau/commonsense_qa/none/validation", multiple_choice.commonsense_qa)),
    Task("social_iqa", "multiple_choice", ("acc",),
         _split_task("social_i_qa/none/validation", multiple_choice.social_iqa)),
    Task("copa", "multiple_choice", ("acc",), _split_task("super_glue/copa/validation", multiple_choice.copa)),
    Task("agreement", "agreement", ("first_sentence_match", "rouge_l_f1", "non_empty", "echoes_system_prompt"),
         _agreement_prepare),
]}
GROUPS = {
    "mc": ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "sciq"],
    "ppl": ["wikipedia", "essays"],
    "long": ["passkey", "niah", "niah_multikey", "niah_multivalue", "variable_tracking", "longqa"],
    "behaviour": ["triviaqa", "nq_open", "lambada", "commonsense_qa", "social_iqa", "copa", "agreement"],
}
GROUPS["all"] = GROUPS["mc"] + GROUPS["ppl"] + GROUPS["long"]


def _file_task(path: Path) -> Task:
    if not path.is_file():
        raise EvaluationError(f"task file {path} does not exist")
    if path.suffix == ".jsonl":
        items = multiple_choice.read_task_file(path)  # read now: a malformed line fails before any engine starts
        return Task(path.stem, "multiple_choice", _ACC_NORM, _mc_prepare(lambda s: items))
    if path.suffix in (".txt", ".md"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise EvaluationError(f"text file {path} is empty")
        return Task(path.stem, "perplexity", _PPL, _ppl_prepare(lambda s: [text]))
    raise EvaluationError(f"task file {path}: expected .jsonl (multiple choice) or .txt/.md (perplexity)")


def resolve_tasks(spec: str) -> list[Task]:
    """``"mc,wikipedia,my_task.jsonl"`` → tasks, groups expanded, duplicates dropped."""
    out: dict[str, Task] = {}
    for raw in [s.strip() for s in spec.split(",") if s.strip()]:
        if raw in GROUPS:
            for name in GROUPS[raw]:
                out.setdefault(name, TASKS[name])
        elif raw in TASKS:
            out.setdefault(raw, TASKS[raw])
        elif raw.endswith((".jsonl", ".txt", ".md")) or "/" in raw:
            task = _file_task(Path(raw))
            if task.name in out or task.name in TASKS:
                raise EvaluationError(f"task file {raw}: its name {task.name!r} clashes with another task")
            out[task.name] = task
        else:
            raise EvaluationError(f"unknown task {raw!r}; known tasks: {', '.join(TASKS)}; groups: "
                                  f"{', '.join(GROUPS)}; or a path to a .jsonl multiple-choice file or a .txt file")
    if not out:
        raise EvaluationError("no tasks given")
    return list(out.values())
