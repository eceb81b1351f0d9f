"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright): a prompt typed,
streamed text appearing, tokens/s shown, the stop button, the API key typed once; a screenshot is saved as a
test artifact (test-artifacts/chat-page.png; BABYLLAMA_UPDATE_DOCS=1 also copies it to docs/images/)."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import shared_file
from serve_helpers import ROOT, Server

CHROMIUM = Path(os.environ.get("BABYLLAMA_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("BABYLLAMA_ARTIFACTS", ROOT / "test-artifacts"))
SCREENSHOT_DOC = ROOT / "docs" / "images" / "chat-page.png"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the dev extra)")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def count_updates(page) -> None:
    """Count how often a reply's text changes (window.updates): more than once, it was streamed."""
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver((records) => {
            window.updates += records.filter((r) => r.target.classList && r.target.classList.contains('assistant'))
                                     .length;
        }).observe(document.getElementById('log'), {subtree: true, childList: true});
    }""")


def greedy_storyteller(page) -> None:
    """A system prompt, and temperature 0 (the input event the slider's label follows)."""
    page.fill("#system", "You are a storyteller.")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "input")


def send_and_read_stream(page, prompt: str) -> list[str]:
    """Type `prompt`, send it, wait for the reply to end; the content pieces of the server's stream, in order."""
    page.fill("#prompt", prompt)
    count_updates(page)
    with page.expect_response("**/v1/chat/completions") as answer:
        page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelector('.msg.assistant') && "
                           "document.querySelector('.msg.assistant').textContent.length > 20")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
    events = [json.loads(line[6:]) for line in answer.value.text().splitlines() if line.startswith("data: {")]
    return [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]


@pytest.mark.parametrize("model, name", [(None, "babyllama-stories"), ("babyllama/assets/chat.bin", "babyllama-chat")],
                         ids=["story-model", "chat-model"])
def test_chat_page_shows_the_built_in_model_s_reply(browser, model, name):
    """The page on each built-in model; the chat model's page is the screenshot docs show."""
    server = Server(*([model] if model else []), "--slots", "2")
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        failed: list[str] = []  # every request the page makes is answered
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(server.url + "/")
        page.wait_for_function(f"document.getElementById('model').textContent === '{name}'")
        if model is None:
            greedy_storyteller(page)
        else:  # the chat model as `babyllama chat` and the README's openai example talk to it: no system prompt
            page.fill("#temperature", "0")
            page.dispatch_event("#temperature", "input")
        streamed = send_and_read_stream(page, "Tell me a story about a cat.")
        # how many pieces the built-in model's reply comes in depends on the machine (it makes thousands of tokens
        # a second, and the server joins those that arrived while the reader was busy): the next test streams
        assert page.text_content(".msg.assistant") == "".join(streamed)  # the page shows exactly what came
        assert "tokens/s" in page.text_content("#speed")
        assert page.text_content(".msg.user") == "Tell me a story about a cat."
        assert failed == []
        # an icon of its own: a browser asks for /favicon.ico otherwise, a 404 in its console and in /metrics
        assert page.eval_on_selector("link[rel=icon]", "e => e.getAttribute('href')") == "data:,"
        if model is not None:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "chat-page.png"))
            if os.environ.get("BABYLLAMA_UPDATE_DOCS") == "1":
                SCREENSHOT_DOC.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ARTIFACTS / "chat-page.png", SCREENSHOT_DOC)
        page.close()
    finally:
        server.stop()


def test_chat_page_shows_a_reply_growing_as_it_streams(browser, tmp_path):
    """A reply of a second or more (a 14M model that never stops early, 400 tokens) comes as a stream of pieces,
    and the page shows it growing, then exactly what came."""
    from conftest import never_ending_model

    server = Server(str(never_ending_model(tmp_path)), "--slots", "1")
    try:
        page = open_page(browser, server)
        greedy_storyteller(page)
        page.fill("#max-tokens", "400")
        page.evaluate("""() => {  // the token counts the tokens/s figure was computed from, in order
            window.counts = [];
            new MutationObserver(() => window.counts.push(+document.getElementById('speed').dataset.tokens))
                .observe(document.getElementById('speed'), {attributes: true, attributeFilter: ['data-tokens']});
        }""")
        streamed = send_and_read_stream(page, "Hello")
        pieces = [piece for piece in streamed if piece]
        assert len(pieces) > 1 and all(len(piece) < len("".join(pieces)) for piece in pieces)
        assert page.evaluate("window.updates") > 1
        assert page.text_content(".msg.assistant") == "".join(streamed)
        # counted from the chunks' tokens while it streamed (a chunk carries every token since the last one), so
        # the live count reaches the usage's 400 before the usage says so
        counts = page.evaluate("window.counts")
        assert len(counts) > 2 and counts == sorted(counts) and counts[-2:] == [400, 400]
        assert "tokens/s" in page.text_content("#speed")
        page.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> tuple[Path, Path]:
    """The 15M bench shape with random weights (one thread: a long reply takes a second or more)."""
    from babyllama.bench import model_file

    tokenizer = shared_file("fixtures/llama2-tokenizer.bin")
    return model_file("15M", "fp32", tmp_path_factory.mktemp("m")), tokenizer


