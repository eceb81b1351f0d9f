"""End-to-end `babyllama run` speed flags on stories260K (run.c's goldens as the plain reference), and the
bench plumbing on a tiny model (no timing is asserted anywhere)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import (
    alive,
    assert_greedy_agree,
    byte_tokenizer,
    cli_error,
    crashing_program,
    logits_after,
    random_weights,
    require_llama_cpp,
    run_cli,
    shared_file,
    tiny_args,
)

from babyllama import bench, formats, kernels

GREEDY = ["-t", "0", "-n", "200"]


def golden(name: str) -> bytes:
    return shared_file(f"fixtures/golden/{name}").read_bytes()


def run(model: Path, tok: Path, *flags: str):
    proc = run_cli("run", str(model), "-z", str(tok), *flags)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def test_threads_and_draft_keep_run_c_output(stories260k, tok512):
    assert run(stories260k, tok512, *GREEDY, "--threads", "1").stdout == golden("s260k_t0_n200.txt")
    # the model as its own draft: greedy speculative output is the plain output, every draft accepted
    proc = run(stories260k, tok512, *GREEDY, "--draft", str(stories260k), "--draft-k", "3")
    assert proc.stdout == golden("s260k_t0_n200.txt")
    assert b"(100.0%)" in proc.stderr


def test_a_draft_with_a_shorter_context_drafts_while_it_lasts(stories260k, tok512, tmp_path):
    """The model as its own draft with a 64-position header: the target's greedy output to 200 positions
    (run.c's), the draft's tokens all accepted while its context lasts and the target alone after that."""
    from dataclasses import replace

    weights = formats.load(stories260k)
    short = tmp_path / "short.bin"
    formats.save(replace(weights, args=replace(weights.args, max_seq_len=64)), short)
    proc = run(stories260k, tok512, *GREEDY, "--draft", str(short), "--draft-k", "3")
    assert proc.stdout == golden("s260k_t0_n200.txt")
    assert b"(100.0%)" in proc.stderr


def test_mmap_flags_are_the_models_and_leave_a_gguf_draft_alone(stories260k, tok512, tmp_path):
    """--mmap / --no-mmap choose how the .bin model is read; a GGUF draft (always mapped) is read its own way,
    not refused for the model's flag."""
    pytest.importorskip("gguf")
    draft = tmp_path / "draft.gguf"
    proc = run_cli("export", str(draft), "--model", str(stories260k), "--tokenizer", str(tok512))
    assert proc.returncode == 0, proc.stderr.decode()
    for flag in ("--mmap", "--no-mmap"):
        proc = run(stories260k, tok512, *GREEDY, flag, "--draft", str(draft), "--draft-k", "3")
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout == golden("s260k_t0_n200.txt")


def test_quantize_reaches_the_draft_model(stories260k, tok512):
    """`--quantize` quantizes the `--draft` model too (read once from its file, like the model itself): the Q4_0
    model as its own draft is the Q4_0 model's greedy output, every draft accepted. Q4_0, whose greedy text parts
    from the fp32 model's within a few dozen tokens on any arithmetic, so that an fp32 draft would be refused
    (Q8_0's can equal fp32's for all 200 tokens, depending on the CPU's arithmetic)."""
    if kernels.native_backend() is None:
        pytest.skip("the verify step's rows equal single steps only on the native kernels (NumPy's attention sums "
                    "a 4-token step's scores and values in other orders than a 1-token one's)")
    alone = run(stories260k, tok512, *GREEDY, "--quantize", "q4_0")
    proc = run(stories260k, tok512, *GREEDY, "--quantize", "q4_0", "--draft", str(stories260k), "--draft-k", "3")
    assert proc.stdout == alone.stdout != golden("s260k_t0_n200.txt")
    assert b"(100.0%)" in proc.stderr


def test_device_cpu_runs_the_pytorch_model(stories260k, tok512):
    pytest.importorskip("torch")
    out = run(stories260k, tok512, *GREEDY, "--device", "cpu").stdout
    # PyTorch's sgemm sums in another order than run.c: its greedy tokens equal the reference path's up to the
    # first near-tie, and then the text is run.c's exactly
    from babyllama.api import load
    from babyllama.generate import generate
    from babyllama.sampler import Sampler

    torch_engine, plain = (load(stories260k, tok512, device=d, plain=d == "numpy").engine for d in ("cpu", "numpy"))
    got, want = (list(generate(e, [1], 200, Sampler(0.0))) for e in (torch_engine, plain))
    if assert_greedy_agree(want, got, lambda i: logits_after(plain, [1] + want[:i]), 1e-2) == len(want):
        assert out == golden("s260k_t0_n200.txt")


def test_compile_without_the_pytorch_engine_is_one_line():
    proc = run_cli("run", "-n", "8", "--compile")
    assert proc.returncode == 1 and b"--compile works with the PyTorch engine only" in proc.stderr
    assert proc.stderr.count(b"\n") == 1


@pytest.mark.parametrize("device", ["cudafoo", "cuda:", "cpu0"])
def test_a_device_that_is_no_device_name_is_unknown(device):
    proc = run_cli("run", "-n", "4", "--device", device)
    assert proc.returncode == 1 and proc.stderr == (f"babyllama: error: unknown device {device!r} (numpy, cpu, cuda "
                                                    "or cuda:N)\n").encode()


def test_device_cuda_without_gpu_is_one_line(stories260k, tok512):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "--device", "cuda")
    assert proc.returncode == 1 and b"no CUDA GPU is available" in proc.stderr
    assert proc.stderr.count(b"\n") == 1


def test_quantize_on_load_fast_equals_plain(stories260k, tok512):
    flags = ["-t", "0", "-n", "60", "--quantize", "q8_0"]  # the plain Q8_0 path is slow: keep it short
    fast, plain = run(stories260k, tok512, *flags), run(stories260k, tok512, *flags, "--plain")
    assert len(plain.stdout) > 100
    # the int8 kernel and the plain NumPy path round differently: the same greedy tokens up to the first
    # near-tie (the same text when there is none)
    from babyllama.api import load
    from babyllama.generate import generate
    from babyllama.sampler import Sampler

    engines = [load(stories260k, tok512, quantize="q8_0", plain=p).engine for p in (False, True)]
    fast_ids, plain_ids = (list(generate(e, [1], 60, Sampler(0.0))) for e in engines)
    if assert_greedy_agree(plain_ids, fast_ids, lambda i: logits_after(engines[1], [1] + plain_ids[:i]), 1e-2) \
            == len(plain_ids):
        assert fast.stdout == plain.stdout


def test_batch_file_prints_each_sequence_like_a_single_run(stories260k, tok512, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\nOnce upon a time, a little dog\nThe sun\n", encoding="utf-8")
    proc = run(stories260k, tok512, "-t", "0", "-n", "120", "--batch-file", str(prompts))
    out = proc.stdout
    assert out.count(b"=== sequence ") == 3
    sections = out.split(b"=== sequence ")[1:]
    assert sections[1].startswith(b"2/3 (")
    body = sections[1].split(b"===\n", 1)[1]
    assert body == golden("s260k_t0_n120_dog.txt")  # the same text as a single run of that prompt
    assert b"aggregate over 3 sequences" in proc.stderr


def test_context_shift_goes_past_seq_len(tmp_path):
    # a random model (the story model ends its stories, with BOS, long before seq_len)
    model, tok = tmp_path / "m.bin", tmp_path / "tok.bin"
    formats.save(random_weights(tiny_args(max_seq_len=32), scale=0.3), model)
    byte_tokenizer().save(tok)
    plain = run(model, tok, "-t", "0", "-n", "0").stdout
    shifted = run(model, tok, "-t", "0", "-n", "100", "--context-shift", "--n-keep", "2").stdout
    # identical up to seq_len, then ~3x the positions (100 instead of 32) of text
    assert shifted.startswith(plain.rstrip(b"\n")) and len(shifted) > 2.5 * len(plain)
    rotated = run(model, tok, "-t", "0", "-n", "100", "--context-shift", "--n-keep", "2", "--rotate-keys").stdout
    assert rotated.startswith(plain.rstrip(b"\n")) and len(rotated) > 2.5 * len(plain)


@pytest.mark.parametrize("flags,message", [
    (["--batch-file", "/nonexistent/prompts.txt"], b"batch file not found"),
    (["--batch-file", "x", "--draft", "y"], b"cannot be combined"),
    (["--threads", "0"], b"--threads must be >= 1"),
    (["--draft-k", "0", "--draft", "x"], b"--draft-k must be >= 1"),
    (["-m", "chat", "--context-shift"], b"generate mode only"),
    (["--rotate-keys"], b"--rotate-keys works with --context-shift only"),
])
def test_bad_speed_flags(stories260k, tok512, flags, message):
    proc = run_cli("run", str(stories260k), "-z", str(tok512), *flags)
    assert proc.returncode == 1
    assert proc.stderr.startswith(b"babyllama: error: ") and message in proc.stderr
    assert proc.stderr.count(b"\n") == 1


def test_a_draft_that_cannot_be_read_is_named_as_the_draft(stories260k, tok512, tmp_path):
    proc = run_cli("run", str(stories260k), "-z", str(tok512), *GREEDY, "--draft", str(tmp_path / "nosuch.bin"))
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().splitlines()[-1] == (
        f"babyllama: error: --draft: model file not found: {tmp_path / 'nosuch.bin'}")


def test_draft_with_another_vocabulary_is_refused(stories260k, tok512, tmp_path):
    other = tmp_path / "other.bin"
    formats.save(random_weights(tiny_args()), other)
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "--draft", str(other))
    assert proc.returncode == 1 and b"must share a tokenizer" in proc.stderr


