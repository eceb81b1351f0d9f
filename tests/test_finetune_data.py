"""Fine-tuning data: chat/instruction records, the mask shard beside the token shard, `babyllama data instruct`
and the instruction-following score (`eval --instruct`)."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from conftest import ROOT, byte_tokenizer, make_story_corpus, random_weights, run_cli, tiny_args

from babyllama import formats
from babyllama.chat_template import encode_chat
from babyllama.errors import BabyLlamaError
from babyllama.instruct import (
    BOTH,
    TEXT,
    InstructScore,
    document_frequencies,
    find_topic,
    make_instructions,
    pick_words,
    read_jsonl,
    uses_word,
)
from babyllama.tokenizer import EOS


def write_lines(path, *lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------------ records


def test_records_are_told_apart_by_their_keys(tmp_path):
    chat = write_lines(tmp_path / "chat.jsonl",
                       {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                       "",
                       {"prompt": "p", "response": "r", "system": "s"})
    data = read_jsonl(chat)
    assert data.kind == "chat" and [n for n, _ in data.items] == [1, 3]
    assert data.items[1][1] == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"},
                                {"role": "assistant", "content": "r"}]
    text = write_lines(tmp_path / "text.jsonl", {"text": "a"}, '"b"', {"story": "c"})
    assert read_jsonl(text).kind == "text" and [t for _, t in read_jsonl(text).items] == ["a", "b", "c"]


def test_jsonl_lines_end_at_newlines_only_after_any_byte_order_mark(tmp_path):
    """JSON strings may hold U+2028, \\x85 and \\x0c raw: they are no line ends, nor is a leading BOM text."""
    path = tmp_path / "d.jsonl"
    texts = ["one\u2028two", "form\x0cfeed \x85 next", "plain"]
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    data = read_jsonl(path)
    assert data.kind == TEXT and not data.bad and [text for _, text in data.items] == texts
    assert [n for n, _ in data.items] == [1, 2, 3]


def test_malformed_lines_are_reported_with_their_numbers_or_skipped(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl",
                       {"prompt": "p", "response": "r"},
                       "{not json",
                       {"messages": [{"role": "bot", "content": "x"}]},
                       {"text": "plain text in a chat file"},
                       {"messages": [{"role": "user", "content": "question without a reply"}]},
                       {"prompt": "p", "response": 3},
                       {"prompt": "p2", "response": "r2"})
    with pytest.raises(BabyLlamaError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert "\n" not in msg and "5 malformed lines" in msg and "--skip-bad-lines" in msg
    assert "line 2: invalid JSON" in msg and "line 3: message 0 has unknown role 'bot'" in msg
    assert "line 4: a text record in a file of chat records" in msg and "and 2 more" in msg
    data = read_jsonl(path, skip_bad_lines=True)
    assert [n for n, _ in data.items] == [1, 7] and [n for n, _ in data.bad] == [2, 3, 4, 5, 6]
    assert "must end with an assistant message" in dict(data.bad)[5] and "must both be strings" in dict(data.bad)[6]
    write_lines(tmp_path / "empty.jsonl", "", "")
    with pytest.raises(BabyLlamaError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_chat_records_in_a_json_list_are_pointed_to_jsonl(tmp_path):
    from babyllama.instruct import read_documents

    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}]}]))
    with pytest.raises(BabyLlamaError, match=r"chat.json\[0\]: a chat record in a .json file: chat data is read from "
                                             r".jsonl files, one conversation per line"):
        list(read_documents(path))
    path.write_text(json.dumps([{"title": "no text"}]))
    with pytest.raises(BabyLlamaError, match=r"chat.json\[0\]: expected a string or an object with a \"text\""):
        list(read_documents(path))


def test_a_messages_record_with_a_system_or_prompt_key_beside_is_malformed(tmp_path):
    """A top-level "system" (or "prompt"/"response") beside "messages" would be dropped unseen."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_lines(tmp_path / "chat.jsonl", {"messages": turns, "words": ["hello"]},
                       {"system": "Be kind.", "messages": turns}, {"messages": turns, "prompt": "Hi"})
    data = read_jsonl(path, skip_bad_lines=True)
    assert [n for n, _ in data.items] == [1] and [n for n, _ in data.bad] == [2, 3]
    assert 'a record with it takes no "system" (a system prompt is its first message' in dict(data.bad)[2]
    assert 'takes no "prompt"' in dict(data.bad)[3]


