"""Instruction data: reading chat/instruction records, making requests from stories, and scoring how well a
model follows them.

Records (one JSON object per line of a .jsonl file) come in three kinds, told apart by their keys:

    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   a conversation (chat)
    {"prompt": ..., "response": ...}  (optional "system")                       one exchange (chat)
    {"text": ...} / {"story": ...} / a JSON string                              plain text

`read_jsonl` reads a whole file as one kind (set by its first good line), keeping each line's number so a
malformed line is reported where it is. `read_documents` reads the plain-text documents of any data file
(.jsonl, a .json list, or text), for `babyllama data` and `babyllama eval` alike.

`make_instructions` turns stories into requests in the spirit of TinyStories-Instruct, without any outside
model: the topic (a character, "a cat named Tom", or the story's most frequent noun) and three required
words are taken from the story itself, and the request is phrased by one of many templates, so a model
learns the request and not one sentence. The words are ones a story uses rarely (in at most MAX_WORD_DF of
the corpus' stories), so a model that ignores the request seldom uses them by chance.

`score_instructions` is `babyllama eval --instruct`: greedy replies to held-out requests, the share of
requested words that appear in them (whole words, any case) and the share of replies that mention the
requested topic (every word of `topic_words`).
"""

from __future__ import annotations

import codecs
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, cast

from . import safeio
from .chat_template import check_messages
from .documents import iter_documents
from .errors import BabyLlamaError, say

# ------------------------------------------------------------------------------------------------ records

CHAT, TEXT = "chat", "text"


def record_kind(item: object) -> str:
    """CHAT or TEXT by the record's keys; ValueError for anything else."""
    if isinstance(item, str):
        return TEXT
    if not isinstance(item, dict):
        raise ValueError("expected a JSON object (or a string)")
    if "messages" in item or "prompt" in item or "response" in item:
        return CHAT
    if isinstance(item.get("text"), str) or isinstance(item.get("story"), str):
        return TEXT
    raise ValueError('expected "messages", "prompt"/"response", or a "text"/"story" field')


def record_messages(item: dict) -> list[dict]:
    """A chat record as a checked conversation ending with an assistant reply; ValueError if malformed."""
    if "messages" in item:
        ignored = [key for key in ("system", "prompt", "response") if key in item]
        if ignored:  # read as well, they would be silently dropped
            raise ValueError(f'"messages" holds the whole conversation: a record with it takes no "{ignored[0]}" '
                             '(a system prompt is its first message, {"role": "system", ...})')
        messages = item["messages"]
    else:
        if not isinstance(item.get("prompt"), str) or not isinstance(item.get("response"), str):
            raise ValueError('"prompt" and "response" must both be strings')
        messages = [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["response"]}]
        if item.get("system"):
            messages.insert(0, {"role": "system", "content": item["system"]})
    try:
        check_messages(messages, generation=False)
    except BabyLlamaError as e:
        raise ValueError(str(e)) from None
    return messages


def record_text(item: str | dict) -> str:
    return item if isinstance(item, str) else item["text"] if isinstance(item.get("text"), str) else item["story"]


@dataclass
class JsonlFile:
    kind: str  # CHAT or TEXT
    items: list[tuple[int, object]]  # (line number, messages or text)
    records: list[dict]  # the raw objects of CHAT lines (eval --instruct reads their words/topic), else []
    bad: list[tuple[int, str]]  # (line number, reason) of every malformed line


