"""`babyllama models` and `babyllama download` against a local HTTP server started in a thread."""

from __future__ import annotations

import socket

import pytest
from conftest import byte_tokenizer, random_weights, run_cli, tiny_args

from babyllama import catalog, formats
from babyllama.config import ModelArgs
from babyllama.download import download_model, fetch
from babyllama.errors import BabyLlamaError


@pytest.fixture
def mirror(serve, tmp_path):
    """A server laid out like the tinyllamas repo: stories260K/ with a tiny model and its tokenizer.
    Yields (base URL, server, served model bytes)."""
    args = tiny_args()
    formats.save(random_weights(args), tmp_path / "m.bin")
    byte_tokenizer(args.vocab_size).save(tmp_path / "t.bin")
    model = (tmp_path / "m.bin").read_bytes()
    tok = (tmp_path / "t.bin").read_bytes()
    server = serve({"/stories260K/stories260K.bin": model, "/stories260K/tok512.bin": tok})
    return server.url(), server, model


def test_download_cli_fetches_model_and_tokenizer_that_run(mirror, tmp_path):
    import shlex

    base, server, model_bytes = mirror
    proc = run_cli("download", "stories260K", "--dir", str(tmp_path / "my models"), "--url-base", base)
    assert proc.returncode == 0, proc.stderr.decode()
    folder = tmp_path / "my models" / "stories260K"
    suggested = proc.stdout.decode().splitlines()[-1].removeprefix("run it: ")
    assert shlex.split(suggested) == ["babyllama", "run", str(folder / "stories260K.bin")]  # quoted: a space
    assert (folder / "stories260K.bin").read_bytes() == model_bytes
    assert sorted(p.name for p in folder.iterdir()) == ["stories260K.bin", "tokenizer.bin"]  # no .part left
    assert [p for p, _ in server.log] == ["/stories260K/stories260K.bin", "/stories260K/tok512.bin"]
    run = run_cli("run", str(folder / "stories260K.bin"), "-n", "8", "-t", "0")  # tokenizer.bin found beside it
    assert run.returncode == 0, run.stderr.decode()
    again = run_cli("download", "stories260K", "--dir", str(tmp_path / "my models"), "--url-base", base)
    assert again.returncode == 0 and len(server.log) == 2  # files already there are not fetched again


def test_a_time_limit_beyond_what_a_timer_can_wait_is_no_limit(mirror, tmp_path):
    """--time-limit 1e10 (past threading.TIMEOUT_MAX, ~9.2e9 s): the download goes as without a limit, with no
    timer thread's traceback."""
    base, _, model_bytes = mirror
    proc = run_cli("download", "stories260K", "--dir", str(tmp_path), "--url-base", base, "--time-limit", "1e10")
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode()
    assert (tmp_path / "stories260K" / "stories260K.bin").read_bytes() == model_bytes


def test_a_host_that_never_accepts_the_connection_is_given_up_on_at_the_time_limit(tmp_path):
    """A listening socket whose backlog is full: connecting hangs, which the deadline (it shuts down sockets
    already open) cannot cut short; the connect itself is bounded by the time left (it took 30 s)."""
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the backlog: a further connect waits for an accept that never comes
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    try:
        start = time.monotonic()
        proc = run_cli("download", "stories260K", "--dir", str(tmp_path), "--url-base", f"http://127.0.0.1:{port}",
                       "--time-limit", "2", timeout=60)
        took = time.monotonic() - start
        assert proc.returncode == 1 and b"took longer than the time limit of 2 s" in proc.stderr, proc.stderr
        assert took < 15
    finally:
        for c in [*fillers, listener]:
            c.close()


@pytest.mark.parametrize("server_ranges", [True, False], ids=["resumes", "server-ignores-range"])
def test_interrupted_download_resumes(mirror, tmp_path, server_ranges):
    base, server, model_bytes = mirror
    server.honour_ranges = server_ranges
    target = tmp_path / "m.bin"
    (tmp_path / "m.bin.part").write_bytes(model_bytes[:1000])
    fetch(f"{base}/stories260K/stories260K.bin", target, show_progress=False)
    assert target.read_bytes() == model_bytes
    assert server.log == [("/stories260K/stories260K.bin", "bytes=1000-")]
    assert not (tmp_path / "m.bin.part").exists()


def test_a_file_changed_on_the_server_since_the_partial_download_is_fetched_whole(mirror, tmp_path):
    """A resume asked for the rest with Range alone: a file replaced on the server in between was completed with
    the new file's tail behind the old file's head. The first response's ETag goes along as If-Range."""
    base, server, old = mirror
    url = f"{base}/stories260K/stories260K.bin"
    server.cut_after = 1000
    with pytest.raises(BabyLlamaError, match="download failed: ended early"):
        fetch(url, tmp_path / "m.bin", show_progress=False)
    assert (tmp_path / "m.bin.part").read_bytes() == old[:1000]
    new = bytes(b ^ 0xFF for b in old)
    server.files["/stories260K/stories260K.bin"] = new
    fetch(url, tmp_path / "m.bin", show_progress=False)
    assert (tmp_path / "m.bin").read_bytes() == new
    assert not (tmp_path / "m.bin.part").exists() and not (tmp_path / "m.bin.part.validator").exists()
    assert server.ranges == [None, "bytes=1000-"]