def test_a_json_escape_of_a_lone_surrogate_is_a_bad_line_not_a_traceback(tmp_path, capsys):
    """JSON may spell half a UTF-16 pair ("\\ud800"), which decodes to no character: written back as UTF-8 (data
    instruct, train-vocab's copy) or encoded for eval it was a UnicodeEncodeError. A pair stays a character."""
    from babyllama.cli import main
    from babyllama.instruct import read_documents

    path = write_lines(tmp_path / "s.jsonl", '{"text": "a smile \\ud83d\\ude00"}', '{"text": "half \\ud800 a pair"}',
                       {"prompt": "p \udfff", "response": "r"})
    data = read_jsonl(path, skip_bad_lines=True)
    assert [text for _, text in data.items] == ["a smile \U0001f600"]
    assert [n for n, _ in data.bad] == [2, 3] and "half a UTF-16 surrogate pair" in data.bad[0][1]
    (tmp_path / "s.json").write_text(json.dumps(["fine", {"story": "x \ud800"}]))
    with pytest.raises(BabyLlamaError, match=r"s.json: invalid JSON \(a \\u escape of half a UTF-16 surrogate pair"):
        list(read_documents(tmp_path / "s.json"))
    assert main(["data", "instruct", "--input", str(path), "--out-dir", str(tmp_path / "out")]) == 1
    assert "line 2: a \\u escape of half a UTF-16 surrogate pair" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ shards


def two_turn():
    return [{"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "A story?"}, {"role": "assistant", "content": "Once upon a time."}]


@pytest.mark.parametrize("case,message", [
    ("silent-mask", "conversation 2 has no reply token (a mask weight above 0) to learn"),
    ("first-weighed", "conversation 2's first token has the mask weight 1, not 0"),
    ("empty", "conversation 2 has 0 tokens, nothing to learn"),
])
def test_a_chat_shard_whose_conversations_have_nothing_to_learn_is_refused(tmp_path, case, message):
    """A mask without a reply token in a conversation (a batch of only such had no loss to average:
    ZeroDivisionError mid-training), one weighing a first token, or an index with an empty conversation (a
    negative batch width) is a torn or foreign shard, refused when the data is opened."""
    from babyllama.train.data import open_split, pretokenize

    byte_tokenizer(300).save(tmp_path / "tok.bin")
    write_lines(tmp_path / "chat.jsonl", *({"prompt": f"Say {w}", "response": w} for w in ("a", "b", "c", "d")))
    pretokenize(tmp_path / "chat.jsonl", tmp_path / "tok.bin", tmp_path / "out", workers=1)
    mask = np.fromfile(tmp_path / "out" / "chat.mask", dtype=np.uint8)
    offsets = np.fromfile(tmp_path / "out" / "chat.idx", dtype=np.int64)
    open_split(tmp_path / "out", "train", seq_len=64)  # as written: fine
    if case == "empty":
        np.insert(offsets, 1, offsets[1]).tofile(tmp_path / "out" / "chat.idx")
    elif case == "silent-mask":
        mask[offsets[1]:offsets[2]] = 0
    else:
        mask[offsets[1]] = 1
    mask.tofile(tmp_path / "out" / "chat.mask")
    with pytest.raises(BabyLlamaError) as e:
        open_split(tmp_path / "out", "train", seq_len=64)
    assert str(e.value) == f"{tmp_path / 'out' / 'chat.bin'}: {message}" + (
        " (a torn or foreign index?)" if case == "empty" else " (a torn or foreign mask?)")


def test_mask_marks_exactly_the_assistant_tokens_of_a_two_turn_conversation(tmp_path):
    from babyllama.train.data import open_split, pretokenize

    torch = pytest.importorskip("torch")
    tok = byte_tokenizer(300)
    tok.save(tmp_path / "tok.bin")
    # the four parts, encoded by hand as the template lays them out
    turn1 = tok.encode("[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi there [/INST]", bos=True)
    reply1 = tok.encode("Hello! ", bos=False) + [EOS]  # Meta's reference closes a reply with a space, then EOS
    turn2 = tok.encode("[INST] A story? [/INST]", bos=True)
    reply2 = tok.encode("Once upon a time. ", bos=False) + [EOS]
    ids = turn1 + reply1 + turn2 + reply2
    a, b, c = len(turn1), len(turn1) + len(reply1), len(turn1) + len(reply1) + len(turn2)
    assert encode_chat(tok, two_turn(), generation=False) == (ids, [0] * a + [1] * (b - a) + [0] * (c - b) +
                                                              [1] * (len(ids) - c))

    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "train.jsonl", {"messages": two_turn()}, {"prompt": "Short?", "response": "Yes."})
    write_lines(src / "val.jsonl", {"messages": two_turn()})
    meta = pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1)
    assert meta["kind"] == "chat" and meta["conversations"] == 3
    assert meta["shards"] == {"train": ["train.bin"], "val": ["val.bin"]}
    mask = np.fromfile(tmp_path / "out" / "train.mask", dtype=np.uint8)
    offsets = np.fromfile(tmp_path / "out" / "train.idx", dtype=np.int64)
    assert np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)[:len(ids)].tolist() == ids
    assert offsets.tolist()[:2] == [0, len(ids)] and len(mask) == offsets[-1]

    examples = open_split(tmp_path / "out", "val", seq_len=len(ids) - 1)
    x, y, _ = examples.batch(np.array([0]), torch.device("cpu"))
    assert x[0].tolist() == ids[:-1]
    # the target at position t is token t+1, kept only where token t+1 belongs to a reply (or its EOS)
    learned = [t for t in range(len(ids) - 1) if y[0, t] != -1]
    assert learned == list(range(a - 1, b - 1)) + list(range(c - 1, len(ids) - 1))
    assert all(int(y[0, t]) == ids[t + 1] for t in learned)

    # conversations of different lengths share a batch: padded inputs, ignored targets
    train = open_split(tmp_path / "out", "train", seq_len=len(ids) - 1)
    x, y, _ = train.batch(np.array([1, 0]), torch.device("cpu"))
    short = len(encode_chat(tok, [{"role": "user", "content": "Short?"},
                                  {"role": "assistant", "content": "Yes."}], generation=False)[0])
    assert x.shape == (2, len(ids) - 1) and (y[0, short - 1:] == -1).all() and (x[0, short - 1:] == 0).all()
    with pytest.raises(BabyLlamaError, match="more than the context holds"):
        open_split(tmp_path / "out", "val", seq_len=len(ids) - 2)