def read_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False, skippable: bool = True,
               allow_empty: bool = False, defer_bad: bool = False) -> JsonlFile:
    """Every record of a .jsonl file. Malformed lines (bad JSON, an unknown role, a plain-text record in a chat
    file, ...) stop here with one line naming them, unless `skip_bad_lines` (the caller reports `bad`), or unless
    `defer_bad` and the file has records (the caller reports `bad` with its own findings, or skips them); the line
    points at --skip-bad-lines where the command has it (`skippable`). A file without a record is an error
    unless `allow_empty` (kind ""): a caller with other files may skip it."""
    path = Path(path)
    out = JsonlFile("", [], [], [])
    # lines end at "\n" only: a JSON string may hold U+2028, \x85 or \x0c, which str.splitlines() splits at;
    # a byte-order mark (Windows editors write one) before the first line is no part of it
    data = safeio.read_bytes(path, "data file")  # a regular file only
    lines = data.removeprefix(codecs.BOM_UTF8).split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.bad.append((lineno, f"not UTF-8 text (byte {e.start + 1} of the line)"))
            continue
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if safeio.has_lone_surrogate(item):
                raise ValueError(safeio.LONE_SURROGATE)
            kind = record_kind(item)
            if out.kind and kind != out.kind:
                raise ValueError(f"a {kind} record in a file of {out.kind} records (line "
                                 f"{out.items[0][0]} set the kind)")
            value = record_messages(item) if kind == CHAT else record_text(item)
        except json.JSONDecodeError as e:
            out.bad.append((lineno, f"invalid JSON ({e.msg})"))
            continue
        except RecursionError:
            out.bad.append((lineno, "JSON nested too deeply"))
            continue
        except ValueError as e:
            out.bad.append((lineno, str(e)))
            continue
        out.kind = out.kind or kind
        out.items.append((lineno, value))
        if kind == CHAT:
            out.records.append(item)
    if out.bad and not skip_bad_lines and not (defer_bad and out.items):
        raise BabyLlamaError(describe_bad_lines(path, out.bad) + (" (fix them, or pass --skip-bad-lines)"
                                                                   if skippable else " (fix them)"))
    if not out.items and not allow_empty:
        raise BabyLlamaError(f"{describe_bad_lines(path, out.bad)}, and no record besides" if out.bad else
                             f"{path}: no records (an empty dataset)")
    return out


def describe_bad_lines(path: str | os.PathLike, bad: Sequence[tuple[int, str]], show: int = 3) -> str:
    """One line: how many lines are malformed, and the first few with their reasons."""
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:show])
    more = f"; and {len(bad) - show} more" if len(bad) > show else ""
    return f"{path}: {len(bad)} malformed line{'s' if len(bad) > 1 else ''}: {shown}{more}"


# ------------------------------------------------------------------------------------------------ making

MAX_WORD_DF = 0.05  # required words occur in at most this share of the corpus' stories...
MIN_WORD_DF = 3  # ...and in at least this many (real words, not typos)
N_WORDS = 3

# words too common or too empty to ask for (pronouns, auxiliaries, connectives, story formulas)
STOPWORDS = frozenset("""
a about above after again all almost also always am an and any are around as at away back be because been
before being below best better between big both but by came can can't could couldn't day did didn't do does
doesn't don't done down each even ever every everyone everything far felt few find first for found from gave get
gets getting give go goes going gone good got had has have having he her here hers herself him himself his how
i i'm if in into is it it's its itself just know knew last later let let's like little lived long look looked
lot made make many may me more most much must my myself named near never new next nice no not now of off oh
old on once one only or other others our out over own put ran really right said saw say says see seen she so
some something soon still such sure take than thank thanks that that's the their them then there they thing
things think this those thought through time to together told too took two under until up upon us very want
wanted was wasn't way we well went were what when where which while who why will with won't would yes yet you
your yours
""".split())
ADJECTIVES = frozenset("""
little big small young old tiny kind happy brave nice good sad shy smart funny pretty red blue green yellow
white black brown pink purple orange fluffy furry friendly curious lazy busy special new bright dark fast slow
""".split())
GENERIC_NOUNS = frozenset("time day end way lot thing things moral idea name kind part".split())
DETERMINERS = frozenset("a an the his her their my your its".split())

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_TOKEN = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|[.,!?;:]")
_CHARACTER = re.compile(r"\b(?:a|an)\s+(?:(?:[a-z]+)\s+)?([a-z]+)\s+named\s+([A-Z][a-z]+)\b")