def test_a_full_disk_is_no_interrupted_transfer(mirror, tmp_path, small_file_limit):
    """A .part that cannot be written was reported as "interrupted ([Errno 27] File too large)"; the message names
    the file, and what it holds stays for the resume."""
    base, server, model_bytes = mirror
    assert len(model_bytes) > 16 << 10
    with pytest.raises(BabyLlamaError, match=r"download failed: cannot write .*m.bin.part: File too large \(what it "
                                             r"holds is kept: run the same command again to resume"):
        fetch(f"{base}/stories260K/stories260K.bin", tmp_path / "m.bin", show_progress=False)
    assert (tmp_path / "m.bin.part").read_bytes() == model_bytes[:16 << 10]


def test_a_second_download_into_a_folder_in_use_is_refused(mirror, tmp_path):
    """Two downloads of one file appended to the same .part (the second resuming from wherever the first was), and
    the first rename published the mix: a folder another download is writing is refused."""
    from conftest import folder_held_elsewhere

    base, server, model_bytes = mirror
    with folder_held_elsewhere(tmp_path):  # as the first download's process holds it
        with pytest.raises(BabyLlamaError, match=f"another download into {tmp_path} is running"):
            fetch(f"{base}/stories260K/stories260K.bin", tmp_path / "m.bin", show_progress=False)
    assert not (tmp_path / "m.bin.part").exists() and server.log == []
    fetch(f"{base}/stories260K/stories260K.bin", tmp_path / "m.bin", show_progress=False)
    assert (tmp_path / "m.bin").read_bytes() == model_bytes


def test_stale_part_longer_than_file_starts_over(mirror, tmp_path):
    base, server, model_bytes = mirror
    (tmp_path / "m.bin.part").write_bytes(model_bytes + b"junk")
    fetch(f"{base}/stories260K/stories260K.bin", tmp_path / "m.bin", show_progress=False)
    assert (tmp_path / "m.bin").read_bytes() == model_bytes
    assert server.ranges == [f"bytes={len(model_bytes) + 4}-", None]


def test_missing_file_on_server_is_one_line_error(mirror, tmp_path):
    base, _, _ = mirror
    with pytest.raises(BabyLlamaError, match="HTTP 404"):
        fetch(f"{base}/nope.bin", tmp_path / "x.bin", show_progress=False)
    assert not (tmp_path / "x.bin").exists()


def test_a_redirect_loop_is_one_line(serve, tmp_path):
    """urllib's reason for a redirect loop runs over three lines: its first is what the error says."""
    server = serve({})
    server.redirects = {"/loop": "/loop"}
    with pytest.raises(BabyLlamaError) as e:
        fetch(f"{server.url()}/loop", tmp_path / "x.bin", show_progress=False)
    assert "\n" not in str(e.value) and "infinite loop" in str(e.value) and str(e.value).endswith("/loop")


def test_error_page_instead_of_model_is_rejected(mirror, tmp_path):
    base, server, _ = mirror
    server.files["/stories260K/stories260K.bin"] = b"<html>rate limited</html>"
    with pytest.raises(BabyLlamaError, match="not a usable model"):
        download_model(catalog.find("stories260K"), tmp_path / "models", base, show_progress=False)
    folder = tmp_path / "models" / "stories260K"
    assert [p.name for p in folder.iterdir()] == ["tokenizer.bin"]  # the next run fetches the model again only


def test_error_page_as_model_and_a_missing_tokenizer_leave_no_model(mirror, tmp_path):
    base, server, _ = mirror
    server.files["/stories260K/stories260K.bin"] = b"<html>rate limited</html>"
    del server.files["/stories260K/tok512.bin"]
    with pytest.raises(BabyLlamaError, match="HTTP 404"):
        download_model(catalog.find("stories260K"), tmp_path / "models", base, show_progress=False)
    assert not (tmp_path / "models" / "stories260K" / "stories260K.bin").exists()


@pytest.mark.parametrize("bad", ["model", "tokenizer", "vocabulary"])
def test_an_unusable_download_removes_only_the_fetched_file_at_fault(mirror, tmp_path, bad):
    """The offline hint tells users to put a file in place by hand: when the other one, fetched, proves unusable
    (a mirror's HTML page, a tokenizer of another vocabulary), the user's file stays and only the fetched file
    at fault goes."""
    base, server, model_bytes = mirror
    folder = tmp_path / "models" / "stories260K"
    folder.mkdir(parents=True)
    if bad == "model":
        server.files["/stories260K/stories260K.bin"] = b"<html>log in to the Wi-Fi</html>"
        mine = folder / "tokenizer.bin"
        mine.write_bytes(server.files["/stories260K/tok512.bin"])
        fetched = folder / "stories260K.bin"
    else:
        other = tmp_path / "other.bin"
        byte_tokenizer(tiny_args().vocab_size + 1).save(other)
        server.files["/stories260K/tok512.bin"] = (b"<html>log in to the Wi-Fi</html>" if bad == "tokenizer" else
                                                   other.read_bytes())
        mine = folder / "stories260K.bin"
        mine.write_bytes(model_bytes)
        fetched = folder / "tokenizer.bin"
    kept = mine.read_bytes()
    with pytest.raises(BabyLlamaError, match=f"not a usable model \\(removed {fetched.name}\\)") as e:
        download_model(catalog.find("stories260K"), tmp_path / "models", base, show_progress=False)
    assert "-z" not in str(e.value)  # download has no such flag
    assert mine.read_bytes() == kept and not fetched.exists()


