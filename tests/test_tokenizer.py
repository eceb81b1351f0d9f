"""The tokenizer agrees with sentencepiece (which trained the vocabularies) and round-trips text."""

from __future__ import annotations

import pytest
from conftest import shared_file

from babyllama.tokenizer import BOS, EOS, Tokenizer

TRICKY = [
    "", " ", "  ", "\n", "\n\n", "a  b", "   x", "  leading and trailing  ", "tab\there\t",
    "hello\n\nworld\n", "12345", "3.14159, 2,718!!! ???", "1 + 1 = 2; 10% of 250 is 25.",
    "Café naïve résumé", "Ünïcödé ÀÉÎÕÜ", "日本語のテキスト", "中文分词测试", "한국어", "Привет, мир!",
    "héllo 世界 🦙", "👨‍👩‍👧‍👦 family 🎉🎉", "<s>hi</s>", "<0x41> <unk>", "’curly’ “quotes” — dash…",
    "Once upon a time, there was a little girl named Lily.", "x" * 200, "\u00a0nbsp\u200bzero width",
]


@pytest.fixture(scope="module")
def llama_pair():
    spm = pytest.importorskip("sentencepiece")

    sp = spm.SentencePieceProcessor(model_file=str(shared_file("fixtures/llama2-tokenizer.model")))
    tok = Tokenizer.load(shared_file("fixtures/llama2-tokenizer.bin"), 32000)
    return sp, tok


@pytest.mark.parametrize("text", TRICKY)
def test_encode_matches_sentencepiece(llama_pair, text):
    sp, tok = llama_pair
    assert tok.encode(text, bos=False) == sp.encode(text)


@pytest.mark.parametrize("text", TRICKY)
def test_decode_inverts_encode(llama_pair, text):
    sp, tok = llama_pair
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS
    assert tok.decode(ids) == text
    assert tok.decode(ids) == sp.decode(ids)


def test_long_text_matches_sentencepiece(llama_pair):
    sp, tok = llama_pair
    text = shared_file("data/tinystories/valid.txt").read_text()[:40000]
    assert tok.encode(text, bos=False) == sp.encode(text)


def test_from_sentencepiece_reproduces_llama2c_export(llama_pair, tmp_path):
    """Our .model -> tokenizer.bin conversion writes the same bytes as llama2.c's tokenizer.py."""
    conv = Tokenizer.from_sentencepiece(shared_file("fixtures/llama2-tokenizer.model"))
    conv.save(tmp_path / "tok.bin")
    assert (tmp_path / "tok.bin").read_bytes() == shared_file("fixtures/llama2-tokenizer.bin").read_bytes()


def test_llama2c_tokenizer_bin_becomes_metas_sentencepiece_model_again(llama_pair):
    """tokenizer.bin -> Vocab -> a sentencepiece .model: it encodes and decodes as Meta's original does."""
    pytest.importorskip("google.protobuf")
    import sentencepiece as spm

    from babyllama.interop.vocab import load_vocab

    sp, _ = llama_pair
    rebuilt = spm.SentencePieceProcessor(model_proto=load_vocab(shared_file("fixtures/llama2-tokenizer.bin"))
                                         .to_sentencepiece())
    text = shared_file("data/tinystories/valid.txt").read_text()[:40000]
    for t in [text, *TRICKY]:
        ids = sp.encode(t)
        assert rebuilt.encode(t) == ids and rebuilt.decode(ids) == sp.decode(ids)
    assert [rebuilt.id_to_piece(i) for i in range(32000)] == [sp.id_to_piece(i) for i in range(32000)]
    assert all(rebuilt.is_byte(i) == sp.is_byte(i) and rebuilt.is_control(i) == sp.is_control(i) for i in range(300))


def test_tok512_agrees_with_run_c_on_plain_text(tok512):
    tok = Tokenizer.load(tok512, 512)
    ids = tok.encode("Once upon a time, a little dog", bos=True)
    assert ids[0] == BOS and tok.decode(ids) == "Once upon a time, a little dog"