def test_requested_words_weigh_exactly_their_reply_tokens(tmp_path):
    from babyllama.train.data import open_split, pretokenize, weigh_words

    torch = pytest.importorskip("torch")
    tok = byte_tokenizer(300)
    tok.save(tmp_path / "tok.bin")
    reply = "Play in the rain. We were playing, then rain fell on the play."
    messages = [{"role": "user", "content": "Use play and rain."}, {"role": "assistant", "content": reply}]
    ids, mask = encode_chat(tok, messages, generation=False)
    start = mask.index(1)
    # the first whole-word use of each word with the space before it (the reply is encoded after a space, as
    # sentencepiece does; "Play" capitalized counts, "playing" does not), found in the text, not the tokens
    spans = [next(re.finditer(rf" (?:{w})(?![a-z])", " " + reply)).span() for w in ("[Pp]lay", "[Rr]ain")]
    assert spans == [(0, 5), (12, 17)]
    chars = [tok.token_bytes(0, t).decode() for t in ids[start:-1]]
    assert "".join(chars) == " " + reply + " "  # Meta's reference closes a reply with a space before EOS
    bounds = np.cumsum([0] + [len(c) for c in chars])
    expected = list(mask)
    for a, b in spans:
        for i in range(len(chars)):
            if bounds[i] < b and bounds[i + 1] > a:
                expected[start + i] = 7
    weighted = weigh_words(tok, ids, mask, ["play", "rain"], 7)
    assert weighted == expected and weighted.count(7) > 0 and weighted[:start] == [0] * start
    assert weigh_words(tok, ids, [0] * len(ids), ["play"], 7) == [0] * len(ids)  # never outside a reply

    # pretokenized: the weights are the mask bytes, and the batch hands them to the loss (targets shifted)
    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "train.jsonl", {"messages": messages, "words": ["play"], "topic_words": ["rain"]})
    write_lines(src / "val.jsonl", {"messages": messages, "words": ["play", "rain"]})
    meta = pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1, word_weight=7)
    assert meta["word_weight"] == 7
    assert np.fromfile(tmp_path / "out" / "train.mask", dtype=np.uint8).tolist() == expected
    x, y, w = open_split(tmp_path / "out", "train", seq_len=len(ids)).batch(np.array([0]), torch.device("cpu"))
    assert w is not None and w[0].tolist() == [float(v) for v in expected[1:]]
    assert [t for t in range(len(ids) - 1) if y[0, t] != -1] == [t for t in range(len(ids) - 1) if expected[t + 1]]
    plain = pretokenize(src, tmp_path / "tok.bin", tmp_path / "plain", workers=1)
    assert open_split(tmp_path / "plain", "train", seq_len=len(ids)).batch(np.array([0]),
                                                                          torch.device("cpu"))[2] is None
    assert plain["word_weight"] == 1


