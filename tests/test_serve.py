"""`babyllama serve` end to end: the real server as a subprocess on a loopback port, driven by the official
`openai` client (and httpx for what the client hides): greedy text against `babyllama run -t 0`, streaming,
stop strings, n, seeds, logprobs, concurrency (batch invariance), disconnects, prefix reuse, bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import run_cli
from serve_helpers import ROOT, Server

from babyllama.loading import BUILTIN_TOKENIZER
from babyllama.tokenizer import BOS, Tokenizer

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

MODEL = "babyllama-stories"  # the built-in model's name (its card)
PROMPTS = ["Once upon a time", "The dog ran to the park", "Lily had a red ball", "One day, a little bird",
           "Tom and his mom went", "The sun was hot and", "A big fish swam", "The cat sat on the mat",
           "Ben wanted to fly a kite", "In the garden there was", "Sue found a shiny rock", "The old tree",
           "Max the frog liked to", "It was a rainy day", "Anna baked a cake for", "The boat was small"]


@pytest.fixture(scope="module")
def server():
    s = Server("--slots", "16", "--queue", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(BUILTIN_TOKENIZER)


def run_text(prompt: str, n: int) -> str:
    """What `babyllama run -t 0` prints after the prompt, for n generated tokens."""
    out = run_cli("run", "-t", "0", "-i", prompt, "--max-new-tokens", str(n))
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert text.startswith(prompt) and text.endswith("\n")
    return text[len(prompt):-1]


def complete(client, prompt: str, n: int = 24, **kw) -> str:
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, **kw).choices[0].text


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert server.get("/health").json() == {"status": "ok", "slots": 16, "active": 0, "queued": 0}
    page = server.get("/")
    assert page.status_code == 200 and "<title>babyllama chat</title>" in page.text
    script = server.get("/static/chat.js")
    assert script.status_code == 200
    # revalidated on every load, not cached by heuristics: an upgraded server's page never runs a stale script
    assert page.headers["cache-control"] == script.headers["cache-control"] == "no-cache"
    revalidated = httpx.get(server.url + "/static/chat.js", headers={"If-None-Match": script.headers["etag"]})
    assert revalidated.status_code == 304
    assert "babyllama_slots 16.0" in server.get("/metrics").text


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_completion_equals_run(client, prompt):
    text = complete(client, prompt, 30)
    assert text == run_text(prompt, 30)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == text


def test_chat_streamed_and_whole_agree(client):
    messages = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "Tell me a story about a cat."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 40 and whole.usage.prompt_tokens > 20
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content and text and not text.startswith(" ")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_default_max_tokens_is_the_rest_of_the_context(client):
    long_turn = "Tell me about the cat and the dog. " * 20  # about 220 of the context's 256 tokens
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_turn}], temperature=0)
    assert r.usage.prompt_tokens > 200
    assert r.choices[0].finish_reason == "stop" or r.usage.total_tokens == 256


def test_stop_strings_cut_the_text(client):
    full = complete(client, "Once upon a time", 40)
    stop = full.split()[4]  # a word that occurs a few words in
    cut = full[:full.index(stop)]
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0,
                                       stop=["zzz", stop], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_are_independent_and_seeds_reproducible(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=1.0, top_p=0.95)
    r = client.completions.create(n=3, seed=7, **kw)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3
    again = client.completions.create(n=3, seed=7, **kw)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
    assert client.completions.create(n=1, seed=8, **kw).choices[0].text == texts[1]  # choice i samples with seed + i
    assert r.usage.completion_tokens == 60 or any(c.finish_reason == "stop" for c in r.choices)


def test_echo_token_prompts_and_ignored_fields(client, tokenizer):
    text = complete(client, "Once upon a time", 10)
    assert complete(client, "Once upon a time", 10, echo=True) == "Once upon a time" + text
    ids = tokenizer.encode("Once upon a time", bos=True)
    assert complete(client, ids, 10) == text
    assert complete(client, "Once upon a time", 10, user="me", frequency_penalty=0, extra_body={"x": 1}) == text


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens).lstrip() == r.choices[0].text.lstrip() and len(lp.token_logprobs) == 8
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen) and top[token] == chosen  # greedy
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_a_list_of_one_prompt_is_that_prompt(client, tokenizer):
    """OpenAI's prompt may be a list of prompts (LangChain's OpenAI LLM always sends one): a list of one string or
    one token list is that prompt; several are refused in words, not with pydantic's union errors."""
    text = complete(client, PROMPTS[0], 8)
    assert complete(client, [PROMPTS[0]], 8) == text
    ids = tokenizer.encode(PROMPTS[0], bos=True)
    assert complete(client, [ids], 8) == text
    for prompts in ([PROMPTS[0], PROMPTS[1]], [ids, ids]):
        with pytest.raises(openai.BadRequestError) as e:
            complete(client, prompts, 8)
        assert e.value.param == "prompt" and "a list of 2 prompts is not supported" in e.value.message


def test_a_reply_budget_past_the_context_names_the_field_that_asked(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, **{field: 5000})
        assert e.value.code == "context_length_exceeded" and f"{field} asks for 5000 more" in e.value.message
        assert e.value.body["message"].endswith(f"lower {field}")  # the server's message (openai's wraps it)
        assert e.value.param == field  # the prompt alone fits: the budget is the field at fault
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Once", max_tokens=5000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"


def test_a_base_url_without_v1_gets_a_404_that_says_where_the_api_is(server):
    """openai.OpenAI(base_url="http://HOST:PORT"), /v1 left out: the 404 says where the path is."""
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert "the API is under /v1: /v1/chat/completions" in e.value.message
    assert "under /v1" in server.get("/models/x").json()["error"]["message"]
    assert server.get("/nope").json()["error"]["message"] == "no such path: /nope"