@pytest.mark.parametrize("size, said", [(512, b"another tokenizer"), (300, b"has 300 tokens")])
def test_a_draft_with_another_tokenizer_beside_it_is_refused(stories260k, tok512, tmp_path, size, said):
    """Same-sized vocabularies can hold other pieces: a draft whose tokenizer.bin is not the model's is refused
    (its drafts would almost all be rejected); one of another size too, as the draft's fault, not the model's (-z
    sets the model's tokenizer); with the model's tokenizer beside it, it drafts."""
    import shutil

    draft = tmp_path / "draft.bin"
    shutil.copyfile(stories260k, draft)
    byte_tokenizer(size).save(tmp_path / "tokenizer.bin")
    proc = run_cli("run", str(stories260k), "-z", str(tok512), *GREEDY, "--draft", str(draft))
    assert proc.returncode == 1 and proc.stderr.count(b"\n") == 1
    assert proc.stderr.startswith(b"babyllama: error: the draft model ") and said in proc.stderr
    assert b"pass the tokenizer" not in proc.stderr
    shutil.copyfile(tok512, tmp_path / "tokenizer.bin")
    proc = run(stories260k, tok512, *GREEDY, "--draft", str(draft))
    assert proc.stdout == golden("s260k_t0_n200.txt") and b"(100.0%)" in proc.stderr


def test_bench_reports_the_decode_runs_it_made(tmp_path, monkeypatch):
    """A figure takes more runs than --repeats while they last under the minimum time: the row says how many
    decode runs its median is of, not how many were asked for."""
    path = tmp_path / "tiny.bin"
    formats.save(random_weights(tiny_args()), path)
    made, runs_of = [], bench.runs_of

    def counted(run, repeats, min_seconds=0.3):
        values = runs_of(run, repeats, min_seconds)
        made.append(len(values))
        return values

    monkeypatch.setattr(bench, "runs_of", counted)
    res = bench.measure(path, False, repeats=1, tokens=8, batch=2, prompt_len=16)
    assert made[0] > 1 and res["repeats"] == made[0]  # the first figure is the decode


def test_bench_caches_its_models_under_babyllama_cache(tmp_path, monkeypatch):
    """BABYLLAMA_CACHE moves every cache of babyllama's, the bench models' too; BABYLLAMA_BENCH_DIR and
    --cache-dir still name the bench's own folder."""
    monkeypatch.delenv("BABYLLAMA_BENCH_DIR", raising=False)
    monkeypatch.setenv("BABYLLAMA_CACHE", str(tmp_path / "cache"))
    assert bench.cache_dir() == tmp_path / "cache" / "bench" and (tmp_path / "cache" / "bench").is_dir()
    monkeypatch.setenv("BABYLLAMA_BENCH_DIR", str(tmp_path / "bench"))
    assert bench.cache_dir() == tmp_path / "bench"
    assert bench.cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"


def test_bench_rejects_unknown_shape():
    proc = run_cli("bench", "--shapes", "7B")
    assert proc.returncode == 1 and b"unknown shape(s) 7B" in proc.stderr


def test_bench_measures_a_name_given_twice_once(monkeypatch, tmp_path):
    """--shapes builtin,builtin (or a format or thread setting given twice) measured the same rows twice."""
    from babyllama.cli import main
    from babyllama.errors import BabyLlamaError

    plans = []

    def planned(plan, *args, **kw):
        plans.append(plan)
        raise BabyLlamaError("planned only")

    monkeypatch.setattr(bench, "run", planned)
    code = main(["bench", "--shapes", "builtin, 15M,builtin", "--formats", "fp32,q8_0,fp32", "--thread-settings",
                 "default,1,default", "--no-plain", "--cache-dir", str(tmp_path)])
    assert code == 1 and len(plans) == 1
    assert (plans[0].shapes, plans[0].formats, plans[0].thread_settings) == (
        ["builtin", "15M"], ("fp32", "q8_0"), ("default", "1"))


@pytest.mark.parametrize("argv, message", [
    (["--no-plain", "--plain-tokens", "500"], "--plain-tokens set the plain baseline's rows, which --no-plain leaves"),
    (["--no-plain", "--plain-repeats", "7"], "--plain-repeats set the plain baseline's rows, which --no-plain leaves"),
    (["--device", "cpu", "--plain-tokens", "1000"], "--plain-tokens set the plain baseline's rows, which --device cpu"),
    (["--device", "cpu", "--bandwidth-mib", "64"], "--bandwidth-mib sizes the memory-bandwidth probe of the NumPy "
                                                   "engine's rows: --device cpu measures none"),
])
def test_bench_refuses_flags_for_rows_it_does_not_measure(monkeypatch, tmp_path, capsys, argv, message):
    """The plain baseline's flags beside --no-plain or the PyTorch engine, and the probe's size beside the PyTorch
    engine, were accepted and ignored (--plain-tokens 1000 was even refused as longer than the context)."""
    from babyllama.cli import main

    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured despite a flag it ignores"))
    assert main(["bench", "--shapes", "builtin", "--cache-dir", str(tmp_path), *argv]) == 1
    assert capsys.readouterr().err.startswith(f"babyllama: error: {message}")


def test_bench_plain_repeats_reach_the_plain_rows(monkeypatch, tmp_path):
    """--plain-repeats N ran one run per figure unless --repeats was raised too (it was capped by it)."""
    from babyllama.cli import main

    specs = []

    def child(spec, env=None):
        specs.append(spec)
        raise RuntimeError("recorded only")

    monkeypatch.setattr(bench, "_run_child", child)
    monkeypatch.setattr(bench, "_bandwidth_probe", lambda plan: {"gbps": 1.0, "threads": 1, "mib": 1})
    main(["bench", "--shapes", "builtin", "--formats", "fp32", "--rounds", "1", "--plain-repeats", "20",
          "--plain-tokens", "16", "--cache-dir", str(tmp_path)])
    rows = {spec["plain"]: spec for spec in specs if spec.get("kind") == "ours"}
    assert (rows[True]["repeats"], rows[True]["tokens"]) == (20, 16)
    assert rows[False]["repeats"] == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder that takes no files")
def test_bench_output_into_a_folder_that_takes_no_files_is_refused_before_measuring(monkeypatch, tmp_path, capsys):
    """The table's file is tried (a file made and removed beside it) before hours of measuring, not after."""
    from babyllama.cli import main

    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before the output was checked"))
    assert main(["bench", "--shapes", "builtin", "--no-plain", "--cache-dir", str(tmp_path), "--output",
                 "/proc/babyllama-bench.md"]) == 1
    assert capsys.readouterr().err.startswith("babyllama: error: cannot write bench table /proc/babyllama-bench.md: ")


