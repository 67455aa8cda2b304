"""Random-weight many-to-many translation models (NLLB-200, M2M100) with real tokenizer classes,
saved as Hugging Face folders that ``encdec_models.loading.load_model`` reads.

No hub access here, so the tokenizers are built from a small vocabulary: NLLB's ``NllbTokenizer``
(tokenizer.json: a character-level BPE with NLLB's special tokens and a few of its language codes)
and M2M100's ``M2M100Tokenizer`` (a character-level sentencepiece model trained in milliseconds,
vocab.json, and M2M100's 100 language codes ``__en__`` ...). The models are NLLB / M2M100 configs
(``M2M100ForConditionalGeneration``, ``model_type`` m2m_100) shrunk in width, with the
discriminating random init of ``whisper_models`` (the embedding unit-variance after its sqrt(d_model)
scale) so every input token and position matters.
"""

from __future__ import annotations

import io
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import M2M100Config, M2M100ForConditionalGeneration

from tests.support.whisper_models import discriminating_init_

NLLB_LANGS = ("eng_Latn", "fra_Latn", "deu_Latn", "spa_Latn", "por_Latn", "zho_Hans")
ALPHABET = string.ascii_lowercase
M2M100_EXTRA_TOKENS = 100 + 8  # M2M100Tokenizer's language codes and its 8 "madeup words"


@dataclass(frozen=True)
class TranslationModel:
    name: str  # "nllb" or "m2m100"
    path: Path
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int

    def tokenizer(self, src_lang: str | None = None):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.path)
        if src_lang is not None:
            tok.src_lang = src_lang
        return tok

    def lang_id(self, code: str) -> int:
        tok = self.tokenizer()
        return tok.get_lang_id(code) if self.name == "m2m100" else tok.convert_tokens_to_ids(code)


def sentence(rng: random.Random, lo: int = 3, hi: int = 10) -> str:
    """Random lowercase "words": one token a character plus a word boundary each (20-60 tokens)."""
    return " ".join(
        "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(lo, hi))
    )


def _nllb_tokenizer():
    from transformers import NllbTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in ["▁", *ALPHABET, *string.digits, ".", ","]:
        vocab[c] = len(vocab)
    # character-level BPE (no merges), NLLB's special-token layout: [src_lang] text </s>
    return NllbTokenizer(vocab=vocab, merges=[], extra_special_tokens=list(NLLB_LANGS), src_lang="eng_Latn")


def _m2m100_tokenizer(folder: Path):
    import sentencepiece as spm
    from transformers import M2M100Tokenizer

    rng = random.Random(0)
    corpus = [sentence(rng) for _ in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="char",
        vocab_size=len(ALPHABET) + 2,  # letters, the word boundary and <unk>
        character_coverage=1.0,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spm.model").write_bytes(model.getvalue())
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tok = M2M100Tokenizer(str(folder / "vocab.json"), str(folder / "spm.model"), src_lang="en", tgt_lang="fr")
    (folder / "spm.model").unlink()  # save_pretrained writes sentencepiece.bpe.model
    return tok, len(vocab) + M2M100_EXTRA_TOKENS


def build_translation_model(name: str, folder: Path, seed: int = 0, **overrides) -> TranslationModel:
    """Build, initialise and save (weights, tokenizer, generation config) one random model."""
    if name == "nllb":
        tok = _nllb_tokenizer()
        vocab_size = len(tok)
    elif name == "m2m100":
        tok, vocab_size = _m2m100_tokenizer(folder)
    else:
        raise ValueError(name)
    kw = dict(
        vocab_size=vocab_size,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=True,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(M2M100Config(**kw)).eval()
    discriminating_init_(model, seed)
    with torch.no_grad():  # the embedding is scaled by sqrt(d_model): unit variance after the scale
        model.model.shared.weight.mul_(kw["d_model"] ** -0.5)
    gen = model.generation_config
    gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = 2, 2, 1, 0
    gen.forced_bos_token_id = None
    gen.max_length = 64
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return TranslationModel(name, folder, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