def test_completion_top_logprobs_always_show_the_sampled_token(client):
    """As OpenAI's: a sampled token that is not among the k likeliest is added to its top_logprobs (up to k + 1
    entries), so top_logprobs[i][tokens[i]] is always token_logprobs[i]; logprobs 0 shows the sampled one alone."""
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=1.0, seed=3)
    lp = client.completions.create(logprobs=1, **kw).choices[0].logprobs
    assert all(top[token] == chosen and len(top) <= 2
               for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    assert any(len(top) == 2 for top in lp.top_logprobs)  # a token sampled below the likeliest
    zero = client.completions.create(logprobs=0, **kw).choices[0].logprobs
    assert zero.top_logprobs == [{t: chosen} for t, chosen in zip(zero.tokens, zero.token_logprobs)]


def test_top_logprobs_of_tokens_that_read_the_same_keep_the_sampled_ones(tokenizer):
    """Lone byte tokens all read U+FFFD: in a completion's top_logprobs (a dict keyed by text) the sampled token's
    log-probability wins that key, else the likeliest's, never a less likely one's."""
    from babyllama.serve.protocol import completion_logprobs
    from babyllama.serve.scheduler import Token

    e6, e7, e8 = (tokenizer.pieces.index(f"<0x{b:02X}>".encode()) for b in (0xE6, 0xE7, 0xE8))
    top = [(e6, -1.0), (e7, -2.0), (e8, -3.0)]
    lp = completion_logprobs(tokenizer, [Token(e7, -2.0, top), Token(e6, -1.0, top), Token(e8, -3.0, top[:1])],
                             [0, 0, 0], BOS)
    assert lp["tokens"] == ["\ufffd"] * 3
    assert lp["top_logprobs"] == [{"\ufffd": -2.0}, {"\ufffd": -1.0}, {"\ufffd": -3.0}]


def test_logprobs_show_a_dropped_control_byte_as_nothing(tokenizer):
    """A lone unprintable ASCII byte token (<0x1F>) adds nothing to the text (run.c's safe_printf): its logprobs
    entry reads "" with no bytes, so that the tokens still join into the text; other byte tokens keep theirs."""
    from babyllama.serve.protocol import chat_logprobs, completion_logprobs
    from babyllama.serve.scheduler import Token

    unit, tab = (tokenizer.pieces.index(f"<0x{b:02X}>".encode()) for b in (0x1F, 0x09))
    a = tokenizer.pieces.index(b" a")
    entries = [Token(a, -1.0, [(unit, -0.5)]), Token(unit, -0.5, None), Token(tab, -2.0, None), Token(a, -1.0, None)]
    text = b"".join(tokenizer.token_bytes(p, e.id) for p, e in zip([a] + [e.id for e in entries], entries)).decode()
    assert text == " a\t a"
    lp = completion_logprobs(tokenizer, entries, [0, 2, 2, 3], a)
    assert lp["tokens"] == [" a", "", "\t", " a"] and "".join(lp["tokens"]) == text
    assert lp["top_logprobs"][0] == {"": -0.5, " a": -1.0}
    content = chat_logprobs(tokenizer, entries, a)["content"]
    assert [c["token"] for c in content] == lp["tokens"]
    assert content[1]["bytes"] == [] and content[2]["bytes"] == [9]
    assert b"".join(bytes(c["bytes"]) for c in content) == text.encode()


def test_chat_logprobs_tokens_join_into_the_content(client, tokenizer):
    """A chat reply is decoded as after BOS (its first piece without the leading space): its logprobs show the
    tokens as the content has them, so their texts and bytes join into the content, whole and streamed, and the
    first token's alternatives drop that space too."""
    from babyllama.serve.protocol import chat_logprobs
    from babyllama.serve.scheduler import Token

    once = tokenizer.encode(" Once", bos=False)
    assert tokenizer.pieces[once[0]].startswith(b" ")
    first, = chat_logprobs(tokenizer, [Token(once[0], -0.5, [(once[0], -0.5)])], BOS)["content"]
    assert first["token"] == first["top_logprobs"][0]["token"] == tokenizer.pieces[once[0]][1:].decode()
    assert bytes(first["bytes"]) == first["token"].encode()

    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
              temperature=0, logprobs=True, top_logprobs=5)
    choice = client.chat.completions.create(**kw).choices[0]
    content = choice.logprobs.content
    assert "".join(c.token for c in content) == choice.message.content
    assert b"".join(bytes(c.bytes) for c in content) == choice.message.content.encode()
    assert not any(t.token.startswith(" ") for t in content[0].top_logprobs)
    assert any(t.token.startswith(" ") for c in content[1:] for t in c.top_logprobs)  # later ones keep theirs
    streamed = [e.token for c in client.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [c.token for c in content]


def test_streamed_text_is_whole_utf8_characters(tokenizer):
    """A character sent as byte tokens (here "é" = C3 A9 and "😀" = F0 9F 98 80) is held back until complete
    and never split by a stop-string check; a stop string that starts like held-back text still cuts."""
    from babyllama.serve.protocol import ChoiceText

    ids = [tokenizer.byte_ids[b] for b in "é😀".encode()]
    text = ChoiceText(tokenizer, BOS, stops=["😀!"])
    pieces = [text.push(t) for t in ids]
    assert pieces == ["", "é", "", "", "", ""]  # the emoji waits: it could start the stop string
    assert text.finish() == "😀" and not text.stopped
    text = ChoiceText(tokenizer, BOS, stops=["é"])
    assert [text.push(t) for t in ids[:2]] == ["", ""] and text.stopped


def test_text_offsets_count_the_replacement_of_a_character_cut_short():
    """A character's first bytes that the next token does not continue come out as one U+FFFD ahead of that
    token's text: its offset is after the U+FFFD (which the bytes' token shows), so every offset indexes the
    text, and a stop string that cuts at the U+FFFD's end leaves the next token out of the answer."""
    from conftest import byte_tokenizer, random_weights, tiny_args

    from babyllama.api import Model
    from babyllama.sampler import Sampler
    from babyllama.serve import protocol as p
    from babyllama.serve.scheduler import Job, Token
    from babyllama.serve.service import Choice, ServeConfig, Service

    tok = byte_tokenizer(300)
    service = Service(Model(random_weights(tiny_args()), tok), ServeConfig(model_name="m"))

    def run(text: bytes, stops: list[str]) -> tuple[Choice, str]:
        choice = Choice(Job([1], 8, Sampler(0.0), lambda i, e: None), p.ChoiceText(tok, BOS, stops))
        sent = "".join(service.take_token(choice, Token(tok.byte_ids[b])) for b in text if not choice.text.stopped)
        return choice, sent + choice.text.finish()

    # E2: a three-byte character's first byte, cut short by "a"; E2 82: its first two; C3 A9: "é" whole; 80: a
    # continuation byte with no start, replaced at once; FF: never in UTF-8
    for text, offsets in [(b"\xe2ab", [0, 1, 2]), (b"x\xe2\x82a", [0, 1, 1, 2]), (b"\xc3\xa9a", [0, 0, 1]),
                          (b"\x80a", [0, 1]), (b"\xe2\xffa", [0, 1, 2]), (b"\xe2\xe2a", [0, 1, 2])]:
        choice, whole = run(text, [])
        assert choice.offsets == offsets, text
        shown = [p.token_text(tok, t.id, choice.prev(k)) for k, t in enumerate(choice.tokens)]
        assert all(whole[o:].startswith(s) for o, s in zip(choice.offsets, shown) if s != "\ufffd"), text
    cut, text = run(b"\xe2ab", ["ab"])
    # "\ufffd" from E2; "a" starts where the text ends
    assert text == "\ufffd" and cut.text.stopped and cut.answered() == 1


def test_events_that_arrive_together_stream_as_one_chunk_per_choice():
    """A step's tokens (or a backlog) go out as one chunk of text per choice: the same text, whole UTF-8
    characters; a token with logprobs keeps a chunk of its own; the templated chunk is the generic one."""
    import asyncio

    from conftest import byte_tokenizer, random_weights, tiny_args

    from babyllama.api import Model
    from babyllama.sampler import Sampler
    from babyllama.serve import protocol as p
    from babyllama.serve.scheduler import Finished, Job, Token
    from babyllama.serve.service import Choice, Pending, ServeConfig, Service

    tok = byte_tokenizer(300)
    service = Service(Model(random_weights(tiny_args()), tok), ServeConfig(model_name="m"))

    def pending(**kw) -> Pending:
        req = p.CompletionRequest(prompt=[1], stream=True, n=2, **kw)
        choices = [Choice(Job([1], 8, Sampler(0.0), lambda i, e: None, index=i), p.ChoiceText(tok, BOS, req.stops))
                   for i in range(2)]
        return Pending(req, False, 1, choices, asyncio.Queue(), id="cmpl-x")

    def chunks(blocks: list[bytes]) -> list[dict]:
        events = b"".join(blocks).split(b"\n\n")
        assert events[-1] == b"" and all(e.startswith(b"data: {") for e in events[:-1])
        return [json.loads(e[6:]) for e in events[:-1]]

    emoji = [tok.byte_ids[b] for b in "é😀".encode()]
    events = [(0, Token(t)) for t in emoji] + [(1, Token(tok.byte_ids[ord("a")])), (0, Finished("length")),
                                                 (1, Token(tok.byte_ids[ord("b")]))]
    together, failed = service.stream_block(pending(), events)
    assert not failed
    got = chunks(together)
    assert [(c["choices"][0]["index"], c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in got] == \
        [(0, "é😀", None), (0, "", "length"), (1, "ab", None)]
    one_by_one = pending()
    apart = chunks([b for e in events for b in service.stream_block(one_by_one, [e])[0]])
    assert [c["choices"][0]["text"] for c in apart] == ["é", "😀", "a", "", "b"]
    assert {c["created"] for c in apart} == {one_by_one.created}

    # with logprobs, a token's log-probabilities go with the chunk that starts its text: "é"'s two byte tokens
    # together, the emoji's four with the emoji, the end of the choice in a chunk of its own
    lp = pending(logprobs=1)
    logged = chunks(b for t in emoji for b in service.stream_block(lp, [(0, Token(t, -0.5, [(t, -0.5)]))])[0])
    logged += chunks(service.stream_block(lp, [(0, Finished("length"))])[0])
    assert [(c["choices"][0]["text"], (c["choices"][0]["logprobs"] or {}).get("text_offset"),
             c["choices"][0]["finish_reason"]) for c in logged] == \
        [("é", [0, 0], None), ("😀", [1, 1, 1, 1], None), ("", None, "length")]
    assert [v for c in logged[:2] for v in c["choices"][0]["logprobs"]["token_logprobs"]] == [-0.5] * 6

    for kw in ({}, {"stream_options": {"include_usage": True}}):
        for chat in (False, True):
            x = pending(**kw)
            x.chat = chat
            for text in ("plain", 'q"uo\\te\n\u2028\x00é😀'):
                assert service.text_chunk(x, 1, text) == service.chunk(x, 1, text, None)


def test_a_stream_waiting_for_its_first_token_sends_keepalive_comments():
    """A stream queued for a slot (or prefilling a long prompt) wrote nothing until its first token, so a proxy's
    or client's read timeout could drop it: it sends an SSE comment every keepalive_s until then, none after."""
    import asyncio

    from conftest import byte_tokenizer, random_weights, tiny_args

    from babyllama.api import Model
    from babyllama.sampler import Sampler
    from babyllama.serve import protocol as p
    from babyllama.serve.scheduler import Finished, Job, Token
    from babyllama.serve.service import KEEPALIVE, Choice, Pending, ServeConfig, Service

    tok = byte_tokenizer(300)
    service = Service(Model(random_weights(tiny_args()), tok), ServeConfig(model_name="m", keepalive_s=0.05))
    req = p.CompletionRequest(prompt=[1], stream=True)
    pending = Pending(req, False, 1, [Choice(Job([1], 8, Sampler(0.0), lambda i, e: None), p.ChoiceText(tok, BOS,
                                                                                                     req.stops))],
                      asyncio.Queue(), id="cmpl-x")

    async def read() -> list[bytes]:
        got, stream = [], service.stream(pending)
        got.append(await stream.__anext__())
        got.append(await stream.__anext__())  # two comments while nothing comes
        for t in b"hi":
            pending.events.put_nowait((0, Token(tok.byte_ids[t])))
        got.append(await stream.__anext__())
        await asyncio.sleep(0.2)  # tokens flowed: waiting now sends nothing
        pending.events.put_nowait((0, Finished("length", 2)))
        got += [b async for b in stream]
        return got

    got = asyncio.run(asyncio.wait_for(read(), 10))
    assert got[:2] == [KEEPALIVE, KEEPALIVE] and KEEPALIVE == b": keep-alive\n\n"
    assert b'"text":"hi"' in got[2] and KEEPALIVE not in got[3:] and got[-1] == b"data: [DONE]\n\n"


@pytest.fixture(scope="module")
def byte_server(tmp_path_factory):
    """A random model whose vocabulary is mostly byte tokens: its text is full of characters split across
    tokens (and of invalid bytes, which become U+FFFD as they should)."""
    from conftest import byte_tokenizer, random_weights, tiny_args

    from babyllama import formats

    folder = tmp_path_factory.mktemp("bytes")
    formats.save(random_weights(tiny_args(max_seq_len=256), scale=0.02), folder / "m.bin", version=1)
    byte_tokenizer(300).save(folder / "tokenizer.bin")
    s = Server(str(folder / "m.bin"), "--slots", "2")
    yield s
    s.stop()


def test_streamed_text_equals_the_whole_text_for_byte_tokens(byte_server):
    client = byte_server.client()
    kw = dict(model="m.bin", prompt="x", max_tokens=200, temperature=1.0, top_p=1.0)
    seen = ""
    for seed in range(1, 6):
        whole = client.completions.create(seed=seed, **kw).choices[0].text
        chunks = [c.choices[0].text for c in client.completions.create(seed=seed, stream=True, **kw)]
        assert "".join(chunks) == whole
        seen += whole
    assert any(ord(ch) > 0x7F and ch != "\ufffd" for ch in seen)  # multi-byte characters were streamed whole


def test_concurrent_clients_get_their_solo_greedy_results(server, client):
    """16 clients at once: each gets exactly what it got alone (a sequence's arithmetic does not depend on
    which others share its steps)."""
    def ask(i: int) -> str:
        if i % 2:
            return complete(client, PROMPTS[i], 32)
        stream = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=32, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)

    solo = [ask(i) for i in range(16)]
    start = threading.Barrier(16)

    def together(i: int) -> str:
        start.wait()
        return ask(i)

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(together, range(16))) == solo
    assert server.wait_idle()["active"] == 0