def test_stop_button_and_api_key(browser, slow_model):
    model, tokenizer = slow_model
    server = Server(str(model), "-z", str(tokenizer), "--threads", "1", "--slots", "2", api_key="k3y")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('status').textContent.includes('API key')")
        page.fill("#api-key", "k3y")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        page.fill("#max-tokens", "150")  # a long reply to stop, and two turns still fit the context (256)
        count_updates(page)
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
        page.wait_for_function("window.updates > 3")  # the reply appears piece by piece
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
        assert not page.is_disabled("#send") and page.is_disabled("#stop")
        assert server.wait_idle()["active"] == 0  # the aborted stream freed its slot
        tokens = server.get("/metrics").text
        assert 'babyllama_cancelled_requests_total{reason="disconnected"} 1.0' in tokens
        page.fill("#prompt", "Again")  # the key was typed once
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && "
                               "document.querySelectorAll('.msg.assistant')[1].textContent.length > 0")
        page.click("#stop")
        page.close()
    finally:
        server.stop()


def test_a_long_conversation_leaves_out_its_oldest_turns_and_a_failed_turn_is_forgotten(browser):
    """On the built-in model (context 512) with replies of up to 300 tokens, a second turn of 128 tokens never
    fits beside the first: the page leaves out the oldest exchange (keeping the system prompt) and the turn is
    answered. A turn that fails (alone longer than the context) leaves nothing in the conversation: the next
    turn is sent as if it had not been typed."""
    server = Server("--slots", "2")
    turn = "The cat sat on the mat and the dog ran in the park. " * 6  # 128 tokens
    sent: list[list[dict]] = []
    try:
        page = browser.new_page()
        page.on("request", lambda r: sent.append(json.loads(r.post_data)["messages"])
                if r.url.endswith("/v1/chat/completions") else None)
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        greedy_storyteller(page)
        page.fill("#max-tokens", "300")
        system = {"role": "system", "content": "You are a storyteller."}

        def say(text: str, n_turns: int) -> None:
            page.fill("#prompt", text)
            page.press("#prompt", "Enter")
            page.wait_for_function(f"document.querySelectorAll('#log .msg').length === {2 * n_turns} && "
                                   "!document.getElementById('send').disabled", timeout=60_000)

        say(turn.strip(), 1)
        first_reply = page.text_content(".msg.assistant")
        assert first_reply
        say("word " * 600, 2)
        assert page.text_content(".msg.error").startswith("Error: ")
        n_before = len(sent)
        say(turn.strip(), 3)
        replies = page.query_selector_all(".msg.assistant")
        assert len(replies) == 2 and replies[1].text_content() and not page.query_selector_all(".msg.error")[1:]
        assert "earliest turns" in page.text_content("#status")
        user = {"role": "user", "content": turn.strip()}
        # the failed turn is not sent again; the exchange that does not fit is left out, the system prompt kept
        assert sent[n_before:] == [[system, user, {"role": "assistant", "content": first_reply}, user],
                                   [system, user]]
        assert all(m["content"] for messages in sent for m in messages)
        page.close()
    finally:
        server.stop()