def test_decode_piece_follows_run_c(llama_pair):
    _, tok = llama_pair
    the = tok.encode("the", bos=False)[0]  # " the"
    assert tok.decode_piece(BOS, the) == b"the"  # leading space dropped after BOS
    assert tok.decode_piece(the, the) == b" the"
    assert tok.decode_piece(the, 3 + ord("A")) == b"A"  # <0x41> prints as the byte
    assert tok.decode_piece(the, 3 + 0x07) == b""  # unprintable control byte suppressed
    assert tok.decode_piece(the, 3 + 0xE4) == b""  # a lone high byte is not printable either (run.c)
    assert tok.decode_piece(the, 3 + ord("\n")) == b"\n"


@pytest.mark.parametrize("text", ["\u2581", "\u2581\u2581", "a\u2581b", "\u2581x  \u2581", "x\u2581"])
def test_a_typed_meta_space_encodes_as_sentencepiece_does(llama_pair, text):
    """sentencepiece escapes spaces as "▁" before it encodes: a "▁" in the text is a space to it (tokenizer.bin
    stores that character as a space, so spelling it as bytes would give other tokens)."""
    sp, tok = llama_pair
    ids = tok.encode(text, bos=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text.replace("\u2581", " ")


@pytest.mark.parametrize("ids", [dict(unk_id=3, bos_id=0, eos_id=1, pad_id=2), dict(bos_id=-1, eos_id=-1)])
def test_a_sentencepiece_model_with_other_special_ids_is_refused(tmp_path, capsys, ids):
    """Everything runs ids 0/1/2 as <unk>, <s>, </s> (llama2.c's layout): a .model trained with other ids is
    refused in one line rather than converted into a tokenizer.bin or GGUF vocabulary whose BOS is another token."""
    from conftest import random_weights, tiny_args, train_sentencepiece

    from babyllama import formats
    from babyllama.cli import main

    model = train_sentencepiece(tmp_path / "odd.model", 320, **ids)
    formats.save(random_weights(tiny_args(vocab_size=320)), tmp_path / "m.bin")
    for argv in (["export-tokenizer", str(model)],
                 ["export", str(tmp_path / "m.gguf"), "--model", str(tmp_path / "m.bin"), "--tokenizer", str(model)],
                 ["export", str(tmp_path / "out" / "m.bin"), "--model", str(tmp_path / "m.bin"),
                  "--tokenizer", str(model)]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert "needs them at 0, 1, 2 as llama2.c does" in err and "\n" not in err
    assert not (tmp_path / "odd.bin").exists() and not (tmp_path / "m.gguf").exists()
    assert not (tmp_path / "out" / "m.bin").exists()


def test_without_byte_fallback_a_run_of_unknown_characters_is_one_unk_as_in_sentencepiece(tmp_path):
    """A vocabulary without byte tokens: sentencepiece gives a run of characters it has no piece for one <unk>."""
    spm = pytest.importorskip("sentencepiece")
    from conftest import train_sentencepiece

    model = train_sentencepiece(tmp_path / "nobytes.model", 100, byte_fallback=False)
    sp, tok = spm.SentencePieceProcessor(model_file=str(model)), Tokenizer.from_sentencepiece(model)
    assert not tok.byte_ids
    for text in ["日本", "the 日本語 cat", "xyz", "日 本", "the QQQ", "😀😀", "", "QQ\u2581QQ"]:
        ids = tok.encode(text, bos=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids)


SYMBOLS = ["<|im_start|>", "<|im_end|>", "<|im"]  # the last begins the others: the longest match wins


def test_user_defined_symbols_are_kept_whole_as_sentencepiece_does(tmp_path):
    """sentencepiece keeps a user-defined symbol whole wherever it stands (no merge reaches across it, the dummy
    prefix stays a space of its own before one that opens the text); a .model read into memory or through a GGUF
    vocabulary encodes the same ids; a tokenizer.bin cannot mark them, so one read back spells them out."""
    import random

    spm = pytest.importorskip("sentencepiece")
    from conftest import train_sentencepiece

    from babyllama.interop.vocab import from_tokenizer, load_vocab
    from babyllama.tokenizer import USER_DEFINED

    model = train_sentencepiece(tmp_path / "ud.model", 320, user_defined_symbols=SYMBOLS)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ids = [sp.piece_to_id(s) for s in SYMBOLS]
    tok = Tokenizer.from_sentencepiece(model, note=False)
    assert tok.symbols == dict(zip(SYMBOLS, ids))
    via_vocab = load_vocab(model).to_tokenizer()
    assert via_vocab.same_as(tok) and [from_tokenizer(tok).types[i] for i in ids] == [USER_DEFINED] * 3
    rng = random.Random(0)
    parts = [*SYMBOLS, "<|", "im_", "start", "|>", " ", "  ", "the cat", "\n", "é", "日", "▁"]
    texts = ["<|im_start|>user\nthe cat sat<|im_end|>", "<|im_end|>", "the<|im|>", " <|im_start|> dog", "<|im_sta"]
    texts += ["".join(rng.choice(parts) for _ in range(rng.randint(1, 12))) for _ in range(400)]
    for text in texts:
        want = sp.encode(text)
        assert tok.encode(text, bos=False) == want, text
        assert via_vocab.encode(text, bos=False) == want, text
        assert tok.decode(want) == sp.decode(want), text
    assert tok.encode("<|im_start|>hi", bos=False)[1] == ids[0]
    tok.save(tmp_path / "ud.bin")
    spelled = Tokenizer.load(tmp_path / "ud.bin")
    assert not spelled.symbols and ids[0] not in spelled.encode("<|im_start|>hi", bos=False)
    assert spelled.same_as(tok)  # the same vocabulary: ids mean the same pieces (shards, drafts, fine-tuning)


def test_control_symbols_never_come_out_of_a_merge_as_in_sentencepiece(tmp_path):
    """A sentencepiece model's control pieces past </s> (`control_symbols`) are never produced by encoding: a
    .model read as it is, or its GGUF vocabulary (token type 3), merges around them as sentencepiece does."""
    spm = pytest.importorskip("sentencepiece")
    from conftest import train_sentencepiece

    from babyllama.interop.vocab import load_vocab

    model = train_sentencepiece(tmp_path / "ctl.model", 320, control_symbols=["he", "<|im_end|>"])
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok, via_vocab = Tokenizer.from_sentencepiece(model, note=False), load_vocab(model).to_tokenizer()
    for text in ["hello", "the happy girl", "he he", "<|im_end|>", "she said hello to the boy"]:
        assert tok.encode(text, bos=False) == sp.encode(text) == via_vocab.encode(text, bos=False), text
    assert sp.piece_to_id("he") not in tok.encode("hello he", bos=False)


def test_fine_tuning_data_through_a_tokenizer_bin_says_it_spells_symbols_out(tmp_path, capsys):
    """finetune --data encodes with the shards' tokenizer.bin, which the fine-tuned model runs with: a base whose
    tokenizer keeps user-defined symbols whole (a GGUF's, a folder's .model) is told, in one line, that the data
    spells them out and how to keep them."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("torch")
    from conftest import train_sentencepiece

    from babyllama.train.finetune import _save_base_tokenizer

    model = train_sentencepiece(tmp_path / "ud.model", 320, user_defined_symbols=SYMBOLS)
    _save_base_tokenizer(Tokenizer.from_sentencepiece(model, note=False), tmp_path / "tokenizer.bin")
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "user-defined symbols (<|im_start|>, <|im_end|>, <|im) whole" in warnings[0]
    assert "pretokenize with the base's tokenizer.model" in warnings[0]
    assert Tokenizer.load(tmp_path / "tokenizer.bin").same_as(Tokenizer.from_sentencepiece(model, note=False))
    _save_base_tokenizer(Tokenizer.load(tmp_path / "tokenizer.bin"), tmp_path / "again.bin")
    assert not capsys.readouterr().err  # none to lose


@pytest.mark.parametrize("options, said", [
    (dict(model_type="unigram", vocab_size=300), "has unigram segmentation, which a tokenizer.bin cannot carry"),
    (dict(user_defined_symbols=["<|im_start|>"]), "has user-defined symbols (<|im_start|>), which a tokenizer.bin"),
])
def test_converting_a_unigram_model_or_one_with_user_defined_symbols_warns(tmp_path, capsys, options, said):
    """tokenizer.bin encodes by BPE merges, piece by piece: a unigram model segments text otherwise, and
    sentencepiece keeps a user-defined symbol whole, which the merges spell out: said in one line."""
    from conftest import train_sentencepiece

    from babyllama.cli import main

    model = train_sentencepiece(tmp_path / "m.model", **{"vocab_size": 320, **options})
    assert main(["export-tokenizer", str(model)]) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("babyllama: warning:")]
    assert len(warnings) == 1 and str(model) in warnings[0] and said in warnings[0], warnings


def test_converting_a_normalizing_sentencepiece_model_warns_in_one_line(tmp_path, capsys, sp_model):
    """tokenizer.bin encodes text as it is: a .model that normalizes (nmt_nfkc) or squeezes whitespace encodes
    such text otherwise, which the conversion says, naming both; Llama's settings (sp_model's) convert silently."""
    from conftest import random_weights, tiny_args, train_sentencepiece

    from babyllama import formats
    from babyllama.cli import main

    model = train_sentencepiece(tmp_path / "nfkc.model", 320, normalization_rule_name="nmt_nfkc",
                                remove_extra_whitespaces=True)
    assert main(["export-tokenizer", str(model)]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("babyllama: warning:"))
    assert str(model) in line and "nmt_nfkc normalization and remove_extra_whitespaces" in line
    assert "which a tokenizer.bin cannot carry" in line
    Tokenizer.from_sentencepiece(sp_model)
    assert "warning" not in capsys.readouterr().err
    # a GGUF vocabulary (llama.cpp's llama tokenizer) encodes text as it is too
    pytest.importorskip("gguf")
    formats.save(random_weights(tiny_args(vocab_size=320)), tmp_path / "m.bin")
    assert main(["export", str(tmp_path / "m.gguf"), "--model", str(tmp_path / "m.bin"), "--tokenizer",
                 str(model)]) == 0
    assert "which a GGUF vocabulary cannot carry" in capsys.readouterr().err


@pytest.mark.parametrize("ids", [
    [0, 278], [0, 0, 29871], [3 + 0x20, 278], [1, 29871, 278], [29871, 29871, 278],  # the dummy prefix
    [3 + 0xE5, 3 + 0xA1], [3 + 0xED, 3 + 0xA0, 3 + 0x80], [3 + 0xC0, 3 + 0x80],  # bytes of no whole character
    [3 + 0xC3, 1, 3 + 0xA9], [3 + 0xC3, 0, 3 + 0xA9], [3 + 0xC3, 3 + 0xA9, 278], [3 + 0xC3, 278],
])
def test_decode_of_any_ids_is_sentencepieces(llama_pair, ids):
    """Ids that no text encodes to (what a model may generate) decode as sentencepiece decodes them: only the first
    piece's leading space is the dummy prefix (not <unk>'s, not a byte token's), and within a run of byte tokens
    each byte that is not part of a whole character is one U+FFFD."""
    sp, tok = llama_pair
    assert tok.decode(ids) == sp.decode(ids)


def test_decode_refuses_ids_outside_the_vocabulary():
    """A negative id would index the pieces from the end (-1 decoded as the last piece), one past the end was
    an IndexError: both are one error naming the id."""
    from conftest import byte_tokenizer

    from babyllama.errors import BabyLlamaError

    tok = byte_tokenizer()
    n = tok.vocab_size
    assert tok.decode([n - 1]) == tok.decode_text([n - 1]) != ""
    for ids in ([-1], [BOS, n], [5, -n]):
        for decode in (tok.decode, tok.decode_text):
            with pytest.raises(BabyLlamaError, match=f"token id {ids[-1]} is outside the vocabulary"):
                decode(ids)
    with pytest.raises(BabyLlamaError, match="token id -1 is outside"):
        tok.decode_text([5], prev=-1)


def test_a_model_or_json_file_given_as_tokenizer_bin_says_what_it_is(tmp_path):
    """A GGUF or llama2.c model, or Hugging Face's tokenizer.json, passed where a tokenizer.bin goes is named as
    what it is, not as a truncated or corrupt tokenizer."""
    gguf = pytest.importorskip("gguf")
    from conftest import random_weights, tiny_args

    from babyllama import formats
    from babyllama.errors import BabyLlamaError

    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    formats.save(random_weights(tiny_args()), tmp_path / "m.bin")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    for name, kind in (("m.gguf", "a GGUF model file"), ("m.bin", "a llama2.c model file"),
                       ("tokenizer.json", "a JSON file (Hugging Face's tokenizer.json?")):
        with pytest.raises(BabyLlamaError) as e:
            Tokenizer.load(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: not a tokenizer.bin but {kind}")


@pytest.mark.parametrize("max_len,message", [
    (-1, "max_token_length -1 is corrupt"),
    (1 << 30, f"max_token_length {1 << 30} is corrupt"),
    (3, "token 0 is 5 bytes, longer than the header's max_token_length 3"),
])
def test_a_corrupt_max_token_length_is_refused_not_written_back(tmp_path, max_len, message):
    """llama2.c sizes its encoder's buffer by the header's max_token_length: a negative or absurd one was read
    and written back by `export` (run.c then overflows its buffer); one shorter than a token was called a
    truncated file."""
    import struct

    from conftest import byte_tokenizer

    from babyllama.errors import BabyLlamaError

    byte_tokenizer(300).save(tmp_path / "tokenizer.bin")
    data = bytearray((tmp_path / "tokenizer.bin").read_bytes())
    struct.pack_into("<i", data, 0, max_len)
    (tmp_path / "tokenizer.bin").write_bytes(bytes(data))
    with pytest.raises(BabyLlamaError) as e:
        Tokenizer.load(tmp_path / "tokenizer.bin")
    assert str(e.value) == f"{tmp_path / 'tokenizer.bin'}: {message}" + ("; the file is corrupt" if max_len == 3 else
                                                                         f" (a {len(data)}-byte file)")


@pytest.mark.parametrize("piece,corrupt,message", [
    (b"<0x73>", b"<0\xdc73>", "not a valid model (its parser's message is not text)"),
    ("\u2581the".encode(), b"\xff\x96\x81the", "piece 268 is not UTF-8 text; the file is corrupt"),
])
def test_a_sentencepiece_model_with_a_piece_that_is_not_utf8_is_one_line(tmp_path, piece, corrupt, message):
    """sentencepiece's Python binding raises UnicodeDecodeError for a piece that is not UTF-8, and for a load
    error whose message quotes one: both were tracebacks of export-tokenizer, run -z and the GGUF export."""
    pytest.importorskip("sentencepiece")
    from conftest import byte_tokenizer

    from babyllama.errors import BabyLlamaError
    from babyllama.interop.vocab import can_write_sentencepiece, from_tokenizer, load_vocab

    if not can_write_sentencepiece():
        pytest.skip("sentencepiece's protobuf module is not importable")
    data = from_tokenizer(byte_tokenizer(300)).to_sentencepiece()
    assert data.count(piece) == 1 and len(piece) == len(corrupt)
    (tmp_path / "t.model").write_bytes(data.replace(piece, corrupt))
    for read in (Tokenizer.from_sentencepiece, load_vocab):
        with pytest.raises(BabyLlamaError) as e:
            read(tmp_path / "t.model")
        assert str(e.value).endswith(message) and str(tmp_path / "t.model") in str(e.value)


def test_a_sentencepiece_model_with_a_nan_score_is_refused_not_converted(tmp_path):
    """export-tokenizer wrote a NaN score into tokenizer.bin, which every reader (ours included) refuses."""
    import struct

    pytest.importorskip("sentencepiece")
    from conftest import byte_tokenizer

    from babyllama.errors import BabyLlamaError
    from babyllama.interop.vocab import can_write_sentencepiece, from_tokenizer

    if not can_write_sentencepiece():
        pytest.skip("sentencepiece's protobuf module is not importable")
    data = from_tokenizer(byte_tokenizer(300)).to_sentencepiece()
    at = data.index("\u2581the".encode() + b"\x15") + len("\u2581the".encode()) + 1  # the piece's float score
    (tmp_path / "t.model").write_bytes(data[:at] + struct.pack("<f", float("nan")) + data[at + 4:])
    with pytest.raises(BabyLlamaError, match=r"t.model: piece 268 has the score nan; the file is corrupt$"):
        Tokenizer.from_sentencepiece(tmp_path / "t.model")