BOTH = [
    "Write a story about {topic} that uses the words {words}.",
    "Tell me a story about {topic}. Use the words {words}.",
    "Can you write a short story about {topic}? Please include the words {words}.",
    "Write a short story about {topic}. It should contain the words {words}.",
    "I would like a story about {topic} with the words {words} in it.",
    "Make up a story about {topic}, and use these words: {words}.",
    "Please tell me a story about {topic} that has the words {words}.",
    "Write a story for kids about {topic}. Words to use: {words}.",
    "Use the words {words} in a story about {topic}.",
    "Write a story. It is about {topic} and includes the words {words}.",
    "Could you tell a story about {topic}? Include {words}.",
    "I want a bedtime story about {topic}. Put the words {words} in it.",
]
TOPIC_ONLY = [
    "Tell me a story about {topic}.",
    "Write a story about {topic}.",
    "Can you tell me a story about {topic}?",
    "I want a story about {topic}.",
    "Please write a short story about {topic}.",
]
WORDS_ONLY = [
    "Write a story that uses the words {words}.",
    "Tell me a story with the words {words}.",
    "Make up a story using {words}.",
    "Write a short story. Include the words {words}.",
]
SHARE_BOTH, SHARE_TOPIC_ONLY = 0.8, 0.1  # the rest ask for words only


@dataclass
class Topic:
    text: str  # as the request says it: "a cat named Tom", "a kite"
    words: list[str]  # what a reply must mention: ["cat", "Tom"], ["kite"]


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def find_topic(story: str) -> Topic | None:
    """A character introduced as "a <noun> named <Name>", else the noun most often seen as "the <noun>" before
    a full stop, comma or function word ("the tree was", "a ball."; twice at least), else None."""
    m = _CHARACTER.search(story)
    if m and m.group(1) not in STOPWORDS and m.group(1) not in ADJECTIVES:
        noun, name = m.groups()
        return Topic(f"{article(noun)} {noun} named {name}", [noun, name])
    tokens = [t.lower() for t in _TOKEN.findall(story)]
    nouns: Counter[str] = Counter()
    for prev, word, after in zip(tokens, tokens[1:], tokens[2:] + ["."]):
        if (prev in DETERMINERS and (after in STOPWORDS or not after[0].isalpha()) and word[0].isalpha()
                and word not in STOPWORDS and word not in ADJECTIVES and word not in GENERIC_NOUNS):
            nouns[word] += 1
    if not nouns:
        return None
    noun, count = nouns.most_common(1)[0]
    if count < 2:
        return None
    plural = noun.endswith("s") and not noun.endswith("ss")
    return Topic(noun if plural else f"the {noun}", [noun])


def article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def document_frequencies(stories: Iterable[str]) -> tuple[Counter, int]:
    """How many stories use each lowercase word, and how many stories there are."""
    df: Counter[str] = Counter()
    n = 0
    for story in stories:
        df.update({w for w in words_of(story) if w.islower()})
        n += 1
    return df, n


def pick_words(story: str, df: Counter, n_stories: int, exclude: Iterable[str], rng: random.Random,
               k: int = N_WORDS, max_df: float = MAX_WORD_DF, first: int = 0) -> list[str]:
    """k distinct words of the story that the corpus uses rarely (in at most `max_df` of its stories), in
    story order; with `first`, drawn from the first `first` such words only (the story's opening uses them)."""
    excluded = {stem(w.lower()) for w in exclude}
    seen, candidates = set(excluded), []
    for w in words_of(story):
        if (w.islower() and stem(w) not in seen and w not in STOPWORDS and len(w) >= 3 and "'" not in w
                and MIN_WORD_DF <= df[w] <= max_df * n_stories):
            seen.add(stem(w))  # one form of a word: not both "book" and "books"
            candidates.append(w)
    if first:
        candidates = candidates[:max(first, k)]
    if len(candidates) < k:
        return []
    chosen = set(rng.sample(candidates, k))
    return [w for w in candidates if w in chosen]