def test_a_new_conversation_while_a_reply_streams_drops_that_turn(browser, tmp_path):
    """"New conversation" clicked while a reply streams stops it (its slot is freed) and forgets the turn: the
    next message starts the new conversation alone (were the old reply kept as the cleared conversation's
    first turn, every later request would be refused as not starting with a user turn)."""
    from conftest import never_ending_model

    server = Server(str(never_ending_model(tmp_path)), "--slots", "1")
    sent: list[list[dict]] = []
    try:
        page = browser.new_page()
        page.on("request", lambda r: sent.append(json.loads(r.post_data)["messages"])
                if r.url.endswith("/v1/chat/completions") else None)
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        start_long_reply(page)  # seconds of generation: still streaming when the button is clicked
        page.wait_for_function("window.updates > 3")
        page.click("#clear")
        page.wait_for_function("!document.getElementById('send').disabled")
        assert server.wait_idle()["active"] == 0  # the reply was stopped, not left generating for nobody
        assert page.query_selector_all("#log .msg") == [] and page.text_content("#status") == ""
        page.fill("#max-tokens", "5")
        page.fill("#prompt", "Again")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('#log .msg').length === 2 && "
                               "!document.getElementById('send').disabled", timeout=60_000)
        assert not page.query_selector_all(".msg.error") and page.text_content(".msg.assistant")
        assert sent[-1] == [{"role": "system", "content": "You are a storyteller."},
                            {"role": "user", "content": "Again"}]
        page.close()
    finally:
        server.stop()


def test_the_key_message_follows_the_key_typed(browser):
    """The page of a server that needs a key says so; a wrong key typed is said to be refused, one that is not
    printable ASCII is said to be no key, and once the right one is typed the model's name shows and no message
    about the key stays."""
    server = Server("--slots", "1", api_key="k3y")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('status').textContent.includes('needs an API key')")
        # the field is not "on the left" on a phone's width, where the settings are above the conversation
        assert page.text_content("#status") == "This server needs an API key: type it in the API key field."
        page.fill("#api-key", "wrong")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('status').textContent.includes('refused')")
        assert page.text_content("#model") == ""
        # a key no HTTP header can carry: fetch refused it with a TypeError, read as the server being gone
        page.fill("#api-key", "clé")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('status').textContent.includes('printable ASCII')")
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.error').length === 1")
        assert page.text_content(".msg.error") == \
            "Error: the API key typed has characters an API key cannot have (it is printable ASCII)"
        page.fill("#api-key", "k3y")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model').textContent === 'babyllama-stories'")
        assert page.text_content("#status") == ""
        page.close()
    finally:
        server.stop()


def test_enter_that_confirms_an_input_method_candidate_does_not_send(browser):
    """Japanese, Chinese or Korean typed through an input method: the Enter that picks a candidate (a keydown
    while composing) only ends the composition; the message is sent by the next Enter."""
    server = Server("--slots", "1")
    try:
        page = open_page(browser, server)
        page.fill("#prompt", "ねこ")
        page.evaluate("""() => document.getElementById('prompt').dispatchEvent(new KeyboardEvent('keydown',
            {key: 'Enter', isComposing: true, bubbles: true, cancelable: true}))""")
        page.wait_for_timeout(300)
        assert page.input_value("#prompt") == "ねこ" and page.query_selector_all("#log .msg") == []
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('#log .msg').length === 2")
        assert page.text_content(".msg.user") == "ねこ"
        page.close()
    finally:
        server.stop()


def open_page(browser, server: Server, **options):
    """The server's chat page in a new tab (`options`: new_page's, e.g. a viewport), once it shows the model's
    name."""
    page = browser.new_page(**options)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")
    return page


def page_recording_requests(browser, server: Server):
    """The server's chat page, loaded, and the list its chat requests' bodies are added to as they are sent."""
    sent: list[dict] = []
    page = open_page(browser, server)
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    return page, sent


def start_long_reply(page) -> None:
    """A greedy reply to "Hello" of up to 1,500 tokens (seconds of generation) sent, its growth counted in
    window.updates (count_updates)."""
    greedy_storyteller(page)
    page.fill("#max-tokens", "1500")
    count_updates(page)
    page.fill("#prompt", "Hello")
    page.press("#prompt", "Enter")


def set_control(page, control: str, value: str) -> None:
    """A sampling control typed in (a range input's label follows its input event)."""
    page.fill(control, value)
    page.dispatch_event(control, "input")