def test_bench_llamacpp_without_llama_cpp_python_is_refused_before_measuring(monkeypatch, tmp_path, capsys):
    import importlib.util

    from babyllama.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured without llama-cpp-python"))
    assert main(["bench", "--shapes", "builtin", "--no-plain", "--llamacpp", "--cache-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        "babyllama: error: bench --llamacpp (llama-cpp-python is missing) needs babyllama's 'bench' extra: pip "
        "install 'babyllama[bench]' (in a source checkout: pip install -e '.[bench]')")


def test_bench_measures_a_model_and_renders_the_table(tmp_path):
    path = tmp_path / "tiny.bin"
    formats.save(random_weights(tiny_args()), path)
    rows = []
    for plain in (True, False):
        res = bench.measure(path, plain, repeats=1, tokens=8, batch=2, prompt_len=16, sampled=True)
        rows.append(bench.Row("tiny", "fp32", "plain NumPy" if plain else "babyllama", result=res))
        for key in ("decode", "sampled", "prefill", "batch", "ttft_ms", "rss_mib"):
            assert res[key] > 0
        assert res["decode_bytes"] == path.stat().st_size - 256 - 4 * (2 * 2 * 32 + 32)  # all but header, norms
        # fp32 keys and values of 2 layers x 2 kv heads of 8 over 8 timed steps at positions 2-9 (3-10 attended)
        assert res["kv_bytes"] == 2 * 2 * (2 * 8) * 4 * (3 + 10) / 2
    text = bench.table(rows, batch=2, prompt_len=16, bandwidth={"gbps": 10.0, "threads": 2, "mib": 64})
    assert text.count("| tiny | fp32 |") == 2 and "plain NumPy" in text
    assert "Memory bandwidth (this run, thread setting default: 2 threads reading 64 MiB): **10.0 GB/s**" in text
    share = [line for line in text.splitlines() if "| babyllama |" in line][0].split("|")[6]
    gbps = rows[1].result["decode"] * (rows[1].result["decode_bytes"] + rows[1].result["kv_bytes"]) / 1e9
    assert share.strip() == f"{gbps:.1f} ({100 * gbps / 10:.0f}%)"
    # measured again beside the model's rows: the share is of that figure
    text = bench.table(rows, batch=2, prompt_len=16, bandwidth={"gbps": 10.0, "threads": 2, "mib": 64,
                                                                "shapes": {"tiny": 4.0}})
    assert "**10.0 GB/s** at the start; beside each model's rows: tiny 4.0 GB/s" in text
    share = [line for line in text.splitlines() if "| babyllama |" in line][0].split("|")[6]
    assert share.strip() == f"{gbps:.1f} ({100 * gbps / 4:.0f}%)"


def test_the_bandwidth_is_the_faster_of_one_stream_and_four_a_thread():
    """The probe reads its buffer as one stream a thread (how a product reads its rows) and as four interleaved,
    taking turns; the bandwidth is the faster median, and the table's line gives both."""
    got = bench.measure_bandwidth(mib=8, repeats=3)
    if not got:
        pytest.skip("the native kernels are not built here (no C compiler)")
    assert set(got["streams"]) == {"1", "4"} and got["gbps"] == max(got["streams"].values()) > 0
    text = bench.table([], batch=2, prompt_len=16, bandwidth={"gbps": 12.5, "threads": 2, "mib": 64,
                                                            "streams": {"1": 10.0, "4": 12.5}})
    assert ("Memory bandwidth (this run, thread setting default: 2 threads reading 64 MiB, each 64 KiB as 1 stream "
            "10.0, 4 streams 12.5 GB/s, the faster): **12.5 GB/s**") in text
    text = bench.table([], batch=2, prompt_len=16, bandwidth={"gbps": 12.5, "threads": 1, "mib": 64})
    assert "thread setting default: 1 thread reading 64 MiB" in text
    with pytest.raises(ValueError, match="at least one read, got 0"):
        bench.measure_bandwidth(mib=1, repeats=0)


def test_the_plain_row_under_a_kv_cache_flag_is_still_the_plain_baseline():
    """--kv-cache X names itself in every engine label, the plain row's too: that row stays the baseline (its
    token count said), never a reference that babyllama is compared with."""
    res = {"decode": 100.0, "prefill": 400.0, "ttft_ms": 1.0, "decode_tokens": 2, "repeats": 1}
    rows = [bench.Row("tiny", "fp32", "plain NumPy --kv-cache q8_0", "1", res),
            bench.Row("tiny", "fp32", "babyllama --kv-cache q8_0", result={**res, "decode": 700.0})]
    text = bench.table(rows, batch=2, prompt_len=16, bandwidth={"gbps": 10.0, "threads": 2, "mib": 64})
    assert "(plain rows: 2 tokens, 1 run" in text
    assert "babyllama / reference" not in text and "vs plain NumPy" not in text


def test_bench_gives_each_rows_share_of_a_read_of_its_own_size_too():
    """A model whose bytes stay in a cache between tokens can pass the memory's bandwidth (the built-in model read
    128%): beside that share each row gives its share of a read of its own bytes per token, where that was
    measured (not under co-runners), and the notes say what that read is."""
    res = {"decode": 1000.0, "decode_bytes": 15e6, "kv_bytes": 5e6}
    rows = [bench.Row("tiny", "fp32", "babyllama", result=res),
            bench.Row("tiny", "q8_0", "babyllama", result={**res, "decode_bytes": 35e6})]

    def cells(bandwidth: dict) -> tuple[list[str], str]:
        text = bench.table(rows, 2, 16, {"gbps": 10.0, "threads": 2, "mib": 64, **bandwidth})
        return [x.split("|")[6].strip() for x in text.splitlines() if x.startswith("| tiny |")], text

    shares, text = cells({"sized": {str(20_000_000): 40.0, str(40_000_000): 8.0}})
    assert shares == ["20.0 (200% / 50%)", "40.0 (400% / 500%)"]
    assert "% of bandwidth / of a same-size read" in text and "same-size read: every kernel thread" in text
    shares, text = cells({"sized": {str(20_000_000): 40.0}})  # the other size not measured
    assert shares == ["20.0 (200% / 50%)", "40.0 (400%)"]
    shares, text = cells({})  # busy runs: no same-size reads
    assert shares == ["20.0 (200%)", "40.0 (400%)"] and "same-size" not in text


def test_the_same_size_probe_reads_buffers_of_each_size():
    """measure_sized_reads reads a buffer of each size, rounded up to whole pages (decode's bytes per token are
    any number), and keys its GB/s on the size asked for."""
    from babyllama import kernels_native

    if kernels_native.load() is None:
        pytest.skip("the probe reads with the native kernels, which need a C compiler")
    sizes = [1, 4096, 300_001, 3 << 20]
    rates = bench.measure_sized_reads(sizes, repeats=1)["sized"]
    assert list(rates) == [str(n) for n in sizes] and all(v > 0 for v in rates.values())


def test_bench_notes_name_the_prompts_the_figures_were_measured_on():
    """TTFT is timed on the prefill prompt's first 16 tokens: a shorter --prompt-len shortens it too."""
    rows = [bench.Row("tiny", "fp32", "babyllama", result={"decode": 1.0, "ttft_ms": 1.0})]
    for prompt_len, ttft in ((256, 16), (8, 8)):
        notes = bench.table(rows, batch=2, prompt_len=prompt_len)
        assert f"prefill: one {prompt_len}-token prompt" in notes and f"+ {ttft}-token prompt + first token" in notes


def test_bench_startup_times_a_whole_run_process_beside_a_bare_interpreter():
    t = bench.startup(repeats=1)
    assert t["run_ms"] > t["python_ms"] > 0  # a run imports, loads and generates on top of the interpreter


def test_bench_names_a_compiler_of_several_words_with_its_options():
    """A $CC with options (CC="gcc -DPREFETCH_BYTES=0", as the kernels' build takes it) is run as those words for
    its version line, and the options are named beside it; a missing compiler is named, not a traceback."""
    plain = bench.compiler_description("gcc")
    assert plain.startswith("gcc") and "with" not in plain
    assert bench.compiler_description("gcc -DPREFETCH_BYTES=0") == f"{plain}, with -DPREFETCH_BYTES=0"
    assert bench.compiler_description("no-such-cc-here") == "no-such-cc-here"


def test_bench_on_the_pytorch_engine_measures_fp32_only(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32))
    plan = bench.Plan(["tiny"], rounds=1, tokens=8, batch=2, prompt_len=16, device="cpu")
    rows, bandwidth = bench.run(plan, tmp_path, log=lambda m: None)
    assert [(r.engine, r.fmt) for r in rows] == [("babyllama --device cpu", "fp32")] and bandwidth == {}
    assert all(rows[0].result[key] > 0 for key in ("decode", "prefill", "batch", "ttft_ms"))
    line = [x for x in bench.table(rows, batch=2, prompt_len=16).splitlines() if x.startswith("| tiny |")][0]
    assert "| babyllama --device cpu |" in line


