"""CLIP's tokenizer: a prompt becomes 77 integer ids by byte-level byte-pair encoding.

CLIP (Radford et al. 2021, §2.4) reads lower-cased byte-level BPE (Sennrich et al. 2016) with
a 49,152-token vocabulary, sequences of at most 77 tokens, bracketed by [SOS] and [EOS]. In
Stable Diffusion v1 the text encoder is CLIP ViT-L/14's text tower, so this is how every
prompt enters the model. The steps, in order:

1. clean: ftfy.fix_text (mojibake, curly quotes, full-width letters, NFC), HTML unescaped
   twice (``&amp;amp;`` → ``&``), whitespace runs collapsed to one space, lower case;
2. pre-tokenise with CLIP's pattern (`PATTERN`): the special tokens, the contractions
   's 't 're 've 'm 'll 'd, runs of letters, single digits, runs of other symbols; spaces
   separate pre-tokens and are dropped;
3. map each pre-token's UTF-8 bytes to printable characters (`bytes_to_unicode`), so any
   text has a spelling in the vocabulary's 256 base symbols;
4. BPE: split the pre-token into symbols, the last one marked with ``</w>`` (end of word),
   then repeatedly merge the adjacent pair with the lowest rank in the merge list;
5. look the pieces up in the vocabulary, add BOS (``<|startoftext|>``, 49406) and EOS
   (``<|endoftext|>``, 49407), truncate or pad to 77.

The vocabulary: OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (shipped in ``data/``) lists the
merges; the ids are the 256 byte symbols, the same 256 with ``</w>``, one per merge
(48,894), then the two special tokens: 49,408 ids. A diffusers ``tokenizer/`` folder holds
the same vocabulary as ``vocab.json`` (token → id) and ``merges.txt``.
Matches OpenAI's ``clip/simple_tokenizer.py`` and transformers' ``CLIPTokenizer``.

Where merges come from: `learn_bpe` learns them from a corpus by counting adjacent symbol
pairs and merging the most frequent one, again and again (Sennrich et al. 2016). The bundled
shapes model's tokenizer is about 150 merges learned this way from the world's captions;
`CLIPTokenizer.from_merges` gives it the same layout as OpenAI's vocabulary.
"""

import gzip
import heapq
import html
import itertools
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import ftfy
import regex
import torch

from minisd.package_data import openai_vocab
from minisd.pretrained import find_folder, naming, read_json, require_file

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WARN_TOKENS = 50     # a truncation warning shows at most this many of the dropped tokens

# CLIP's pre-tokenisation pattern (OpenAI clip/simple_tokenizer.py), applied to lower-cased
# text; \p{L} is any Unicode letter, \p{N} any Unicode digit (hence the `regex` package).
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def bytes_to_unicode() -> dict[int, str]:
    """The byte → character table of byte-level BPE (GPT-2, Radford et al. 2019; CLIP).

    The 188 printable bytes ('!'…'~', '¡'…'¬', '®'…'ÿ') stand for themselves; the other 68
    (space, control characters, …) map to the characters 256, 257, … in byte order, so every
    byte has a visible, non-space stand-in. Returns {byte 0–255: one-character str}.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy fix, HTML unescape (twice), whitespace collapse, lower case.

    "HELLO   world" → "hello world"; "caf&eacute;" → "café"; "don’t" → "don't".
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip().lower()


def pre_tokens(text: str) -> list[str]:
    """Steps 1–3: `text` cleaned, split by `PATTERN`, each pre-token's UTF-8 bytes spelled with
    `bytes_to_unicode`'s characters. "Café, 2 cats" → ["cafÃ©", ",", "2", "cats"]."""
    byte_encoder = bytes_to_unicode()
    return ["".join(byte_encoder[b] for b in token.encode("utf-8"))
            for token in PATTERN.findall(clean_text(text))]


def merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every occurrence of the adjacent symbols `pair` in `word` by their
    concatenation, left to right: (["a", "a", "a</w>"], ("a", "a")) → ["aa", "a</w>"]."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def learn_bpe(texts: Iterable[str], num_merges: int | None = None,
              min_frequency: int = 2) -> list[tuple[str, str]]:
    """Learn a byte-level BPE merge list from a corpus (Sennrich et al. 2016, Algorithm 1,
    on CLIP's pre-tokens, as CLIP's own vocabulary was learned).

    1. Count the words: each text goes through `pre_tokens` (cleaning, CLIP's pattern, byte
       symbols), exactly as the tokenizer will see it; special tokens are skipped. A word
       starts as its symbols, the last marked ``</w>``: "red" → r e d</w>.
    2. Count every adjacent pair of symbols over all words, each word weighted by how often
       it occurs ("red" × 10 → (r, e) and (e, d</w>) 10 times each).
    3. The most frequent pair becomes the next merge (ties: the pair that sorts first); it
       is merged in every word (`merge_pair`), so new, longer symbols can pair up.
    4. Repeat 2–3 until `num_merges` merges are learned or no pair occurs `min_frequency`
       times. Merges never cross a word boundary, so with enough merges every word of the
       corpus becomes one symbol, and the learning stops by itself.

    Args:
        texts: the corpus, any iterable of strings.
        num_merges: at most this many merges (None: until step 4 stops it).
        min_frequency: a pair rarer than this is not merged (≥ 1).
    Returns:
        the merges in rank order, e.g. [("r", "e"), ("re", "d</w>"), …]; the vocabulary is
        `CLIPTokenizer.from_merges(merges)` (the 512 byte symbols stay in it, so words never
        seen still tokenise, byte by byte).
    Raises:
        ValueError if num_merges < 0 or min_frequency < 1.
    """
    if num_merges is not None and num_merges < 0:
        raise ValueError(f"num_merges must be >= 0 or None, got {num_merges}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    counts = Counter(token for text in texts for token in pre_tokens(text)
                     if token not in (BOS, EOS))
    words = {(*word[:-1], word[-1] + "</w>"): n for word, n in counts.items()}
    merges = []
    while num_merges is None or len(merges) < num_merges:
        pairs = Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        words = {tuple(merge_pair(list(word), best)): n for word, n in words.items()}
    return merges