def test_the_sampling_controls_are_sent_as_serve_s_request_fields(browser):
    """Left at their defaults, the controls under "More sampling controls" add nothing to the request; set, they
    are sent as the fields serve reads, and the page shows the reply the API gives for the same request."""
    server = Server("--slots", "1")
    try:
        page, sent = page_recording_requests(browser, server)
        greedy_storyteller(page)
        page.fill("#max-tokens", "60")
        prompt = "Tell me a story about a cat."
        send_and_read_stream(page, prompt)
        assert set(sent[-1]) == {"messages", "stream", "temperature", "top_p", "max_tokens", "stream_options",
                                 "logprobs"}  # a chunk's tokens, which the tokens/s figure counts
        plain = page.text_content(".msg.assistant")

        page.click("#clear")
        page.click("#more-sampling summary")
        controls = {"top_k": 5, "min_p": 0.05, "repeat_penalty": 1.3, "repeat_last_n": 32, "presence_penalty": 0.5,
                    "frequency_penalty": 0.4}
        for field, value in controls.items():
            set_control(page, "#" + field.replace("_", "-"), str(value))
        assert page.text_content("#presence-penalty-out") == "0.5" and page.is_visible("#top-k")  # shown: it is set
        send_and_read_stream(page, prompt)
        body = sent[-1]
        assert {k: body[k] for k in controls} == controls
        shown = page.text_content(".msg.assistant")
        api = server.post("/v1/chat/completions", {k: body[k] for k in body if k not in ("stream", "stream_options")})
        assert api.status_code == 200
        assert shown == api.json()["choices"][0]["message"]["content"] != plain  # the penalties changed the reply
        page.close()
    finally:
        server.stop()


def test_on_a_phone_s_width_the_conversation_and_the_composer_get_the_width(browser):
    """At 375 px the settings go above the conversation: beside it, they left the replies a word a line, the
    message box a few pixels and the stop button off the screen. A long word is broken inside its bubble."""
    server = Server("--slots", "1")
    try:
        page = open_page(browser, server, viewport={"width": 375, "height": 667})
        box = {name: page.locator(name).bounding_box() for name in ("#log", "#prompt", "#send", "#stop", "aside")}
        assert box["#log"]["width"] > 300 and box["#prompt"]["width"] > 150
        assert all(0 <= b["x"] and b["x"] + b["width"] <= 375 for b in box.values())
        assert box["#stop"]["y"] + box["#stop"]["height"] <= 667 and box["aside"]["height"] < 667 / 2
        # a word longer than the width (a URL, a path) is broken inside its bubble, not run out of it
        page.fill("#max-tokens", "4")
        page.fill("#prompt", "https://example.com/" + "a" * 200)
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('#log .msg').length === 2 && "
                               "!document.getElementById('send').disabled", timeout=60_000)
        assert page.evaluate("""() => [...document.querySelectorAll('#log, #log .msg')]
                                      .every((e) => e.scrollWidth <= e.clientWidth)""")
        page.close()
    finally:
        server.stop()


def test_the_page_works_behind_a_proxy_s_path_prefix(browser):
    """A reverse proxy that serves the server under /llama/ (each request's URL rewritten, as the proxy would):
    the page's style, script and API calls go to the page's own path, not to the site's root."""
    server = Server("--slots", "1")
    prefix = server.url + "/llama/"
    asked: list[str] = []

    def proxy(route) -> None:
        url = route.request.url
        asked.append(url)
        if url.startswith(prefix):
            route.continue_(url=server.url + "/" + url[len(prefix):])
        else:
            route.fulfill(status=404, body="not behind the proxy")

    try:
        page = browser.new_page()
        page.route("**/*", proxy)
        page.goto(prefix)
        page.wait_for_function("document.getElementById('model').textContent === 'babyllama-stories'")
        page.fill("#max-tokens", "8")
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('#log .msg').length === 2 && "
                               "!document.getElementById('send').disabled", timeout=60_000)
        assert page.text_content(".msg.assistant") and not page.query_selector_all(".msg.error")
        assert page.evaluate("getComputedStyle(document.getElementById('send')).color") == "rgb(255, 255, 255)"
        assert asked and all(url.startswith(prefix) for url in asked)
        page.close()
    finally:
        server.stop()


