"""The torch-free CLIP tokenizer gives open_clip's token ids, text for text.

Every comparison is against ``open_clip.get_tokenizer("ViT-B-32")`` in this process: COCO's 80
names in all 80 prompt templates, LVIS-style names, names near and past the 77-token context,
punctuation and HTML entities, and non-ASCII text (accents, CJK, emoji, mojibake that ftfy fixes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.clip_tokenizer import (
    CONTEXT_LENGTH,
    EOT_TOKEN_ID,
    SOT_TOKEN_ID,
    CLIPTokenizer,
    clean_text,
    clip_vocab_and_merges,
    write_tokenizer_files,
)

open_clip = pytest.importorskip("open_clip")
from vlexport.models.clip.text import COCO80_CLASSES, IMAGENET_TEMPLATES  # noqa: E402

# LVIS-style names (LVIS v1 spells them "aerosol_can", "Band_Aid", ...; prompts use spaces).
LVIS_NAMES = [
    "aerosol can", "air conditioner", "alarm clock", "Band Aid", "bulletproof vest", "cream pitcher",
    "baby buggy", "bagpipe", "ball peen hammer", "beanbag", "Bible", "boom microphone", "bow (weapon)",
    "bow (decorative ribbons)", "Christmas tree", "Dixie cup", "crock pot", "cufflink", "pita (bread)",
    "Ferris wheel", "Lego", "Rollerblade", "Tabasco sauce", "Sharpie", "ping-pong ball",
    "poker (fire stirring tool)", "eggbeater", "coat hanger", "water jug", "dollhouse", "jean",
    "legume", "mail slot", "nutcracker", "parchment", "pelican", "pepper mill", "pop (soda)",
    "shower cap", "sleeping bag", "soupspoon", "teakettle", "tights (clothing)", "Tootsie Roll",
    "walking cane", "wind chime", "yoke (animal equipment)", "Lanyard", "Band-Aid", "sushi",
    "tux", "flip-flop (sandal)", "kiwi fruit", "mandarin orange", "hot-air balloon",
]
PUNCTUATION = [
    "a photo of a {}.", "a photo of a dog.", "dog, cat; bird: fish!", "what's this?", "it's o'clock",
    "the dog's bowl", "THE DOG'S BOWL", "they'll we'd I'm you're we've isn't", "rock 'n' roll",
    "fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp; twice-escaped", "&#39;quoted&#39; &quot;x&quot;",
    '"double quoted"', "'single quoted'", "“curly” ‘quotes’ o’clock", "semi-trailer truck",
    "t-shirt", "x-ray machine", "24/7 store", "3.5mm jack", "R2-D2", "1920x1080", "C++ book",
    "e-mail", "well...", "(parenthesised)", "[bracket] {brace}", "100% cotton", "#hashtag @user",
    "under_score", "a--b", "tab\tand\nnewline  and   spaces", "  leading and trailing  ",
    "<start_of_text>", "x <end_of_text> y", "a<end_of_text>b", "<<end_of_text>", "<end_of_text><end_of_text>",
    "<START_OF_TEXT>", "'ſ long s", "",
]
NON_ASCII = [
    "café crème", "crème brûlée", "Straßenbahn", "STRASSE", "Ærøskøbing", "naïve façade", "jalapeño",
    "自行车", "红色的汽车", "自転車", "자전거", "велосипед", "ποδήλατο", "دراجة", "साइकिल", "จักรยาน",
    "🚲", "a 🐶 and a 🐱", "👍🏽 thumbs", "👨‍👩‍👧 family", "🇯🇵 flag",
    "cafÃ© crÃ¨me", "schÃ¶n", "â€œmojibakeâ€\x9d", "Ã©tÃ©",  # mojibake that ftfy repairs
    "cafe\u0301 (combining accent)", "ﬁne ﬂour ligatures", "ＦＵＬＬ width", "İstanbul", "ǅemal",
    "x² ½ Ⅻ ①", "zero\u200bwidth", "non\u00a0breaking\u2003em space", "soft\u00adhyphen", "\ufeffbom",
    "control\x07bell", "windows\r\nline", "\x1b[31mred\x1b[0m",
]


def _long_name(words: int) -> str:
    base = ["red", "blue", "big", "small", "wooden", "metal", "plastic", "old", "new", "shiny"]
    return " ".join(base[i % len(base)] for i in range(words))


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> tuple[Path, Path]:
    return write_tokenizer_files(tmp_path_factory.mktemp("clip_tok"), open_clip.tokenizer.default_bpe())


@pytest.fixture(scope="module")
def ours(tokenizer_files) -> CLIPTokenizer:
    return CLIPTokenizer.from_files(*tokenizer_files)


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


def _assert_same(ours: CLIPTokenizer, reference, texts: list[str]) -> None:
    got, want = ours(texts), reference(texts).numpy()
    assert got.dtype == np.int64 and got.shape == want.shape == (len(texts), CONTEXT_LENGTH)
    bad = [(t, g[:24].tolist(), w[:24].tolist()) for t, g, w in zip(texts, got, want) if not np.array_equal(g, w)]
    assert not bad, bad[:3]


def test_coco_names_in_all_80_templates(ours, reference):
    prompts = [t.format(c) for c in COCO80_CLASSES for t in IMAGENET_TEMPLATES]
    assert len(prompts) == 6400
    _assert_same(ours, reference, prompts)


@pytest.mark.parametrize("template", ["{}", "a photo of a {}.", "a bad photo of the {}.", "itap of my {}.",
                                      "a {} in a video game."])
def test_lvis_style_punctuation_and_non_ascii_names(ours, reference, template):
    names = LVIS_NAMES + PUNCTUATION + NON_ASCII + [n.lower() for n in LVIS_NAMES] + [n.upper() for n in LVIS_NAMES]
    _assert_same(ours, reference, [template.format(n) for n in names])


def test_plain_texts_without_templates(ours, reference):
    _assert_same(ours, reference, PUNCTUATION + NON_ASCII)


def test_long_names_near_and_past_the_context_are_cut_as_open_clip_does(ours, reference):
    # "a photo of a" + n words + "." : 4 + n + 1 ids between start and end; 77 is reached at n = 70.
    names = [_long_name(n) for n in (60, 68, 69, 70, 71, 72, 73, 80, 200)]
    names += ["aerosol can " * 30, "bulletproof vest, " * 20, "自行车" * 60, "🚲" * 80]
    prompts = [f"a photo of a {n}." for n in names]
    _assert_same(ours, reference, prompts)
    got = ours(prompts)
    lengths = (got != 0).sum(axis=1)
    assert lengths.tolist()[:5] == [67, 75, 76, 77, 77]
    assert (got[:, 0] == SOT_TOKEN_ID).all()
    full = got[lengths == CONTEXT_LENGTH]
    assert len(full) >= 8 and (full[:, -1] == EOT_TOKEN_ID).all()  # the end-of-text token survives the cut
    # Another context length, as open_clip's context_length argument.
    np.testing.assert_array_equal(ours(prompts, context_length=16), reference(prompts, context_length=16).numpy())


def test_vocabulary_and_merges_are_open_clips(tokenizer_files, reference):
    vocab_file, merges_file = tokenizer_files
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    assert vocab == reference.encoder and len(vocab) == 49408
    merges = [tuple(line.split(" ")) for line in merges_file.read_text(encoding="utf-8").splitlines()[1:]]
    assert {m: i for i, m in enumerate(merges)} == reference.bpe_ranks
    assert clip_vocab_and_merges(open_clip.tokenizer.default_bpe())[0] == reference.encoder
    assert b"\x80\x04" not in vocab_file.read_bytes()  # plain JSON, nothing pickled


def test_cleaning_is_open_clips(reference):
    for text in PUNCTUATION + NON_ASCII + LVIS_NAMES:
        assert clean_text(text) == reference.clean_fn(text), text
    assert clean_text("cafÃ© &amp;amp;  Crème\n") == "café & crème"


def test_encode_decode_and_single_strings(ours, reference):
    assert ours.encode("a photo of a dog.") == reference.encode("a photo of a dog.")
    assert ours.decode(ours("A Photo of a Café crème.")[0]) == "a photo of a café crème ."
    np.testing.assert_array_equal(ours("a dog"), reference("a dog").numpy())
    with pytest.raises(UsageError, match="expected strings"):
        ours(["ok", 3])


def test_files_that_are_not_clips_are_refused(tmp_path, tokenizer_files):
    vocab_file, merges_file = tokenizer_files
    with pytest.raises(UsageError, match="not found"):
        CLIPTokenizer.from_files(tmp_path / "vocab.json", merges_file)
    bad = tmp_path / "vocab.json"
    bad.write_text(json.dumps({"a": 0}), encoding="utf-8")
    with pytest.raises(BundleError, match="not CLIP's BPE"):
        CLIPTokenizer.from_files(bad, merges_file, error=BundleError)
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UsageError, match="cannot read"):
        CLIPTokenizer.from_files(bad, merges_file)
