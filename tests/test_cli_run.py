"""End-to-end `babyllama run` behaviour beyond the goldens: prompts, chat, stdout streaming."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from babyllama.chat_template import get_template
from babyllama.tokenizer import EOS, Tokenizer


def test_prompt_is_echoed_and_steps_count_positions(stories260k, tok512):
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "-t", "0", "-n", "3", "-i", "Once upon a time")
    assert proc.returncode == 0
    # -n 3 = 3 positions: BOS plus the first 3 prompt tokens are printed, nothing generated
    assert proc.stdout.startswith(b"Once") and len(proc.stdout) < len(b"Once upon a time\n")


def test_chat_gives_every_turn_its_own_budget(stories260k, tok512):
    """-n 40 bounds each reply, not the whole conversation: both turns are answered (the story model never
    says EOS, so each reply runs to its budget)."""
    proc = run_cli("chat", str(stories260k), "-z", str(tok512), "-t", "0", "-n", "40",
                   "-y", "You tell stories.", input="Tell me about a cat.\nAnd a dog?\n")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "Enter system prompt" not in out  # -y given
    replies = out.split("Assistant: ")[1:]
    assert len(replies) == 2
    tok = Tokenizer.load(tok512)
    assert all(len(tok.encode(r.split("\nUser: ")[0], bos=False)) >= 30 for r in replies), replies  # of 40


class ScriptedSampler:
    """Answers each turn with a fixed number of tokens, then EOS (what a chat model would do)."""

    def __init__(self, answer_len: int):
        self.answer_len, self.n = answer_len, 0

    def sample(self, logits, tokens=(), generated=()):
        self.n += 1
        if self.n > self.answer_len:
            self.n = 0
            return EOS
        return 300 + self.n  # ordinary tokens


def test_chat_turns_share_one_growing_sequence(monkeypatch, stories260k, tok512):
    from babyllama import load
    from babyllama.chat import chat

    model = load(stories260k, tok512)
    fed = []
    real_forward = model.engine.forward

    def recording_forward(tokens, positions, *args, **kw):
        fed.append(list(positions))
        return real_forward(tokens, positions, *args, **kw)

    monkeypatch.setattr(model.engine, "forward", recording_forward)
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n"))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, write_through=True))
    assert chat(model, ScriptedSampler(3), 512, None, "sys") == 0
    text = out.getvalue().decode()
    assert text.count("Assistant: ") == 2 and text.endswith("User: \n")  # the end of input ends the line
    positions = [p for call in fed for p in call]
    assert positions == list(range(len(positions)))  # one KV cache, positions never restart
    turn1 = len(model.tokenizer.encode(get_template().turn("first question", "sys")))
    turn2 = len(model.tokenizer.encode(get_template().turn("second question", None)))
    # turn 1 prompt + 3 answers + EOS, turn 2 prompt + 3 answers (its EOS is sampled, not fed)
    assert len(positions) == turn1 + 3 + 1 + turn2 + 3


def test_a_reply_cut_by_its_budget_ends_with_eos_before_the_next_turn(monkeypatch, stories260k, tok512):
    """The conversation in the cache is the template's (chat_template.encode_chat): every reply ends with the
    template's closing (Llama 2's "▁") and EOS, also one that -n cut short."""
    from babyllama import load
    from babyllama.chat import chat
    from babyllama.chat_template import encode_chat, reply_closing

    model = load(stories260k, tok512)
    fed: list[int] = []
    real_forward = model.engine.forward

    def recording_forward(tokens, *args, **kw):
        fed.extend(tokens)
        return real_forward(tokens, *args, **kw)

    monkeypatch.setattr(model.engine, "forward", recording_forward)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), write_through=True))
    assert chat(model, ScriptedSampler(10), 3, None, None) == 0  # 3 tokens a reply: cut before the EOS
    turns = [encode_chat(model.tokenizer, [{"role": "user", "content": text}])[0] for text in ("first", "second")]
    # the second reply's last token is sampled, never fed
    assert [model.tokenizer.pieces[t] for t in reply_closing(model.tokenizer)] == [b" "]  # "▁"
    assert fed == turns[0] + [301, 302, 303, *reply_closing(model.tokenizer), EOS] + turns[1] + [304, 305]


def test_chat_skips_a_line_longer_than_any_context_without_holding_it(monkeypatch, capsys):
    """A user turn is read MAX_LINE_BYTES at most: a longer line (a file of one endless line, /dev/zero) is read
    through and skipped with a note, not held whole in memory (a MemoryError, or all of it)."""
    import io

    from babyllama import chat
    from babyllama.loading import BUILTIN_TOKENIZER
    from babyllama.printer import Printer
    from babyllama.tokenizer import Tokenizer

    monkeypatch.setattr(chat, "MAX_LINE_BYTES", 16)
    stdin = io.TextIOWrapper(io.BytesIO(b"x" * 1000 + b"\nshort line\n"), encoding="utf-8")
    monkeypatch.setattr(chat.sys, "stdin", stdin)
    printer = Printer(Tokenizer.load(BUILTIN_TOKENIZER), out=io.BytesIO())
    assert chat._read_line(printer, "User: ") == "short line"
    assert "a line of more than 0 MiB is more than any context holds; skipped" in capsys.readouterr().err
    assert chat._read_line(printer, "User: ") is None


def test_chat_from_python_takes_a_turn_with_a_lone_surrogate(monkeypatch, capsys, stories260k, tok512):
    """The turn's byte count (a check before encoding) raised UnicodeEncodeError on a lone surrogate, which the
    API passes through (the CLI refuses such text first); the turn is answered as before."""
    import io

    from babyllama import chat, load
    from babyllama.sampler import Sampler

    monkeypatch.setattr(chat.sys, "stdin", io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8"))
    assert chat.chat(load(stories260k, tok512), Sampler(temperature=0.0), max_new=5, user="hi \udcff") == 0
    assert "Assistant: " in capsys.readouterr().out


@pytest.mark.parametrize("max_new", [60, 200])
def test_chat_keeps_a_short_first_exchange_whole_when_older_turns_slide_out(monkeypatch, capsys, stories260k,
                                                                            tok512, max_new):
    """Past the context, the first turn stays, with its reply when the two take at most a quarter of the context
    (the first user turn alone stayed, followed by whatever came after its reply); a longer first reply slides
    out, so that every later turn keeps its own prompt beside its reply (kept, it left them half the context)."""
    import io

    from babyllama import chat, load
    from babyllama.generate import Sequence
    from babyllama.sampler import Sampler

    first: list[list[int]] = []
    extended: list[list[int]] = []
    real_extend = Sequence.extend

    def extend(self, ids):
        first.append(list(self.tokens))  # at the first call: the first turn, its reply and that reply's EOS
        extended.append(list(ids))
        real_extend(self, ids)

    monkeypatch.setattr(Sequence, "extend", extend)
    monkeypatch.setattr(chat.sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Tell me a story.\n" * 12), encoding="utf-8"))
    model = load(stories260k, tok512)
    seq_len = model.args.max_seq_len
    batches = []
    real_add = chat.Batch.add
    monkeypatch.setattr(chat.Batch, "add", lambda self, seq: batches.append(seq) or real_add(self, seq))
    assert chat.chat(model, Sampler(temperature=0.0), max_new=max_new) == 0
    capsys.readouterr()
    seq = batches[0]
    assert seq.n_dropped > 0  # the conversation outgrew the context
    exchange = first[0]
    ended = len(exchange) + (2 if exchange[-1] != 2 else 0)  # a reply cut by its budget: " " and EOS follow it
    if ended <= seq_len // 4:
        assert seq.tokens[:len(exchange)] == exchange and seq.n_keep == ended
    else:
        turn = len(exchange) - max_new  # the first reply ran to its budget
        assert seq.n_keep == turn and seq.tokens[:turn] == exchange[:turn]
    last = extended[-1]  # the last turn (after the previous reply's ending) is still in the window before its reply
    start = len(seq.tokens) - len(seq.generated) - len(last)
    assert start >= seq.n_keep and seq.tokens[start:start + len(last)] == last


def test_piped_chat_takes_the_system_prompt_only_from_y(stories260k, tok512):
    """With stdin not a terminal, nothing is asked: the first piped line is a user turn, not a system prompt."""
    proc = run_cli("chat", str(stories260k), "-z", str(tok512), "-t", "0", "-n", "20", "-i", "Hello",
                   input="And then?\n")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert out.startswith("Assistant: ") and out.count("Assistant: ") == 2 and "Enter system prompt" not in out


def test_chat_on_a_terminal_asks_for_the_system_prompt(stories260k, tok512):
    """On a terminal (a pseudo-terminal here) run.c's question comes first when -y is not given."""
    import os
    import pty
    import subprocess

    from conftest import ROOT

    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", "chat", str(stories260k), "-z", str(tok512), "-t",
                             "0", "-n", "5"], stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT)
    os.close(follower)
    os.write(leader, b"Be brief.\nHi\n\x04")
    out, err = proc.communicate(timeout=120)
    os.close(leader)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("Enter system prompt (optional): User: Assistant: ")