def test_a_server_gone_mid_reply_or_before_the_message_is_said_so(browser, tmp_path):
    """A reply whose stream ends without its [DONE] (the connection closed) was taken for a whole reply, and
    the server killed while a reply streams was "network error": both say that the connection was lost, and the
    turn is forgotten. A proxy's error page is named by its status. A message sent to a server that is gone said
    "Failed to fetch"; the page says that the server cannot be reached."""
    from conftest import never_ending_model

    server = Server(str(never_ending_model(tmp_path)), "--slots", "1")
    lost = "Error: the connection to the server was lost before the reply was complete"
    try:
        page = browser.new_page()  # a proxy's error page, then a connection closed after a piece of the reply
        answers = [dict(status=502, content_type="text/html", body="<h1>Bad Gateway</h1>"),
                   dict(status=200, content_type="text/event-stream",
                        body='data: {"choices": [{"index": 0, "delta": {"content": "Once"}}]}\n\n')]
        page.route("**/v1/chat/completions", lambda route: route.fulfill(**answers.pop(0)))
        page.goto(server.url + "/")
        for n in (1, 2):
            page.fill("#prompt", "Hello")
            page.press("#prompt", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.msg.error').length === {n}")
        assert [e.text_content() for e in page.query_selector_all(".msg.error")] == ["Error: 502 Bad Gateway", lost]
        page.close()

        page = open_page(browser, server)
        start_long_reply(page)
        page.wait_for_function("window.updates > 3")
        server.proc.kill()
        page.wait_for_function("!document.getElementById('send').disabled")
        assert page.text_content(".msg.error") == lost
        page.fill("#prompt", "Again")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.error').length === 2")
        assert page.query_selector_all(".msg.error")[1].text_content() == \
            "Error: cannot reach the server: is babyllama serve still running?"
        page.dispatch_event("#api-key", "change")  # the model's name asked for again
        page.wait_for_function("document.getElementById('status').textContent.includes('cannot reach')")
        page.close()
    finally:
        server.stop()


def test_the_status_line_says_why_a_reply_ended_and_that_turns_were_left_out(browser):
    """Without max tokens a reply runs to the end of the context, which the status line called "max tokens";
    and a reply cut at max tokens after the oldest turns were left out replaced that news with its own."""
    server = Server("--slots", "1")
    turn = ("The cat sat on the mat and the dog ran in the park. " * 24)[:1200]  # 501 tokens: 11 left of 512
    try:
        page = open_page(browser, server, viewport={"width": 1100, "height": 500})  # the turn overflows the log
        set_control(page, "#temperature", "0")  # and no system prompt: the turn alone fills the context
        page.fill("#max-tokens", "")

        def say(text: str, n_turns: int) -> str:
            page.fill("#prompt", text)
            page.press("#prompt", "Enter")
            page.wait_for_function(f"document.querySelectorAll('#log .msg').length === {2 * n_turns} && "
                                   "!document.getElementById('send').disabled", timeout=60_000)
            assert not page.query_selector_all(".msg.error")
            return page.text_content("#status")

        assert say(turn, 1) == "reply cut at the end of the model's context"
        # the line that appeared shortened the log, which follows: its last line is not left under the edge
        assert page.evaluate("(() => { const log = document.getElementById('log'); "
                             "return log.scrollHeight > log.clientHeight && "
                             "log.scrollHeight - log.scrollTop - log.clientHeight < 1; })()")
        page.fill("#max-tokens", "5")
        assert say("Hello", 2) == "earliest turns left out to fit the model's context; reply cut at max tokens"
        page.click("#more-sampling summary")  # the sliders are named by what they set (not by their value)
        for name in ("Temperature", "Top-p", "Min-p", "Presence penalty", "Frequency penalty"):
            assert page.get_by_role("slider", name=name, exact=True).count() == 1, name
        page.close()
    finally:
        server.stop()


def test_on_a_phone_s_width_a_long_conversation_scrolls_and_the_composer_stays_in_sight(browser):
    """The conversation grew the page (a flex item's automatic minimum height is its content's): after a few
    exchanges the message box was below the screen and the settings a 31 px sliver. It scrolls within its own
    box now."""
    server = Server("--slots", "1")
    try:
        page = open_page(browser, server, viewport={"width": 375, "height": 667})
        greedy_storyteller(page)
        page.fill("#max-tokens", "60")
        settings = page.locator("aside").bounding_box()["height"]
        for n in range(1, 6):
            page.fill("#prompt", f"Tell me story number {n}.")
            page.press("#prompt", "Enter")
            page.wait_for_function(f"document.querySelectorAll('#log .msg').length === {2 * n} && "
                                   "!document.getElementById('send').disabled", timeout=60_000)
        assert page.evaluate("document.documentElement.scrollHeight") <= 667
        send = page.locator("#send").bounding_box()
        assert send["y"] + send["height"] <= 667 and page.locator("aside").bounding_box()["height"] == settings
        assert page.evaluate("(() => { const log = document.getElementById('log'); "
                             "return log.scrollHeight > log.clientHeight; })()")  # it scrolls, within itself
        page.close()
    finally:
        server.stop()


def test_focus_stop_before_any_text_and_a_reload_while_waiting(browser):
    """Send clicked, or Stop pressed from the keyboard, left the focus nowhere (a disabled button's); a reply
    stopped before any text left the turn out of the conversation without a word; a reload while a reply was
    awaited lost the message sent. (The replies here never come: the requests are held.)"""
    server = Server("--slots", "1")
    held: list = []
    try:
        page, sent = page_recording_requests(browser, server)
        page.route("**/v1/chat/completions", lambda route: held.append(route))
        page.fill("#prompt", "Hello")
        page.click("#send")
        page.wait_for_function("!document.getElementById('stop').disabled")
        assert page.evaluate("document.activeElement.id") == "prompt"
        page.focus("#stop")
        page.keyboard.press("Enter")
        page.wait_for_function("!document.getElementById('send').disabled")
        assert page.evaluate("document.activeElement.id") == "prompt"
        assert page.text_content("#status") == "stopped before any text: this turn is left out of the conversation"

        page.fill("#prompt", "My second message")
        page.press("#prompt", "Enter")
        page.wait_for_function("!document.getElementById('stop').disabled")
        log = [m.text_content() for m in page.query_selector_all("#log .msg")]
        assert log[-2:] == ["My second message", ""]
        page.reload()
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        assert [m.text_content() for m in page.query_selector_all("#log .msg")] == log[:-2]
        assert page.input_value("#prompt") == "My second message"  # back in the box, to send again
        assert [m["content"] for m in sent[-1]["messages"] if m["role"] != "system"] == ["My second message"]
        page.close()
    finally:
        server.stop()


def test_a_reply_s_html_is_text_and_an_empty_reply_is_said_so(browser):
    """The reply's text is shown as text (markup in it is not run), and a reply that ends before any text (the
    model's first token an end of text), which the page leaves out of the conversation, is said to be so: it
    was an empty bubble and nothing else. Its bubbles go (they showed a turn the model is not sent) and the
    message is back in the box."""
    server = Server("--slots", "1")
    markup = '<img src=x onerror="window.ran = 1"><b>bold</b> **not bold**'

    def stream(*contents: str) -> str:
        chunks = [{"choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in contents]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    answers = [stream(markup[:12], markup[12:]), stream()]
    try:
        page = browser.new_page()
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, content_type="text/event-stream", body=answers.pop(0)))
        page.goto(server.url + "/")
        for text, back in (("<script>window.ran = 2</script>", ""), ("Hello", "Hello")):
            page.fill("#prompt", text)
            page.press("#prompt", "Enter")
            page.wait_for_function("([back]) => document.querySelectorAll('#log .msg').length === 2 && "
                                   "!document.getElementById('send').disabled && "
                                   "document.getElementById('prompt').value === back", arg=[back])
        assert [m.text_content() for m in page.query_selector_all("#log .msg")] == \
            ["<script>window.ran = 2</script>", markup]
        assert page.input_value("#prompt") == "Hello"
        assert page.query_selector_all("#log img, #log b, #log script") == []
        assert page.evaluate("window.ran") is None
        assert page.text_content("#status") == \
            "the model ended its reply before any text: this turn is left out of the conversation"
        page.close()
    finally:
        server.stop()


def test_a_reload_keeps_the_conversation_and_the_settings(browser):
    """A reload of the page (a phone's browser reloads a tab it had put away) lost the conversation and every
    setting but the key: the log, the turns sent with the next message and the settings are kept for the tab."""
    server = Server("--slots", "1")
    try:
        page, sent = page_recording_requests(browser, server)
        greedy_storyteller(page)
        page.fill("#max-tokens", "8")
        page.click("#more-sampling summary")
        set_control(page, "#top-k", "7")
        set_control(page, "#presence-penalty", "0.5")
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('#log .msg').length === 2 && "
                               "!document.getElementById('send').disabled", timeout=60_000)
        log = [(m.get_attribute("class"), m.text_content()) for m in page.query_selector_all("#log .msg")]
        page.reload()
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        assert [(m.get_attribute("class"), m.text_content()) for m in page.query_selector_all("#log .msg")] == log
        assert [page.input_value(i) for i in ("#system", "#temperature", "#max-tokens", "#top-k")] == \
            ["You are a storyteller.", "0", "8", "7"]
        assert page.text_content("#presence-penalty-out") == "0.5" and page.is_visible("#top-k")  # shown: it is set
        page.fill("#prompt", "Again")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('#log .msg').length === 4 && "
                               "!document.getElementById('send').disabled", timeout=60_000)
        assert sent[-1]["messages"] == [*sent[0]["messages"], {"role": "assistant", "content": log[1][1]},
                                        {"role": "user", "content": "Again"}]
        assert sent[-1]["top_k"] == 7 and sent[-1]["presence_penalty"] == 0.5
        page.click("#clear")
        page.reload()
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        assert page.query_selector_all("#log .msg") == []
        page.close()
    finally:
        server.stop()


