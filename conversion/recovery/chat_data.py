"""Chat prompts for distillation: the inputs an instruct model is used with, built from the corpus.

Recovery that imitates the teacher only on Wikipedia paragraphs gives back perplexity but not
behaviour: the student never sees a chat turn, a question or an instruction, and drifts off the
teacher's path there (empty answers, the system prompt echoed back). So the teacher answers
conversations built here, and the student is distilled on those conversations and, on-policy,
on its own answers to the same kind of prompts.

Kinds of prompt (:data:`KINDS`), each a list of chat messages:

- ``question``: a HotpotQA or SQuAD question on its own (knowledge the model must keep);
- ``question_context``: the same questions with their paragraphs as context (reading);
- ``instruction``: summarise / explain / list / rewrite / title / answer from a corpus paragraph;
- ``open``: open-ended requests about a corpus topic (an article title) and general requests;
- ``multi_turn``: any of the above followed by a follow-up turn; the teacher's first answer is
  written in by the synthesizer before the second turn is answered.

A quarter of the conversations carry a custom system prompt, the rest rely on the chat
template's own default, so the student sees both.

Only the corpus's *training* side is used: a question is taken only if it and every paragraph it
shows are on the training side of the corpus split (:func:`conversion.recovery.corpus.is_held_out`
of :func:`split_key`), so the held-out paragraphs behind the perplexity and the ``agreement``
evaluation never reach training. Everything here is pure (no vLLM, no model): the synthesizer
renders the messages with the tokenizer's chat template and samples the answers.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conversion.errors import ConversionError
from conversion.recovery.corpus import HOTPOTQA, SQUAD, ensure_default_corpus, is_held_out, split_key

KINDS = ("question", "question_context", "instruction", "open", "multi_turn")
QUESTION_KINDS = ("question", "question_context")
DEFAULT_MIX = {"question": 0.25, "question_context": 0.2, "instruction": 0.25, "open": 0.15, "multi_turn": 0.15}
"""Share of conversations per kind (the on-policy stage and the synthesizer use the same mix)."""

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly and accurately.",
    "You are a friendly tutor who explains things in simple words.",
    "You are a knowledgeable encyclopedia assistant. Stick to the facts.",
    "You are a careful assistant. If you are not sure, say so.",
)
CUSTOM_SYSTEM_SHARE = 0.25

CONTEXT_QA_TEMPLATES = (
    "Read the text and answer the question.\n\n{context}\n\nQuestion: {question}",
    "{context}\n\nBased on the text above, {question_lower}",
    "Use the following information to answer the question.\n\n{context}\n\n{question}",
)
INSTRUCTION_TEMPLATES = (
    "Summarize the following text in two sentences.\n\n{text}",
    "Explain the following paragraph as if I were ten years old.\n\n{text}",
    "List the key facts in this text as bullet points.\n\n{text}",
    "Rewrite this paragraph in simpler words.\n\n{text}",
    "What is the main topic of this text? Answer in one sentence.\n\n{text}",
    "Write a short title for this paragraph.\n\n{text}",
    "{text}\n\nWhat are three questions that this text answers?",
    "{text}\n\nWhat is the most surprising fact in this text, and why?",
)
TOPIC_TEMPLATES = (
    "Tell me about {topic}.",
    "What is {topic} known for?",
    "Give me three interesting facts about {topic}.",
    "Write a short poem about {topic}.",
    "Write a two-sentence description of {topic}.",
    "Why might someone be interested in {topic}?",
)
GENERAL_REQUESTS = (  # nothing like the demo's or the agreement evaluation's prompts (tested)
    "What are some good habits for learning a new language?",
    "What is the difference between weather and climate?",
    "Write a short story about a robot who learns to paint.",
    "How do I make a cup of tea?",
    "Explain what photosynthesis is.",
    "What are the benefits of regular exercise?",
    "Describe a busy city street in three sentences.",
    "How does a rainbow form?",
    "Suggest a name for a small bakery.",
    "What causes the seasons on Earth?",
    "Explain gravity in one paragraph.",
    "What should I pack for a weekend hiking trip?",
    "Write a polite email declining a meeting invitation.",
    "What are the primary colors?",
    "Give me a simple recipe for pancakes.",
    "Why is the sky blue?",
    "What is the difference between a lake and a pond?",
    "How do bees make honey?",
    "Name three famous scientists and what they discovered.",
    "How can I improve my sleep?",
)
FOLLOW_UPS = (
    "Can you say that more briefly?",
    "Why is that?",
    "Can you give me an example?",
    "Thanks! Can you tell me more?",
    "Summarize your answer in one sentence.",
    "Is there anything else I should know?",
)
MAX_CONTEXT_CHARS = 1800
"""Context paragraphs are cut to this many characters (about 400 tokens): prompts stay short
enough that the teacher's answer is most of each conversation."""