def test_a_requested_word_after_a_quote_or_a_line_break_is_its_first_use():
    """The first use of a word need not follow a space: after a quote or at a paragraph's start it is the first
    use all the same (and "football" is no use of "ball")."""
    from babyllama.tokenizer import Tokenizer
    from babyllama.train.data import weigh_words

    tok = Tokenizer.load(ROOT / "babyllama" / "assets" / "tokenizer.bin")  # sentencepiece-style " word" pieces
    reply = 'The football flew.\nBall games are fun. "Stop!" said Tom. He threw the ball. Stop.'
    messages = [{"role": "user", "content": "Use ball and stop."}, {"role": "assistant", "content": reply}]
    ids, mask = encode_chat(tok, messages, generation=False)
    weighted = weigh_words(tok, ids, mask, ["ball", "stop"], 9)
    spelled = [tok.piece_bytes(t) for t, w in zip(ids, weighted) if w == 9]
    assert b"".join(spelled) == b"BallStop", spelled  # the tokens of "Ball" after the line break, "Stop" after '"'
    first = weighted.index(9)
    assert b"".join(tok.piece_bytes(t) for t in ids[first - 2:first]).endswith(b".\n")


def test_weighted_loss_is_the_weighted_mean_of_the_targets_cross_entropy():
    torch = pytest.importorskip("torch")
    from babyllama.model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_args(vocab_size=64, max_seq_len=16)).eval()
    x = torch.randint(64, (2, 10))
    y = torch.randint(64, (2, 10))
    y[0, :3] = -1
    w = torch.rand(2, 10) * 5
    logits, plain = model(x, y)
    _, weighted = model(x, y, weights=w)
    _, ones = model(x, y, weights=torch.ones(2, 10))
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 64), y.view(-1), ignore_index=-1, reduction="none")
    keep = (y.view(-1) != -1).float()
    assert torch.allclose(weighted, (ce * w.view(-1) * keep).sum() / (w.view(-1) * keep).sum(), rtol=1e-6)
    assert torch.allclose(ones, plain, rtol=1e-6) and not torch.allclose(weighted, plain, rtol=1e-3)


def test_chat_pretokenize_refuses_mixed_inputs_and_long_conversations(tmp_path):
    pytest.importorskip("tqdm", reason="pretokenize shows its progress with tqdm (the train extra)")
    from babyllama.train.data import pretokenize

    tok = byte_tokenizer(300)
    tok.save(tmp_path / "tok.bin")
    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "chat.jsonl", {"messages": two_turn()}, {"prompt": "p", "response": "r"})
    (src / "story.txt").write_text("plain text\n")
    with pytest.raises(BabyLlamaError, match="mixes chat records .* with plain text"):
        pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1)
    (src / "story.txt").unlink()
    with pytest.raises(BabyLlamaError, match=r"1 malformed line: line 1: the conversation has \d+ tokens, more than "
                                             r"max_seq_len 29 \+ 1"):
        pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1, max_tokens=30)
    from conftest import recording_bar

    from babyllama.train import data as data_module

    updates: list[int] = []  # chat files show their progress too (minutes of silence on a large one)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data_module, "progress_bar", recording_bar(updates))
        meta = pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1, max_tokens=30,
                           skip_bad_lines=True)
    assert meta["conversations"] == 1 and updates == [-2, 2]  # both read, one then refused as too long
    with pytest.raises(BabyLlamaError, match="no conversations left"):
        pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1, max_tokens=3, skip_bad_lines=True)


def test_a_file_whose_every_line_is_skipped_is_left_out_beside_others(tmp_path, capsys):
    """--skip-bad-lines: a file left with nothing (every line malformed, or every conversation too long) is left
    out as an empty file is, with what was skipped said; only a dataset with nothing at all left is refused."""
    pytest.importorskip("tqdm", reason="pretokenize shows its progress with tqdm (the train extra)")
    from babyllama.train.data import pretokenize

    byte_tokenizer(300).save(tmp_path / "tok.bin")
    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "chat.jsonl", {"messages": two_turn()}, {"prompt": "p", "response": "r"})
    (src / "zz.jsonl").write_text("{bad\n")
    meta = pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1, skip_bad_lines=True)
    assert meta["conversations"] == 2 and meta["shards"]["train"] == ["chat.bin"]
    assert "skipped " in capsys.readouterr().err
    write_lines(src / "zz.jsonl", {"prompt": "p", "response": "word " * 200})  # too long for max_tokens 200
    meta = pretokenize(src, tmp_path / "tok.bin", tmp_path / "out2", workers=1, max_tokens=200, skip_bad_lines=True)
    assert meta["conversations"] == 2 and meta["shards"]["train"] == ["chat.bin"]
    (src / "chat.jsonl").write_text("{bad\n")
    (src / "zz.jsonl").write_text("[1, 2\n")
    with pytest.raises(BabyLlamaError, match="chat.jsonl: 1 malformed line: .*, and no record besides"):
        pretokenize(src, tmp_path / "tok.bin", tmp_path / "out3", workers=1, skip_bad_lines=True)