def _tokenizer_settings(settings: dict, source: Path) -> dict:
    """The constructor's keywords from tokenizer_config.json or special_tokens_map.json
    (`source`): the special tokens (a plain string or transformers' {"content": …}) and
    model_max_length. Raises ValueError naming the file and the key of a wrong kind."""
    kwargs = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        token = settings.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and not isinstance(token, str):
            raise ValueError(f"{source}: {key} must be a token string, got {token!r}")
        if token:
            kwargs[key] = token
    length = settings.get("model_max_length")
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, (int, float)) \
                or length != int(length) or length < 2:
            raise ValueError(f"{source}: model_max_length must be an integer >= 2, got "
                             f"{length!r}")
        kwargs["model_max_length"] = int(length)
    return kwargs


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (see the module docstring for the steps).

    Args:
        vocab: {token: id}; must contain the 256 byte symbols, the same with ``</w>``, every
            merge result, and the special tokens.
        merges: merge pairs ("a b") in rank order (rank 0 merges first).
        bos_token, eos_token: the start and end markers; pad_token: what fills a prompt up
            to the length (EOS in SD v1, "!" = id 0 in OpenCLIP / SD 2.x;).
        model_max_length: default sequence length (77 for CLIP).
    Raises:
        ValueError if the vocabulary lacks a byte symbol, a merge result or a special token.

    Use `CLIPTokenizer.openai()` for OpenAI's vocabulary, `from_pretrained(folder)` for a
    diffusers ``tokenizer/`` folder; `tokenizer(prompts)` gives the ids (B, 77).
    """

    def __init__(self, vocab: dict[str, int], merges: list[str], bos_token: str = BOS,
                 eos_token: str = EOS, pad_token: str = EOS, model_max_length: int = 77):
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.merges = [tuple(m.split()) for m in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.model_max_length = model_max_length
        needed = [*self.byte_encoder.values(), *(c + "</w>" for c in self.byte_encoder.values()),
                  *("".join(pair) for pair in self.merges), bos_token, eos_token, pad_token]
        missing = [t for t in needed if t not in self.encoder]
        if missing:
            raise ValueError(f"the vocabulary lacks {len(missing)} token(s) that the byte table "
                             f"or the merges need, e.g. {missing[:5]}: vocab and merges do not "
                             "belong together")
        self.bos_token_id, self.eos_token_id = self.encoder[bos_token], self.encoder[eos_token]
        self.pad_token_id = self.encoder[pad_token]
        # pre-token → BPE pieces; special tokens are their own piece.
        self.cache = {bos_token: [bos_token], eos_token: [eos_token]}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # ---- loading and saving ----

    @classmethod
    def openai(cls, path: str | Path | None = None, **kwargs) -> "CLIPTokenizer":
        """OpenAI's vocabulary from ``bpe_simple_vocab_16e6.txt.gz`` (`path`; by default the
        copy shipped with minisd, `minisd.package_data.openai_vocab()`).

        The file holds a header line and 262,144 merges, of which CLIP uses the first
        49,152 − 256 − 2 = 48,894. Keyword arguments go to the constructor (e.g.
        ``pad_token="!"`` for OpenCLIP-style padding with 0).
        """
        with gzip.open(path or openai_vocab(), "rt", encoding="utf-8") as f:
            merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
        return cls.from_merges([tuple(m.split()) for m in merges], **kwargs)

    @classmethod
    def from_merges(cls, merges: list[tuple[str, str]], **kwargs) -> "CLIPTokenizer":
        """A tokenizer from a merge list alone, with CLIP's vocabulary layout: ids 0–255 the
        byte symbols, 256–511 the same with ``</w>``, then one id per merge result in rank
        order (a result that is already a token keeps its first id), then BOS and EOS.
        Keyword arguments go to the constructor."""
        symbols = list(bytes_to_unicode().values())
        vocab = {}
        for token in [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
                      BOS, EOS]:
            vocab.setdefault(token, len(vocab))
        return cls(vocab, [" ".join(m) for m in merges], **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None) -> "CLIPTokenizer":
        """Load a diffusers/transformers ``tokenizer/`` folder (`path`, `path/subfolder`, or
        the ``tokenizer/`` of a model folder: the contract of `minisd.pretrained`).

        Reads ``vocab.json`` and ``merges.txt`` (a ``#version`` header line is skipped) or,
        without them, ``tokenizer.json`` (what transformers 5 saves: its BPE model holds the
        same vocabulary and merges, as "a b" strings or [a, b] pairs); the special tokens
        and ``model_max_length`` from ``tokenizer_config.json`` and
        ``special_tokens_map.json`` (the latter wins where both name a token).
        Raises FileNotFoundError naming the missing folder or file; ValueError naming the
        file (and the key) for a file that is not JSON, lacks the vocabulary or merges, has
        special tokens or a `model_max_length` of the wrong kind, or a vocabulary that does
        not fit its merges.
        """
        folder = find_folder(path, subfolder, "tokenizer", ("vocab.json", "tokenizer.json"))
        what = "a CLIP tokenizer folder holds vocab.json and merges.txt, or tokenizer.json"
        if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            vocab = read_json(folder / "vocab.json", what)
            merges_path = require_file(folder, ("merges.txt",), what)
            lines = merges_path.read_text(encoding="utf-8").split("\n")
            merges = [m for m in lines if m and not m.startswith("#version")]
            source = folder / "vocab.json"
        else:
            source = folder / "tokenizer.json"
            model = read_json(source).get("model")
            if not isinstance(model, dict) or not {"vocab", "merges"} <= model.keys():
                raise ValueError(f"{source}: model must hold the BPE 'vocab' and 'merges'")
            vocab = model["vocab"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise ValueError(f"{source}: the vocabulary must map tokens to integer ids")
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                settings.update(_tokenizer_settings(read_json(folder / name), folder / name))
        with naming(folder):
            return cls(vocab, merges, **settings)

    def save_pretrained(self, folder: str | Path):
        """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
        ``special_tokens_map.json`` (the layout of SD v1's ``tokenizer/`` folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False),
                                           encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "unk_token": self.eos_token, "pad_token": self.pad_token}
        config = {**special, "model_max_length": self.model_max_length,
                  "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    # ---- text → pieces → ids ----

    def bpe(self, token: str) -> list[str]:
        """Byte-pair encode one byte-mapped pre-token: its symbols (the last with ``</w>``),
        merged pair by pair, lowest rank first (equal pairs left to right), until no adjacent
        pair is in the merge list. "hello" → ["hello</w>"]; results are cached.

        The merge list is learned in order, so a merge never creates a pair of lower rank than
        its own, and taking the pairs from a heap of (rank, position) merges exactly as
        OpenAI's loop does (all occurrences of the best pair, then the next best), but in
        O(n log n) for n symbols instead of O(n²): a 10⁶-letter word takes seconds.
        """
        if token in self.cache:
            return self.cache[token]
        word = [*token[:-1], token[-1] + "</w>"]     # word[i]: the symbol starting at i, or None
        n = len(word)
        after = list(range(1, n + 1))                # after[i]: the next live position
        before = list(range(-1, n - 1))
        # a heap of rank·n + i: the pair starting at i, lowest rank first, then leftmost
        heap = [self.ranks[pair] * n + i for i, pair in enumerate(itertools.pairwise(word))
                if pair in self.ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = divmod(heapq.heappop(heap), n)
            j = after[i]
            if word[i] is None or j >= n or self.merges[rank] != (word[i], word[j]):
                continue                               # stale: a neighbour merged since
            word[i], word[j] = word[i] + word[j], None
            after[i] = after[j]
            if after[i] < n:
                before[after[i]] = i
            for left in (before[i], i):                # the two new pairs
                if left >= 0 and after[left] < n:
                    rank = self.ranks.get((word[left], word[after[left]]))
                    if rank is not None:
                        heapq.heappush(heap, rank * n + left)
        pieces = [symbol for symbol in word if symbol is not None]
        self.cache[token] = pieces
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """Clean, pre-tokenise, byte-map and BPE `text`: its pieces, without BOS/EOS.
        "a photo of a cat" → ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]."""
        return [piece for token in pre_tokens(text) for piece in self.bpe(token)]

    def encode(self, text: str) -> list[int]:
        """The ids of `text`'s pieces, without BOS/EOS and without length limit."""
        return [self.encoder[piece] for piece in self.tokenize(text)]

    def __call__(self, prompts: str | list[str], max_length: int | None = None) -> torch.Tensor:
        """Token ids for a prompt or a batch of prompts.

        Args:
            prompts: a string or a list (or tuple) of B strings.
            max_length: sequence length L, an int ≥ 2 (default `model_max_length`, 77).
        Returns:
            int64 tensor (B, L): BOS, the prompt's ids, EOS, then the pad id up to L.
            A prompt longer than L − 2 tokens keeps its first L − 2, EOS stays last, and a
            warning names the dropped text (its first `WARN_TOKENS` tokens).
        Raises:
            TypeError if prompts is not a str or a list of str (e.g. None, an int, bytes) or
            max_length is not an int; ValueError if max_length < 2.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        elif not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str, got "
                            f"{type(prompts).__name__}"
                            + ("; decode bytes first, e.g. text.decode('utf-8')"
                               if isinstance(prompts, bytes) else ""))
        length = self.model_max_length if max_length is None else max_length
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"max_length must be an int >= 2 (77 for CLIP), got {length!r}")
        if length < 2:
            raise ValueError(f"max_length={length} leaves no room for BOS and EOS; use >= 2")
        ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {row} is a {type(prompt).__name__}, not a string; "
                                "prompts must be a str or a list of str")
            tokens = self.encode(prompt)
            if len(tokens) > length - 2:
                dropped = self.decode(tokens[length - 2:length - 2 + WARN_TOKENS])
                more = len(tokens) - (length - 2) - WARN_TOKENS
                warnings.warn(f"prompt {row} has {len(tokens)} tokens, more than the "
                              f"{length - 2} that fit in {length}; dropped: {dropped!r}"
                              + (f" and {more} more tokens" if more > 0 else ""), stacklevel=2)
                tokens = tokens[:length - 2]
            tokens = [self.bos_token_id, *tokens, self.eos_token_id]
            ids[row, :len(tokens)] = torch.tensor(tokens)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The ids of one prompt (a list of ints or a 1-D integer tensor (L,)) back to text:
        pieces joined, bytes decoded as UTF-8 (invalid sequences → U+FFFD), each ``</w>``
        read as a space. The text is the cleaned, lower-cased prompt. BOS, EOS and the pad
        token are left out unless `skip_special_tokens` is False. For a batch (B, L), decode
        one row at a time: ``[tok.decode(row) for row in ids]``.
        Raises TypeError for ids that are not integers; ValueError for ids that are not one
        row (e.g. (B, L)) or an id outside the vocabulary."""
        if not isinstance(ids, torch.Tensor):
            try:
                ids = torch.tensor(list(ids))
            except (TypeError, ValueError, RuntimeError):
                raise TypeError("decode takes the ids of one prompt, a list of ints or a 1-D "
                                f"tensor; got {ids!r:.60}") from None
        if ids.numel() and (ids.is_floating_point() or ids.is_complex()
                            or ids.dtype == torch.bool):
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        if ids.ndim != 1:
            raise ValueError(f"decode takes the ids of one prompt (L,), got shape "
                             f"{tuple(ids.shape)}; for a batch decode one row at a time: "
                             "[tokenizer.decode(row) for row in ids]")
        ids = ids.tolist()
        unknown = sorted({i for i in ids if i not in self.decoder})
        if unknown:
            raise ValueError(f"ids {unknown[:5]} are not in the vocabulary of {self.vocab_size} "
                             "tokens; were they made by another tokenizer?")
        special = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        pieces = [self.decoder[i] for i in ids if not (skip_special_tokens and i in special)]
        words = "".join(pieces).split("</w>")
        return " ".join(bytes(self.byte_decoder[c] for c in word).decode("utf-8", "replace")
                        for word in words).strip()
