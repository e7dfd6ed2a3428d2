"""The text-embedding cache: one encode per unique caption, reuse across runs, repair, dtypes, refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from t2i_fixtures import save_tiny_t5

from difffit.engine.data.text_cache import text_cache_dir, text_embeddings
from difffit.engine.errors import DiffFitError

MAX_TOKENS = 12
CAPTIONS = [
    "a photo of a cat",
    "a bowl of ramen",
    "a photo of a cat",
    "a green circle",
    "a bowl of ramen",
    "a dog on the beach",
]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from transformers import T5EncoderModel, T5Tokenizer

    folder = save_tiny_t5(tmp_path_factory.mktemp("t5"))
    return T5Tokenizer.from_pretrained(folder / "tokenizer"), T5EncoderModel.from_pretrained(folder / "text_encoder")


class Encoder:
    """PixArt's encode_prompt in miniature (padded to MAX_TOKENS), recording every caption it is given."""

    def __init__(self, t5, max_tokens: int = MAX_TOKENS):
        self.tokenizer, self.model = t5
        self.max_tokens, self.seen = max_tokens, []

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.seen += captions
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        embeds = self.model(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        return {"prompt_embeds": embeds, "prompt_attention_mask": tokens.attention_mask}


def _shards(embeddings) -> list:
    return sorted(p for p in embeddings.path.iterdir() if len(p.name) == 32)


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_each_unique_caption_encoded_once_and_taken_per_image(t5, tmp_path):
    encoder = Encoder(t5)
    embeddings = text_embeddings(CAPTIONS, encoder, key="t5", cache_dir=tmp_path, batch_size=2, progress=False)
    assert sorted(encoder.seen) == sorted(set(CAPTIONS)) and embeddings.encoded == 4
    assert len(embeddings) == 6 and len(embeddings.captions) == 4
    batch = embeddings.take(torch.tensor([5, 0, 2]))
    direct = Encoder(t5)(["a dog on the beach", "a photo of a cat", "a photo of a cat"])
    assert batch["prompt_embeds"].shape == (3, MAX_TOKENS, 32) and batch["prompt_attention_mask"].dtype == torch.long
    for name in direct:  # batch composition may move float32 sums by an ulp; nothing more
        torch.testing.assert_close(batch[name], direct[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(batch["prompt_embeds"][1], batch["prompt_embeds"][2])
    # In memory (cache_dir None), the same numbers.
    memory = text_embeddings(CAPTIONS, Encoder(t5), key="t5", cache_dir=None, batch_size=2, progress=False)
    assert memory.path is None
    _assert_equal(memory.take(torch.arange(6)), embeddings.take(torch.arange(6)))


def test_second_run_encodes_nothing_and_a_changed_caption_only_itself(t5, tmp_path):
    first = text_embeddings(CAPTIONS, Encoder(t5), key="t5", cache_dir=tmp_path, progress=False)
    again_encoder = Encoder(t5)
    again = text_embeddings(CAPTIONS, again_encoder, key="t5", cache_dir=tmp_path, progress=False)
    assert again_encoder.seen == [] and again.encoded == 0 and again.path == first.path
    _assert_equal(again.take(torch.arange(6)), first.take(torch.arange(6)))

    edited = [*CAPTIONS[:3], "a green square", *CAPTIONS[4:]]
    edit_encoder = Encoder(t5)
    changed = text_embeddings(edited, edit_encoder, key="t5", cache_dir=tmp_path, progress=False)
    assert edit_encoder.seen == ["a green square"] and len(_shards(changed)) == 2
    expected = Encoder(t5)(["a green square"])
    torch.testing.assert_close(
        changed.take(torch.tensor([3]))["prompt_embeds"], expected["prompt_embeds"], rtol=1e-5, atol=1e-6
    )
    _assert_equal(changed.take(torch.tensor([0, 5])), first.take(torch.tensor([0, 5])))
    mixed = changed.take(torch.arange(6))  # one batch from both shards
    for i in range(6):
        _assert_equal({name: t[i : i + 1] for name, t in mixed.items()}, changed.take(torch.tensor([i])))
    # Another key (another encoder, token count or fingerprint) is another cache.
    other = Encoder(t5, max_tokens=8)
    assert text_embeddings(CAPTIONS, other, key="t5/8", cache_dir=tmp_path, progress=False).path != first.path
    assert len(other.seen) == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_damaged_cache_is_named_and_rebuilt(t5, tmp_path, capsys, damage):
    first = text_embeddings(CAPTIONS, Encoder(t5), key="t5", cache_dir=tmp_path, progress=False)
    clean = first.take(torch.arange(6))
    (shard,) = _shards(first)
    del first  # its memory maps
    embeds = shard / "0.npy"
    if damage == "flip":
        data = bytearray(embeds.read_bytes())
        data[-100] ^= 0xFF
        embeds.write_bytes(bytes(data))
    elif damage == "truncate":
        with open(embeds, "r+b") as f:
            f.truncate(os.path.getsize(embeds) // 2)
    else:
        (shard / "meta.json").write_text("{ broken")
    encoder = Encoder(t5)
    rebuilt = text_embeddings(CAPTIONS, encoder, key="t5", cache_dir=tmp_path, progress=False)
    err = capsys.readouterr().err.replace("\n", "")
    assert f"text-embedding cache {shard} is damaged" in err
    assert sorted(encoder.seen) == sorted(set(CAPTIONS)) and not shard.exists()
    _assert_equal(rebuilt.take(torch.arange(6)), clean)
    third = Encoder(t5)
    text_embeddings(CAPTIONS, third, key="t5", cache_dir=tmp_path, progress=False)
    assert third.seen == []  # intact now: reused


def test_stored_dtype_is_the_callers_and_masks_keep_theirs(t5, tmp_path):
    embeddings = text_embeddings(
        CAPTIONS, Encoder(t5), key="t5", cache_dir=tmp_path, dtype=torch.bfloat16, progress=False
    )
    batch = embeddings.take(torch.arange(6))
    assert batch["prompt_embeds"].dtype == torch.bfloat16 and batch["prompt_attention_mask"].dtype == torch.long
    exact = text_embeddings(CAPTIONS, Encoder(t5), key="t5", cache_dir=tmp_path, progress=False)
    assert exact.path != embeddings.path  # a dtype is part of what is cached
    assert torch.equal(batch["prompt_embeds"], exact.take(torch.arange(6))["prompt_embeds"].to(torch.bfloat16))
    (shard,) = _shards(embeddings)
    assert (shard / "0.npy").stat().st_size < 0.6 * (_shards(exact)[0] / "0.npy").stat().st_size
    reopened = text_embeddings(
        CAPTIONS, Encoder(t5), key="t5", cache_dir=tmp_path, dtype=torch.bfloat16, progress=False
    )
    assert reopened.encoded == 0
    _assert_equal(reopened.take(torch.arange(6)), batch)


def test_extra_captions_such_as_the_empty_one(t5, tmp_path):
    embeddings = text_embeddings(
        CAPTIONS, Encoder(t5), key="t5", cache_dir=tmp_path, extra=["", CAPTIONS[0]], progress=False
    )
    empty = embeddings.of("")
    assert empty["prompt_embeds"].shape == (1, MAX_TOKENS, 32)
    assert empty["prompt_attention_mask"].sum() == 1  # only </s>
    _assert_equal(embeddings.of(CAPTIONS[3]), embeddings.take(torch.tensor([3])))
    with pytest.raises(KeyError, match="was not encoded"):
        embeddings.of("never seen")


def test_an_encoder_of_another_form_under_the_same_key_replaces_the_cache(t5, tmp_path, capsys):
    first = text_embeddings(CAPTIONS[:2], Encoder(t5), key="t5", cache_dir=tmp_path, progress=False)
    (old,) = _shards(first)
    longer = Encoder(t5, max_tokens=16)  # a caller that forgot to put the token count in the key
    embeddings = text_embeddings(CAPTIONS, longer, key="t5", cache_dir=tmp_path, batch_size=2, progress=False)
    assert "is out of date" in capsys.readouterr().err and not old.exists()
    assert sorted(longer.seen) == sorted(set(CAPTIONS)) and embeddings.encoded == 4
    assert embeddings.take(torch.arange(6))["prompt_embeds"].shape == (6, 16, 32)


def test_encoder_nan_is_one_sentence_and_caches_nothing(tmp_path):
    def encode(captions):
        embeds = torch.zeros(len(captions), 4, 8)
        embeds[captions.index("bad") if "bad" in captions else 0, 1, 2] = float("nan") if "bad" in captions else 0
        return {"prompt_embeds": embeds}

    with pytest.raises(DiffFitError, match="NaN or inf for the caption 'bad'"):
        text_embeddings(["fine", "bad"], encode, key="k", cache_dir=tmp_path, progress=False)
    assert [p for p in tmp_path.rglob("*.npy")] == []


@pytest.mark.parametrize(
    "encode, words",
    [
        (lambda captions: {"e": torch.zeros(1, 3)}, "leading dim must be the batch"),
        (lambda captions: {"e": torch.zeros(len(captions), len(captions[0]))}, "pad every batch to one token count"),
        (lambda captions: [torch.zeros(len(captions))], "dict of tensors"),
    ],
)
def test_encoder_bugs_are_named(tmp_path, encode, words):
    with pytest.raises((ValueError, TypeError), match=words):
        text_embeddings(["ab", "abc", "abcd"], encode, key="k", cache_dir=tmp_path, batch_size=2, progress=False)


def test_text_cache_sits_beside_the_latents(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFFIT_CACHE", str(tmp_path / "home"))
    assert text_cache_dir(None) == tmp_path / "home" / "latents" / "text"
    assert text_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine" / "text"


def test_meta_records_captions_and_checksums(t5, tmp_path):
    embeddings = text_embeddings(CAPTIONS, Encoder(t5), key="t5 fingerprint", cache_dir=tmp_path, progress=False)
    meta = json.loads((_shards(embeddings)[0] / "meta.json").read_text())
    assert meta["key"] == "t5 fingerprint" and sorted(meta["captions"]) == sorted(set(CAPTIONS))
    assert {t["checksum"][:6] for t in meta["tensors"].values()} == {"crc32:"}


def test_a_disk_too_small_for_the_cache_is_refused_before_any_write(t5, tmp_path, monkeypatch):
    """The shards are memory maps, which a full disk would kill with a Bus error: the space is checked first."""
    from types import SimpleNamespace

    from difffit.engine.data import cache_files

    monkeypatch.setattr(cache_files.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(DiffFitError, match="The text-embedding cache needs .* GB free"):
        text_embeddings(CAPTIONS, Encoder(t5), key="t5", cache_dir=tmp_path, progress=False)
    assert not any(p.suffix == ".npy" for p in tmp_path.rglob("*"))  # nothing written, the build folder gone