def test_chat_never_prints_control_tokens(monkeypatch, stories260k, tok512):
    """A BOS (the model's piece "\\n<s>\\n") ends a reply as EOS does, as in the server's chat, and neither is
    printed: the next turn's reply follows as its own."""
    from babyllama import load
    from babyllama.chat import chat
    from babyllama.tokenizer import BOS

    class BosThenEos:
        def __init__(self):
            self.seq = [300, BOS, 301, EOS]

        def sample(self, logits, tokens=(), generated=()):
            return self.seq.pop(0)

    model = load(stories260k, tok512)
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nmore\n"))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, write_through=True))
    assert chat(model, BosThenEos(), 0, None, "") == 0
    text = out.getvalue().decode()
    first, second = (model.tokenizer.decode_text([t], prev=BOS) for t in (300, 301))
    assert "<s>" not in text and f"Assistant: {first}\nUser: Assistant: {second}\n" in text


@pytest.mark.parametrize("raw", [False, True])
def test_chat_reply_follows_one_space(monkeypatch, stories260k, tok512, raw):
    """A reply's first word (a piece with its leading space, "▁Once") follows "Assistant: " with one space, as
    the server's reply text begins; --raw-bytes keeps run.c's bytes, which decode it after "]" (two spaces)."""
    from babyllama import load
    from babyllama.chat import chat

    model = load(stories260k, tok512)
    once = model.tokenizer.encode("Once", bos=False)  # "▁Once": encode adds the leading space
    assert model.tokenizer.pieces[once[0]].startswith(b" ")  # the case this is about

    class Once:
        def __init__(self):
            self.seq = [*once, EOS]

        def sample(self, logits, tokens=(), generated=()):
            return self.seq.pop(0)

    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, write_through=True))
    assert chat(model, Once(), 0, None, "", raw=raw) == 0
    expected = b"Assistant:  Once\n" if raw else b"Assistant: Once\n"
    assert expected in out.getvalue(), out.getvalue()


def test_chat_template_is_llama2():
    assert get_template().turn("Hi", "Be brief.") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    assert get_template().turn("Hi", None) == "[INST] Hi [/INST]"


def test_python_module_and_help():
    proc = run_cli("--help")
    assert proc.returncode == 0 and b"run" in proc.stdout
    proc = run_cli()
    assert proc.returncode == 2


def test_chat_subcommand_is_run_in_chat_mode(stories260k, tok512):
    proc = run_cli("chat", str(stories260k), "-z", str(tok512), "-t", "0", "-n", "60", "-y", "Be kind.",
                   input="Hello\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("User: Assistant: ")
    same = run_cli("run", str(stories260k), "-z", str(tok512), "-m", "chat", "-t", "0", "-n", "60", "-y", "Be kind.",
                   input="Hello\n")
    assert proc.stdout == same.stdout


UTF8_LOCALE = {"LC_ALL": "C.UTF-8", "PYTHONUTF8": "1"}
ASCII_LOCALE = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}  # no UTF-8 mode, no coercion


@pytest.mark.parametrize("command, text", [(["run", "-n", "30", "-i", "Le café était très"], None),
                                           (["chat", "-n", "30"], "Éric and Zoë met at the café, señor.\n")])