def test_disconnect_frees_the_slot(server):
    """A client that goes away mid-stream: its 16 choices (far from done) are cancelled and their slots freed."""
    def disconnected() -> float:
        text = server.get("/metrics").text
        found = re.search(r'babyllama_cancelled_requests_total\{reason="disconnected"\} (\S+)', text)
        return float(found.group(1)) if found else 0.0

    before = disconnected()
    body = {"prompt": "Once upon a time", "max_tokens": 250, "n": 16, "stream": True, "temperature": 1}
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json=body) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data:"))
    health = server.wait_idle()
    assert (health["active"], health["queued"]) == (0, 0)
    assert disconnected() == before + 1


def test_a_stream_tells_proxies_not_to_buffer_it(server):
    """Behind nginx (the chat page under a path prefix, say), a stream left to nginx's default buffering came in
    bursts of kilobytes; the answer says not to buffer it (X-Accel-Buffering) nor keep it."""
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json=body) as r:
        assert r.headers["x-accel-buffering"] == "no" and r.headers["cache-control"] == "no-cache"
        assert list(r.iter_lines())[-2:] == ["data: [DONE]", ""]


def test_prefix_reuse_prefills_only_the_suffix(server, client, tokenizer):
    """Two prompts share a 200-token prefix: the second prefills only its own tokens (/metrics counts them) and
    its greedy text equals a fresh prefill's (`run`), up to a near-tie the logprobs would show."""
    story = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
             "friends. One day, she saw a big red ball under a tree. She ran to get it, but a dog got there first. ")
    prefix = story
    while len(tokenizer.encode(prefix)) < 200:  # at least 200 shared tokens, whatever the vocabulary
        prefix += story
    n_prefix = len(tokenizer.encode(prefix))
    assert 200 <= n_prefix <= 320
    first, second = prefix + "The dog", prefix + "Lily was sad, so her mom"
    complete(client, first, 4)
    reused, prefilled = server.metric("babyllama_prefix_reused_tokens_total"), \
        server.metric("babyllama_prefill_tokens_total")
    r = client.completions.create(model=MODEL, prompt=second, max_tokens=12, temperature=0, logprobs=2)
    n_second = len(tokenizer.encode(second))
    got_reused = server.metric("babyllama_prefix_reused_tokens_total") - reused
    assert got_reused >= n_prefix - 1  # all the shared tokens (the last one may merge with the suffix)
    assert server.metric("babyllama_prefill_tokens_total") - prefilled == n_second - got_reused
    fresh = run_text(second, 12)
    if r.choices[0].text != fresh:  # rounding may only flip a near-tie
        lp = r.choices[0].logprobs
        text = ""
        for token, top in zip(lp.tokens, lp.top_logprobs):
            if not fresh.startswith(text + token):
                best = sorted(top.values(), reverse=True)
                assert best[0] - best[1] < 1e-3, f"differs at {text!r} with a clear margin"
                break
            text += token


BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "x", ', 400),  # malformed JSON
    ("/v1/completions", b'[1, 2]', 400),
    ("/v1/completions", {"prompt": 5}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400),
    ("/v1/completions", {"prompt": [1, 99999]}, 400),
    ("/v1/completions", {"prompt": "word " * 400}, 400),  # longer than the context
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400),  # leaves no room in any test model's context
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 2.5}, 400),  # OpenAI's range is [-2, 2]
    ("/v1/completions", {"prompt": "x", "presence_penalty": -2.5}, 400),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400),
    ("/v1/completions", {"prompt": "x", "top_k": 1.5}, 400),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, 400),
    ("/v1/completions", {"prompt": "x", "repeat_penalty": 0}, 400),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": -1.0}, 400),
    ("/v1/completions", {"prompt": "x", "repeat_penalty": 1.1, "repetition_penalty": 1.2}, 400),
    ("/v1/completions", {"prompt": "x", "repeat_last_n": -2}, 400),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400),  # OpenAI's range is [-100, 100]
    ("/v1/completions", {"prompt": "x", "logit_bias": {"x": 1}}, 400),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400),  # beyond every test model's vocabulary
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"}}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400),  # wrong types are refused, not converted
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.0}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, 400),
    ("/v1/completions", {"prompt": [True, 5]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 300}]}, 400),
    ("/v1/nothing", {}, 404),
    ("/v1/completions", {"prompt": "x" * (2 << 20)}, 413),  # over the body limit
]


@pytest.mark.parametrize("path, body, status", BAD_REQUESTS)
def test_bad_input_is_an_openai_error(server, path, body, status):
    r = server.post(path, content=body) if isinstance(body, bytes) else server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]


def test_a_lone_surrogate_is_named_not_called_invalid_json(server):
    """Half an emoji, escaped ("\\ud83d": valid JSON, as a browser's JSON.stringify sends a truncated paste), is
    refused as text that is not Unicode, naming where it is, not as "Invalid JSON"."""
    chat = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, ' \
           b'{"role": "user", "content": "x \\ud83d y"}], "max_tokens": 2}'
    r = server.post("/v1/chat/completions", content=chat)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("messages.2.content: the text holds a lone UTF-16 surrogate")
    assert r.json()["error"]["param"] == "messages"
    r = server.post("/v1/completions", content=b'{"prompt": "\\udc00", "max_tokens": 2}')
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt: the text holds"), r.text
    r = server.post("/v1/completions", content=b'{"prompt": "x", "a\\udc00": 1}')  # in a key
    assert r.status_code == 400 and "lone UTF-16 surrogate" in r.json()["error"]["message"], r.text
    r = server.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 2')  # truly not JSON
    assert r.status_code == 400 and "Invalid JSON" in r.json()["error"]["message"], r.text


def test_bad_input_leaves_the_server_serving(server, client):
    assert server.get("/v1/models/gpt-4").status_code == 404
    assert server.get("/nope").json()["error"]["type"] == "not_found_error"
    assert complete(client, PROMPTS[0], 8) == run_text(PROMPTS[0], 8)


@pytest.fixture(scope="module")
def keyed():
    s = Server("--slots", "1", "--queue", "2", api_key="s3cret")
    yield s
    s.stop()