def test_a_single_conversation_without_a_validation_file_says_it_is_too_few(tmp_path):
    pytest.importorskip("tqdm", reason="pretokenize shows its progress with tqdm (the train extra)")
    from babyllama.train.data import open_split, pretokenize

    byte_tokenizer(300).save(tmp_path / "tok.bin")
    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "chat.jsonl", {"prompt": "p", "response": "r"})
    pretokenize(src, tmp_path / "tok.bin", tmp_path / "one", workers=1)
    for split in ("train", "val"):
        with pytest.raises(BabyLlamaError, match="1 conversation, too few to hold one out for validation: add more, "
                                                 "or a validation file"):
            open_split(tmp_path / "one", split, seq_len=96)
    write_lines(src / "chat.jsonl", {"prompt": "p", "response": "r"}, {"prompt": "q", "response": "s"})
    pretokenize(src, tmp_path / "tok.bin", tmp_path / "two", workers=1)
    assert [len(open_split(tmp_path / "two", split, seq_len=96)) for split in ("train", "val")] == [1, 1]


# ------------------------------------------------------------------------------------------------ instruct


def test_topics_and_words_come_from_the_story():
    story = ("Once upon a time, there was a little cat named Tom. Tom had a red ball. "
             "One day it began to rain and the ball rolled into a puddle. Tom was happy to splash.")
    topic = find_topic(story)
    assert topic.text == "a cat named Tom" and topic.words == ["cat", "Tom"]
    assert find_topic("The tree was tall. A bird sat on the tree. The tree, old and kind, gave shade.").words == \
        ["tree"]
    assert find_topic("Nothing here.") is None
    # the story's own words occur in 4 of 104 stories (rare enough to ask for; "happy" is in all of them)
    corpus = [story] + ["A ball began to roll in the rain puddle; a splash, then it rolled on. Happy."] * 3 + \
        ["Once upon a time there was a dog. The dog was happy."] * 100
    df, n = document_frequencies(corpus)
    words = pick_words(story, df, n, topic.words, random.Random(0))
    assert len(words) == 3 and all(uses_word(story, w) for w in words)
    assert not {"happy", "cat", "the", "was"} & set(words)  # common in the corpus, the topic, or function words
    # first=N: only the story's first N candidates (in order: ball, began, rain, rolled, splash)
    assert set(pick_words(story, df, n, topic.words, random.Random(0), k=5)) == {"ball", "began", "rain",
                                                                                   "rolled", "splash"}
    for seed in range(20):
        early = pick_words(story, df, n, topic.words, random.Random(seed), first=4)
        assert len(early) == 3 and set(early) <= {"ball", "began", "rain", "rolled"}