def test_text_is_read_as_utf8_under_a_locale_that_is_not(command, text):
    """Under LC_ALL=C without Python's UTF-8 mode (argv and stdin decoded as ASCII) a UTF-8 prompt gives the same
    text as under a UTF-8 locale: -i is not refused as not UTF-8, nor does chat feed every accented letter to the
    model as junk byte tokens."""
    runs = [run_cli(*command, "-t", "0", input=text, env=env) for env in (UTF8_LOCALE, ASCII_LOCALE)]
    assert [r.returncode for r in runs] == [0, 0], runs[1].stderr.decode()
    assert runs[1].stdout == runs[0].stdout


def test_reports_print_under_a_locale_that_cannot_encode_them(tmp_path):
    """Under LC_ALL=C without UTF-8 mode, bench's table (en dashes in its empty cells) was a UnicodeEncodeError
    that lost the table and its --output file, and a UTF-8 file name in an error line came out as \\udcc3 escapes:
    the file keeps the table in UTF-8, stdout shows what ASCII lacks as "?", a name goes out as its own bytes."""
    out = tmp_path / "bench.md"
    proc = run_cli("bench", "--shapes", "builtin", "--formats", "fp32", "--rounds", "1", "--tokens", "8",
                   "--no-plain", "--prompt-len", "8", "--batch", "2", "--reference", "/bin/false", "--cache-dir",
                   str(tmp_path / "cache"), "--output", str(out), env=ASCII_LOCALE)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1 and "Traceback" not in err and err.endswith("1 of 2 rows failed (listed under the "
                                                                           "table)\n"), err
    table = out.read_text(encoding="utf-8")
    assert "\u2013" in table and proc.stdout == (table.replace("\u2013", "?") + "\n").encode("ascii")
    proc = run_cli("run", str(tmp_path / "n\u00f6pe.bin"), env=ASCII_LOCALE)
    named = f"babyllama: error: model file not found: {tmp_path}/n\u00f6pe.bin\n".encode()
    assert proc.returncode == 1 and proc.stderr == named


def test_help_and_version_into_a_full_or_closed_stdout_are_one_error_line():
    """argparse drops what it cannot print and exits 0: `--help > /dev/full` said nothing and succeeded."""
    for args in (["--help"], ["--version"], ["run", "--help"]):
        one_error_line(shell_cli(">&-", *args), "standard output is closed")
        if Path("/dev/full").exists():
            one_error_line(shell_cli("> /dev/full", *args), "cannot write to stdout: No space left")
        assert shell_cli("", *args).returncode == 0


def test_chat_skips_a_line_that_is_not_utf8_and_reads_crlf_lines():
    """A piped line that is not UTF-8 is skipped with a note, and the chat goes on (a strict UTF-8 locale's
    decoder, as en_US.UTF-8 has, raised a traceback); a CRLF line is the same turn as its LF twin."""
    argv = ("chat", "-t", "0", "-n", "20")
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    proc = run_cli(*argv, input=b"caf\xe9\nHello\r\n", env=strict)
    assert proc.returncode == 0, proc.stderr.decode()
    notes = [line for line in proc.stderr.decode().splitlines() if line.startswith("babyllama:")]
    assert notes == ["babyllama: this line is not valid UTF-8 text; skipped"]
    plain = run_cli(*argv, input=b"Hello\n", env=strict)
    assert proc.stdout == b"User: " + plain.stdout


def test_chat_skips_a_line_no_encoding_can_fit_before_encoding_it():
    """A pasted line longer in bytes than the context's tokens can cover is skipped at once (a 8 MiB line was
    encoded for 15 s and 600 MB first, then skipped as too many tokens), and the chat goes on."""
    from babyllama.api import load
    from babyllama.loading import builtin_chat_model

    model = load(builtin_chat_model())  # what `chat` runs without a model
    limit = model.args.max_seq_len * model.tokenizer.most_bytes_per_token()
    argv = ("chat", "-t", "0", "-n", "20")
    proc = run_cli(*argv, input=b" " * limit + b"Hi\n" + b"a" * (limit + 1) + b"\nHello\n")  # spaces: stripped
    assert proc.returncode == 0, proc.stderr.decode()
    notes = [line for line in proc.stderr.decode().splitlines() if line.startswith("babyllama:")]
    assert notes == [f"babyllama: this turn is {limit + 1} bytes, more than the context window's "
                     f"{model.args.max_seq_len} tokens can hold (a token covers at most "
                     f"{model.tokenizer.most_bytes_per_token()} bytes); skipped"]
    assert proc.stdout.replace(b"User: User: ", b"User: ") == run_cli(*argv, input=b"Hi\nHello\n").stdout