def stem(word: str) -> str:
    """A crude stem (walks, walked, walking -> walk), only to keep two forms of one word out of a request."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def format_words(words: Sequence[str], rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return ", ".join(words)
    if style == 1:
        return ", ".join(words[:-1]) + " and " + words[-1]
    return ", ".join(f'"{w}"' for w in words[:-1]) + f' and "{words[-1]}"'


def make_request(topic: Topic | None, words: list[str], rng: random.Random) -> tuple[str, Topic | None, list[str]]:
    """A request (and what it asks for: topic or None, words or []) in one of the phrasings."""
    roll = rng.random()
    if topic and words and roll < SHARE_BOTH:
        return rng.choice(BOTH).format(topic=topic.text, words=format_words(words, rng)), topic, words
    if topic and (not words or roll < SHARE_BOTH + SHARE_TOPIC_ONLY):
        return rng.choice(TOPIC_ONLY).format(topic=topic.text), topic, []
    if words:
        return rng.choice(WORDS_ONLY).format(words=format_words(words, rng)), None, words
    raise ValueError("a request needs a topic or words")


def instruction_record(story: str, df: Counter, n_stories: int, rng: random.Random,
                       max_df: float = MAX_WORD_DF, first: int = 0) -> dict | None:
    """One training/eval record for `story`: the request, the story as the reply, and what was asked."""
    topic = find_topic(story)
    words = pick_words(story, df, n_stories, topic.words if topic else (), rng, max_df=max_df, first=first)
    if topic is None and not words:
        return None
    request, topic, words = make_request(topic, words, rng)
    return exchange(request, story, topic, words)


def exchange(request: str, reply: str, topic: Topic | None, words: list[str]) -> dict:
    """A record: the request and its reply, with what the request asks for (what eval --instruct scores)."""
    return {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": reply}],
            "topic": topic.text if topic else None, "topic_words": topic.words if topic else [], "words": words}


def check_settings(val_count: int, dev_count: int, per_story: int, first: int) -> None:
    """make_instructions' settings that need no story to check (said before any story is read)."""
    if val_count < 0 or dev_count < 0 or per_story < 1:
        raise BabyLlamaError("--val-count and --dev-count must be >= 0 and --per-story >= 1")
    if first < 0:
        raise BabyLlamaError("--early-words must be >= 0 (0: words from anywhere in the story)")