def test_a_failed_bandwidth_probe_is_one_line(tmp_path, monkeypatch):
    """The probe's child failing (no memory for --bandwidth-mib) is one error line before any row is measured."""
    from babyllama.errors import BabyLlamaError

    def failing_child(spec, env=None):
        assert spec["kind"] == "bandwidth"
        raise RuntimeError("numpy._core._exceptions._ArrayMemoryError: Unable to allocate 95.4 TiB")

    monkeypatch.setattr(bench, "_run_child", failing_child)
    plan = bench.Plan(["builtin"], ("fp32",), rounds=1, tokens=8, batch=2, prompt_len=16, paths=("fast",),
                      bandwidth_mib=100_000_000)
    with pytest.raises(BabyLlamaError, match=r"^the memory-bandwidth probe \(100000000 MiB\) failed: numpy.*"
                                             r"Unable to allocate 95.4 TiB \(a smaller --bandwidth-mib fits\)$"):
        bench.run(plan, tmp_path, log=lambda m: None)


def test_bench_run_measures_the_bandwidth_again_beside_each_model(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32))
    plan = bench.Plan(["tiny"], ("fp32",), rounds=1, tokens=8, batch=2, prompt_len=16, paths=("fast",),
                      bandwidth_mib=8)
    rows, bandwidth = bench.run(plan, tmp_path, log=lambda m: None)
    assert bandwidth["gbps"] > 0 and set(bandwidth["shapes"]) == {"tiny"} and bandwidth["shapes"]["tiny"] > 0
    line = [x for x in bench.table(rows, 2, 16, bandwidth).splitlines() if x.startswith("| tiny |")][0]
    read = rows[0].result["decode_bytes"] + rows[0].result["kv_bytes"]
    gbps = rows[0].result["decode"] * read / 1e9
    assert list(bandwidth["sized"]) == [str(read)]  # a read of the row's own bytes per token, after its rounds
    limits = (bandwidth["shapes"]["tiny"], bandwidth["sized"][str(read)])
    assert f"{gbps:.1f} ({100 * gbps / limits[0]:.0f}% / {100 * gbps / limits[1]:.0f}%)" in line


def test_bench_run_with_busy_co_runners_thread_settings_and_a_failing_reference(tmp_path, monkeypatch):
    """Plumbing of one run: the bandwidth figure, a co-runner process per --busy while the rows are measured
    (and gone after), a row per thread setting, Q4_0 rows, and a reference that fails reported in one line
    instead of a traceback that ends the bench (as llama2.c's run.c fails without a tokenizer)."""
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32))
    fake = tmp_path / "run"
    fake.write_text("#!/bin/sh\necho \"couldn't load tokenizer.bin\" >&2\nexit 1\n")
    fake.chmod(0o755)
    seen = []

    def log(message: str) -> None:  # while the rows are measured, the co-runners are running
        if "measuring" in message:
            seen.append(sum(1 for p in _children() if bench.BUSY_CODE in p))

    plan = bench.Plan(["tiny"], ("fp32", "q4_0"), rounds=1, tokens=8, batch=2, prompt_len=16, paths=("fast",),
                      references={"run.c": str(fake)}, thread_settings=("default", "1"), busy=1, bandwidth_mib=8)
    rows, bandwidth = bench.run(plan, tmp_path, log=log)
    assert bandwidth["gbps"] > 0 and seen and set(seen) == {1} and not any(bench.BUSY_CODE in p for p in _children())
    assert "shapes" not in bandwidth  # beside co-runners the bandwidth is the one measured before they started
    assert [(r.fmt, r.engine, r.threads) for r in rows] == [
        ("fp32", "run.c", "default"), ("fp32", "babyllama", "default"), ("fp32", "run.c", "1"),
        ("fp32", "babyllama", "1"), ("q4_0", "babyllama", "default"), ("q4_0", "babyllama", "1")]
    assert rows[0].error.endswith("failed: couldn't load tokenizer.bin") and rows[0].error.count("\n") == 0
    assert all(r.result["decode"] > 0 for r in rows if r.engine == "babyllama")
    text = bench.table(rows, 2, 16, bandwidth)
    assert "| tiny | Q4_0 | babyllama | 1 |" in text and "- tiny fp32 run.c: run.c (" in text


def test_a_reference_that_prints_no_speed_is_not_reported_by_its_last_line(tmp_path):
    fake = tmp_path / "run"
    fake.write_text("#!/bin/sh\necho 'Once upon a time'\n")  # exits 0, its speed line missing
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"^it printed no 'achieved tok/s:' line on stderr, as llama2.c's run.c"):
        bench.reference_decode(str(fake), tmp_path / "m.bin", tmp_path / "t.bin", 8, 1)


@pytest.mark.parametrize("value", ["abc", "nan", "-5", "0"])
def test_a_reference_whose_speed_line_is_no_speed_is_reported(tmp_path, value):
    fake = tmp_path / "run"
    fake.write_text(f"#!/bin/sh\necho 'achieved tok/s: {value}' >&2\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match=f"^its 'achieved tok/s:' line gives '{value}', not a speed$"):
        bench.reference_decode(str(fake), tmp_path / "m.bin", tmp_path / "t.bin", 8, 1)


def test_a_measurement_that_crashes_is_reported_by_its_signal(tmp_path, monkeypatch):
    """A process killed by a signal (llama.cpp's crash in a measuring child, a reference's segfault) is reported as
    such: its last line is only what it logged before, which read as the reason (a llama.cpp warning did)."""
    fake = crashing_program(tmp_path / "crashes", "llama_context: n_ctx_seq (512) > n_ctx_train (256)")
    said = r"^killed by SIGSEGV \(the last line it printed: llama_context: n_ctx_seq \(512\) > n_ctx_train \(256\)\)$"
    with pytest.raises(RuntimeError, match=said):
        bench.reference_decode(fake, tmp_path / "m.bin", tmp_path / "t.bin", 8, 1)
    monkeypatch.setattr(bench.sys, "executable", fake)  # the Python a measuring child is started with
    with pytest.raises(RuntimeError, match=said):
        bench._run_child({"kind": "llamacpp", "path": str(tmp_path / "m.gguf")})
    assert bench.child_failure(3, "") == "exit status 3" and bench.child_failure(-99, "") == "killed by signal 99"


def test_a_llama_cpp_row_that_crashes_on_an_amx_cpu_names_the_known_cause(tmp_path, monkeypatch):
    """PyPI's llama-cpp-python crashes in its AMX products on Sapphire Rapids-class Xeons: a llama.cpp row killed
    by a signal on a CPU with AMX says so and where the build without AMX is; a crash elsewhere, or an error
    that is no crash, is reported as it is."""
    from babyllama import kernels_native

    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32))
    monkeypatch.setattr(bench, "_run_child", lambda spec, env=None: (_ for _ in ()).throw(
        RuntimeError("killed by SIGSEGV")))
    plan = bench.Plan(["tiny"], ("q8_0",), rounds=1, tokens=8, batch=2, prompt_len=16, paths=(), llamacpp=True)
    for flags, said in (({"avx512f", "amx_int8"}, "llama.cpp failed: killed by SIGSEGV; llama.cpp's AMX products "
                         "crash on some Xeons: build llama-cpp-python without them (docs/speed.md, How to measure)"),
                        ({"avx512f"}, "llama.cpp failed: killed by SIGSEGV")):
        monkeypatch.setattr(kernels_native, "cpu_flags", lambda flags=flags: flags)
        rows = bench._references(plan, "tiny", "q8_0", "default", {}, tmp_path, log=lambda m: None)
        assert [r.error for r in rows] == [said]
    monkeypatch.setattr(kernels_native, "cpu_flags", lambda: {"amx_int8"})
    assert bench.llamacpp_failure("no such file") == "no such file"