def stderr_closed_run(read: int | None = None) -> tuple[bytes, int]:
    """`babyllama run -t 0 -n 200` with its stderr closed (`2>&-`): what it printed (the first `read` bytes, then
    the pipe closed as `| head -c` does) and its exit status."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", "run", "-t", "0", "-n", "200"], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    assert proc.stdout is not None
    out = proc.stdout.read(read) if read else proc.stdout.read()
    proc.stdout.close()
    return out, proc.wait(timeout=120)


def test_a_closed_stderr_keeps_notes_out_of_the_text():
    """With stderr closed, print(file=sys.stderr) wrote to stdout: the tok/s line ended up in the story, and
    a reader that went away (`2>&- | head -c 10`) made the run exit 1 (sys.stderr.close() on None)."""
    plain = run_cli("run", "-t", "0", "-n", "200")
    assert plain.returncode == 0 and b"achieved tok/s" in plain.stderr
    assert stderr_closed_run() == (plain.stdout, 0)
    assert stderr_closed_run(read=10) == (plain.stdout[:10], 0)


def shell_cli(redirect: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """`python -m babyllama ARGS REDIRECT` through the shell (closed or odd standard streams)."""
    cmd = " ".join([shlex.quote(sys.executable), "-m", "babyllama", *map(shlex.quote, args), redirect])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(["sh", "-c", cmd], input=input.encode() if input else None, capture_output=True,
                          timeout=120, cwd=ROOT, env=env)


def one_error_line(proc: subprocess.CompletedProcess, text: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.startswith(f"babyllama: error: {text}") and err.count("\n") == 1, err


@pytest.mark.parametrize("mode", [["chat"], ["chat", "-y", "Be kind."], ["run", "-m", "chat"]])
def test_chat_with_stdin_closed_ends_as_at_the_end_of_input(mode):
    proc = shell_cli("<&-", *mode, "-t", "0", "-n", "20")
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()


@pytest.mark.parametrize("command", [["run"], ["chat"], ["run", "--batch-file", "PROMPTS"]])
def test_closed_or_full_stdout_is_one_error_line(command, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once\nA dog\n")
    args = [str(prompts) if a == "PROMPTS" else a for a in command] + ["-t", "0", "-n", "40"]
    one_error_line(shell_cli(">&-", *args, input="Hi\n"), "standard output is closed")
    if Path("/dev/full").exists():  # writes to it fail with ENOSPC
        one_error_line(shell_cli("> /dev/full", *args, input="Hi\n"), "cannot write the output: No space left")


@pytest.mark.parametrize("command, what", [(["models"], "the table"),
                                           (["bench", "--shapes", "builtin", "--no-plain"], "the table"),
                                           (["eval", "--data", "STORIES"], "the scores")])
def test_commands_whose_output_is_printed_refuse_a_closed_stdout(command, what, tmp_path):
    """Python prints nothing to a closed stdout, silently: such a command said nothing and exited 0 (bench after
    its measuring, eval after evaluating)."""
    stories = tmp_path / "stories.txt"
    stories.write_text("Once upon a time there was a cat.\n")
    args = [str(stories) if a == "STORIES" else a for a in command]
    one_error_line(shell_cli(">&-", *args), f"standard output is closed: nowhere to print {what}")


@pytest.mark.parametrize("flags, message", [
    (["--parallel", "4"], "--parallel works with --batch-file only"),
    (["--n-keep", "5"], "--n-keep works with --context-shift only"),
    (["--draft-k", "3"], "--draft-k works with --draft only"),
    (["-y", "You are a pirate."], "-y/--system works with -m chat only"),
    (["--batch-file", "PROMPTS", "-i", "Hi"], "--batch-file gives the prompts"),
    (["--plain", "--device", "cpu"], "--plain is the NumPy reference engine"),
    (["--quantize", "q4_0", "--device", "cpu"], "--quantize q4_0 works with the NumPy engine only"),
    (["--context-shift", "--n-keep", "257"], "--n-keep must be at most half the context (256), got 257"),
])
def test_flags_without_their_partner_are_refused(flags, message, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once\n")
    one_error_line(run_cli("run", "-n", "5", *[str(prompts) if f == "PROMPTS" else f for f in flags]), message)


@pytest.mark.parametrize("flags", [[""], ["-z", ""], ["--lora", ""], ["--batch-file", ""], ["--draft", ""],
                                   ["--batch-file", "", "--parallel", "2"]])
def test_an_empty_path_is_a_usage_error(flags):
    """An unset variable ("$DRAFT") would otherwise name the current folder, or read as the flag left out."""
    proc = run_cli("run", "-n", "4", *flags)
    assert proc.returncode == 2 and b"the path is empty" in proc.stderr, proc.stderr


def test_run_m_chat_without_a_model_talks_to_the_chat_model():
    """`run -m chat` is `chat`: without MODEL, both run the built-in chat model."""
    a = run_cli("run", "-m", "chat", "-t", "0", "-n", "30", input=b"Tell me a story about a cat.\n")
    b = run_cli("chat", "-t", "0", "-n", "30", input=b"Tell me a story about a cat.\n")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout, (a.stderr, b.stderr)


def test_a_prompt_longer_than_the_context(stories260k, tok512):
    """run.c's rule (the prompt printed, nothing generated) with a warning that names the cause; with
    --context-shift, --max-new-tokens alone bounds the run and the window slides past the prompt."""
    prompt = "Once upon a time there was a dog. " * 60  # ~600 tokens: more than the 512 positions
    base = ["run", str(stories260k), "-z", str(tok512), "-t", "0", "-i", prompt]
    proc = run_cli(*base, "--max-new-tokens", "30")
    assert proc.returncode == 0 and proc.stdout.decode() == prompt.rstrip(" ")[:len(proc.stdout) - 1] + "\n"
    assert b"more than the model's context (512)" in proc.stderr and b"--context-shift" in proc.stderr
    shifted = run_cli(*base, "--max-new-tokens", "30", "--context-shift")
    assert shifted.returncode == 0, shifted.stderr.decode()
    assert len(shifted.stdout) > len(proc.stdout) + 30 and b"warning" not in shifted.stderr
    for flags in (["--context-shift"], ["--context-shift", "-n", "300"]):  # then -n is the limit, not the context
        limited = run_cli(*base, *flags)
        n = flags[-1] if flags[-1] != "--context-shift" else "256"
        assert f"but -n/--steps allows {n} positions".encode() in limited.stderr, limited.stderr
        assert b"more than the model's context" not in limited.stderr
    one = run_cli(*base, "--context-shift", "-n", "1")
    assert b"but -n/--steps allows 1 position:" in one.stderr, one.stderr
    drafted = run_cli(*base, "--max-new-tokens", "5", "--draft", str(stories260k))  # which refuses --context-shift
    assert b"more than the model's context (512)" in drafted.stderr and b"--context-shift" not in drafted.stderr


def test_a_prompt_longer_than_n_points_at_the_flag_not_given(tmp_path):
    """-n bounds the prompt too (run.c's positions): the warning's remedy is --max-new-tokens, and when that was
    given alongside -n, leaving -n out (not "use --max-new-tokens", which is there already)."""
    prompt = "Once upon a time there was a dog. " * 4
    alone = run_cli("run", "-t", "0", "-n", "10", "-i", prompt)
    assert alone.returncode == 0 and b"(raise -n, or use --max-new-tokens)" in alone.stderr, alone.stderr
    for flags in ([], ["--batch-file", "PROMPTS"]):
        prompts = tmp_path / "prompts.txt"
        prompts.write_text(prompt + "\n")
        args = [str(prompts) if f == "PROMPTS" else f for f in flags] or ["-i", prompt]
        both = run_cli("run", "-t", "0", "-n", "10", "--max-new-tokens", "5", *args)
        assert both.returncode == 0, both.stderr
        assert b"raise -n, or leave it out: --max-new-tokens alone counts generated tokens only" in both.stderr
        assert b"use --max-new-tokens" not in both.stderr


def test_chat_takes_max_new_tokens_0_as_up_to_the_context(stories260k, tok512):
    proc = run_cli("chat", str(stories260k), "-z", str(tok512), "-t", "0", "--max-new-tokens", "0", input="Hi\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout.split(b"Assistant: ")[1]) > 400  # the story model runs on, far past run.c's 256 steps


def test_batch_file_has_a_prompt_per_line_empty_ones_included(stories260k, tok512, tmp_path):
    """Every line is a prompt, an empty one included (a story from BOS); only the newline that ends the file
    makes none."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n")
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "-t", "0", "-n", "20", "--batch-file", str(prompts))
    assert proc.returncode == 0, proc.stderr.decode()
    sections = proc.stdout.split(b"=== sequence ")[1:]
    assert len(sections) == 2 and sections[0].split(b"===\n", 1)[1] == sections[1].split(b"===\n", 1)[1]
    prompts.write_text("")
    one_error_line(run_cli("run", "--batch-file", str(prompts)), f"batch file {prompts} has no prompts")