def test_data_instruct_makes_a_held_out_split_with_varied_requests(tmp_path):
    corpus = make_story_corpus(tmp_path / "stories.txt", 400, seed=3)
    proc = run_cli("data", "instruct", "--input", str(corpus), "--out-dir", str(tmp_path / "ins"),
                   "--val-count", "40", "--model", str(_tiny_model(tmp_path)), "--max-word-df", "0.5")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"training and 40 held-out requests from 400 stories" in proc.stdout
    train = [json.loads(line) for line in (tmp_path / "ins" / "instruct_train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "ins" / "instruct_val.jsonl").read_text().splitlines()]
    assert len(val) == 40 and len(train) == 360
    for r in train + val:
        (user, assistant) = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        story = assistant["content"]
        assert r["words"] or r["topic_words"]
        assert all(uses_word(story, w) and w in user["content"] for w in r["words"])
        assert all(uses_word(story, w) for w in r["topic_words"])
        if r["topic"]:
            assert r["topic"] in user["content"]
    openings = {next(t for t in BOTH if r["messages"][0]["content"].startswith(t.split("{")[0])) for r in train
                if r["topic"] and r["words"]}
    assert len(openings) >= 8  # many phrasings of the same request


def test_held_out_stories_never_appear_in_training():
    names = [f"Rex{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(100)]
    stories = [f"Once upon a time there was a dog named {n}. {n} liked the garden. The garden was green."
               for n in names]
    seen: list[int] = []  # data instruct's progress bar: a story at a time (it ran for half a minute silent)
    train, val, dev, counts = make_instructions(stories, 10, seed=1, per_story=3, max_df=1.0, on_story=seen.append)
    assert counts == {"stories": 100, "no_request": 0, "too_long": 0, "train": 270, "val": 10, "dev": 0}
    assert seen == [1] * 100
    replies = lambda records: {r["messages"][1]["content"] for r in records}  # noqa: E731
    assert len(replies(val)) == 10 and len(replies(train)) == 90 and not replies(val) & replies(train)
    assert len({r["messages"][0]["content"] for r in train}) > 200  # three different requests per story
    assert dev == []
    # a dev split: the next stories of the same shuffle, one request each; the held-out records stay the same
    train2, val2, dev2, counts2 = make_instructions(stories, 10, seed=1, per_story=3, max_df=1.0, dev_count=15)
    assert val2 == val and counts2["dev"] == 15 and counts2["train"] == 225
    assert len(replies(dev2)) == 15 and not replies(dev2) & (replies(val2) | replies(train2))
    assert replies(train2) | replies(dev2) == replies(train)


def _tiny_model(tmp_path):
    path = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args(vocab_size=300, max_seq_len=640)), path, 1)
    byte_tokenizer(300).save(tmp_path / "tokenizer.bin")
    return path


def test_instruct_score_counts_whole_words_and_topics():
    s = InstructScore()
    s.add("req", "Tom threw the Ball. It rained.", ["ball", "rain", "happy"], ["cat", "Tom"], True, 10)
    s.add("req", "A cat named Tom was happy in the rain.", ["rain", "happy"], ["cat", "Tom"], False, 20)
    s.add("req", "Nothing.", [], ["dog"], True, 5)
    assert (s.words_requested, s.words_used, s.all_words, s.word_requests) == (5, 3, 1, 2)
    assert (s.topic_requests, s.topic_hits, s.finished) == (3, 1, 2)
    assert s.word_share == pytest.approx(0.6) and s.topic_share == pytest.approx(1 / 3)
    assert not uses_word("the rained", "rain") and uses_word("RAIN!", "rain") and not uses_word("brain", "rain")
    assert uses_word("Mom said 'happy' to him.", "happy") and uses_word("'Rain,' she said", "rain")
    assert not uses_word("at six o'clock", "clock") and uses_word("the clock's hands", "clock")


def test_eval_instruct_errors_are_one_line(tmp_path):
    model = _tiny_model(tmp_path)
    write_lines(tmp_path / "plain.jsonl", {"text": "a story"})
    write_lines(tmp_path / "nowords.jsonl", {"prompt": "p", "response": "r"})
    (tmp_path / "bad.jsonl").write_text("{bad\n")
    for path, message in ((tmp_path / "plain.jsonl", "plain-text records"),
                          (tmp_path / "nowords.jsonl", "nothing to score"),
                          (tmp_path / "missing.jsonl", "not found"),
                          (tmp_path / "bad.jsonl", "line 1: invalid JSON")):
        proc = run_cli("eval", str(model), "--instruct", str(path))
        err = proc.stderr.decode().strip()
        assert proc.returncode == 1 and message in err and len(err.splitlines()) == 1, err
        assert "--skip-bad-lines" not in err  # eval has no such flag



def test_an_empty_jsonl_file_gets_no_shard_like_an_empty_txt(tmp_path):
    pytest.importorskip("tqdm", reason="pretokenize shows its progress with tqdm (the train extra)")
    from babyllama.train.data import pretokenize

    byte_tokenizer(300).save(tmp_path / "tok.bin")
    data = tmp_path / "data"
    data.mkdir()
    write_lines(data / "instruct_train.jsonl", {"prompt": "Say hi", "response": "hi"}, {"prompt": "a", "response": "b"})
    (data / "instruct_val.jsonl").write_text("\n")
    meta = pretokenize(data, tmp_path / "tok.bin", tmp_path / "shards", workers=1)
    assert meta["kind"] == "chat" and meta["shards"] == {"train": ["instruct_train.bin"], "val": []}
    (data / "notes.txt").write_text("\n  \n<|endoftext|>\n")  # no document: no plain text among the chat files
    meta = pretokenize(data, tmp_path / "tok.bin", tmp_path / "shards", workers=1)
    assert meta["kind"] == "chat" and meta["shards"] == {"train": ["instruct_train.bin"], "val": []}


def test_data_instruct_without_held_out_stories_writes_no_empty_file(tmp_path, capsys):
    from babyllama.cli import main

    corpus = make_story_corpus(tmp_path / "stories.txt", 40, seed=3)
    assert main(["data", "instruct", "--input", str(corpus), "--out-dir", str(tmp_path / "ins"), "--val-count", "0",
                 "--model", str(_tiny_model(tmp_path)), "--max-word-df", "0.5"]) == 0
    assert sorted(p.name for p in (tmp_path / "ins").iterdir()) == ["instruct_train.jsonl"]


def test_a_refused_data_instruct_makes_no_folder(tmp_path, capsys):
    from babyllama.cli import main

    corpus = make_story_corpus(tmp_path / "stories.txt", 5, seed=3)
    out = tmp_path / "new" / "ins"
    assert main(["data", "instruct", "--input", str(corpus), "--out-dir", str(out), "--val-count", "9",
                 "--model", str(_tiny_model(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "leave no training stories" in err and err.count("\n") == 1, err  # no note on the stories first
    assert not (tmp_path / "new").exists()
    # settings that need no story are refused before any is read (here: before the missing input is noticed)
    assert main(["data", "instruct", "--input", str(tmp_path / "absent.txt"), "--out-dir", str(out),
                 "--per-story", "0"]) == 1
    assert "--per-story >= 1" in capsys.readouterr().err


def test_data_instruct_says_when_no_word_can_be_asked_for(tmp_path, capsys):
    """A word asked for must be in at least 3 stories and at most --max-word-df of them: with 40 stories and
    the default 0.05 (2 stories) none can be, which a note says (the requests silently asked for no words)."""
    import json

    from babyllama.cli import main

    corpus = make_story_corpus(tmp_path / "stories.txt", 40, seed=3)
    argv = ["data", "instruct", "--input", str(corpus), "--out-dir", str(tmp_path / "ins"), "--val-count", "0",
            "--model", str(_tiny_model(tmp_path))]
    assert main(argv) == 0
    assert ("note: no request asks for words: a word asked for must be used by at least 3 of the 40 stories and by "
            "at most --max-word-df 0.05 of them (2); raise --max-word-df to 0.075 or more") in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "ins" / "instruct_train.jsonl").open()]
    assert records and not any(r["words"] for r in records)
    assert main([*argv, "--max-word-df", "0.5"]) == 0
    assert "no request asks for words" not in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "ins" / "instruct_train.jsonl").open()]
    assert any(r["words"] for r in records)


def test_data_instruct_again_leaves_no_earlier_held_out_split(tmp_path, capsys):
    """A held-out file of an earlier split holds stories the new split may train on: kept, it would be scored
    (finetune's validation, eval --instruct) as held out."""
    from babyllama.cli import main

    corpus = make_story_corpus(tmp_path / "stories.txt", 40, seed=3)
    argv = ["data", "instruct", "--input", str(corpus), "--out-dir", str(tmp_path / "ins"),
            "--model", str(_tiny_model(tmp_path)), "--max-word-df", "0.5"]
    assert main([*argv, "--val-count", "5", "--dev-count", "5"]) == 0
    assert main([*argv, "--val-count", "5", "--seed", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "ins").iterdir()) == ["instruct_train.jsonl", "instruct_val.jsonl"]
    assert f"removed {tmp_path / 'ins' / 'instruct_dev.jsonl'}: an earlier run's" in capsys.readouterr().err


def test_data_instruct_again_into_a_folder_inside_its_input_reads_the_stories_only(tmp_path, capsys):
    """--out-dir inside --input: the requests an earlier run wrote there are no stories to read again."""
    from babyllama.cli import main

    (tmp_path / "stories").mkdir()
    make_story_corpus(tmp_path / "stories" / "stories.txt", 40, seed=3)
    argv = ["data", "instruct", "--input", str(tmp_path / "stories"), "--out-dir", str(tmp_path / "stories" / "ins"),
            "--model", str(_tiny_model(tmp_path)), "--max-word-df", "0.5", "--val-count", "5"]
    assert main(argv) == 0
    first = (tmp_path / "stories" / "ins" / "instruct_train.jsonl").read_bytes()
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "stories" / "ins" / "instruct_train.jsonl").read_bytes() == first