def test_a_reader_who_scrolls_up_while_a_reply_streams_is_left_there(browser, tmp_path):
    """Each piece of a reply scrolled the log to the bottom, pulling away a reader who had scrolled up to read
    while it streamed; the log follows the reply only while it is scrolled to the bottom."""
    from conftest import never_ending_model

    server = Server(str(never_ending_model(tmp_path)), "--slots", "1")
    try:
        page = open_page(browser, server, viewport={"width": 800, "height": 400})
        start_long_reply(page)
        log = "document.getElementById('log')"
        page.wait_for_function(f"{log}.scrollTop > 100")  # followed while at the bottom
        page.evaluate(f"{log}.scrollTop = 0")
        updates = page.evaluate("window.updates")
        page.wait_for_function(f"window.updates > {updates + 5}")
        assert page.evaluate(f"{log}.scrollTop") == 0
        page.click("#stop")
        page.close()
    finally:
        server.stop()


def test_the_page_works_where_the_browser_refuses_storage(browser):
    """Storage refused (Chrome set to block sites' data, where reading sessionStorage throws; a full quota): the
    page still chats, and only a reload forgets. The key's read threw as the script started: a dead page."""
    server = Server("--slots", "1")
    try:
        page = browser.new_page()
        page.add_init_script("""Object.defineProperty(window, 'sessionStorage', {get() {
            throw new DOMException("Failed to read the 'sessionStorage' property", 'SecurityError'); }});""")
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        page.fill("#api-key", "k")
        page.dispatch_event("#api-key", "change")
        page.fill("#max-tokens", "3")
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.getElementById('status').textContent === 'reply cut at max tokens'")
        page.close()
    finally:
        server.stop()