def test_api_key(keyed):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                    {"Authorization": "Basic s3cret"}, {"Authorization": "Bearers3cret"},
                    {"Authorization": "Bearer s3cret2"}):
        r = httpx.post(keyed.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    for scheme in ("bearer", "BEARER", "Bearer "):  # the scheme is case-insensitive (RFC 7235)
        r = httpx.post(keyed.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                       headers={"Authorization": f"{scheme} s3cret"})
        assert r.status_code == 200, (scheme, r.text)
    assert httpx.get(keyed.url + "/metrics").status_code == 401
    assert httpx.get(keyed.url + "/health").status_code == 200 and httpx.get(keyed.url + "/").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert keyed.client().completions.create(model=MODEL, prompt="Hi", max_tokens=3).usage.completion_tokens <= 3


def test_a_page_of_another_origin_can_read_the_401(keyed):
    """A wrong key from a browser page of another origin: the 401 carries CORS headers, so that the page reads
    OpenAI's error instead of a failed fetch; it is counted as a 401 all the same."""
    def refused() -> float:
        found = re.search(r'babyllama_requests_total\{endpoint="/v1/models",status="401"\} (\S+)',
                          keyed.get("/metrics").text)
        return float(found.group(1)) if found else 0.0

    before = refused()
    r = httpx.get(keyed.url + "/v1/models", headers={"Origin": "http://example.com", "Authorization": "Bearer no"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers.get("access-control-allow-origin") == "*"
    assert refused() == before + 1


def test_the_queue_counts_only_choices_that_wait(keyed):
    """--slots 1 --queue 2, idle: three choices fit (one in the slot, two waiting); four never can (400)."""
    assert keyed.wait_idle()["active"] == 0
    r = keyed.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "n": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3, r.text
    r = keyed.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "n": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert "n=4 is more choices than this server takes at once (3: 1 slots and a queue of 2)" in r.text


def test_the_scheduler_queues_only_jobs_that_find_no_slot():
    from conftest import random_weights, tiny_args

    from babyllama.engine import Engine
    from babyllama.sampler import Sampler
    from babyllama.serve.metrics import Metrics
    from babyllama.serve.scheduler import Job, QueueFull, Scheduler

    def jobs(n: int) -> list[Job]:
        return [Job([1], 4, Sampler(0.0), lambda i, e: None) for _ in range(n)]

    sched = Scheduler(Engine(random_weights(tiny_args())), slots=4, queue_size=2, metrics=Metrics(4))
    sched.submit(jobs(5))  # not started: nothing runs, four find a slot, one waits
    sched.submit(jobs(1))
    with pytest.raises(QueueFull):
        sched.submit(jobs(1))


def test_full_queue_answers_429_with_retry_after(keyed):
    def ask(_):
        return keyed.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 100, "n": 2})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(ask, range(10)))
    busy = [r for r in answers if r.status_code == 429]
    assert busy and all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in busy)
    assert all(r.status_code in (200, 429) for r in answers)
    assert keyed.wait_idle()["active"] == 0


def test_load(server, tokenizer):
    """200 requests from 20 clients at once, a third of them malformed, oversized or cancelled: every valid one
    answered with its solo text, every bad one a 4xx, no 5xx; the server healthy, its memory flat."""
    expected = {p: complete(server.client(), p, 16) for p in PROMPTS[:4]}
    server.wait_idle()
    rss0 = server.rss_bytes()
    results = []

    def one(i: int) -> None:
        prompt = PROMPTS[i % 4]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0}
        kind = "ok" if i % 3 else ("malformed", "too long", "too large", "cancelled")[i // 3 % 4]
        with httpx.Client(timeout=60) as http:
            url = server.url + "/v1/completions"
            if kind == "malformed":
                r = http.post(url, content=b'{"prompt": ')
            elif kind == "too long":  # more tokens than the context
                r = http.post(url, json={**body, "prompt": "word " * 600})
            elif kind == "too large":  # over the body limit
                r = http.post(url, json={**body, "prompt": "word " * 250_000})
            elif kind == "cancelled":  # a stream dropped after its first event
                with http.stream("POST", url, json={**body, "stream": True, "max_tokens": 200}) as r:
                    next(r.iter_lines())
            else:
                r = http.post(url, json=body)
                text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
                results.append((kind, r.status_code, (text, expected[prompt])))
                return
            results.append((kind, r.status_code, None))

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(one, range(200)))
    assert len(results) == 200
    assert not [r for r in results if r[1] >= 500]
    assert all(400 <= status < 500 for kind, status, _ in results if kind not in ("ok", "cancelled"))
    assert len([r for r in results if r[0] != "ok"]) == 67
    oks = [r for r in results if r[0] == "ok"]
    assert all(status == 200 and got == want for _, status, (got, want) in oks)
    health = server.wait_idle()
    assert health["status"] == "ok" and (health["active"], health["queued"]) == (0, 0)
    assert server.rss_bytes() <= rss0 * 1.1 + 50e6
    metrics = server.get("/metrics").text
    assert json.loads(server.get("/health").text)["status"] == "ok" and "babyllama_requests_total" in metrics


def test_scheduler_ends_jobs_past_their_time_limit_and_skips_cancelled_ones():
    import time

    from conftest import random_weights, tiny_args

    from babyllama.engine import Engine
    from babyllama.sampler import Sampler
    from babyllama.serve.metrics import Metrics
    from babyllama.serve.scheduler import Finished, Job, QueueFull, Scheduler, Token

    events = []
    done = threading.Event()

    def emit(index, event):
        events.append((index, event))
        if isinstance(event, Finished):
            done.set()

    sched = Scheduler(Engine(random_weights(tiny_args())), slots=1, queue_size=2, metrics=Metrics(1))
    late = Job([1, 5, 6], 10, Sampler(0.0), emit, index=0, deadline=time.monotonic() - 1)
    gone = Job([1, 5, 6], 10, Sampler(0.0), emit, index=1)
    gone.cancel()
    with pytest.raises(QueueFull):  # one would find the free slot, three would wait
        sched.submit([late, gone, Job([1], 1, Sampler(0.0), emit), Job([1], 1, Sampler(0.0), emit)])
    sched.submit([late, gone])
    sched.start()
    try:
        assert done.wait(10)
        time.sleep(0.2)
        assert events == [(0, Finished("timeout"))]  # the cancelled job never ran nor answered
        done.clear()
        sched.submit([Job([1, 5, 6], 3, Sampler(0.0), emit, index=2)])
        assert done.wait(10)
        assert [type(e) for _, e in events[1:]] == [Token, Token, Token, Finished]
        assert sched.status() == {"slots": 1, "active": 0, "queued": 0} and sched.healthy
        # status() waited for the step that finished the job to let go of the lock: the gauges are set by then
        assert sched.metrics.registry.get_sample_value("babyllama_active_slots") == 0
    finally:
        sched.stop()


@pytest.mark.parametrize("flags, message", [
    (["--slots", "0"], "--slots must be >= 1"),
    (["--port", "70000"], "--port must be <= 65535"),
    (["--timeout", "0"], "--timeout must be a finite number of seconds > 0, got 0"),
    (["--timeout", "inf"], "--timeout must be a finite number of seconds > 0, got inf"),
    (["--header-timeout", "-1"], "--header-timeout must be a finite number of seconds > 0, got -1"),
    (["--model-name", " "], "--model-name must not be empty"),
    (["--max-connections", "0"], "--max-connections must be >= 1, got 0"),
    (["--chat-template", "nope"], "unknown chat template 'nope'"),
    (["--api-key", " "], "--api-key must not be empty"),
    (["--api-key", "clé"], "--api-key must be printable ASCII"),
    (["--api-key", " k3y"], "--api-key must not begin or end with a space"),
    (["--host", ""], "--host must not be empty"),
    (["--slots", "10000000"], "lower --slots, or choose a smaller --kv-cache"),  # before it says "serving"
    (["/no/such/model.bin"], "not found"),
])
def test_serve_flags_are_checked_in_one_line(flags, message):
    out = run_cli("serve", *flags)
    err = out.stderr.decode()
    assert out.returncode == 1 and message in err and err.count("\n") == 1, err


SERVE_FLAGS = {"--slots": "slots", "--queue": "queue", "--timeout": "timeout_s", "--header-timeout": "header_timeout_s",
               "--max-body": "max_body_bytes", "--chunk": "max_tokens_per_step", "--prefix-min": "prefix_min",
               "--max-connections": "max_connections"}


def test_serve_flags_default_to_serveconfig_and_the_docs_say_so():
    """ServeConfig is where the server's defaults are written: `serve` without flags runs with them, its --help
    shows them, and docs/serve.md's flags table gives the same figures."""
    import dataclasses

    from babyllama.cli import build_parser
    from babyllama.config import ServeConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    args = build_parser().parse_args(["serve"])
    table = {row.split("|")[1].strip(): row.split("|")[2].strip()
             for row in (ROOT / "docs" / "serve.md").read_text().splitlines() if row.startswith("| `--")}
    for flag, field in SERVE_FLAGS.items():
        value = defaults[field]
        assert getattr(args, flag[2:].replace("-", "_")) == value, flag
        written = f"{value // (1 << 20)} MiB" if field == "max_body_bytes" else f"{value:g}"
        assert table[f"`{flag}`"] in (written, f"{written} s"), flag
    assert args.api_key == defaults["api_key"]


def test_loopback_hosts():
    from babyllama.cli.serve import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.4", "::", "example.com"))