def make_instructions(stories: Sequence[str], val_count: int, seed: int = 0, per_story: int = 1,
                      fits: Callable[[dict], bool] | None = None,
                      max_df: float = MAX_WORD_DF, first: int = 0, dev_count: int = 0,
                      on_story: Callable[[int], object] | None = None,
                      ) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(train records, held-out records, dev records, counts). Stories are split first (a seeded shuffle; the held-out
    stories never appear in training), then each training story gets `per_story` requests (their words and
    phrasing drawn anew), each held-out story one. `fits(record)` drops records longer than a model's context.
    The next `dev_count` stories of the shuffle are held out as the dev split, one request each: the split to
    choose settings on, so that the held-out one stays for reporting. The held-out records do not depend on
    `dev_count` (they are drawn first). `on_story(1)` after each story (a progress bar's update)."""
    check_settings(val_count, dev_count, per_story, first)
    if val_count + dev_count >= len(stories):
        raise BabyLlamaError(f"--val-count {val_count} and --dev-count {dev_count} leave no training stories (there "
                             f"are {len(stories)})")
    df, n = document_frequencies(stories)
    rng = random.Random(seed)
    order = list(range(len(stories)))
    rng.shuffle(order)
    counts = {"stories": len(stories), "no_request": 0, "too_long": 0}
    splits: dict[str, list[dict]] = {"val": [], "dev": [], "train": []}
    for rank, i in enumerate(order):
        split = "val" if rank < val_count else "dev" if rank < val_count + dev_count else "train"
        for _ in range(per_story if split == "train" else 1):
            record = instruction_record(stories[i], df, n, rng, max_df, first)
            if record is None:
                counts["no_request"] += 1
            elif fits is not None and not fits(record):
                counts["too_long"] += 1
            else:
                splits[split].append(record)
        if on_story is not None:
            on_story(1)
    counts.update(train=len(splits["train"]), val=len(splits["val"]), dev=len(splits["dev"]))
    return splits["train"], splits["val"], splits["dev"], counts


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    path = safeio.output_file(path)
    with safeio.atomic_write(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ scoring


def uses_word(text: str, word: str) -> bool:
    """`word` appears in `text` as a whole word, in any case: not inside a longer one ("brain", "rained") nor
    after a letter and an apostrophe ("o'clock" holds no "clock"), but in single quotes ('rain') as in double."""
    return re.search(rf"(?<![A-Za-z])(?<![A-Za-z]'){re.escape(word)}(?![A-Za-z])", text, re.IGNORECASE) is not None


@dataclass
class InstructScore:
    requests: int = 0
    words_requested: int = 0
    words_used: int = 0
    all_words: int = 0  # replies that used every requested word (of requests that asked for words)
    word_requests: int = 0
    topic_requests: int = 0
    topic_hits: int = 0
    finished: int = 0  # replies that ended with EOS (the rest ran into the context or the token limit)
    reply_tokens: int = 0
    samples: list[dict] = field(default_factory=list)

    @property
    def word_share(self) -> float:
        return self.words_used / self.words_requested if self.words_requested else float("nan")

    @property
    def topic_share(self) -> float:
        return self.topic_hits / self.topic_requests if self.topic_requests else float("nan")

    @property
    def all_words_share(self) -> float:
        return self.all_words / self.word_requests if self.word_requests else float("nan")

    def add(self, request: str, reply: str, words: Sequence[str], topic_words: Sequence[str], eos: bool,
            n_tokens: int) -> None:
        self.requests += 1
        used = [w for w in words if uses_word(reply, w)]
        if words:
            self.word_requests += 1
            self.words_requested += len(words)
            self.words_used += len(used)
            self.all_words += len(used) == len(words)
        topic_hit = None
        if topic_words:
            self.topic_requests += 1
            topic_hit = all(uses_word(reply, w) for w in topic_words)
            self.topic_hits += topic_hit
        self.finished += eos
        self.reply_tokens += n_tokens
        self.samples.append({"request": request, "reply": reply, "words": list(words), "used": used,
                             "topic_words": list(topic_words), "topic_hit": topic_hit})

    def to_dict(self, samples: int = 0) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "samples"}
        shares = dict(word_share=self.word_share, topic_share=self.topic_share, all_words_share=self.all_words_share,
                      mean_reply_tokens=self.reply_tokens / self.requests if self.requests else float("nan"))
        d.update({k: None if math.isnan(v) else v for k, v in shares.items()})  # JSON has no NaN: null, none asked
        if samples:
            d["samples"] = self.samples[:samples]
        return d


class Request(NamedTuple):
    """A request to score: its messages up to the first reply, the words and topic words it asks for, and where
    it was read (FILE:LINE)."""

    messages: list[dict]
    words: list
    topic_words: list
    where: str


def eval_requests(path: str | os.PathLike, max_examples: int | None = None) -> list[Request]:
    """The requests of an instruction file (`babyllama data instruct` writes them: "words" and "topic_words"
    beside "messages")."""
    data = read_jsonl(path, skippable=False)  # `eval --instruct` scores every record it is given
    if data.kind != CHAT:
        raise BabyLlamaError(f"{path}: plain-text records; --instruct needs instruction records "
                             "(babyllama data instruct makes them)")
    out = []
    for (lineno, messages), record in zip(data.items, data.records):
        words, topic_words = record.get("words") or [], record.get("topic_words") or []
        if not (isinstance(words, list) and isinstance(topic_words, list)
                and all(isinstance(w, str) for w in words + topic_words)):
            raise BabyLlamaError(f"{path}:{lineno}: \"words\" and \"topic_words\" must be lists of strings")
        if not words and not topic_words:
            raise BabyLlamaError(f"{path}:{lineno}: nothing to score: the record has no \"words\" or \"topic_words\"")
        chat = cast("list[dict]", messages)  # chat records: lists of messages
        first_reply = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
        out.append(Request(chat[:first_reply], words, topic_words, f"{path}:{lineno}"))
        if max_examples and len(out) >= max_examples:
            break
    return out


def score_instructions(model, requests: Sequence[Request], max_new_tokens: int | None = None,
                       batch_size: int = 16, show_progress: bool = True) -> InstructScore:
    """Greedy replies of `model` (an api.Model) to each request, scored (see the module docstring); every request
    is checked to leave room for a reply before any is answered."""
    from .chat_template import encode_chat
    from .generate import generate_batch
    from .progress import progress_bar
    from .sampler import Sampler
    from .tokenizer import BOS, EOS

    tok, seq_len = model.tokenizer, model.args.max_seq_len
    score = InstructScore()
    all_prompts = [encode_chat(tok, r.messages)[0] for r in requests]
    for r, p in zip(requests, all_prompts):
        if len(p) >= seq_len:
            raise BabyLlamaError(f"{r.where}: a request of {len(p)} tokens leaves no room for a reply in the "
                                 f"context of {seq_len}")
    with progress_bar(total=len(requests), desc="instruct", disable=not show_progress) as bar:
        for start in range(0, len(requests), batch_size):
            chunk, prompts = requests[start:start + batch_size], all_prompts[start:start + batch_size]
            seqs = generate_batch(model.engine, prompts, seq_len, [Sampler(0.0) for _ in prompts],
                                  stop_ids=(EOS, BOS), max_new=max_new_tokens)
            for (messages, words, topic_words, _), p, seq in zip(chunk, prompts, seqs):
                reply = tok.decode_text(seq.generated, p[-1]).strip()
                score.add(messages[-1]["content"], reply, words, topic_words, seq.stop_reason == "stop",
                          len(seq.generated))
            bar.update(len(chunk))
    return score


def _doc_text(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("text", "story"):
            if isinstance(item.get(key), str):
                return item[key]
        if not {"messages", "prompt", "response"}.isdisjoint(item):  # a chat record: a .json list holds documents
            raise BabyLlamaError(f"{where}: a chat record in a .json file: chat data is read from .jsonl files, one "
                                 "conversation per line")
    raise BabyLlamaError(f"{where}: expected a string or an object with a \"text\" or \"story\" field")


def read_documents(path: Path, skip_bad_lines: bool = False,
                   on_bytes: Callable[[int], object] | None = None, skippable: bool = True) -> Iterator[str]:
    """The documents of one file (.jsonl, .json, else text: documents.iter_documents), stripped of surrounding
    whitespace, empty ones skipped; malformed .jsonl lines refused, or skipped with a count. `on_bytes`: as
    iter_documents (a .jsonl or .json file, read whole first, shares its size out evenly over its documents as
    they are handed on); `skippable`: as read_jsonl."""
    docs: Iterable[str]
    try:
        if path.suffix == ".jsonl":
            data = read_jsonl(path, skip_bad_lines, skippable)
            if data.kind == CHAT:
                raise BabyLlamaError(f"{path}: chat records, not plain text")
            if data.bad:
                say(f"skipped {describe_bad_lines(path, data.bad)}")
            docs = [cast(str, text) for _, text in data.items]  # TEXT records: strings
        elif path.suffix == ".json":
            data = safeio.read_json(path, "data file", max_bytes=None, expect=list)
            docs = [_doc_text(item, f"{path}[{i}]") for i, item in enumerate(data)]
        else:
            docs = iter_documents(path, on_bytes)
    except UnicodeDecodeError:
        raise BabyLlamaError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BabyLlamaError(f"{path}: invalid JSON: {e}") from None
    shares = even_shares(path.stat().st_size, len(docs)) if isinstance(docs, list) and on_bytes else None
    for k, doc in enumerate(docs):
        doc = doc.strip()
        if doc:
            yield doc
        if shares is not None and on_bytes is not None:
            on_bytes(shares[k])


def even_shares(total: int, n: int) -> list[int]:
    """`total` cut into n whole parts that differ by at most one and add up to it (a file's bytes shared out over
    its documents, for a progress bar)."""
    return [total * (k + 1) // n - total * k // n for k in range(n)]