def style_rules(page, selector: str) -> list[dict]:
    """The declarations of the page's style rules for `selector` (media rules' included), as the browser kept them
    (of a property declared twice in a rule, the last that it understands)."""
    return page.evaluate("""(selector) => [...document.styleSheets].flatMap((sheet) => [...sheet.cssRules])
        .flatMap((rule) => rule instanceof CSSMediaRule ? [...rule.cssRules] : [rule])
        .filter((rule) => rule.selectorText === selector)
        .map((rule) => Object.fromEntries([...rule.style].map((name) => [name, rule.style.getPropertyValue(name)])))""",
                         selector)


def test_the_page_is_as_tall_as_a_phone_s_browser_leaves_it(browser):
    """The page's height is 100dvh, the height between a phone browser's toolbars (100vh is the height without
    them: the composer went under the bottom toolbar), and so is the settings' share of it on a phone; 100vh
    stays as the fallback of browsers without dvh."""
    server = Server("--slots", "1")
    try:
        page = open_page(browser, server, viewport={"width": 375, "height": 667})
        assert [rule.get("height") for rule in style_rules(page, "body")] == ["100dvh"]
        assert "33dvh" in [rule.get("max-height") for rule in style_rules(page, "aside")]
        css = (ROOT / "babyllama" / "serve" / "static" / "chat.css").read_text()
        assert "height: 100vh; height: 100dvh;" in css and "max-height: 33vh; max-height: 33dvh;" in css
        page.close()
    finally:
        server.stop()


