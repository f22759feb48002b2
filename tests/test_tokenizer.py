"""CLIPTokenizer: parity with transformers' CLIPTokenizer on the same vocabulary, golden ids
of SD v1's prompts, padding and truncation, OpenAI's text cleaning, loading and saving, bad input."""

import json
import random
import re
import signal
import string
import warnings
from contextlib import contextmanager

import pytest
import torch
import transformers

from minisd.text_encoder import CLIPTokenizer as ReExported
from minisd.tokenizer import CLIPTokenizer, bytes_to_unicode, clean_text

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.openai()


@pytest.fixture(scope="module")
def folder(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(folder):
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    # the vocab_file= form of transformers 5 silently builds a 2-token vocabulary: make sure
    # the reference really holds OpenAI's 49,408 tokens
    assert len(reference.get_vocab()) == 49408
    return reference


HANDWRITTEN = [
    "a photo of a cat", "A Photo Of A CAT", "an astronaut riding a horse on the moon",
    "a painting of a fox, by Greg Rutkowski, trending on artstation, 4k, highly detailed",
    "portrait of a woman (masterpiece:1.2), [blurry], {cinematic}", "red/green/blue",
    "1girl, solo, looking at viewer", "a 35mm photo of 3 dogs, f/1.8, 1/250s, ISO 400",
    "the year 2024 and 1999.5", "pi = 3.14159265358979", "cost: $1,000,000 (USD) – 50% off!!!",
    "e-mail: someone@example.com; url https://example.com/a?b=c&d=e#f",
    "C++ and C# and F# and .NET", "x^2 + y^2 = z^2", "100°C > 212°F", "#hashtag @mention",
    "don't stop", "I'm here", "you're right", "we've been", "she'll go", "he'd say", "it's fine",
    "the cat's toy", "rock'n'roll", "'quoted' words", "o'clock", "DON'T SHOUT", "I'M HERE",
    "SHE'S", "y'all'd've", "''''", "café au lait", "naïve façade", "Crème brûlée", "São Paulo",
    "Zürich über Straße", "Ångström", "El Niño", "Dvořák", "Łódź", "İstanbul",
    "cafe\u0301 (decomposed accent)", "Ελληνικά γράμματα", "Русский текст, Москва",
    "日本語のテキスト", "中文文本", "한국어 텍스트", "עברית", "العربية ١٢٣", "हिन्दी",
    "ไทย", "emoji 😀😃😄", "👍🏽 thumbs up", "family 👨‍👩‍👧 and flag 🇫🇷", "heart ❤️ sparkle ✨",
    "🐱🐶🦊", "math ∑ ∫ √ ∞ ≠ ≤", "arrows → ← ↑ ↓", "x²+y³=½", "Ⅻ roman numerals",
    "tabs\tand\nnewlines\r\nmixed", "   leading and trailing   ", "multiple     spaces",
    "non\u00a0breaking\u00a0space", "zero\u200bwidth", "", " ", "!!!", "...", "???!!!...",
    "a_b_c snake_case", "CamelCaseWord", "ALLCAPS", "mIxEd CaSe", "<|endoftext|> inside",
    "<|startoftext|>hello", "a" * 60, "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis", "antidisestablishmentarianism",
    "photorealistic, octane render, unreal engine 5, 8k uhd, dslr",
    "a cute corgi wearing a tiny hat, studio lighting, bokeh",
]

WORDS = ["cat", "dog", "Photo", "of", "a", "the", "red", "BLUE", "café", "naïve", "don't",
         "it's", "we'll", "3d", "4k", "1024x768", "#1", "(", ")", "[", "]", ",", ".", "!", "?",
         ":", ";", "-", "--", "—", "&", "/", "😀", "🚀", "❤️", "東京", "Москва", "Ελλάδα",
         "über", "señor", "x2", "v1.5", "2.0", "1e-3", "+", "=", "%", "$5", "@home", "\"", "'",
         "hello", "WORLD", "sunset", "mountains", "oil painting", "by", "artist", "unreal"]


def varied_prompts() -> list[str]:
    """≥ 200 prompts: the hand-written ones, random mixtures of the word pool (with random
    case and spacing), and long ones that must be truncated."""
    rng = random.Random(0)
    prompts = list(HANDWRITTEN)
    for _ in range(130):
        words = rng.choices(WORDS, k=rng.randint(1, 14))
        words = [w.upper() if rng.random() < 0.15 else w for w in words]
        prompts.append("".join(w + rng.choice([" ", " ", "", "  ", "\t"]) for w in words))
    for n in (30, 60, 90, 150):
        prompts.append(" ".join(rng.choices(WORDS, k=n)))
    prompts.append(", ".join(HANDWRITTEN[:20]))
    return prompts


def test_prompt_set_is_varied(tok):
    prompts = varied_prompts()
    assert len(prompts) >= 200
    assert sum(len(tok.encode(p)) > 75 for p in prompts) >= 4


def test_parity_with_transformers_on_varied_prompts(tok, hf):
    prompts = varied_prompts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts are truncated, with a warning
        ours = tok(prompts)
    theirs = hf(prompts, padding="max_length", max_length=77, truncation=True,
                return_tensors="pt").input_ids
    assert ours.shape == (len(prompts), 77) and ours.dtype == torch.int64
    mismatched = [p for p, a, b in zip(prompts, ours, theirs) if not torch.equal(a, b)]
    assert mismatched == []
    for prompt in prompts:
        assert tok.encode(prompt) == hf(prompt, add_special_tokens=False).input_ids
    for row in ours:
        assert tok.decode(row) == hf.decode(row, skip_special_tokens=True)


def test_parity_with_openclip_style_padding(tok, tmp_path):
    """Pad token "!" (id 0), as SD 2.x. transformers makes the pad token a special token, so
    a "!" typed in a prompt becomes id 0 there instead of joining a BPE piece ("!!!" is one
    token, 995); ours tokenises the text as OpenCLIP does. Prompts with "!" are left out."""
    tok_zero = CLIPTokenizer.openai(pad_token="!")
    tok_zero.save_pretrained(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert len(hf.get_vocab()) == 49408 and hf.pad_token_id == 0
    assert tok_zero.encode("wow!!!") == tok.encode("wow!!!") == [2781, 995]
    prompts = [p for p in varied_prompts() if "!" not in p][:60]
    expected = hf(prompts, padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(tok_zero(prompts), expected, rtol=0, atol=0)


# Text cleaning and the golden ids of the OpenAI vocabulary.

def test_golden_ids(tok):
    assert tok("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("hello world")[0, :4].tolist() == [49406, 3306, 1002, 49407]
    assert tok("HELLO   world")[0, :4].tolist() == [49406, 3306, 1002, 49407]
    assert tok("You should've done this")[0, :7].tolist() == [49406, 592, 1535, 1200, 1700,
                                                             589, 49407]
    assert tok.tokenize("You should've done this") == ["you</w>", "should</w>", "'ve</w>",
                                                       "done</w>", "this</w>"]


def test_ftfy_and_html_cleaning(tok, hf):
    """OpenAI's CLIP runs ftfy and html.unescape before lower-casing; transformers 5's
    tokenizer does not (it applies NFC only). Ours follows OpenAI: these prompts tokenise as
    their cleaned forms, which transformers then tokenises identically."""
    cases = {
        "don’t stop": "don't stop",                        # curly apostrophe → contraction
        "ＦＵＬＬ width": "full width",                      # full-width letters
        "ﬁsh ﬂour": "fish flour",                          # ligatures
        "caf&eacute; &amp;amp; cr&egrave;me": "café & crème",  # HTML, also double-escaped
        "ǅemal": "džemal",                                  # Latin digraph "ligature"
        "ΟΔΟΣ": "οδος",                                     # final sigma, as str.lower()
    }
    for raw, cleaned in cases.items():
        assert clean_text(raw) == cleaned
        assert tok.encode(raw) == tok.encode(cleaned)
        assert tok.encode(raw) == hf(cleaned, add_special_tokens=False).input_ids
    # ids checked against OpenAI's reference tokenizer (the copy in open_clip_torch 3.3.0)
    assert tok.encode("don’t stop") == [847, 713, 1691]
    assert tok.encode("ＦＵＬＬ width") == [1476, 23571]
    assert tok.encode("&lt;3 &amp;") == [283, 274, 261]


# Padding with the configured pad token.

def test_sd_v1_pads_with_end_of_text(tok):
    ids = tok("hello world")
    assert ids.shape == (1, 77) and ids.dtype == torch.int64
    assert ids[0].tolist() == [49406, 3306, 1002, 49407] + [49407] * 73


def test_openclip_pads_with_zero_read_from_the_folder(folder, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
         "unk_token": "<|endoftext|>"}))
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token_id == 0
    assert tok("hello world")[0].tolist() == [49406, 3306, 1002, 49407] + [0] * 73


def test_pad_token_written_as_added_token_dict(folder, tmp_path):
    """transformers 4 writes special tokens as {"content": …, "lstrip": …} dictionaries."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    token = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False,
             "normalized": True, "rstrip": False, "single_word": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": token, "pad_token": token, "model_max_length": 77}))
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token_id == 49407 and tok.model_max_length == 77


# Truncation keeps EOS last and says what it dropped.

def test_long_prompt_is_truncated_with_a_warning(tok):
    with pytest.warns(UserWarning, match="dropped: 'cat( cat){24}'$"):
        ids = tok(" ".join(["cat"] * 100))
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 49406 and ids[0, 76] == 49407
    assert ids[0, 1:76].tolist() == [2368] * 75


def test_warning_names_exactly_the_dropped_tokens(tok):
    prompt = " ".join(str(i % 10) for i in range(100))   # one token per digit
    with pytest.warns(UserWarning) as record:
        ids = tok(prompt)
    dropped = " ".join(str(i % 10) for i in range(75, 100))
    assert f"dropped: '{dropped}'" in str(record[0].message)
    assert tok.decode(ids[0]) == " ".join(str(i % 10) for i in range(75))


def test_exactly_75_tokens_is_not_truncated(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok(" ".join(["a"] * 75))
    assert ids[0].tolist() == [49406] + [320] * 75 + [49407]
    with pytest.warns(UserWarning, match="dropped: 'a'"):
        assert tok(" ".join(["a"] * 76))[0].tolist() == [49406] + [320] * 75 + [49407]


# Byte-pair encoding always ends, and stays fast on long words: a port of CLIP's BPE looped
# forever on "pavement" (greyovo/CLIP-android-demo #1); BPE that rescans the word after
# every merge is quadratic in its length (openai/tiktoken #195).

@contextmanager
def finishes_within(seconds: int):
    """Fail with TimeoutError instead of hanging (a quadratic BPE takes hours on 10⁶
    letters); a bound on termination, far above the time it takes."""
    def stop(*_):
        raise TimeoutError(f"did not finish within {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_bpe_ends_on_pavement(tok):
    with finishes_within(10):
        ids = tok("cat on the pavement")
    assert ids[0, :7].tolist() == [49406, 2368, 525, 518, 27669, 49407, 49407]
    assert tok.bpe("pavement") == ["pavement</w>"]


@pytest.mark.parametrize("kind", ["repeated", "random"])
def test_a_long_word_gives_the_pieces_of_the_reference_bpe(tok, hf, kind):
    word = "a" * 10_000 if kind == "repeated" else "".join(
        random.Random(0).choices(string.ascii_lowercase, k=10_000))
    with finishes_within(30):
        pieces = tok.encode(word)
    assert pieces == hf(word, add_special_tokens=False).input_ids
    with pytest.warns(UserWarning) as record:
        ids = tok(word)
    assert len(record) == 1 and ids.shape == (1, 77)
    assert ids[0].tolist() == [BOS, *pieces[:75], EOS]


def test_a_million_letters_give_77_ids_and_one_short_warning(tok):
    word = "".join(random.Random(1).choices(string.ascii_lowercase, k=10 ** 6))
    with finishes_within(60), pytest.warns(UserWarning) as record:
        ids = tok(word)
    assert ids.shape == (1, 77) and ids[0, 0] == BOS and ids[0, 76] == EOS
    assert len(record) == 1 and len(str(record[0].message)) < 1000
    assert re.search(r"has \d+ tokens, more than the 75 that fit in 77; dropped: '.*' and "
                     r"\d+ more tokens$", str(record[0].message))


# The pieces of the algorithm.

def test_bytes_to_unicode_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord("!")] == "!" and table[ord("ÿ")] == "ÿ"
    assert table[0] == chr(256) and table[ord(" ")] == "Ġ" and table[173] == chr(323)


def test_openai_vocabulary_layout(tok):
    assert tok.vocab_size == 49408 and len(tok.merges) == 48894
    assert tok.encoder["!"] == 0 and tok.encoder["!</w>"] == 256
    assert tok.encoder["".join(tok.merges[0])] == 512
    assert tok.encoder["<|startoftext|>"] == BOS and tok.encoder["<|endoftext|>"] == EOS
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)


def test_bpe_merges_by_rank_and_caches(tok):
    assert tok.merges[:3] == [("i", "n"), ("t", "h"), ("a", "n")]
    assert tok.bpe("hello") == ["hello</w>"]
    assert tok.bpe("x") == ["x</w>"]
    pieces = tok.bpe("photosynthesizing")
    assert pieces == ["photo", "synthe", "sizing</w>"]
    assert tok.cache["photosynthesizing"] is pieces
    assert tok.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>",
                                                "cat</w>"]


def test_special_tokens_in_text_are_special(tok):
    assert tok.encode("<|endoftext|> hi") == [49407, 1883]


def test_decode(tok):
    ids = tok(["Hello, World! 123", "café 😀"])
    assert tok.decode(ids[0]) == "hello , world ! 1 2 3"
    assert tok.decode(ids[1]) == "café 😀"
    assert tok.decode(ids[0, :4], skip_special_tokens=False) == "<|startoftext|>hello , world"


def test_save_and_load_round_trip(tok, folder):
    loaded = CLIPTokenizer.from_pretrained(folder)
    assert loaded.encoder == tok.encoder and loaded.merges == tok.merges
    assert (folder / "merges.txt").read_text().startswith("#version: 0.2\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "<|endoftext|>" and config["model_max_length"] == 77
    assert ReExported is CLIPTokenizer


def test_batch_and_max_length(tok):
    ids = tok(["a cat", "a dog on a mat"], max_length=10)
    assert ids.shape == (2, 10)
    assert ids[0].tolist() == [BOS, 320, 2368, EOS] + [EOS] * 6


def test_bad_input(tok, folder, tmp_path):
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        tok(["a cat", 3])
    with pytest.raises(ValueError, match="max_length=1"):
        tok("a cat", max_length=1)
    with pytest.raises(FileNotFoundError, match="no merges.txt"):
        (tmp_path / "vocab.json").write_bytes((folder / "vocab.json").read_bytes())
        CLIPTokenizer.from_pretrained(tmp_path)
    vocab = dict(tok.encoder)
    del vocab["photo</w>"]
    with pytest.raises(ValueError, match="photo</w>"):
        CLIPTokenizer(vocab, [" ".join(m) for m in tok.merges])


@pytest.mark.parametrize("bad, name", [(None, "NoneType"), (3, "int"), (b"a cat", "bytes")])
def test_prompts_must_be_str_or_list_of_str(tok, bad, name):
    with pytest.raises(TypeError, match=f"prompts must be a str or a list of str, got {name}"):
        tok(bad)


def test_bytes_prompt_suggests_decoding(tok):
    with pytest.raises(TypeError, match=r"got bytes; decode bytes first, e.g. text.decode"):
        tok(b"a cat")
    with pytest.raises(TypeError, match="prompt 1 is a bytes, not a string; prompts must be"):
        tok(["a cat", b"a dog"])
    assert tok(("a cat", "a dog")).shape == (2, 77)     # a tuple is a list of prompts too


@pytest.mark.parametrize("bad", [1.5, 77.0, "77", True])
def test_max_length_must_be_an_int(tok, bad):
    with pytest.raises(TypeError, match=rf"max_length must be an int >= 2 \(77 for CLIP\), "
                                        rf"got {re.escape(repr(bad))}"):
        tok("a cat", max_length=bad)
    with pytest.raises(ValueError, match=r"max_length=-3 leaves no room for BOS and EOS"):
        tok("a cat", max_length=-3)


def test_decode_takes_one_row(tok):
    ids = tok(["a cat", "a dog"])
    for batch in (ids, ids.tolist()):
        with pytest.raises(ValueError, match=r"ids of one prompt \(L,\), got shape \(2, 77\); "
                                             r"for a batch decode one row at a time"):
            tok.decode(batch)
    assert [tok.decode(row) for row in ids] == ["a cat", "a dog"]
    with pytest.raises(TypeError, match=r"a list of ints or a 1-D tensor; got \[\[320\], "):
        tok.decode([[320], [2368, 320]])
    with pytest.raises(TypeError, match="token ids must be integers, got torch.float32"):
        tok.decode(torch.tensor([320.0, 2368.0]))
    assert tok.decode([]) == "" and tok.decode((320, 2368)) == "a cat"


def test_decode_refuses_unknown_ids(tok):
    with pytest.raises(ValueError, match=r"ids \[-1, 49408\] are not in the vocabulary of "
                                         r"49408 tokens"):
        tok.decode([320, 49408, -1, 2368])
    shapes = CLIPTokenizer.from_merges([("c", "a"), ("ca", "t</w>")])
    assert shapes.vocab_size == 516
    with pytest.raises(ValueError, match=r"ids \[2368\] are not in the vocabulary of 516"):
        shapes.decode(tok.encode("a cat"))