@dataclass(frozen=True)
class Question:
    """A corpus question with the paragraphs that answer it (in the corpus's document format)."""

    question: str
    answer: str
    paragraphs: tuple[str, ...]
    source: str


@dataclass
class ChatPrompt:
    """One conversation to be answered: ``messages`` end with a user turn; ``follow_up`` (for
    ``multi_turn``) is the second user turn, asked after the first answer."""

    kind: str
    messages: list[dict]
    follow_up: str | None = None

    def user_texts(self) -> list[str]:
        texts = [m["content"] for m in self.messages if m["role"] == "user"]
        return texts + ([self.follow_up] if self.follow_up else [])


@dataclass
class ChatMix:
    """What a set of prompts holds (recorded in the fine-tune report)."""

    kinds: dict[str, int] = field(default_factory=dict)
    custom_system: int = 0
    sources: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kinds": self.kinds, "custom_system_prompt": self.custom_system, "sources": self.sources}


def _hotpotqa_questions(records: list[dict]) -> list[Question]:
    out = []
    for r in records:
        paragraphs = {title: f"{title}\n{''.join(sents).strip()}" for title, sents in r["context"]}
        gold = dict.fromkeys(title for title, _ in r["supporting_facts"])
        shown = tuple(paragraphs[t] for t in gold if t in paragraphs)
        if shown and r.get("question") and r.get("answer"):
            out.append(Question(r["question"].strip(), str(r["answer"]).strip(), shown, "hotpotqa"))
    return out


def _squad_questions(data: dict) -> list[Question]:
    out = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"].strip()
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa.get("answers", []) if a.get("text")]
                if qa.get("is_impossible") or not answers:
                    continue
                out.append(Question(qa["question"].strip(), answers[0].strip(), (context,), "squad"))
    return out


def is_training_question(q: Question) -> bool:
    """On the training side: the question and every paragraph it shows (by the corpus's own
    split rule, keyed on the article) are outside the held-out split."""
    return not is_held_out(q.question) and not any(is_held_out(split_key(p)) for p in q.paragraphs)