def test_on_phones_no_field_s_text_is_under_16px(browser):
    """iOS Safari zooms into a field whose text is under 16px when it is focused (and stays zoomed): at a phone's
    width every field one types in (the message, the system prompt, the numbers, the key) has 16px text."""
    server = Server("--slots", "1")
    try:
        page = open_page(browser, server, viewport={"width": 375, "height": 667})
        sizes = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('textarea, input')]
            .filter((e) => e.type !== 'range').map((e) => [e.id, parseFloat(getComputedStyle(e).fontSize)]))""")
        assert {"prompt", "system", "max-tokens", "top-k", "api-key"} <= set(sizes)
        assert all(size >= 16 for size in sizes.values()), sizes
        page.close()
    finally:
        server.stop()


def test_a_reply_waiting_for_a_free_slot_says_so_until_its_first_text(browser, tmp_path):
    """With the server's one slot busy (another tab's long reply), a message's reply bubble says, after a moment
    without text, that it waits for a free slot; the reply's text replaces it once the slot is freed, and the hint
    is never part of the reply (nor of the conversation kept)."""
    from conftest import never_ending_model

    server = Server(str(never_ending_model(tmp_path)), "--slots", "1")
    try:
        busy = open_page(browser, server)
        start_long_reply(busy)
        busy.wait_for_function("window.updates > 3")
        page = open_page(browser, server)
        set_control(page, "#temperature", "0")  # sampled, EOS (logit 0 here) came first in ~1 reply in 150
        page.fill("#max-tokens", "5")
        page.fill("#prompt", "Hi")
        page.press("#prompt", "Enter")
        hint = "getComputedStyle(document.querySelector('.msg.assistant'), '::before').content"
        page.wait_for_function(f"{hint}.includes('waiting for a free slot')")
        assert page.text_content(".msg.assistant") == ""
        busy.click("#stop")
        page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 0 && "
                               "!document.getElementById('send').disabled", timeout=60_000)
        assert page.evaluate(hint) == "none"
        assert page.get_attribute(".msg.assistant", "data-hint") is None
        busy.close()
        page.close()
    finally:
        server.stop()


def test_an_error_is_followed_into_view_and_the_speed_is_the_latest_reply_s(browser):
    """An error that ends a turn is scrolled into view as a reply's text is (it was left under the log's edge);
    the tokens/s figure and its count belong to the latest reply: a reply too short to time, a failed turn and a
    new conversation clear the previous reply's figure."""
    server = Server("--slots", "1")
    log = "document.getElementById('log')"
    try:
        page = open_page(browser, server, viewport={"width": 1000, "height": 500})
        set_control(page, "#temperature", "0")

        def say(text: str, max_tokens: str, n_turns: int) -> None:
            page.fill("#max-tokens", max_tokens)
            page.fill("#prompt", text)
            page.press("#prompt", "Enter")
            page.wait_for_function(f"document.querySelectorAll('#log .msg').length === {2 * n_turns} && "
                                   "!document.getElementById('send').disabled", timeout=60_000)

        say("Tell me a story about a cat.\n" * 4, "60", 1)
        assert "tokens/s" in page.text_content("#speed")
        assert int(page.get_attribute("#speed", "data-tokens")) > 1  # up to 60: the reply may end sooner
        say("Hello", "1", 2)  # one token: nothing to time
        assert page.text_content("#speed") == "" and page.get_attribute("#speed", "data-tokens") == "1"
        say("Tell me another story.", "2000", 3)  # the context (512) has no room for 2000 more: an error
        assert page.text_content(".msg.error").startswith("Error: ")
        assert page.evaluate(f"{log}.scrollHeight > {log}.clientHeight && "
                             f"{log}.scrollHeight - {log}.scrollTop - {log}.clientHeight < 1")
        assert page.text_content("#speed") == "" and page.get_attribute("#speed", "data-tokens") is None
        say("Hello", "40", 4)
        assert "tokens/s" in page.text_content("#speed")
        page.click("#clear")
        assert page.text_content("#speed") == "" and page.get_attribute("#speed", "data-tokens") is None
        page.close()
    finally:
        server.stop()


def test_answers_in_other_servers_shapes_are_read_or_said_plainly(browser):
    """Behind a proxy or with another server, an answer may differ from serve's: an error given as a plain
    string is shown (it showed "Error: " alone), a page where a stream should be says so (it was called a lost
    connection), and events that end in CRLF blank lines (which the format allows) are read."""
    server = Server("--slots", "1")
    answers = {
        "string error": (400, "application/json", '{"error": "a plain string error"}'),
        "html page": (200, "text/html", "<html><body>Sign in to the proxy</body></html>"),
        "crlf events": (200, "text/event-stream", 'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}, '
                        '"finish_reason": null}]}\r\n\r\ndata: {"choices": [{"index": 0, "delta": {}, '
                        '"finish_reason": "stop"}]}\r\n\r\ndata: [DONE]\r\n\r\n'),
    }

    def answer(status: int, content_type: str, body: str, route, request) -> None:
        route.fulfill(status=status, content_type=content_type, body=body)

    try:
        page = open_page(browser, server)
        for n, (name, (status, content_type, body)) in enumerate(answers.items(), start=1):
            page.route("**/v1/chat/completions", functools.partial(answer, status, content_type, body))
            page.fill("#prompt", name)
            page.press("#prompt", "Enter")
            page.wait_for_function("!document.getElementById('send').disabled && "
                                   f"document.querySelectorAll('#log .msg').length === {2 * n}", timeout=30_000)
            last = page.query_selector_all("#log .msg")[-1]
            shown = {"string error": "Error: a plain string error",
                     "html page": "Error: the answer is not a stream of events but text/html: is a proxy in the way?",
                     "crlf events": "Hi"}[name]
            assert last.text_content() == shown, name
            page.unroute("**/v1/chat/completions")
        page.close()
    finally:
        server.stop()