def test_readme_serve_examples(server):
    """The README's Serve section, as written, against the server (its port for 8000): the curl command prints
    `run -t 0`'s text; the openai example streams a reply from the chat model that the section's second
    command serves."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Serve"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(r"```(sh|py)\n(.*?)```", section, flags=re.S)
    sh = [code for lang, code in blocks if lang == "sh"]
    py = [code for lang, code in blocks if lang == "py"]
    assert "babyllama serve" in sh[0] and len(sh) == 2 and len(py) == 1

    def local(code: str) -> str:
        assert "127.0.0.1:8000" in code
        return code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")

    if shutil.which("curl"):
        out = subprocess.run(["bash", "-c", local(sh[1])], capture_output=True, text=True, timeout=60)
        assert json.loads(out.stdout)["choices"][0]["text"] == run_text("Once upon a time", 40)
    chat_command = sh[0].splitlines()[1].split("#")[0].split()
    assert chat_command[:2] == ["babyllama", "serve"] and (ROOT / chat_command[2]).is_file()
    chat_server = Server(str(ROOT / chat_command[2]))
    try:
        chat_port = f"127.0.0.1:{chat_server.port}"
        out = subprocess.run([sys.executable, "-c", py[0].replace("127.0.0.1:8000", chat_port)], capture_output=True,
                             text=True, timeout=60)
    finally:
        chat_server.stop()
    assert out.returncode == 0 and len(out.stdout) > 20, out.stderr


def test_null_means_the_default(server):
    """OpenAI reads null as "not set" (LiteLLM sends null for every field it leaves unset)."""
    nulls = dict.fromkeys(["model", "top_p", "n", "stream", "stream_options", "seed", "stop", "user"])
    r = server.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                                        "echo": None, "logprobs": None, **nulls})
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [run_text("Once upon a time", 8)]
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                             "temperature": None, "logprobs": None, "top_logprobs": None,
                                             "max_completion_tokens": None, **nulls})
    assert r.status_code == 200, r.text
    choice, = r.json()["choices"]
    assert choice["logprobs"] is None and r.json()["usage"]["completion_tokens"] <= 4
    r = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True,
                                        "stream_options": {"include_usage": None}})
    assert r.status_code == 200 and '"usage"' not in r.text


def test_a_temperature_too_small_for_fp32_gives_the_greedy_text(client):
    greedy = run_text("Once upon a time", 12)
    for seed in (1, 2):
        r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1e-45,
                                      seed=seed)
        assert r.choices[0].text == greedy


def test_the_prompt_counts_once_however_many_choices(client, tokenizer):
    n_prompt = len(tokenizer.encode("Once upon a time", bos=True))
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=1.0, seed=3)
    whole = client.completions.create(n=3, **kw)
    assert whole.usage.prompt_tokens == n_prompt
    assert whole.usage.completion_tokens == sum(len(c.text) > 0 for c in whole.choices) * 5 or \
        any(c.finish_reason == "stop" for c in whole.choices)
    streamed = list(client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw))
    assert streamed[-1].usage.prompt_tokens == n_prompt
    assert streamed[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_neutral_response_format_and_developer_role(client):
    def reply(role: str, **kw) -> str:
        messages = [{"role": role, "content": "You tell short stories."},
                    {"role": "user", "content": "Tell me a story."}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                              **kw).choices[0].message.content

    text = reply("system")
    assert reply("system", response_format={"type": "text"}) == text  # OpenAI's default, so neutral
    assert reply("developer") == text  # newer clients' name for the system prompt
    with pytest.raises(openai.BadRequestError, match="message 1 is developer where assistant belongs"):
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": "a"}, {"role": "developer", "content": "x"}])


@pytest.mark.parametrize("field, value", [
    ("tool_choice", "required"), ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("function_call", {"name": "f"}), ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
])
def test_asking_for_a_tool_call_or_audio_is_refused(client, field, value):
    """A reply that must be a tool call, or that must carry audio, is one this server cannot give: refused (the
    client raises BadRequestError naming the field) rather than answered with plain text."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       **{field: value})
    assert e.value.param == field and "not supported" in e.value.message


def test_logit_bias_gives_run_s_text_with_the_same_flag(client, tokenizer):
    """OpenAI's logit_bias ({"token id": bias}) adds to those logits before the penalties and the draw, as `run
    --logit-bias` does: the same text, greedy and sampled; +100 all but forces a token, -100 all but bans one, an
    empty map is neutral."""
    prompt = PROMPTS[0]
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, logprobs=0)
    text, first = greedy.choices[0].text, greedy.choices[0].logprobs.tokens[0]
    assert complete(client, prompt, 20, logit_bias={}) == text
    first_id = tokenizer.pieces.index(first.encode())
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, logprobs=0,
                                       logit_bias={str(first_id): -100}).choices[0]
    assert banned.logprobs.tokens[0] != first
    assert banned.text == run_with(prompt, 20, "-t", "0", "-l", f"{first_id}-100")
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                                       logit_bias={"400": 100}).choices[0]
    assert set(forced.logprobs.tokens) == {tokenizer.pieces[400].decode()}
    assert forced.text == run_with(prompt, 6, "-t", "0", "--logit-bias", "400+100")
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=0, logit_bias={"400": 100}).choices[0].message.content
    assert reply.split() == ["do"] * 3
    kw = dict(model=MODEL, prompt=prompt, max_tokens=20, temperature=1.0, top_p=0.9, seed=3, logit_bias={"400": 3.5})
    assert client.completions.create(**kw).choices[0].text == \
        run_with(prompt, 20, "-t", "1", "-p", "0.9", "-s", "3", "-l", "400+3.5")


def test_fields_that_ask_for_a_plain_reply_are_neutral(client):
    """tool_choice "none"/"auto" (no tools), function_call "none"/"auto", modalities ["text"] and an empty suffix
    ask for what the server does anyway: the same text."""
    messages = [{"role": "user", "content": "Tell me a story."}]
    kw = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    text = client.chat.completions.create(**kw).choices[0].message.content
    for extra in ({"tool_choice": "none"}, {"tool_choice": "auto"}, {"function_call": "auto"},
                  {"modalities": ["text"]}):
        assert client.chat.completions.create(**kw, **extra).choices[0].message.content == text, extra
    assert complete(client, PROMPTS[0], 8, suffix="") == run_text(PROMPTS[0], 8)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": [True, 5]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "min_p": 2}, "min_p"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", b'{"prompt": ', None),  # not JSON: no field to name
])
def test_validation_errors_name_the_field(server, path, body, param):
    r = server.post(path, content=body) if isinstance(body, bytes) else server.post(path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature", "finite number"),
    ("/v1/completions", b'{"prompt": "x", "top_p": Infinity}', "top_p", "finite number"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature",
     "finite number"),
    ("/v1/completions", {"prompt": "x", "max_completion_tokens": 5}, "max_completion_tokens", "takes max_tokens"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": False}, "frequency_penalty", "valid number"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": "0"}, "presence_penalty", "valid number"),
    ("/v1/completions", {"prompt": "x", "best_of": True}, "best_of", "valid integer"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias",
     "logit_bias must map token ids to biases in [-100, 100], got 5: 101"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-5": 1}}, "logit_bias",
     "token ids (up to 18 decimal digits), got '-5'"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": "1"}}, "logit_bias", "valid number"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1, "05": 2}}, "logit_bias", "each token id once"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias", "token ids in [0, "),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1" * 5000: 1}},
     "logit_bias", f"logit_bias keys must be token ids (up to 18 decimal digits), got {'1' * 40!r} (5000 characters)"),
])
def test_validation_messages_say_what_is_wrong(server, path, body, param, message):
    r = server.post(path, content=body) if isinstance(body, bytes) else server.post(path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert message in r.json()["error"]["message"], r.text


def test_logprobs_end_where_a_stop_string_cuts_the_text(client):
    """A stop string cuts the text before token k: the logprobs (completions: tokens and text_offset, chat:
    content), whole and streamed, keep only the tokens that begin inside the text."""
    kw = dict(model=MODEL, max_tokens=30, temperature=0)
    full = client.completions.create(prompt="Once upon a time", logprobs=0, **kw).choices[0]
    lp = full.logprobs
    k = next(k for k in range(3, len(lp.tokens)) if lp.tokens[k].startswith(" ") and
             full.text.find(lp.tokens[k]) == lp.text_offset[k])  # a stop string that starts at token k
    stop = lp.tokens[k]
    cut = client.completions.create(prompt="Once upon a time", logprobs=0, stop=[stop], **kw).choices[0]
    assert cut.text == full.text[:lp.text_offset[k]] and cut.finish_reason == "stop"
    assert (cut.logprobs.tokens, cut.logprobs.text_offset) == (lp.tokens[:k], lp.text_offset[:k])
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        prompt="Once upon a time", logprobs=0, stop=[stop], stream=True, **kw) if c.choices[0].logprobs]
    assert [o for c in streamed for o in c.text_offset] == lp.text_offset[:k]

    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(messages=messages, logprobs=True, **kw).choices[0]
    pieces = [c.token for c in whole.logprobs.content]
    text = whole.message.content
    starts = [len(text) - len("".join(pieces[i:])) for i in range(len(pieces))]  # where each begins in the text
    k = next(k for k in range(3, len(pieces)) if pieces[k].startswith(" ") and text.find(pieces[k]) == starts[k])
    cut = client.chat.completions.create(messages=messages, logprobs=True, stop=[pieces[k]], **kw).choices[0]
    assert cut.message.content == text[:starts[k]]
    assert [c.token for c in cut.logprobs.content] == pieces[:k]
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        messages=messages, logprobs=True, stop=[pieces[k]], stream=True, **kw) if c.choices[0].logprobs]
    assert [e.token for c in streamed for e in c.content] == pieces[:k]


