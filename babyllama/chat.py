"""Interactive chat: user turns from stdin, the model's replies streamed to stdout.

One sequence holds the whole conversation (each turn is appended to the same KV cache, rendered by
chat_template.py as the server and fine-tuning render it). Unlike run.c, where all turns share one `-n`
budget of positions, every reply gets its own budget of generated tokens (`max_new`), and when the
conversation outgrows the context window the oldest turns are dropped (context shift), the first turn (with
the system prompt) kept, and its reply with it when the two take at most a quarter of the context (more would
leave later turns too little room for themselves and their replies). The system prompt comes from `-y`; only
on a terminal is it asked for, and only there does Ctrl-C stop a reply and go on with the chat (elsewhere it
ends the program, as at the prompt).
A reply stays in the history as the tokens the model generated (no prefill again); the server is sent the
reply's text and encodes it, which gives other ids where the text does not encode back to the same tokens: a
reply that begins mid-word (a story model's "," right after [/INST]: the encoder puts a word boundary before
it) or one cut short after a newline (stripped). A chat model's replies (words, ended by EOS) read the same
in both.
"""

from __future__ import annotations

import codecs
import contextlib
import locale
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from .api import Model
from .chat_template import encode_chat, reply_closing
from .errors import BabyLlamaError, note, say
from .generate import Batch, Sequence
from .printer import Printer
from .sampler import Sampler
from .tokenizer import BOS, EOS


def _read_line(printer: Printer, prompt: str) -> str | None:
    """A line of stdin without its line ending; None at the end of input (a closed stdin included). Lines are
    UTF-8 whatever the locale says, as printed text is: a line that is not is skipped with a note (the locale's
    strict decoder would raise a traceback, and a non-UTF-8 locale would turn every accented letter into junk
    bytes)."""
    if sys.stdin is None:
        return None
    editing = _line_editing()
    while True:
        if editing:
            line = _edited_line(prompt)
        else:
            printer.write(prompt)
            line = _stdin_line()
        if not line:  # the prompt's line ended, so that the shell's prompt (after Ctrl-D) starts a line of its own
            printer.write("\n")
            return None
        if not line.endswith(b"\n") and _on_a_terminal():  # Ctrl-D after part of a line: the reply on a line of its own
            printer.write("\n")
        if len(line) > MAX_LINE_BYTES:
            note(f"a line of more than {MAX_LINE_BYTES >> 20} MiB is more than any context holds; skipped")
            continue
        try:
            return line.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:
            say("babyllama: this line is not valid UTF-8 text; skipped")


MAX_LINE_BYTES = 64 << 20  # a user turn read at most (a line from /dev/zero would take all memory)


def _line_editing() -> bool:
    """Whether turns are typed with readline's line editing (cursor keys, Ctrl-A/E/W/U, the session's earlier turns
    on the up arrow, a multi-line paste as one turn): where `input()` uses it (stdin and stdout both the process's
    terminal, the main thread: readline's signal handling is the main thread's) and both Python and readline read
    UTF-8 (readline edits in the C library's locale: under LC_ALL=C, Python's UTF-8 mode decodes the line but
    readline would erase an accented letter a byte at a time, where the terminal's own editing erases it whole);
    elsewhere lines are read as they come."""
    try:
        if not (sys.stdin.isatty() and sys.stdout is not None and sys.stdout.isatty() and sys.stdin.fileno() == 0
                and sys.stdout.fileno() == 1):
            return False
    except (AttributeError, OSError, ValueError):  # a stream put in stdin's or stdout's place, a closed one
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    if not (_is_utf8(sys.stdin.encoding) and hasattr(locale, "nl_langinfo")
            and _is_utf8(locale.nl_langinfo(locale.CODESET))):
        return False
    try:
        import readline
    except ImportError:  # a Python built without it (some Windows and minimal builds)
        return False
    # Python turns bracketed paste off (for its REPL, where each pasted line is a statement); here a pasted block
    # is one turn. The terminal is asked for it while a line is read, with an escape sequence a dumb terminal
    # (Emacs' shell, TERM unset) would show as it is.
    if os.environ.get("TERM", "dumb") != "dumb":
        readline.parse_and_bind("set enable-bracketed-paste on")
    return True


def _is_utf8(encoding: str | None) -> bool:
    try:
        return codecs.lookup(encoding or "ascii").name == "utf-8"
    except LookupError:
        return False


def _edited_line(prompt: str) -> bytes:
    """A line typed at the terminal through readline, ending in "\\n"; b"" at Ctrl-D on an empty line. Its bytes as
    typed, so that the caller's UTF-8 check and size limit apply to it as to a line read from a pipe. (Ctrl-C ends
    the wait with KeyboardInterrupt; one that lands in the microseconds between readline's writing the prompt and
    its wait for a key goes unseen until the next Ctrl-C or Enter: CPython's readline loop looks for signals only
    when a signal interrupts that wait.)"""
    try:
        text = input(prompt)
    except EOFError:
        return b""
    except UnicodeDecodeError as e:  # stdin's strict UTF-8 decoder (a UTF-8 locale without surrogateescape)
        return e.object + b"\n"
    # a C locale's UTF-8 mode decodes bytes that are not UTF-8 as lone surrogates: back to those bytes
    return text.encode("utf-8", "surrogateescape") + b"\n"


def _on_a_terminal() -> bool:
    isatty = getattr(sys.stdin, "isatty", None)
    return bool(isatty and isatty())