def test_a_reference_that_hangs_is_stopped_and_reported(tmp_path, monkeypatch):
    """A reference that never ends (here: one waiting for input that never comes) is stopped after
    REFERENCE_TIMEOUT and reported as the reason its row is missing; the benchmark goes on."""
    fake = tmp_path / "run"
    fake.write_text("#!/bin/sh\nread line\nsleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(bench, "REFERENCE_TIMEOUT", 1.0)
    with pytest.raises(RuntimeError, match=r"^it ran past 1 s and was stopped$"):
        bench.reference_decode(str(fake), tmp_path / "m.bin", tmp_path / "t.bin", 8, 1)


def test_bench_reports_q4_0_over_q8_0_beside_their_bytes():
    rows = [bench.Row("tiny", fmt, "babyllama", threads,
                      {"decode": tok_s, "decode_bytes": mb * 1e6, "kv_bytes": 20e6})
            for fmt, threads, tok_s, mb in (("q8_0", "default", 100.0, 340), ("q4_0", "default", 150.0, 180),
                                             ("q8_0", "1", 80.0, 340), ("q4_0", "1", 96.0, 180))]
    text = bench.table(rows, 2, 16, {"gbps": 40.0, "threads": 2, "mib": 64})
    assert ("babyllama Q4_0 / Q8_0 decode: tiny 1.50x (weight bytes 1.89x fewer, with the KV cache 1.80x); "
            "tiny 1.20x (1t) (weight bytes 1.89x fewer, with the KV cache 1.80x)") in text
    assert "| tiny | Q4_0 | babyllama | default | 150.0 | 30.0 (75%) |" in text  # (180 + 20) MB x 150 tok/s
    # rows of another KV cache (`bench --kv-cache q8_0`) are babyllama's too
    for r in rows:
        r.engine = "babyllama --kv-cache q8_0"
    text = bench.table(rows, 2, 16)
    assert ("babyllama Q4_0 / Q8_0 decode: tiny 1.50x (weight bytes 1.89x fewer, with the KV cache 1.80x); "
            "tiny 1.20x") in text


def test_bench_gives_q4_0_over_q8_0_round_by_round_beside_the_medians_ratio():
    """Each round's Q4_0 ÷ Q8_0 is taken from its own rows (measured seconds apart; the rounds lie minutes apart on
    a machine whose speed moves): their range follows the ratio of the medians, per engine and thread setting."""
    def round_of(q8: float, q4: float, q4_one: float) -> list[bench.Row]:
        return [bench.Row("tiny", fmt, "babyllama", t, {"decode": v, "decode_bytes": b})
                for fmt, t, v, b in (("q8_0", "default", q8, 340), ("q4_0", "default", q4, 180),
                                     ("q8_0", "1", 50.0, 340), ("q4_0", "1", q4_one, 180))]

    rounds = [round_of(100.0, 150.0, 60.0), round_of(50.0, 100.0, 90.0), round_of(80.0, 96.0, 75.0)]
    rows = bench.merge_rounds(rounds)
    q4 = {r.threads: r.result for r in rows if r.fmt == "q4_0"}
    assert q4["default"]["q4_shares"] == [1.5, 2.0, 1.2] and q4["1"]["q4_shares"] == [1.2, 1.8, 1.5]
    assert all("q4_shares" not in r.result for r in rows if r.fmt == "q8_0")
    text = bench.table(rows, 2, 16)
    # medians: Q4_0 100 over Q8_0 80 (default), 75 over 50 (one thread)
    assert ("babyllama Q4_0 / Q8_0 decode: tiny 1.25x, round by round 1.20–2.00x (weight bytes 1.89x fewer, with the "
            "KV cache 1.89x); tiny 1.50x (1t), round by round 1.20–1.80x (weight bytes") in text
    rounds[1][0].error = "failed"  # a round without Q8_0's figure has no ratio
    rounds[1][0].result = {}
    assert bench.q4_shares(rounds)[("tiny", "babyllama", "default")] == [1.5, 1.2]
    one = bench.merge_rounds(rounds[:1])
    assert "Q8_0 decode: tiny 1.50x (weight bytes" in bench.table(one, 2, 16)  # one round: the ratio alone


def test_bench_reports_prefill_against_a_reference_that_measured_it():
    rows = [bench.Row("tiny", "q8_0", "babyllama", "default", {"decode": 200.0, "prefill": 900.0}),
            bench.Row("tiny", "q8_0", "llama.cpp", "default", {"decode": 100.0, "prefill": 600.0}),
            bench.Row("tiny", "q8_0", "runq.c", "default", {"decode": 50.0})]  # no prefill: no ratio
    text = bench.table(rows, 2, 16)
    assert "decode speed of babyllama / reference: tiny Q8_0 vs llama.cpp 2.00x; tiny Q8_0 vs runq.c 4.00x" in text
    assert "prefill speed of babyllama / reference: tiny Q8_0 vs llama.cpp 1.50x\n" in text + "\n"
    assert "| tiny | Q8_0 | llama.cpp | default | 100.0 | – | – | 600 |" in text


def test_bench_reports_babyllama_against_llama_cpp_on_the_same_gguf_file():
    """`bench --gguf` rows (babyllama on the GGUF file llama.cpp reads) get a ratio line of their own against
    llama.cpp's rows, and stay out of the line that compares babyllama's own files with the references."""
    rows = [bench.Row("tiny", "q8_0", "babyllama", "default", {"decode": 200.0, "prefill": 900.0}),
            bench.Row("tiny", "q8_0", "llama.cpp", "default", {"decode": 100.0, "prefill": 600.0}),
            bench.Row("tiny", "q8_0", bench.GGUF_ENGINE, "default", {"decode": 150.0, "prefill": 1200.0})]
    text = bench.table(rows, 2, 16)
    assert "decode speed of babyllama / reference: tiny Q8_0 vs llama.cpp 2.00x\n" in text
    assert "prefill speed of babyllama / reference: tiny Q8_0 vs llama.cpp 1.50x\n" in text
    assert "decode speed of babyllama / llama.cpp on the same GGUF file: tiny Q8_0 vs llama.cpp 1.50x\n" in text
    assert "prefill speed of babyllama / llama.cpp on the same GGUF file: tiny Q8_0 vs llama.cpp 2.00x" in text
    assert "| tiny | Q8_0 | babyllama (GGUF) | default | 150.0 |" in text


def test_bench_times_babyllama_on_the_gguf_files(tmp_path, monkeypatch):
    """`bench --gguf` measures babyllama on GGUF exports of the quantized models (llama.cpp's Q8_0 blocks, run
    as they are stored: regrouped, not dequantized), beside its rows on its own files; fp32 gets no such row."""
    pytest.importorskip("gguf", reason="the GGUF rows are written with the interop extra")
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=64))
    plan = bench.Plan(["tiny"], ("fp32", "q8_0"), rounds=1, tokens=16, batch=2, prompt_len=24, paths=("fast",),
                      gguf=True, bandwidth_mib=8)
    rows, _ = bench.run(plan, tmp_path, log=lambda m: None)
    assert [(r.fmt, r.engine) for r in rows] == [("fp32", "babyllama"), ("q8_0", "babyllama"),
                                                 ("q8_0", bench.GGUF_ENGINE)]
    gguf_row = rows[-1]
    assert gguf_row.error is None and gguf_row.result["decode"] > 0 and gguf_row.result["prefill"] > 0
    # run as stored (34 bytes per 32 weights, like runq.c's groups of 64 here), not dequantized to fp32
    assert gguf_row.result["decode_bytes"] == rows[1].result["decode_bytes"] < rows[0].result["decode_bytes"] / 3