def test_data_instruct_on_a_corpus_folder_leaves_its_validation_file_out(tmp_path, capsys):
    """A folder such as ../shared/data/tinystories (train-00.txt, valid.txt): its valid.txt stories became training
    requests, so a model tuned on them was later scored (`eval --data valid.txt`) on stories it was trained on."""
    from babyllama.cli import main

    (tmp_path / "corpus").mkdir()
    make_story_corpus(tmp_path / "corpus" / "train-00.txt", 40, seed=3)
    make_story_corpus(tmp_path / "corpus" / "valid.txt", 10, seed=4)
    argv = ["--model", str(_tiny_model(tmp_path)), "--max-word-df", "0.5", "--val-count", "5"]
    assert main(["data", "instruct", "--input", str(tmp_path / "corpus"), "--out-dir", str(tmp_path / "a"), *argv]) == 0
    assert f"note: left out {tmp_path / 'corpus' / 'valid.txt'}: validation data by name" in capsys.readouterr().err
    alone = tmp_path / "corpus" / "train-00.txt"
    assert main(["data", "instruct", "--input", str(alone), "--out-dir", str(tmp_path / "b"), *argv]) == 0
    for name in ("instruct_train.jsonl", "instruct_val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_data_instruct_never_writes_over_its_input(tmp_path, capsys):
    """--out-dir the input's own folder: an earlier run's requests there are skipped; an input file that is one
    of the files it writes is refused before anything is written."""
    from babyllama.cli import main

    (tmp_path / "stories").mkdir()
    make_story_corpus(tmp_path / "stories" / "stories.txt", 40, seed=3)
    argv = ["data", "instruct", "--out-dir", str(tmp_path / "stories"), "--model", str(_tiny_model(tmp_path)),
            "--max-word-df", "0.5", "--val-count", "5"]
    assert main([*argv, "--input", str(tmp_path / "stories")]) == 0
    first = (tmp_path / "stories" / "instruct_train.jsonl").read_bytes()
    assert main([*argv, "--input", str(tmp_path / "stories")]) == 0, capsys.readouterr().err
    assert (tmp_path / "stories" / "instruct_train.jsonl").read_bytes() == first
    capsys.readouterr()
    val = tmp_path / "stories" / "instruct_val.jsonl"
    before = val.read_bytes()
    assert main([*argv, "--input", str(val)]) == 1
    assert f"{val} is a file this command writes into --out-dir" in capsys.readouterr().err
    assert val.read_bytes() == before and (tmp_path / "stories" / "instruct_train.jsonl").read_bytes() == first


def test_data_instruct_counts_the_requests_it_leaves_out(tmp_path, capsys):
    """With --per-story N a story too long for the context is N requests left out, and said so as requests."""
    from babyllama.cli import main

    corpus = make_story_corpus(tmp_path / "stories.txt", 20, seed=3)
    with open(corpus, "a") as f:
        f.write("Once upon a time, a cat named Tom ran. " * 40 + "\n<|endoftext|>\n")  # > 640 byte tokens
    argv = ["data", "instruct", "--input", str(corpus), "--out-dir", str(tmp_path / "ins"), "--model",
            str(_tiny_model(tmp_path)), "--max-word-df", "0.5", "--val-count", "0", "--per-story", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "from 21 stories" in out and "(left out: 3 requests longer than the context of 640," in out, out


def test_malformed_lines_and_conversations_too_long_are_reported_together(tmp_path):
    """A file with a line of bad JSON and a conversation too long for the context named only the bad JSON; fixed,
    the next run stopped at the long one. One run names both (docs/finetune.md: malformed lines, "a
    conversation longer than the context" among them)."""
    pytest.importorskip("tqdm", reason="pretokenize shows its progress with tqdm (the train extra)")
    from babyllama.train.data import pretokenize

    byte_tokenizer(300).save(tmp_path / "tok.bin")
    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "chat.jsonl", {"prompt": "p", "response": "r"}, "{not json",
                {"prompt": "p", "response": "word " * 50})
    with pytest.raises(BabyLlamaError, match=r"2 malformed lines: line 2: invalid JSON .*; line 3: the conversation "
                                             r"has \d+ tokens, more than max_seq_len 29 \+ 1 \(fix them, or pass "
                                             r"--skip-bad-lines\)"):
        pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1, max_tokens=30)
    (src / "chat.jsonl").write_text("{not json\n")  # nothing but malformed lines: said as before
    with pytest.raises(BabyLlamaError, match=r"1 malformed line: line 1: invalid JSON .* \(fix them, or pass "
                                             r"--skip-bad-lines\)"):
        pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1, max_tokens=30)