def test_every_seed_samples_its_own_text(client):
    """Seed 0 stands for a seed that no other request's choice uses (0x5EED is an ordinary seed); choice 0 of
    seed S is `babyllama run -s S`."""
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=1.0, top_p=0.9)

    def texts(seed: int, n: int = 1) -> list[str]:
        r = client.completions.create(seed=seed, n=n, **kw)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    zero = texts(0)
    assert texts(0) == zero  # reproducible
    assert zero[0] not in texts(0x5EED) + texts(0x5EED - 1, n=2)
    out = run_cli("run", "-t", "1.0", "-p", "0.9", "-s", "5", "-i", "Once upon a time", "--max-new-tokens", "20")
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == "Once upon a time" + texts(5)[0] + "\n"
    # a negative seed (llama.cpp's front ends send -1) samples anew each time, as no seed does
    assert len({texts(-1)[0] for _ in range(4)}) > 1


@pytest.mark.parametrize("prompt", ["", "Once upon a"])
def test_logprobs_text_offsets_index_the_text(client, prompt):
    """Each token's text_offset is where its text starts in the choice's text, text held back for a possible stop
    string included; after BOS (an empty prompt) the first token shows its piece as the text does, without the
    leading space."""
    kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=2, stop=["a zebra!"])
    choice = client.completions.create(**kw).choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
    assert all(top[token] == chosen for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    if not prompt:
        assert not choice.text.startswith(" ") and not lp.tokens[0].startswith(" ")
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset


def test_head_cors_and_idle_gauges(server, client):
    """HEAD on /health and / (health checkers probe with it); a CORS preflight for any request header (OpenAI's
    SDKs add X-Stainless-*); after the last request the active-slots gauge is back to 0, as /health says."""
    for path in ("/health", "/"):
        r = httpx.head(server.url + path)
        assert (r.status_code, r.content) == (200, b"")
    counted = r'babyllama_requests_total\{endpoint="/v1/chat/completions",status="200"\} (\S+)'
    chats = lambda: [float(n) for n in re.findall(counted, server.get("/metrics").text)]  # noqa: E731
    before = chats()
    r = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-stainless-retry-count"})
    assert r.status_code == 200, r.text
    assert "x-stainless-retry-count" in r.headers["access-control-allow-headers"].lower()
    assert chats() == before  # a preflight is no completion
    for method, path, allowed in (("GET", "/v1/completions", {"POST"}), ("PUT", "/health", {"GET", "HEAD"})):
        r = httpx.request(method, server.url + path)
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == allowed, r.headers
    complete(client, "Once upon a time", 8)
    assert server.wait_idle()["active"] == 0
    assert server.metric("babyllama_active_slots") == 0


def test_text_that_cannot_fit_the_context_is_refused_before_encoding(monkeypatch):
    """A prompt of more bytes than the context's tokens can cover (a token covers at most its longest piece's
    bytes) is refused without being encoded; one that may fit is encoded beside the event loop, not on it."""
    import asyncio

    from conftest import byte_tokenizer, random_weights, tiny_args
    from starlette.testclient import TestClient

    from babyllama.api import Model
    from babyllama.serve import ServeConfig, create_app

    tok = byte_tokenizer(300)
    on_loop: list[bool] = []
    encode = tok.encode

    def watched_encode(*args, **kw):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return encode(*args, **kw)

    monkeypatch.setattr(tok, "encode", watched_encode)
    seq_len = 64
    longest = max(len(tok.piece_bytes(i)) for i in range(3, tok.vocab_size))  # "tok299": 6 bytes
    app = create_app(Model(random_weights(tiny_args(max_seq_len=seq_len)), tok), ServeConfig(model_name="m"))
    with TestClient(app) as http:
        for path, body in (("/v1/completions", {"prompt": "x" * (seq_len * longest + 1)}),
                           ("/v1/chat/completions", {"messages": [
                               {"role": "system", "content": "x" * (seq_len * longest // 2)},
                               {"role": "user", "content": "x" * (seq_len * longest // 2 + 1)}]})):
            r = http.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            assert "more than the model's context of 64 tokens can hold" in r.json()["error"]["message"]
        assert on_loop == []
        r = http.post("/v1/completions", json={"prompt": "x" * 100})  # 100 tokens: too long, found by encoding
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert on_loop and not any(on_loop)


def space_run_tokenizer() -> Tokenizer:
    """byte_tokenizer's layout with merges of up to eight spaces: a token covers at most 8 bytes of text."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    pieces += [b" ", b"  ", b"    ", b"        ", b"a"]
    pieces += [f"t{i}".encode() for i in range(300 - len(pieces))]
    return Tokenizer(pieces, [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)])


def test_a_text_of_meta_spaces_is_counted_as_the_tokenizer_reads_it():
    """The check before encoding counts a "▁" (U+2581, three bytes of UTF-8) as the one-byte space the tokenizer
    reads it as: a prompt of them that fits the context is answered, not refused as too many bytes."""
    from conftest import random_weights, tiny_args
    from starlette.testclient import TestClient

    from babyllama.api import Model
    from babyllama.serve import ServeConfig, create_app

    tok = space_run_tokenizer()
    assert tok.most_bytes_per_token() == 8
    text = "a" + "\u2581" * 200  # 601 bytes of UTF-8, more than 64 tokens x 8 bytes; 201 bytes to the tokenizer
    assert tok.text_bytes(text) == 201 and len(tok.encode(text)) < 40
    app = create_app(Model(random_weights(tiny_args(max_seq_len=64)), tok), ServeConfig(model_name="m"))
    with TestClient(app) as http:
        r = http.post("/v1/completions", json={"prompt": text, "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = http.post("/v1/completions", json={"prompt": "a" * 513})  # still refused before encoding
        assert r.status_code == 400 and "is 513 bytes" in r.json()["error"]["message"], r.text


def emoji_after_hi(tok: Tokenizer):
    """A model that answers any prompt ending in BOS with "Hi😀" (the emoji as its four byte tokens), then EOS."""
    from conftest import scripted_weights

    ids = [tok.byte_ids[b] for b in "Hi😀".encode()]
    return scripted_weights(dict(zip([BOS, *ids[:-1]], ids)), tok.vocab_size)


def test_a_stop_string_completed_by_the_last_text_ends_the_choice_as_a_stop():
    """max_tokens that cuts a character short leaves a U+FFFD at the end; a stop string it completes cuts
    the text there, and the choice's finish_reason is "stop", whole and streamed, not "length"."""
    from conftest import byte_tokenizer
    from starlette.testclient import TestClient

    from babyllama.api import Model
    from babyllama.serve import ServeConfig, create_app

    tok = byte_tokenizer(300)
    app = create_app(Model(emoji_after_hi(tok), tok), ServeConfig(model_name="m"))
    with TestClient(app) as http:
        for stop, text, reason in (("i\ufffd", "H", "stop"), ("x", "Hi\ufffd", "length")):
            body = {"prompt": [BOS], "max_tokens": 4, "temperature": 0, "stop": stop}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert (r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]) == (text, reason)
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
            assert "".join(e["choices"][0]["text"] for e in events) == text
            assert events[-1]["choices"][0]["finish_reason"] == reason


def test_echo_of_token_ids_that_end_inside_a_character_reads_as_one_text():
    """A prompt of token ids that ends with a character's first bytes (here the emoji's first two): the echo
    holds the whole characters before them, and the completion's text, which finishes the character, begins
    with it, so echo + completion is the text of all the ids (not a U+FFFD for each half)."""
    from conftest import byte_tokenizer
    from starlette.testclient import TestClient

    from babyllama.api import Model
    from babyllama.serve import ServeConfig, create_app

    tok = byte_tokenizer(300)
    app = create_app(Model(emoji_after_hi(tok), tok), ServeConfig(model_name="m"))
    prompt = [BOS] + [tok.byte_ids[b] for b in "Hi😀".encode()[:4]]
    with TestClient(app) as http:
        for echo, text in ((True, "Hi😀"), (False, "\ufffd\ufffd")):  # alone, the last two bytes are no character
            body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": echo}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == text
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
            assert "".join(e["choices"][0]["text"] for e in events) == text


def test_health_says_shutting_down_once_the_server_stops():
    """Between the signal to stop and the last connection's end, /health answers 503 "shutting_down" (a load
    balancer then sends the requests elsewhere), as the API answers new requests."""
    from conftest import byte_tokenizer, random_weights, tiny_args
    from starlette.testclient import TestClient

    from babyllama.api import Model
    from babyllama.serve import ServeConfig, create_app

    app = create_app(Model(random_weights(tiny_args()), byte_tokenizer(300)), ServeConfig(model_name="m"))
    with TestClient(app) as http:
        assert http.get("/health").json()["status"] == "ok"
        app.state.service.shut_down()
        r = http.get("/health")
        slots = ServeConfig(model_name="m").slots
        assert r.status_code == 503 and r.json() == {"status": "shutting_down", "slots": slots, "active": 0,
                                                     "queued": 0}
        assert http.head("/health").status_code == 503
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


def test_time_to_first_token_counts_from_the_request_s_arrival(monkeypatch):
    """babyllama_time_to_first_token_seconds counts from the request's arrival, as /metrics says: the reading of
    its body and the encoding of its prompt (here made to take 0.5 s) included."""
    import time

    from conftest import byte_tokenizer, random_weights, tiny_args
    from starlette.testclient import TestClient

    from babyllama.api import Model
    from babyllama.serve import ServeConfig, create_app

    tok = byte_tokenizer(300)
    encode = tok.encode

    def slow_encode(*args, **kw):
        time.sleep(0.5)
        return encode(*args, **kw)

    monkeypatch.setattr(tok, "encode", slow_encode)
    app = create_app(Model(random_weights(tiny_args()), tok), ServeConfig(model_name="m"))
    with TestClient(app) as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        registry = app.state.service.metrics.registry
        assert registry.get_sample_value("babyllama_time_to_first_token_seconds_count") == 1
        assert registry.get_sample_value("babyllama_time_to_first_token_seconds_sum") >= 0.5


def test_a_model_file_is_served_under_its_own_cards_name_and_template(tmp_path, monkeypatch, capsys):
    """NAME.json beside NAME.bin is its card (the assets' chat.bin and chat.json): the card's name is the model id
    and its chat template is used; a model without a card is served under its file name. Another model's
    model.json in the same folder is not this model's card."""
    from babyllama import serve
    from babyllama.cli import main
    from babyllama.loading import BUILTIN_CHAT, BUILTIN_MODEL

    configs = []
    monkeypatch.setattr(serve, "create_app", lambda model, config: configs.append(config))
    monkeypatch.setattr(serve, "listen", lambda host, port: [])
    monkeypatch.setattr(serve, "run", lambda *args: None)
    assert main(["serve", str(BUILTIN_CHAT)]) == 0
    chat_card = json.loads(BUILTIN_CHAT.with_suffix(".json").read_text())
    assert configs[-1].model_name == chat_card["name"] == "babyllama-chat"
    assert main(["serve", str(BUILTIN_MODEL)]) == 0
    assert configs[-1].model_name == "babyllama-stories"
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copyfile(BUILTIN_MODEL, folder / "other.bin")
    shutil.copyfile(BUILTIN_TOKENIZER, folder / "tokenizer.bin")
    (folder / "model.json").write_text(json.dumps({"name": "not-this-one", "chat_template": "no-such-template"}))
    assert main(["serve", str(folder / "other.bin")]) == 0
    assert configs[-1].model_name == "other.bin"
    capsys.readouterr()


def test_an_adapter_is_served_under_its_own_name(tmp_path, monkeypatch, capsys):
    """With --lora the model id is the adapter's name, not the base's: its run folder's (given as the folder or as
    one of the adapter.* files training writes there), else its file's stem; --model-name still decides."""
    from babyllama import api, serve
    from babyllama.cli import main
    from babyllama.loading import BUILTIN_CHAT

    configs = []
    monkeypatch.setattr(serve, "create_app", lambda model, config: configs.append(config))
    monkeypatch.setattr(serve, "listen", lambda host, port: [])
    monkeypatch.setattr(serve, "run", lambda *args: None)
    real_load = api.load
    # the name is the matter here, not the merge (test_finetune's): the base is loaded as it is
    monkeypatch.setattr(api, "load", lambda checkpoint, tokenizer, lora=None, **kw: real_load(checkpoint, tokenizer,
                                                                                              **kw))
    run_dir = tmp_path / "stories-tuned"
    run_dir.mkdir()
    for lora, name in ((run_dir, "stories-tuned"), (run_dir / "adapter.safetensors", "stories-tuned"),
                       (run_dir / "adapter.json", "stories-tuned"), (tmp_path / "kind.safetensors", "kind")):
        assert main(["serve", "--lora", str(lora)]) == 0
        assert configs[-1].model_name == name
    assert main(["serve", "--lora", str(run_dir), "--model-name", "mine"]) == 0
    assert configs[-1].model_name == "mine"
    # an adapter was fine-tuned with Llama 2's template, not the one its base's card names
    assert main(["serve", str(BUILTIN_CHAT), "--lora", str(run_dir)]) == 0
    assert configs[-1].chat_template is None
    assert main(["serve", str(BUILTIN_CHAT)]) == 0
    assert configs[-1].chat_template == "babyllama"
    assert main(["serve"]) == 0
    assert configs[-1].model_name == MODEL
    capsys.readouterr()


def overflowing_engine():
    """An engine on fp16 KV cache in which token 7's layer-0 value lies beyond fp16's range (its embedding alone
    has a first component, which wv multiplies by 1e6): a step holding it raises the cache's error."""
    from conftest import random_weights, tiny_args

    from babyllama.engine import Engine

    w = random_weights(tiny_args())
    w.tok_embeddings[:, 0] = 0
    w.tok_embeddings[7, 0] = 1
    w.wv[0][:, 0] = 1e6
    return Engine(w, kv_cache="f16")


def test_a_step_the_model_cannot_compute_fails_its_jobs_and_the_server_goes_on():
    """A step holding token 7 raises the fp16 KV cache's error (overflowing_engine). Its job ends with that
    message and the scheduler serves the next job (were its thread to die, every later request would fail)."""
    import time

    from babyllama.sampler import Sampler
    from babyllama.serve.metrics import Metrics
    from babyllama.serve.scheduler import Finished, Job, Scheduler, Token

    events, done = [], threading.Event()

    def emit(index, event):
        events.append((index, event))
        if isinstance(event, Finished):
            done.set()

    sched = Scheduler(overflowing_engine(), slots=2, queue_size=4, metrics=Metrics(2), prefix_min=1)
    sched.start()
    try:
        sched.submit([Job([1, 5, 7, 6], 5, Sampler(0.0), emit, index=0)])
        assert done.wait(10)
        (_, end), = events
        assert end.reason == "error" and "exceeds the range of the fp16 KV cache" in end.message
        done.clear()
        sched.submit([Job([1, 5, 6], 3, Sampler(0.0), emit, index=1)])
        assert done.wait(10)
        assert [type(e) for _, e in events[1:]] == [Token, Token, Token, Finished] and events[-1][1].reason == "length"
        time.sleep(0.1)
        assert sched.healthy and sched.status()["active"] == 0
    finally:
        sched.stop()


def test_a_failure_of_one_sequence_ends_its_job_only():
    """Jobs that share steps with one the model cannot compute (a prompt whose value overflows the fp16 cache,
    in the same engine call as theirs; or a sequence whose sampling meets NaN logits) get all their tokens, the
    same as alone; the failing jobs end with their own error."""
    from babyllama.errors import BabyLlamaError
    from babyllama.sampler import Sampler
    from babyllama.serve.metrics import Metrics
    from babyllama.serve.scheduler import Finished, Job, Scheduler, Token

    class NaNSampler(Sampler):
        def sample(self, logits, tokens=(), generated=()):
            raise BabyLlamaError("the model produced NaN logits")

    def run(jobs: list[Job]) -> None:
        sched = Scheduler(overflowing_engine(), slots=3, queue_size=4, metrics=Metrics(3), prefix_min=0)
        sched.submit(jobs)  # before the thread starts: all admitted into the same first step
        sched.start()
        try:
            assert all(finished[job.index].wait(10) for job in jobs)
            assert sched.healthy
        finally:
            sched.stop()

    events: dict[int, list] = {0: [], 1: [], 2: []}
    finished = {i: threading.Event() for i in events}

    def emit(index, event):
        events[index].append(event)
        if isinstance(event, Finished):
            finished[index].set()

    run([Job([1, 5, 6], 6, Sampler(0.0), emit, index=0)])
    alone = events[0]
    assert [type(e) for e in alone] == [Token] * 6 + [Finished]
    events[0], finished[0] = [], threading.Event()
    run([Job([1, 5, 7, 6], 5, Sampler(0.0), emit, index=1), Job([1, 5, 6], 6, Sampler(0.0), emit, index=0),
         Job([1, 8, 9], 5, NaNSampler(0.0), emit, index=2)])
    assert events[0] == alone
    (overflow,), (nan,) = events[1], events[2]
    assert overflow.reason == "error" and "exceeds the range of the fp16 KV cache" in overflow.message
    assert nan == Finished("error", "the model produced NaN logits")


def run_with(prompt: str, n: int, *flags: str) -> str:
    """`run_text` with more flags."""
    out = run_cli("run", "-i", prompt, "--max-new-tokens", str(n), *flags)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode()[len(prompt):-1]


def test_sampling_controls_give_run_s_text(client):
    """llama.cpp's controls through the request body (the openai client's extra_body: top_k, min_p,
    repeat_penalty or repetition_penalty, repeat_last_n) and OpenAI's penalties as the client's own arguments
    give the text of `babyllama run` with the same flags; top_k 1 is greedy at any temperature."""
    prompt = PROMPTS[0]
    greedy = complete(client, prompt, 40)
    penalized = run_with(prompt, 40, "-t", "0", "--repeat-penalty", "1.5")
    assert penalized != greedy
    assert complete(client, prompt, 40, extra_body={"repeat_penalty": 1.5}) == penalized
    assert complete(client, prompt, 40, extra_body={"repetition_penalty": 1.5}) == penalized
    assert complete(client, prompt, 40, extra_body={"repeat_penalty": 1.5, "repeat_last_n": 4}) == \
        run_with(prompt, 40, "-t", "0", "--repeat-penalty", "1.5", "--repeat-last-n", "4")
    assert complete(client, prompt, 40, frequency_penalty=1.0, presence_penalty=0.5) == \
        run_with(prompt, 40, "-t", "0", "--frequency-penalty", "1", "--presence-penalty", "0.5")
    kw = dict(model=MODEL, prompt=prompt, max_tokens=40, seed=5)
    assert client.completions.create(temperature=1.5, extra_body={"top_k": 1}, **kw).choices[0].text == greedy
    sampled = client.completions.create(temperature=1.0, **kw).choices[0].text
    assert client.completions.create(temperature=1.0, extra_body={"top_k": -1}, **kw).choices[0].text == sampled
    assert client.completions.create(temperature=1.0, extra_body={"min_p": 0.05}, **kw).choices[0].text == \
        run_with(prompt, 40, "-t", "1", "-p", "1", "-s", "5", "--min-p", "0.05")
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = dict(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    plain = client.chat.completions.create(**chat).choices[0].message.content
    assert client.chat.completions.create(**chat, extra_body={"repeat_penalty": 2.0}).choices[0].message.content \
        != plain
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**chat, extra_body={"top_k": -5})
    assert e.value.param == "top_k"
    # the message a person reads (the chat page shows it): the field named once, without pydantic's "body: "
    assert e.value.body["message"] == "top_k must be an integer >= 0 (0: off), got -5"


def test_once_the_scheduler_has_died_requests_are_refused_not_left_waiting(monkeypatch):
    """A bug that kills the scheduler thread ends the jobs it held with an error; a request that comes after is
    refused at once (the server's 500) instead of waiting forever in a queue that nothing reads, past its time
    limit too, and /health no longer counts the ended jobs as active."""
    from conftest import random_weights, tiny_args

    from babyllama.engine import Engine
    from babyllama.sampler import Sampler
    from babyllama.serve.metrics import Metrics
    from babyllama.serve.scheduler import Finished, Job, Scheduler, SchedulerFailed

    def step():
        raise RuntimeError("a bug")

    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's traceback: expected here
    events, done = [], threading.Event()

    def emit(index, event):
        events.append((index, event))
        done.set()

    sched = Scheduler(Engine(random_weights(tiny_args())), slots=2, queue_size=4, metrics=Metrics(2))
    monkeypatch.setattr(sched.batch, "step", step)
    sched.start()
    try:
        sched.submit([Job([1, 5, 6], 3, Sampler(0.0), emit)])
        assert done.wait(10) and events == [(0, Finished("error"))]
        sched._thread.join(10)
        assert not sched.healthy and sched.status() == {"slots": 2, "active": 0, "queued": 0}
        with pytest.raises(SchedulerFailed):
            sched.submit([Job([1, 5, 6], 3, Sampler(0.0), emit)])
    finally:
        sched.stop()


def test_serve_without_its_extra_names_the_install_command_for_a_checkout_too(monkeypatch, capsys):
    """As every other extra's hint: the released package's install command and a source checkout's."""
    from babyllama.cli import main

    for name in [m for m in sys.modules if m == "babyllama.serve" or m.startswith("babyllama.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr("babyllama.serve", raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # not installed
    assert main(["serve"]) == 1
    assert capsys.readouterr().err.strip() == (
        "babyllama: error: babyllama serve (uvicorn is missing) needs babyllama's 'serve' extra: pip install "
        "'babyllama[serve]' (in a source checkout: pip install -e '.[serve]')")


def test_the_scheduler_makes_every_slot_s_whole_context_at_start(monkeypatch):
    """Start-up checks that --slots whole contexts fit; the scheduler's cache is made that size at once (its pages
    taken as they fill), so that no step of a running request grows it, or fails to (a chat's cache grows)."""
    from conftest import random_weights, tiny_args

    import babyllama.generate as gen
    from babyllama.engine import Engine
    from babyllama.serve.metrics import Metrics
    from babyllama.serve.scheduler import Scheduler

    monkeypatch.setattr(gen, "INITIAL_CACHE", 2)
    sched = Scheduler(Engine(random_weights(tiny_args(max_seq_len=96))), slots=3, queue_size=2, metrics=Metrics(3))
    assert (sched.batch.cache.seq_len, sched.batch.cache.n_slots) == (96, 3)


@pytest.mark.parametrize("roles", [
    ("assistant", "user"), ("system", "system", "user"), ("user", "system", "user"), ("user", "user"),
    ("system", "assistant", "user"), ("user", "assistant"), ("system",), ("user", "assistant", "assistant", "user"),
])
def test_a_conversation_out_of_llama2_order_is_one_400(server, roles):
    """Orders Meta's Llama 2 template has no layout for (transformers' apply_chat_template raises for the
    alternation ones; a last assistant turn leaves no reply to generate): one 400 naming messages."""
    messages = [{"role": role, "content": f"turn {i}"} for i, role in enumerate(roles)]
    r = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "\n" not in r.json()["error"]["message"]


def test_http_details_a_client_or_browser_meets():
    """The page's revalidation is a 304 as its files' are; a Private Network Access preflight (a public page
    calling this machine) is allowed, as CORS allows any origin; a path with a trailing slash is a 404 naming the
    path meant (it was a bare 307 to an absolute URL, and /v1/models/ "the model '' does not exist"); a
    compressed body is a 415 saying so, and a UTF-8 byte order mark before the JSON is passed over."""
    import gzip

    from conftest import byte_tokenizer, random_weights, tiny_args
    from starlette.testclient import TestClient

    from babyllama.api import Model
    from babyllama.serve import ServeConfig, create_app

    app = create_app(Model(random_weights(tiny_args()), byte_tokenizer(300)), ServeConfig(model_name="m"))
    body = {"prompt": "x", "max_tokens": 2}
    with TestClient(app) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["etag"]
        again = http.get("/", headers={"If-None-Match": page.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert http.head("/").status_code == 200
        preflight = http.options("/v1/chat/completions", headers={
            "Origin": "https://example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type", "Access-Control-Request-Private-Network": "true"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-private-network"] == "true"
        for method, path, meant in (("POST", "/v1/completions/", "/v1/completions"),
                                    ("GET", "/v1/models/", "/v1/models"), ("GET", "/health/", "/health")):
            r = http.request(method, path, json=body if method == "POST" else None, follow_redirects=False)
            assert r.status_code == 404, (path, r.status_code)
            assert r.json()["error"]["message"] == f"no such path: {path} (without the trailing slash: {meant})"
        r = http.post("/v1/completions", content=gzip.compress(json.dumps(body).encode()),
                      headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        assert r.status_code == 415 and "Content-Encoding gzip is not supported" in r.json()["error"]["message"]
        r = http.post("/v1/completions", content=b"\xef\xbb\xbf" + json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text


def test_cors_origin_limits_the_pages_that_may_call_the_api():
    """--cors-origin: a preflight from a listed origin is allowed and answered with that origin, one from any
    other origin is refused (400, no Access-Control-Allow-Origin, so the browser never sends the request), and
    any other request from such a page is refused (403) before it runs: a POST of text/plain needs no preflight and
    ran, unread, before. Requests without an Origin and from the server's own origin (its chat page) pass; the
    flag's value is checked and read as a browser sends an origin (lower case, no default port)."""
    server = Server("--cors-origin", "HTTP://Allowed.test:8080", "--cors-origin", "https://Other.test:443")
    try:
        def preflight(origin: str) -> httpx.Response:
            return httpx.options(server.url + "/v1/chat/completions", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type", "Access-Control-Request-Private-Network": "true"})

        def plain_post(origin: str | None) -> httpx.Response:  # what fetch sends without a preflight
            body = json.dumps({"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0})
            headers = {"Content-Type": "text/plain;charset=UTF-8", **({"Origin": origin} if origin else {})}
            return httpx.post(server.url + "/v1/completions", content=body, headers=headers, timeout=60)

        generated = 0
        for origin in ("http://allowed.test:8080", "https://other.test"):
            r = preflight(origin)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, r.headers
            r = plain_post(origin)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
            generated += r.json()["usage"]["completion_tokens"]
        for origin in ("http://evil.test", "http://allowed.test", "https://allowed.test:8080", "null"):
            r = preflight(origin)
            assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, origin
            r = plain_post(origin)
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", origin
            assert "access-control-allow-origin" not in r.headers
        assert server.metric("babyllama_generated_tokens_total") == generated > 0  # the allowed posts' tokens alone
        assert plain_post(None).status_code == 200
        assert plain_post(server.url).status_code == 200  # the chat page's own origin
        r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.test"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    finally:
        server.stop()
    for bad in ("https://example.com/", "example.com", "https://example.com/chat", "", "http://user:pw@a.test",
                "http://a.test:xyz", "http://a.test:99999", "http://a%2F", "http://bücher.de"):
        proc = run_cli("serve", "--cors-origin", bad, "--port", "0")
        assert proc.returncode == 2 and f"argument --cors-origin: not an origin: {bad!r}" in proc.stderr.decode()


def test_the_upgrade_warnings_uvicorn_logs_are_left_out():
    """Every request with an Upgrade header (curl --http2 sends h2c's) logged two warnings, one advising a
    WebSocket library; the server has no WebSocket route and answers such requests as HTTP/1.1."""
    import logging

    from babyllama.serve import no_upgrade_advice

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, None, None)

    assert not no_upgrade_advice(record("Unsupported upgrade request."))
    assert not no_upgrade_advice(record('No supported WebSocket library detected. Please use "pip install ...'))
    assert no_upgrade_advice(record("Invalid HTTP request received."))