def test_batch_file_from_a_windows_editor_has_the_same_prompts(tmp_path):
    """A UTF-8 byte-order mark and CRLF line ends (Notepad's) are not part of the prompts."""
    windows, unix = tmp_path / "windows.txt", tmp_path / "unix.txt"
    windows.write_bytes(b"\xef\xbb\xbfOnce\r\nThe dog\r\n")
    unix.write_bytes(b"Once\nThe dog\n")
    outs = [run_cli("run", "-t", "0", "-n", "12", "--batch-file", str(f)) for f in (windows, unix)]
    assert outs[0].returncode == outs[1].returncode == 0 and outs[0].stdout == outs[1].stdout


def test_batch_file_warns_about_each_prompt_that_leaves_no_room(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time " * 20 + "\nHi\n" + "x " * 600 + "\n")
    proc = run_cli("run", "-t", "0", "-n", "30", "--batch-file", str(prompts))
    assert proc.returncode == 0, proc.stderr.decode()
    warned = [line for line in proc.stderr.decode().splitlines() if "nothing will be generated" in line]
    assert len(warned) == 2
    assert "the prompt on line 1 is" in warned[0] and "allows 30 positions" in warned[0]
    assert "the prompt on line 3 is" in warned[1] and "more than the model's context" in warned[1]
    assert "--context-shift" not in warned[1]  # it cannot be combined with --batch-file


def test_chat_skips_a_turn_that_fills_the_context_and_says_why():
    from babyllama import load
    from babyllama.chat_template import encode_chat
    from babyllama.loading import builtin_chat_model

    model = load(builtin_chat_model())
    turn = "dog " * (model.args.max_seq_len // 2 - 20)
    while (n := len(encode_chat(model.tokenizer, [{"role": "user", "content": turn}])[0])) < model.args.max_seq_len:
        turn += "a "
    assert n == model.args.max_seq_len
    proc = run_cli("chat", "-t", "0", "-n", "5", input=turn + "\nHi\n")
    assert proc.returncode == 0 and proc.stdout.decode().count("Assistant: ") == 1
    assert proc.stderr.decode() == (f"babyllama: this turn has {n} tokens: the context window ({n}) leaves no room "
                                    "for a reply; skipped\n")
    # with a system prompt that fits alone, the first turn carries it: the message says so
    system = "dog " * (model.args.max_seq_len // 2 - 30)
    proc = run_cli("chat", "-t", "0", "-n", "5", "-y", system, input="cat " * 40 + "\n")
    assert proc.returncode == 0 and "Assistant: " not in proc.stdout.decode()
    assert proc.stderr.decode().startswith("babyllama: this turn with the system prompt has "), proc.stderr


def test_chat_refuses_a_system_prompt_that_fills_the_context():
    """Every turn would be skipped: one error line at the start instead."""
    proc = run_cli("chat", "-n", "5", "-y", "dog " * 300, input="Hi\n")
    one_error_line(proc, "the system prompt takes")
    assert b"leaves no room for a turn and a reply" in proc.stderr and b"User: " not in proc.stdout


def test_chat_ends_on_ctrl_c_with_130_and_no_traceback():
    """README: Ctrl-C ends the chat at once (exit 130: ended by SIGINT, which a shell reports as 130), as one
    quiet exit, not a KeyboardInterrupt trace."""
    import signal

    from conftest import sigint_default

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", "chat", "-n", "5", "-y", ""], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=sigint_default)
    assert proc.stdout.read(len(b"User: ")) == b"User: "  # waiting for the first turn
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and err == b""


def test_ctrl_c_stops_a_shell_loop_that_runs_it(tmp_path):
    """A shell goes on after a child that exits 130 (it takes the interrupt as handled by the child): a Ctrl-C
    stopped one `babyllama run` of a loop and the loop ran the next. babyllama ends by SIGINT, as other programs
    do: the loop stops, and the shell reports 130 as before."""
    import contextlib
    import signal
    import time

    from conftest import never_ending_model, sigint_default

    model = never_ending_model(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    text = tmp_path / "story.txt"
    # each run generates until interrupted (the model never ends a story; the context shifts), whatever the speed
    script = (f'for i in 1 2; do "{sys.executable}" -m babyllama run "{model}" -t 0 --context-shift '
              f'--max-new-tokens 100000000 > "{text}"; echo "after $i: $?"; done')
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True, preexec_fn=sigint_default)  # a terminal's foreground job
    try:
        deadline = time.monotonic() + 120
        while not (text.exists() and text.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the first run is generating
        assert proc.poll() is None and text.stat().st_size
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the loop went on to its next run after Ctrl-C")
        assert out == b"" and err == b"" and proc.returncode == -signal.SIGINT, (out, err)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever still runs of the loop


def test_ctrl_d_after_part_of_a_line_puts_the_reply_on_a_line_of_its_own():
    """With stdin a terminal and stdout not (no line editing: `chat | tee log`), Ctrl-D (twice) after typing part of
    a turn sends it (as `cat` takes it), no newline typed: "Assistant: " followed the user's text on the same line
    ("User: Tell me a storyAssistant: ...")."""
    import pty
    import select
    import time

    from conftest import sigint_default

    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", "chat", "-n", "10", "-t", "0", "-y", ""], stdin=slave,
                            stdout=subprocess.PIPE, stderr=slave, env=env, preexec_fn=sigint_default)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 120
        while b"User: " not in out and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1)[0]:
                out += os.read(proc.stdout.fileno(), 4096)
        os.write(master, b"Tell me a story\x04\x04")  # the typed part handed over, then an end of input
        while b"Assistant: " not in out and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1)[0]:
                out += os.read(proc.stdout.fileno(), 4096)
        assert out.startswith(b"User: \nAssistant: "), out[-300:]
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def typed_lines(keystrokes: list[bytes], reads: int, **env: str) -> tuple[bytes, list[str]]:
    """What chat's line reader returns (repr of each of `reads` lines, and its notes) for `keystrokes` typed at a
    terminal (a pseudo-terminal that is its stdin and stdout), each sent once the previous line's prompt is back;
    and all it wrote to the terminal. `env`: variables set (or unset, given "")."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    code = ("import sys\nfrom babyllama.chat import _read_line\nfrom babyllama.printer import Printer\n"
            "class Tokenizer:\n    def stream(self, prev): return None\n"
            f"printer = Printer(Tokenizer())\nfor _ in range({reads}):\n"
            "    print(repr(_read_line(printer, 'User: ')), file=sys.stderr)\n")
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env={k: v for k, v in environ.items() if v})
    os.close(slave)
    seen = b""

    def prompts_so_far() -> int:
        nonlocal seen
        deadline = time.monotonic() + 0.3  # what the child writes after a keystroke comes within that
        while time.monotonic() < deadline or not seen:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
        return seen.count(b"User: ")

    try:
        for keys in keystrokes[:-1]:
            count = prompts_so_far()
            os.write(master, keys)
            deadline = time.monotonic() + 30
            while prompts_so_far() == count:  # the next prompt (a skipped line's again)
                assert time.monotonic() < deadline, seen[-300:]
        os.write(master, keystrokes[-1])
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        os.close(master)
    return seen, err.decode().splitlines()


def test_turns_typed_at_a_terminal_are_edited_with_readline():
    """stdin and stdout a terminal: a turn is typed with readline's editing (the cursor moved left and a letter put
    in, Ctrl-A, the up arrow recalling the last turn), a bracketed paste of two lines is one turn (the terminal is
    asked for bracketed paste: Python's readline turns it off), UTF-8 as everywhere (a line that is not is
    skipped), and Ctrl-D on an empty line is the end of input."""
    # line editing needs readline and a UTF-8 locale for the C library (a minimal image may lack both)
    probe = subprocess.run([sys.executable, "-c", "import locale, readline; locale.setlocale(locale.LC_CTYPE, "
                            "'C.UTF-8')"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"no readline or no C.UTF-8 locale here: {probe.stderr.decode().strip().splitlines()[-1:]}")
    seen, lines = typed_lines([b"abc\x1b[D\x1b[DX\r", b"\x1b[A\x01Z\r", "caf\u00e9\r".encode(),
                               b"\x1b[200~one\rtwo\x1b[201~\r", b"\xff\xfe\r", b"\x04"], 5, TERM="xterm",
                              LC_ALL="C.UTF-8")
    assert lines == ["'aXbc'", "'ZaXbc'", "'café'", "'one\\ntwo'",
                     "babyllama: this line is not valid UTF-8 text; skipped", "None"], lines
    assert b"\x1b[?2004h" in seen


@pytest.mark.parametrize("env", [{"LC_ALL": "C"}, {"TERM": "dumb"}, {"TERM": ""}])
def test_line_editing_stays_out_of_what_it_would_garble(env):
    """Under LC_ALL=C readline edits bytes (Backspace after "é" left half a character, and the turn was skipped as
    not UTF-8): the terminal's own line editing reads the line, as with stdout not a terminal. A dumb terminal
    (TERM=dumb, or none) is never sent the escape sequence that asks for bracketed paste."""
    seen, lines = typed_lines([b"caf\xc3\xa9\r", b"\x04"], 2, **env)
    assert lines == ["'café'", "None"], lines
    assert b"\x1b[?2004" not in seen
    if "LC_ALL" in env:  # the terminal's editing: the cursor key's bytes are in the line
        _, lines = typed_lines([b"ab\x1b[Dc\r", b"\x04"], 2, **env)
        assert lines == ["'ab\\x1b[Dc'", "None"], lines


def test_ctrl_c_on_a_terminal_stops_the_reply_and_the_chat_goes_on(tmp_path):
    """On a terminal, Ctrl-C during a reply ends that reply (the next prompt comes at once, the reply far short
    of the 2000 tokens it would run to); Ctrl-C at the prompt then ends the chat with 130, no traceback."""
    import pty
    import select
    import signal
    import time

    from conftest import never_ending_model, sigint_default

    model = never_ending_model(tmp_path)
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", "chat", str(model), "-n", "2000", "-t", "0",
                             "-y", ""], stdin=slave, stdout=slave, stderr=slave, env=env, preexec_fn=sigint_default)
    os.close(slave)
    seen = b""

    def read_until(pattern: bytes, after: int = 0, more: int = 0) -> int:
        """The end of `pattern` at or past `after`, once `more` bytes follow it."""
        nonlocal seen
        deadline = time.monotonic() + 120
        while (at := seen.find(pattern, after)) < 0 or len(seen) < at + len(pattern) + more:
            assert time.monotonic() < deadline, seen[-300:]
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        return at + len(pattern)

    try:
        read_until(b"User: ")
        os.write(master, b"hi\n")
        reply = read_until(b"Assistant: ", more=20)  # the reply under way
        proc.send_signal(signal.SIGINT)
        prompt = read_until(b"User: ", reply)
        assert len(seen[reply:prompt]) < 1000 and proc.poll() is None
        # a person's Ctrl-C comes after the prompt is on the screen: readline is then waiting for a key (one sent
        # the moment the prompt is written can land before that wait, where CPython's readline loop does not
        # look for it: see chat._edited_line)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:  # read what it still writes: a full pty blocks it
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child closed the terminal as it exited
                    break
        # the child may close the terminal before its interpreter has finished exiting: on a busy machine that
        # took more than 5 s, so it gets what is left of the deadline
        assert proc.wait(timeout=max(5.0, deadline - time.monotonic())) == -signal.SIGINT, seen[-300:]
    finally:
        proc.kill()
        os.close(master)
    assert b"Traceback" not in seen


@pytest.mark.parametrize("command", ["run", "chat", "eval", "serve"])
def test_tokenizer_help_says_the_builtin_fallback_is_for_bin_files_only(command, capsys):
    from babyllama.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "for a .bin or a checkpoint, tokenizer.bin beside it, else for a .bin the built-in one" in text


def test_chat_help_says_what_i_and_m_chat_do(capsys):
    from babyllama.cli import build_parser

    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        # Python 3.13's argparse writes the value's name once ("-i, --prompt PROMPT"), older ones after each flag
        return re.sub(r"(-\w) (\w+), (--[\w-]+ \2)\b", r"\1, \3", text)

    assert "-i, --prompt PROMPT the first user turn (the others come from stdin)" in help_of("chat")
    run = help_of("run")
    assert "-i is the first user turn, the others come from stdin, -n budgets each reply" in run
    assert "-i, --prompt PROMPT input prompt" in run


def test_every_command_has_a_description_and_every_flag_a_help_text():
    import argparse

    from babyllama.cli import build_parser

    def parsers(parser: argparse.ArgumentParser, name: str):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    yield from parsers(child, f"{name} {sub}")

    missing = []
    for name, parser in parsers(build_parser(), "babyllama"):
        if not parser.description:
            missing.append(f"{name}: no description")
        missing += [f"{name} {action.option_strings or action.dest}: no help" for action in parser._actions
                    if action.help is None and not isinstance(action, argparse._SubParsersAction)]
    assert not missing, missing


@pytest.mark.parametrize("command", [["chat"], ["run", "-m", "chat"]])
def test_chat_refuses_two_different_reply_budgets(command, capsys):
    from babyllama.cli import main

    assert main([*command, "-n", "6", "--max-new-tokens", "5"]) == 1
    assert capsys.readouterr().err.strip() == ("babyllama: error: -n 6 and --max-new-tokens 5 both set each reply's "
                                               "budget in chat: give one of them")


def test_threads_help_names_the_variable_the_kernels_read(capsys):
    from babyllama.cli import build_parser
    from babyllama.threads import explicit_threads

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: OMP_NUM_THREADS, else every core" in text
    with pytest.MonkeyPatch.context() as mp:  # OPENBLAS_NUM_THREADS is not a count for the kernels' pool
        mp.delenv("OMP_NUM_THREADS", raising=False)
        mp.setenv("OPENBLAS_NUM_THREADS", "1")
        assert explicit_threads() is None
        mp.setenv("OMP_NUM_THREADS", "1")
        assert explicit_threads() == 1


def test_sampling_controls_reach_run_chat_and_batch_files(tmp_path):
    """llama.cpp's flags: --top-k 1 samples greedy's text at any temperature and seed (generate, --batch-file,
    chat), and a penalty changes greedy's text."""
    def text(*flags: str, input: str | None = None) -> bytes:
        proc = run_cli(*flags, "--max-new-tokens", "30", input=input)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout

    greedy = text("run", "-i", "Once upon a time", "-t", "0")
    assert text("run", "-i", "Once upon a time", "-t", "1.5", "-s", "3", "--top-k", "1") == greedy
    assert text("run", "-i", "Once upon a time", "-t", "0", "--repeat-penalty", "1.5") != greedy
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n")
    batch = text("run", "--batch-file", str(prompts), "-t", "0")
    assert text("run", "--batch-file", str(prompts), "-t", "1.5", "--top-k", "1") == batch
    assert text("run", "--batch-file", str(prompts), "-t", "0", "--repeat-penalty", "1.5") != batch
    chat = text("chat", "-t", "0", input="Tell me a story.\n")
    assert text("chat", "-t", "1.5", "--top-k", "1", input="Tell me a story.\n") == chat
    assert text("chat", "-t", "0", "--repeat-penalty", "2", input="Tell me a story.\n") != chat
    # a token's logit + 100 (the built-in tokenizer's token 400 is " do"); a later -l for the same token holds
    forced = text("run", "-i", "Once upon a time", "-t", "0", "-l", "400-100", "--logit-bias", "400+100")
    assert forced == b"Once upon a time" + b" do" * 30 + b"\n"
    assert b" do" * 30 + b"\n" in text("run", "--batch-file", str(prompts), "-t", "0", "-l", "400+100")
    assert text("chat", "-t", "0", "-l", "400+100", input="Tell me a story.\n") != chat


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "-1"], "--top-k must be an integer >= 0 (0: off), got -1"),
    (["--min-p", "1.5"], "--min-p must be in [0, 1] (0: off), got 1.5"),
    (["--min-p", "nan"], "--min-p must be in [0, 1] (0: off), got nan"),
    (["--repeat-penalty", "0"], "--repeat-penalty must be a finite number > 0 (1: off), got 0.0"),
    (["--repeat-penalty", "inf"], "--repeat-penalty must be a finite number > 0 (1: off), got inf"),
    (["--repeat-last-n", "-2"],
     "--repeat-last-n must be an integer >= -1 (-1: every token of the window, 0: off), got -2"),
    (["--presence-penalty", "2.5"], "--presence-penalty must be in [-2, 2] (0: off), got 2.5"),
    (["--frequency-penalty", "-3"], "--frequency-penalty must be in [-2, 2] (0: off), got -3.0"),
    (["--draft", "x.bin", "--repeat-penalty", "1.1"], "--draft cannot apply --logit-bias, --repeat-penalty"),
    (["--draft", "x.bin", "--logit-bias", "5+1"], "--draft cannot apply --logit-bias, --repeat-penalty"),
    (["--logit-bias", "5+101"], "--logit-bias must map token ids to biases in [-100, 100], got 5: 101.0"),
    (["-l", "5+nan"], "--logit-bias must map token ids to biases in [-100, 100], got 5: nan"),
    (["-l", "1+1", "-l", "512-1"],  # checked against the model's vocabulary once it is loaded
     "--logit-bias must map token ids in [0, 512) to biases in [-100, 100], got 512: -1.0"),
])
def test_sampling_controls_out_of_range_are_one_error_line(flags, message):
    one_error_line(run_cli("run", "-n", "5", *flags), message)
    if "--draft" not in flags:
        one_error_line(run_cli("chat", *flags, input="Hi\n"), message)