def test_bench_mmap_flags_apply_to_its_bin_rows_only(tmp_path, monkeypatch):
    """`bench --mmap --gguf`: the .bin rows map their files, the GGUF rows run (a GGUF file is always mapped; the
    flag, refused for GGUF models, is not passed on to them) and say no flag."""
    pytest.importorskip("gguf", reason="the GGUF rows are written with the interop extra")
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=64))
    plan = bench.Plan(["tiny"], ("q8_0",), rounds=1, tokens=8, batch=2, prompt_len=16, paths=("fast",),
                      gguf=True, bandwidth_mib=8, mmap=True)
    rows, _ = bench.run(plan, tmp_path, log=lambda m: None)
    assert [r.engine for r in rows] == ["babyllama --mmap", bench.GGUF_ENGINE]
    assert all(r.error is None and r.result["decode"] > 0 for r in rows), [r.error for r in rows]


def test_bench_times_16_bit_ggufs_as_they_are_stored(tmp_path, monkeypatch):
    """`--formats f16,bf16`: babyllama on llama.cpp's F16 and BF16 GGUF files (no .bin holds them, so no other
    row of ours), their weights read as the files store them: half the bytes of the fp32 row's."""
    pytest.importorskip("gguf", reason="the GGUF rows are written with the interop extra")
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=64))
    plan = bench.Plan(["tiny"], ("fp32", "f16", "bf16"), rounds=1, tokens=16, batch=2, prompt_len=24,
                      paths=("fast",), bandwidth_mib=8)
    rows, bandwidth = bench.run(plan, tmp_path, log=lambda m: None)
    assert [(r.fmt, r.engine) for r in rows] == [("fp32", "babyllama"), ("f16", bench.GGUF_ENGINE),
                                                 ("bf16", bench.GGUF_ENGINE)]
    for half in rows[1:]:
        assert half.error is None and half.result["decode"] > 0 and half.result["prefill"] > 0
        assert half.result["decode_bytes"] == rows[0].result["decode_bytes"] / 2
    table = bench.table(rows, 2, 24, bandwidth)
    assert "| tiny | F16 | babyllama (GGUF) |" in table and "| tiny | BF16 | babyllama (GGUF) |" in table
    proc = run_cli("bench", "--formats", "f8")
    assert proc.returncode == 1 and b"--formats takes fp32, q8_0, q4_0, f16, bf16, got 'f8'" in proc.stderr


def test_bench_measures_llama_cpp_decode_and_prefill_on_the_same_models(tmp_path, monkeypatch):
    """`bench --llamacpp` runs llama.cpp (llama-cpp-python, the `bench` extra) on GGUF exports of the same
    models: its decode and its prefill of the same prompt, and the babyllama / llama.cpp ratios of both
    (plumbing only: no speed is asserted)."""
    require_llama_cpp()
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=64))
    plan = bench.Plan(["tiny"], ("q8_0",), rounds=1, tokens=16, batch=2, prompt_len=24, paths=("fast",),
                      llamacpp=True, bandwidth_mib=8)
    rows, bandwidth = bench.run(plan, tmp_path, log=lambda m: None)
    (ref,) = [r for r in rows if r.engine == "llama.cpp"]
    assert ref.error is None and ref.result["decode"] > 0 and ref.result["prefill"] > 0
    text = bench.table(rows, 2, 24, bandwidth)
    assert "tiny Q8_0 vs llama.cpp" in text.split("prefill speed of babyllama / reference: ")[1]


def _children() -> list[str]:
    """The command lines of this process's children (Linux /proc)."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid():
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_bench_threads_or_omp_num_threads_is_the_rows_thread_setting(monkeypatch):
    """--threads N (which sets OMP_NUM_THREADS=N) or OMP_NUM_THREADS=N is the rows' one setting N: the rows'
    children get only their setting's variables, so it would otherwise reach the header and not the rows."""
    from babyllama.cli.bench import _thread_settings

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _thread_settings(None, None) == ("default",)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert _thread_settings(None, None) == ("2",)
    assert _thread_settings("default,1", None) == ("default", "1")


@pytest.mark.parametrize("flags, message", [
    (["--threads", "1", "--thread-settings", "2"], b"not both"),
    (["--thread-settings", "default,100000"], b"--thread-settings 100000 is more than babyllama uses"),
])
def test_bench_thread_flags_are_checked_in_one_line(tmp_path, flags, message):
    proc = run_cli("bench", *flags, "--cache-dir", str(tmp_path))
    assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count(b"\n") == 1


def test_bench_rows_and_the_bandwidth_probe_run_with_their_thread_setting(tmp_path, monkeypatch):
    """Each child gets its setting's variables (the plain row: one thread, as labelled), the bandwidth probe the
    first setting's, whatever the parent's environment holds."""
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    seen = []

    def child(spec: dict, env: dict | None = None) -> dict:
        seen.append((spec["kind"], spec.get("plain"), (env or {}).get("OMP_NUM_THREADS")))
        return {"decode": 1.0}

    monkeypatch.setattr(bench, "_run_child", child)
    plan = bench.Plan(["tiny"], ("fp32",), rounds=1, thread_settings=("2", "default"))
    rows, bandwidth = bench.run(plan, tmp_path, log=lambda m: None)
    assert seen == [("bandwidth", None, "2"), ("ours", True, "1"), ("ours", False, "2"), ("ours", False, None)]
    assert [(r.engine, r.threads) for r in rows] == [("plain NumPy", "1"), ("babyllama", "2"),
                                                     ("babyllama", "default")]
    assert bandwidth["setting"] == "2"


def test_busy_co_runners_end_when_the_bench_is_killed(tmp_path):
    """A bench ended by SIGKILL cannot stop its co-runners: they end once their parent is gone."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time; from babyllama import bench\n"
            "with bench.Busy(1) as b:\n    print(b.procs[0].pid, flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(Path(bench.__file__).parents[1])}
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert parent.stdout is not None
    co_runner = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(co_runner) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = alive(co_runner)
    if left:
        os.kill(co_runner, signal.SIGKILL)
    assert not left


def test_a_model_file_that_cannot_be_built_fails_its_row_only(tmp_path, monkeypatch):
    """A cache folder that takes no new file (read-only, full) fails the rows whose file is missing; the rows
    measured before are still reported."""
    from babyllama.errors import BabyLlamaError

    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32))
    monkeypatch.setattr(bench, "_run_child", lambda spec, env=None: {"decode": 1.0})

    def unwritable(*args, **kw):
        raise BabyLlamaError("cannot write output tiny.gguf: Read-only file system")

    monkeypatch.setattr(bench, "gguf_file", unwritable)
    plan = bench.Plan(["tiny"], ("q8_0",), rounds=1, paths=("fast",), gguf=True)
    rows, _ = bench.run(plan, tmp_path, log=lambda m: None)
    assert [(r.engine, r.error) for r in rows] == [
        ("babyllama", None), (bench.GGUF_ENGINE, "its model file could not be built: cannot write output tiny.gguf: "
                                                 "Read-only file system")]
    assert "- tiny Q8_0 babyllama (GGUF): its model file" in bench.table(rows, 8, 256, {})


def test_bench_cli_reports_a_bad_reference_flag_in_one_line(tmp_path):
    proc = run_cli("bench", "--reference", str(tmp_path / "missing"), "--cache-dir", str(tmp_path))
    assert proc.returncode == 1 and b"not an executable file" in proc.stderr and proc.stderr.count(b"\n") == 1
    proc = run_cli("bench", "--thread-settings", "default,0", "--cache-dir", str(tmp_path))
    assert proc.returncode == 1 and b"--thread-settings takes" in proc.stderr
    proc = run_cli("bench", "--busy", "100000", "--cache-dir", str(tmp_path))  # started them all, said nothing
    assert proc.returncode == 1 and b"--busy must be from 0 to " in proc.stderr and proc.stderr.count(b"\n") == 1


def test_busy_co_runners_leave_ctrl_c_to_the_bench():
    """A terminal's Ctrl-C goes to the whole process group: each co-runner printed its KeyboardInterrupt
    traceback under the bench's exit. They ignore it (the bench ends them), and print nothing."""
    import signal

    with bench.Busy(2) as busy:
        for p in busy.procs:
            p.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert [p.poll() for p in busy.procs] == [None, None]
    assert all(p.poll() is not None for p in busy.procs)