def load_training_questions(cache_dir: Path | None = None) -> list[Question]:
    """Training-side questions of the default corpus's HotpotQA and SQuAD files."""
    folder = ensure_default_corpus(cache_dir)
    try:
        hotpot = json.loads((folder / HOTPOTQA).read_text(encoding="utf-8"))
        squad = json.loads((folder / SQUAD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"the corpus question files under {folder} could not be read ({exc}); "
                              f"delete {folder} so it is fetched again") from exc
    return [q for q in _hotpotqa_questions(hotpot) + _squad_questions(squad) if is_training_question(q)]


def _topic(doc: str) -> str | None:
    """A HotpotQA paragraph's article title (its first line), if it has one."""
    head, _, rest = doc.partition("\n")
    return head.strip() if rest and 0 < len(head.strip()) <= 80 else None


def _clip(text: str) -> str:
    if len(text) <= MAX_CONTEXT_CHARS:
        return text
    cut = text[:MAX_CONTEXT_CHARS]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def _first_turn(kind: str, rng: random.Random, questions: Sequence[Question], documents: Sequence[str]) -> tuple[str, str]:
    """(user text, source) of a first user turn of ``kind`` (``multi_turn`` picks another kind)."""
    if kind == "question":
        q = questions[rng.randrange(len(questions))]
        return q.question, q.source
    if kind == "question_context":
        q = questions[rng.randrange(len(questions))]
        context = _clip("\n\n".join(q.paragraphs))
        template = CONTEXT_QA_TEMPLATES[rng.randrange(len(CONTEXT_QA_TEMPLATES))]
        return template.format(context=context, question=q.question, question_lower=_lower_first(q.question)), q.source
    if kind == "instruction":
        doc = documents[rng.randrange(len(documents))]
        return INSTRUCTION_TEMPLATES[rng.randrange(len(INSTRUCTION_TEMPLATES))].format(text=_clip(doc)), "corpus"
    if kind == "open":
        if rng.random() < 0.3:
            return GENERAL_REQUESTS[rng.randrange(len(GENERAL_REQUESTS))], "general"
        for _ in range(20):
            topic = _topic(documents[rng.randrange(len(documents))])
            if topic:
                return TOPIC_TEMPLATES[rng.randrange(len(TOPIC_TEMPLATES))].format(topic=topic), "corpus"
        return GENERAL_REQUESTS[rng.randrange(len(GENERAL_REQUESTS))], "general"
    raise ConversionError(f"unknown chat prompt kind {kind!r}; expected one of {', '.join(KINDS)}")


def _kind_counts(count: int, mix: dict[str, float]) -> dict[str, int]:
    unknown = set(mix) - set(KINDS)
    if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ConversionError(f"chat mix must give non-negative shares of {', '.join(KINDS)}, got {mix}")
    total = sum(mix.values())
    counts = {k: int(count * v / total) for k, v in mix.items()}
    for k in sorted(mix, key=lambda k: -mix[k])[: count - sum(counts.values())]:
        counts[k] += 1
    return counts


def build_chat_prompts(
    questions: Sequence[Question], documents: Sequence[str], count: int, seed: int = 0,
    mix: dict[str, float] | None = None,
) -> tuple[list[ChatPrompt], ChatMix]:
    """``count`` conversations in the proportions of ``mix`` (deterministic for a seed).

    ``questions`` and ``documents`` must be training-side data (:func:`load_training_questions`,
    ``Corpus.train``); a held-out one is refused, so no evaluation text can slip in. Without
    questions (a user's own ``--data``) the question kinds' share goes to the other kinds.
    """
    if count < 1:
        raise ConversionError(f"the number of chat prompts must be positive, got {count}")
    if not documents:
        raise ConversionError("chat prompts need training documents; none were given")
    mix = dict(mix or DEFAULT_MIX)
    if not questions:
        mix = {k: v for k, v in mix.items() if k not in QUESTION_KINDS}
    leaked = [q.question for q in questions if not is_training_question(q)][:1] + \
        [d[:60] for d in documents if is_held_out(split_key(d))][:1]
    if leaked:
        raise ConversionError(f"held-out text given to the chat prompt builder: {leaked[0]!r}")
    rng = random.Random(seed)
    plan = [k for k, n in _kind_counts(count, mix).items() for _ in range(n)]
    first_kinds = [k for k in KINDS[:4] if questions or k not in QUESTION_KINDS]
    rng.shuffle(plan)
    prompts: list[ChatPrompt] = []
    mix_record = ChatMix(kinds=dict(Counter(plan)))
    sources: Counter = Counter()
    for kind in plan:
        first_kind = rng.choice(first_kinds) if kind == "multi_turn" else kind
        text, source = _first_turn(first_kind, rng, questions, documents)
        sources[source] += 1
        messages = []
        if rng.random() < CUSTOM_SYSTEM_SHARE:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            mix_record.custom_system += 1
        messages.append({"role": "user", "content": text})
        follow_up = rng.choice(FOLLOW_UPS) if kind == "multi_turn" else None
        prompts.append(ChatPrompt(kind, messages, follow_up))
    mix_record.sources = dict(sources)
    return prompts, mix_record


def continuation_prompts(documents: Sequence[str], count: int, seed: int = 0, chars: int = 200) -> list[str]:
    """For a base model (no chat template): the openings of ``count`` random documents, to be continued."""
    if not documents:
        raise ConversionError("continuation prompts need documents; none were given")
    rng = random.Random(seed)
    return [documents[rng.randrange(len(documents))].strip()[:chars] for _ in range(count)]