def test_a_logit_bias_flag_that_does_not_parse_is_a_usage_error():
    proc = run_cli("run", "-n", "5", "-l", "5=1")
    assert proc.returncode == 2 and proc.stderr.decode() == (
        "babyllama run: error: argument -l/--logit-bias: invalid token id and bias: '5=1' (TOKEN+BIAS or "
        "TOKEN-BIAS, such as 15043+1) (see --help)\n")


def test_models_help_names_both_built_in_models(capsys):
    """`babyllama models` lists the built-in story model and the chat model (README: Models)."""
    from babyllama.catalog import table
    from babyllama.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "models list the built-in story and chat models and the public llama2.c checkpoints" in text
    assert table().splitlines()[1].startswith("builtin ") and table().splitlines()[2].startswith("builtin-chat ")


def test_ctrl_c_while_the_cli_loads_ends_it_without_a_traceback(monkeypatch):
    """The command's entry point: a Ctrl-C during the imports (the first fraction of a second) is exit 130,
    as it is later, not Python's traceback."""
    import builtins

    from babyllama.__main__ import run

    real_import = builtins.__import__

    def interrupted(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "cli" and level == 1 and (globals or {}).get("__package__") == "babyllama":
            raise KeyboardInterrupt
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert run() == 130
    monkeypatch.setattr(builtins, "__import__", real_import)


def test_ctrl_c_inside_an_extension_modules_import_ends_it_without_a_traceback(monkeypatch):
    """A Ctrl-C that lands inside NumPy's import of its C parts reaches the entry point as an ImportError (NumPy's
    "bad install" message, 40 lines): after a Ctrl-C that is exit 130 too; an ImportError without one is not."""
    import builtins
    import os
    import signal
    import time

    from babyllama.__main__ import run

    real_import = builtins.__import__

    def import_interrupted(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "cli" and level == 1 and (globals or {}).get("__package__") == "babyllama":
            try:  # the signal as a user's Ctrl-C delivers it, caught and replaced as an extension's import does
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                raise ImportError("PyCapsule_Import could not import module \"datetime\"") from None
        return real_import(name, globals, locals, fromlist, level)

    def import_broken(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "cli" and level == 1 and (globals or {}).get("__package__") == "babyllama":
            raise ImportError("a broken install")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", import_interrupted)
    assert run() == 130
    monkeypatch.setattr(builtins, "__import__", import_broken)
    with pytest.raises(ImportError, match="a broken install"):
        run()
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # left as it was found


def test_ctrl_c_while_the_command_line_is_parsed_ends_it_without_a_traceback(monkeypatch):
    """After the imports, building the parser imports more (train's settings): a Ctrl-C there is exit 130 too."""
    from babyllama import cli
    from babyllama.__main__ import run

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert run() == 130


def test_a_batch_through_seed_zero_gives_each_sequence_its_own_seed(tmp_path):
    """--batch-file samples sequence i with seed -s + i (64-bit, as run.c reads -s); where that runs through 0
    from just below 2**64, seed 0's stand-in (2**64 - 1) is the sequence before's seed, so it takes another."""
    from babyllama.sampler import ZERO_SEED, batch_seeds

    assert batch_seeds(-1, 3) == [ZERO_SEED, 2**63, 1] and batch_seeds(-2, 2) == [2**64 - 2, ZERO_SEED]
    assert batch_seeds(0, 2) == [ZERO_SEED, 1] and batch_seeds(7, 2) == [7, 8]
    same = tmp_path / "same.txt"
    same.write_text("Lily\nLily\nLily\n", encoding="utf-8")
    proc = run_cli("run", "--batch-file", str(same), "-s", "-1", "-n", "30")
    assert proc.returncode == 0, proc.stderr.decode()
    texts = [t for t in re.split(r"=== sequence \d/3 .*===\n", proc.stdout.decode()) if t]
    assert len(texts) == 3 and len(set(texts)) == 3
    alone = run_cli("run", "-s", "-1", "-n", "30", "-i", "Lily")
    assert texts[0].strip() == alone.stdout.decode().strip()


@pytest.mark.parametrize("template", ["llama2", "babyllama"])
def test_chat_closes_a_cut_reply_as_the_server_renders_it(monkeypatch, stories260k, tok512, template):
    """A reply cut by its budget gets the template's closing (Llama 2's "▁") and EOS before the next turn, the ids
    the server renders from the reply's text."""
    from babyllama import load
    from babyllama.chat import chat
    from babyllama.chat_template import encode_chat
    from babyllama.generate import Batch

    model = load(stories260k, tok512)
    word = model.tokenizer.encode("the", bos=False)
    assert len(word) == 1  # "▁the": one piece, so that the reply's text encodes back to the same ids
    added = []
    real_add = Batch.add
    monkeypatch.setattr(Batch, "add", lambda self, seq: added.append(seq) or real_add(self, seq))

    class Cat:
        def sample(self, logits, tokens=(), generated=()):
            return word[0]

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nMore\n"))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), write_through=True))
    assert chat(model, Cat(), 3, None, "", template=template) == 0
    reply = model.tokenizer.decode(word * 3)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply},
               {"role": "user", "content": "More"}]
    expected = encode_chat(model.tokenizer, history, template=template)[0] + word * 3
    assert added[0].tokens == expected