def test_bench_builds_and_caches_models(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=16))
    first = bench.model_file("tiny", "q8_0", tmp_path)
    args, version, _, _ = formats.read_header(first)
    assert version == 2 and args.vocab_size == 32000 and args.dim == 32
    mtime = first.stat().st_mtime_ns
    assert bench.model_file("tiny", "q8_0", tmp_path).stat().st_mtime_ns == mtime  # cached, not rebuilt


def test_bench_caches_the_builtin_model_by_its_content(tmp_path, monkeypatch):
    """A retrained built-in model gets its own cached copies, never an older model's."""
    import babyllama.loading

    paths = []
    for n_layers in (1, 2):
        builtin = tmp_path / f"builtin-{n_layers}.bin"
        formats.save(random_weights(tiny_args(n_layers=n_layers)), builtin)
        monkeypatch.setattr(babyllama.loading, "BUILTIN_MODEL", builtin)
        paths.append(bench.model_file(bench.BUILTIN, "q8_0", tmp_path))
        assert formats.read_header(paths[-1])[0].n_layers == n_layers
    assert paths[0] != paths[1] and paths[0].exists()


def test_importing_babyllama_shortens_thread_spin_waits_unless_set():
    """The pools' spin-wait settings are read when NumPy/the kernels load: `import babyllama` must set them
    first, and leave a user's own values alone."""
    import os
    import subprocess
    import sys

    from babyllama.threads import WAIT_DEFAULTS

    show = "import babyllama, os, sys; print(os.environ['GOMP_SPINCOUNT'], os.environ['OPENBLAS_THREAD_TIMEOUT'], " \
           "'numpy' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in WAIT_DEFAULTS}
    out = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [WAIT_DEFAULTS["GOMP_SPINCOUNT"], WAIT_DEFAULTS["OPENBLAS_THREAD_TIMEOUT"], "False"]
    env["GOMP_SPINCOUNT"] = "123"
    out = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "123"


def test_q4_on_load_equals_the_version_3_file_and_the_plain_path(tmp_path):
    """The built-in model (dim 128, hidden 352: whole Q4_0 blocks): `--quantize q4_0` in memory, the same model
    exported as a version-3 file, and the plain reference path print the same greedy text."""
    flags = ["-t", "0", "-n", "60", "-i", "Once upon a time"]
    in_memory = run_cli("run", *flags, "--quantize", "q4_0")
    assert in_memory.returncode == 0, in_memory.stderr.decode()
    out, builtin = tmp_path / "q4.bin", Path(bench.__file__).parent / "assets" / "model.bin"
    exported = run_cli("export", str(out), "--model", str(builtin), "--version", "3")
    assert exported.returncode == 0, exported.stderr.decode()
    assert formats.read_header(out)[1] == 3 and out.stat().st_size < 0.15 * builtin.stat().st_size
    from_file = run_cli("run", str(out), *flags)
    plain = run_cli("run", *flags, "--quantize", "q4_0", "--plain")
    assert from_file.returncode == plain.returncode == 0
    assert in_memory.stdout == from_file.stdout == plain.stdout and len(in_memory.stdout) > 100


def test_bench_measures_a_models_rows_in_rounds_and_reports_medians(tmp_path, monkeypatch):
    """--rounds: each of a model's rows once per round, in turn (the slow plain baseline only in the first), merged
    into one row per (model, engine, thread setting) with each figure's median over the rounds."""
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32))
    measured = []
    plan = bench.Plan(["tiny"], ("fp32", "q8_0"), repeats=1, tokens=8, batch=2, prompt_len=16, bandwidth_mib=8,
                      rounds=3, plain_tokens=4)
    rows, bandwidth = bench.run(plan, tmp_path, log=measured.append)
    order = [m.removeprefix("measuring tiny ").split(" (")[0] for m in measured if m.startswith("measuring")]
    assert order == ["fp32 plain NumPy", "fp32 babyllama", "q8_0 plain NumPy", "q8_0 babyllama"] + \
        ["fp32 babyllama", "q8_0 babyllama"] * 2
    assert [(r.fmt, r.engine, r.result["rounds"]) for r in rows] == [
        ("fp32", "plain NumPy", 1), ("fp32", "babyllama", 3), ("q8_0", "plain NumPy", 1), ("q8_0", "babyllama", 3)]
    assert rows[1].result["repeats"] >= 3 and bandwidth["shapes"]["tiny"] > 0  # decode runs: at least 1 a round
    assert "Each figure: the median of 3 rounds" in bench.table(rows, 2, 16, bandwidth)


def test_merged_rounds_take_each_figures_median_and_keep_a_failure():
    def row(decode, ttft, error=None):
        return bench.Row("tiny", "q4_0", "babyllama", "default", {} if error else
                         {"decode": decode, "ttft_ms": ttft, "repeats": 2, "decode_bytes": 100}, error)

    (merged,) = bench.merge_rounds([[row(10.0, 5.0)], [row(30.0, 4.0)], [row(20.0, 9.0)]])
    assert merged.result == {"decode": 20.0, "ttft_ms": 5.0, "repeats": 6, "decode_bytes": 100, "rounds": 3}
    (failed,) = bench.merge_rounds([[row(10.0, 5.0)], [row(0, 0, "llama.cpp failed: no file")]])
    assert failed.error == "llama.cpp failed: no file" and not failed.result


def test_the_default_threads_share_is_taken_round_by_round_against_the_faster_explicit_setting():
    def round_of(default, one, two, fmt="fp32"):
        return [bench.Row("tiny", fmt, "babyllama", t, {"decode": v, "decode_bytes": 100})
                for t, v in (("default", default), ("1", one), ("2", two))]

    # round 2 is slow throughout: its own rows judge it, where the medians (20, 20, 30) would give 67%
    rounds = [round_of(27.0, 20.0, 30.0), round_of(10.0, 5.0, 10.0), round_of(20.0, 20.0, 40.0)]
    rows = bench.merge_rounds(rounds)
    default = next(r for r in rows if r.threads == "default")
    assert default.result["default_shares"] == [0.9, 1.0, 0.5]
    assert all("default_shares" not in r.result for r in rows if r.threads != "default")
    assert "default threads / the faster explicit setting, round by round (median, lowest–highest): " \
           "tiny fp32 90% (50–100%)" in bench.table(rows, 2, 16)
    # a setting that failed in a round leaves that round to the others; a run without explicit settings has none
    rounds[1][2] = bench.Row("tiny", "fp32", "babyllama", "2", {}, "failed")
    assert bench.default_shares(rounds)[("tiny", "fp32", "babyllama")] == [0.9, 2.0, 0.5]
    assert bench.default_shares([[r for r in rnd if r.threads == "default"] for rnd in rounds]) == {}


def test_a_figure_takes_more_runs_while_they_last_under_the_minimum_time(monkeypatch):
    clock = [0.0]  # a run of `step` seconds on a fake clock: the counts do not depend on the machine
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def runs(step: float, repeats: int, min_seconds: float) -> list[float]:
        values: list[float] = []

        def run() -> float:
            clock[0] += step
            values.append(float(len(values)))
            return values[-1]

        assert bench.median_of_runs(run, repeats, min_seconds) == bench._median(values)
        return values

    assert len(runs(0.01, 1, 0.2)) == 20  # short runs: as many as fill the minimum time
    assert len(runs(0.5, 3, 0.2)) == 3  # long ones: the repeats asked for
    assert len(runs(0.0, 1, 0.2)) == bench.MAX_RUNS  # and never more than MAX_RUNS


def test_bench_times_no_cache_growth(tmp_path, monkeypatch):
    """A Batch sized by the model's context grows its cache as it fills (chat); the bench's batches
    are made whole before the clock runs, so that no timed step copies a cache."""
    import babyllama.generate as gen

    path = tmp_path / "tiny.bin"
    formats.save(random_weights(tiny_args()), path)
    monkeypatch.setattr(gen, "INITIAL_CACHE", 2)
    grown = []
    make_room = gen.Batch._make_room

    def counted(self, end):
        before = self.cache.seq_len
        make_room(self, end)
        if self.cache.seq_len != before:
            grown.append(end)

    monkeypatch.setattr(gen.Batch, "_make_room", counted)
    bench.measure(path, False, repeats=1, tokens=8, batch=2, prompt_len=16)
    assert grown == []