def test_two_unusable_files_are_both_removed(mirror, tmp_path):
    base, server, _ = mirror
    server.files["/stories260K/stories260K.bin"] = server.files["/stories260K/tok512.bin"] = b"<html>busy</html>"
    with pytest.raises(BabyLlamaError, match=r"\(removed stories260K.bin; removed tokenizer.bin\)"):
        download_model(catalog.find("stories260K"), tmp_path / "models", base, show_progress=False)
    assert not (tmp_path / "models").exists()  # nor the folders it made


@pytest.mark.parametrize("flags", [["--dir", ""], ["--url-base", ""]])
def test_download_refuses_an_empty_folder_or_mirror(flags):
    """An unset variable would otherwise download into the current folder, or from the default site."""
    proc = run_cli("download", "stories260K", *flags)
    assert proc.returncode == 2 and b"is empty" in proc.stderr and proc.stderr.count(b"\n") == 1


def test_a_malformed_url_is_one_line(tmp_path):
    with pytest.raises(BabyLlamaError, match=r"http://\[bad/x.bin is not a valid URL"):
        fetch("http://[bad/x.bin", tmp_path / "x.bin", show_progress=False)


def test_a_certificate_that_does_not_verify_says_so(tmp_path, monkeypatch):
    """A Python without CA certificates (macOS's python.org installers) fails every HTTPS download on the
    certificate; the error said "no internet connection?", which sent the user the wrong way."""
    import ssl
    import urllib.error

    from babyllama import download

    class Refused:
        def open(self, *args, **kw):
            why = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate"
            raise urllib.error.URLError(ssl.SSLCertVerificationError(1, why))

    monkeypatch.setattr(download.Deadline, "opener", lambda self: Refused())
    with pytest.raises(BabyLlamaError) as e:
        fetch("https://example.org/m.bin", tmp_path / "m.bin", show_progress=False)
    assert "CERTIFICATE_VERIFY_FAILED" in str(e.value) and "Install Certificates" in str(e.value)
    assert "no internet" not in str(e.value)


def test_offline_is_one_clear_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused, as offline as it gets here
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli("download", "stories15M", "--dir", str(tmp_path / "models"), "--url-base",
                   f"http://127.0.0.1:{port}")
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.startswith("babyllama: error: download failed: cannot reach http://127.0.0.1:") and "no internet" in err
    # what to do offline: the file put where the command looks for it first
    assert f"put it at {tmp_path / 'models' / 'stories15M' / 'stories15M.bin'}: the same command then takes it" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "models").exists()  # the folders made for it, left empty, are gone again


@pytest.mark.parametrize("url, hint", [("/no/such/archive.tar.gz", "a URL is needed (https://..., or file:///"),
                                       ("file:///no/such/archive.tar.gz", "no such local file")])
def test_a_path_or_a_missing_local_file_is_no_network_fault(tmp_path, url, hint):
    proc = run_cli("data", "download", "--url", url, "--data-dir", str(tmp_path / "dl"))
    err = proc.stderr.decode()
    assert proc.returncode == 1 and hint in err and "no internet" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "dl").exists()


def test_unknown_name(tmp_path):
    proc = run_cli("download", "stories7B", "--dir", str(tmp_path))
    assert proc.returncode == 1 and b"unknown model 'stories7B'; known: stories260K" in proc.stderr


def test_models_table_lists_public_checkpoints_with_reported_losses():
    proc = run_cli("models")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    for name, loss in [("stories260K", "1.297"), ("stories15M", "1.072"), ("stories42M", "0.847"),
                       ("stories110M", "0.760")]:
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert loss in row
    assert "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories15M.bin" in out
    assert "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin" in out


def test_public_sizes_match_the_reported_shapes():
    """The sizes shown are those of a version-0 file of the reported shape (stories260K: the fixture's)."""
    for m in catalog.PUBLIC:
        if m.name == "stories260K":
            continue  # its hidden_dim (172) is not Meta's rule; checked against the real file below
        args = ModelArgs(dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                                 vocab_size=m.vocab_size, max_seq_len=m.seq_len)
        assert m.size == formats.HEADER_V0 + formats.body_size(args, 0)


def test_stories260k_size_is_the_real_file(stories260k):
    assert catalog.find("stories260K").size == stories260k.stat().st_size