def _stdin_line() -> bytes:
    """stdin's next line as bytes (b"" at its end); of a line longer than MAX_LINE_BYTES, its first
    MAX_LINE_BYTES + 1 bytes (the rest is read and dropped)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream put in stdin's place (an embedding program, a test)
        return sys.stdin.readline(MAX_LINE_BYTES + 1).encode("utf-8", "surrogateescape")
    if sys.stdin.isatty():
        _wait_for_input(sys.stdin.fileno())
    line = buffer.readline(MAX_LINE_BYTES + 1)
    if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
        while (rest := buffer.readline(1 << 20)) and not rest.endswith(b"\n"):
            pass
    return line


def _wait_for_input(fd: int) -> None:
    """Until the terminal has a line to read. A Ctrl-C that lands after Python's last check for signals but
    before a blocking read is handled only when that read returns, after the next Enter; waiting in short polls
    instead lets the interpreter raise its KeyboardInterrupt between them. (A terminal hands over a line at a
    time, so no line waits in stdin's buffer unseen by the poll.)"""
    while not select.select([fd], [], [], 0.1)[0]:
        pass


@contextlib.contextmanager
def _ctrl_c_stops_the_reply(interactive: bool) -> Iterator[Callable[[], bool]]:
    """Yields "was Ctrl-C pressed?". On a terminal the first Ctrl-C only asks the reply to stop: the loop ends it
    after the step in progress, so the cache and the sequence stay consistent; a second one (a long prompt
    step) ends the program as usual."""
    pressed: list[bool] = []
    if not interactive:
        yield lambda: False
        return

    def handler(signum, frame) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_system_fits(model: Model, system: str, seq_len: int, template: str | None) -> None:
    """A system prompt that fills the context window alone would have every turn skipped: one error instead."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": ""}]
    n = len(encode_chat(model.tokenizer, messages, template=template)[0])
    if n >= seq_len:
        raise BabyLlamaError(f"the system prompt takes {n} tokens (in its first turn): the context window ({seq_len}) "
                             "leaves no room for a turn and a reply")


def chat(model: Model, sampler: Sampler, max_new: int, user: str | None = None, system: str | None = None,
         raw: bool = False, template: str | None = None) -> int:
    """Chat until stdin ends. `max_new` caps each reply (0: at the context's length, older turns sliding out).
    `template`: the chat template's name (chat_template.TEMPLATES; default: the model's, `Model.chat_template`,
    else Llama 2's)."""
    template = template or model.chat_template
    closing = reply_closing(model.tokenizer, template)  # an unknown name (a model card's) is refused here, at once
    printer = Printer(model.tokenizer, raw)
    # a signal handler can only be set from the main thread
    interactive = sys.stdin is not None and sys.stdin.isatty() and threading.current_thread() is threading.main_thread()
    if system is None and interactive:
        system = _read_line(printer, "Enter system prompt (optional): ")
        if system is None:
            return 0
    seq_len = model.args.max_seq_len
    most_bytes = model.tokenizer.most_bytes_per_token()
    if system:
        _check_system_fits(model, system, seq_len, template)
    batch = Batch(model.engine, 1)
    seq: Sequence | None = None
    while True:
        if not user:
            user = _read_line(printer, "User: ")
            if user is None:  # end of input
                return 0
        n_bytes = model.tokenizer.text_bytes(user.strip())  # the template strips a message
        if n_bytes > seq_len * most_bytes:  # no encoding can fit it: said at once, not after minutes of encoding
            say(f"babyllama: this turn is {n_bytes} bytes, more than the context window's {seq_len} tokens can "
                f"hold (a token covers at most {most_bytes} bytes); skipped")
            user = None
            continue
        messages = [{"role": "user", "content": user}]
        if seq is None and system:  # until a first turn is answered
            messages.insert(0, {"role": "system", "content": system})
        with_system = len(messages) > 1
        turn, _ = encode_chat(model.tokenizer, messages, template=template)
        user = None
        if len(turn) >= seq_len:
            what = "this turn with the system prompt" if with_system else "this turn"
            say(f"babyllama: {what} has {len(turn)} tokens: the context window ({seq_len}) leaves no room for "
                "a reply; skipped")
            continue
        budget = max_new or seq_len
        if seq is None:  # the first turn (and its system prompt) stays when older turns slide out
            # BOS ends a reply as EOS does (as in the server's chat): a story model begins its next story there
            seq = batch.add(Sequence(turn, sampler, sys.maxsize, frozenset({BOS, EOS}), context_shift=True,
                                     n_keep=min(len(turn), seq_len // 2), max_new=budget))
        else:
            seq.max_new = budget
            # a reply cut by its budget did not end with EOS: the template's closing and EOS (every reply ends so,
            # as the server and fine-tuning render a conversation) come before the next turn
            ending = [*closing, EOS] if seq.stop_reason == "length" else []
            first_exchange = len(seq.tokens) + len(ending)
            if not seq.turn_starts and not seq.n_dropped and first_exchange <= seq_len // 4:  # the second turn
                seq.n_keep = first_exchange  # the first reply stays with its turn, ended as every reply is
            seq.extend(ending + turn)
        printer.write("Assistant: ")
        # the reply is text of its own, as the server returns it: its first piece's leading space (the word
        # boundary after [/INST]) dropped, as after BOS, so "Assistant: " is not followed by a second space;
        # --raw-bytes keeps run.c's bytes, which decode the reply after the prompt's last token
        printer.restart(turn[-1] if raw else BOS)
        with _ctrl_c_stops_the_reply(interactive) as stopped:
            while not seq.done and not stopped():
                for _, token in batch.step():
                    printer.token(token)
        if not seq.done:  # stopped by Ctrl-C: as a reply cut by its budget, it gets EOS before the next turn
            seq.done, seq.stop_reason = True, "length"
        if seq.stop_reason == "stop" and seq.tokens[-1] == BOS:  # not yet fed: the template's ending in its place
            seq.tokens[-1:] = [*closing, EOS]
        printer.end()