def test_bench_with_a_failed_row_prints_its_table_and_exits_1(tmp_path, monkeypatch, capsys):
    """A row that failed (here a reference that exits 1) is listed under the table, which is still printed and
    written, and the exit status says so (it was 0, so a script saw a failed measurement as a good one). The
    line is an error of the "babyllama" logger: a program that quiets its notes still sees it."""
    import logging

    from babyllama.cli import main
    from babyllama.errors import LOG

    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32))
    fake = tmp_path / "run"
    fake.write_text("#!/bin/sh\necho \"couldn't load tokenizer.bin\" >&2\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "table.md"
    LOG.setLevel(logging.ERROR)
    try:
        code = main(["bench", "--shapes", "tiny", "--formats", "fp32", "--no-plain", "--rounds", "1", "--tokens", "8",
                     "--batch", "2", "--prompt-len", "16", "--bandwidth-mib", "8", "--reference", str(fake),
                     "--cache-dir", str(tmp_path), "--output", str(out)])
    finally:
        LOG.setLevel(logging.INFO)
    captured = capsys.readouterr()
    assert code == 1 and "| tiny | fp32 | babyllama |" in captured.out and "- tiny fp32 run.c: run.c (" in captured.out
    assert "- tiny fp32 run.c: run.c (" in out.read_text(encoding="utf-8")
    assert captured.err.strip().splitlines()[-1] == "babyllama: error: 1 of 2 rows failed (listed under the table)"


def test_bench_machine_line_says_why_the_c_kernels_are_not_used(monkeypatch):
    """The machine line said "(no C compiler)" whenever the C kernels were not the backend, also where a compiler
    was there and a forced instruction set failed, or where a setting chose another backend."""
    from babyllama import bench, kernels, kernels_native
    from babyllama.kernels_base import NumpyKernels

    monkeypatch.setattr(kernels, "backend", lambda: NumpyKernels())
    monkeypatch.delenv("BABYLLAMA_NATIVE", raising=False)
    monkeypatch.setenv("BABYLLAMA_KERNELS", "numpy")
    assert bench.kernels_description() == "NumPy (BABYLLAMA_KERNELS=numpy)"
    monkeypatch.delenv("BABYLLAMA_KERNELS")
    monkeypatch.setenv("BABYLLAMA_NATIVE", "0")
    assert bench.kernels_description() == "NumPy (BABYLLAMA_NATIVE=0)"
    monkeypatch.setenv("BABYLLAMA_NATIVE", "1")  # the kernels' default: no reason of its own
    monkeypatch.setattr(kernels_native, "compiler", lambda: "cc")
    assert "(the C kernels did not build or load: see the line above;" in bench.kernels_description()
    monkeypatch.setattr(kernels_native, "compiler", lambda: None)
    assert bench.kernels_description().startswith("NumPy only (no C compiler;")


@pytest.mark.parametrize("start, said", [({"OMP_NUM_THREADS": "2"}, "OMP_NUM_THREADS=2"), ({}, "none set")])
def test_bench_header_names_the_thread_variables_it_started_with(start, said):
    """Not the ones babyllama set itself before the header was written (OMP_NUM_THREADS=2 was said as
    "OMP_NUM_THREADS=2, NUMBA_NUM_THREADS=2", and --threads 1 as three variables none of which was set)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")} | start
    code = "from babyllama import bench, threads; threads.configure(1); print(bench.describe_machine())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert f"thread variables at start: {said}; load average" in out


def test_bench_reference_by_bare_name_times_the_program_it_checked(tmp_path, monkeypatch):
    """`--reference-q runq` with ./runq passed the check, then subprocess looked `runq` up on PATH (a row failed
    after the whole measurement, or another program was timed); a program on PATH alone was refused."""
    from babyllama.cli.bench import reference_path

    here, on_path = tmp_path / "here", tmp_path / "bin"
    for folder in (here, on_path):
        folder.mkdir()
        (folder / "runq").write_text("#!/bin/sh\n")
        (folder / "runq").chmod(0o755)
    (on_path / "only-on-path").write_text("#!/bin/sh\n")
    (on_path / "only-on-path").chmod(0o755)
    monkeypatch.chdir(here)
    monkeypatch.setenv("PATH", f"{on_path}{os.pathsep}{os.environ['PATH']}")
    assert reference_path("runq") == str(here / "runq")
    assert reference_path("only-on-path") == str(on_path / "only-on-path")
    assert reference_path("./runq") == str(here / "runq")
    assert reference_path("absent") is None
    (here / "plain").write_text("not a program")
    assert reference_path("plain") is None


def test_bench_says_an_unknown_device_is_one(capsys):
    msg = cli_error(capsys, "bench", "--device", "tpu", "--formats", "q4_0")
    assert "tpu" in msg and "fp32 files only" not in msg, msg


def test_cpu_ticks_reads_the_stolen_and_the_total_time_of_all_cpus(tmp_path):
    """/proc/stat's first line: user nice system idle iowait irq softirq steal (guest time is inside user)."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 1 5 80 2 0 0 7 3 0\ncpu0 5 0 2 40 1 0 0 3 1 0\n")
    assert bench.cpu_ticks(str(stat)) == (7, 105)
    for unreadable in ("cpu  1 2 3\n", "intr 5 6 7 8 9 10 11 12 13\n", "cpu  a b c d e f g h\n", ""):
        stat.write_text(unreadable)
        assert bench.cpu_ticks(str(stat)) is None
    assert bench.cpu_ticks(str(tmp_path / "missing")) is None
    if Path("/proc/stat").exists():
        ticks = bench.cpu_ticks()
        assert ticks is not None and 0 <= ticks[0] <= ticks[1] and ticks[1] > 0
    assert bench.stolen_share((7, 105), (17, 205)) == 0.1
    assert bench.stolen_share(None, (1, 2)) is None and bench.stolen_share((1, 2), None) is None
    assert bench.stolen_share((1, 2), (1, 2)) is None  # no time between the readings


def test_bench_reports_the_cpu_time_a_vms_host_took_round_by_round(tmp_path, monkeypatch):
    """Each row keeps the share of CPU time stolen while it was measured, a merged row every round's, and the
    table names the rows where a round reached 5% (the rounds that ran on less CPU), with the figures."""
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32))
    shares = iter([0.0, 0.0, 0.25, 0.049])  # fp32 then q8_0, round 1 then round 2
    clock = {"calls": 0, "stolen": 0, "total": 0}

    def ticks(path: str = "/proc/stat") -> tuple[int, int]:
        clock["calls"] += 1
        if clock["calls"] % 2 == 0:  # a meter's second reading: the row's time has passed
            clock["stolen"] += round(1000 * next(shares))
            clock["total"] += 1000
        return clock["stolen"], clock["total"]

    monkeypatch.setattr(bench, "cpu_ticks", ticks)
    plan = bench.Plan(["tiny"], ("fp32", "q8_0"), rounds=2, tokens=8, batch=2, prompt_len=16, paths=("fast",),
                      bandwidth_mib=8)
    rows, bandwidth = bench.run(plan, tmp_path, log=lambda m: None)
    assert [(r.fmt, r.result["steals"]) for r in rows] == [("fp32", [0.0, 0.25]), ("q8_0", [0.0, 0.049])]
    text = bench.table(rows, 2, 16, bandwidth)
    assert ("Hypervisor steal (/proc/stat: CPU time this machine's host gave to other work) while the rows ran, "
            "round by round where it reached 5%: tiny fp32 babyllama 0, 25%. Those rounds ran on less CPU") in text
    assert "tiny Q8_0 babyllama 0" not in text
    for r in rows:
        r.result["steals"] = [0.0, 0.012]
    assert "while the rows ran: under 5% in every round (at most 1.2%)." in bench.table(rows, 2, 16, bandwidth)
    for r in rows:
        del r.result["steals"], r.result["steal"]  # the rounds' list, and their median
    assert "Hypervisor steal" not in bench.table(rows, 2, 16, bandwidth)  # not measured (no /proc/stat)
