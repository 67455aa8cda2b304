"""Random-weight image-to-text models saved as Hugging Face folders (weights, generation config,
image processor, a word-level tokenizer built with the ``tokenizers`` library), and images drawn
with Pillow.

Weights get ``discriminating_init_`` (tests/support/whisper_models.py): a random decoder at the
standard init repeats one token whatever the image, and two such outputs agreeing proves little.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    TrOCRConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)

from encdec_models.loading import LoadedModel, build_model, generation_config_of, iter_checkpoint
from tests.support.whisper_models import discriminating_init_

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def word_tokenizer(vocab_size: int, extra: list[str] = ()) -> PreTrainedTokenizerFast:
    """Specials 0-3, then ``extra`` tokens (task prompts), then words w0, w1, ... up to vocab_size."""
    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS) - len(extra))]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *extra, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    if extra:
        fast.add_special_tokens({"additional_special_tokens": list(extra)})
    return fast


def save_vision_model(
    path: Path, model, image_processor, vocab_size: int, extra_tokens: list[str] = (), seed: int = 0
):
    """discriminating_init_ the model, then save it, its generation config, image processor and
    tokenizer into ``path``; returns the model (eval)."""
    discriminating_init_(model, seed)
    model.eval()
    model.config.decoder_start_token_id = BOS
    model.config.pad_token_id = PAD
    model.config.eos_token_id = EOS
    model.generation_config = GenerationConfig(
        decoder_start_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS
    )
    model.save_pretrained(path)
    image_processor.save_pretrained(path)
    word_tokenizer(vocab_size, list(extra_tokens)).save_pretrained(path)
    return model


def random_trocr(
    path: Path,
    seed: int = 0,
    encoder: dict | None = None,
    decoder: dict | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    encoder_type: str = "vit",
):
    """A TrOCR-shaped model (ViT or DeiT encoder, TrOCR decoder) with a ViT image processor."""
    from transformers import DeiTConfig, ViTImageProcessor

    torch.manual_seed(seed)
    enc_kw = dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=image_size,
        patch_size=patch_size,
    )
    enc_kw.update(encoder or {})
    dec_kw = dict(
        vocab_size=300,
        d_model=48,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=96,
        max_position_embeddings=64,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
    )
    dec_kw.update(decoder or {})
    enc_cfg = (DeiTConfig if encoder_type == "deit" else ViTConfig)(**enc_kw)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc_cfg, TrOCRConfig(**dec_kw))
    model = VisionEncoderDecoderModel(cfg)
    proc = ViTImageProcessor(size={"height": image_size, "width": image_size})
    return save_vision_model(path, model, proc, dec_kw["vocab_size"], seed=seed)


def load_ours(path: Path, dtype=torch.float32) -> LoadedModel:
    """Our model from a saved folder, with its tokenizer and generation config."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    arch = "VisionEncoderDecoderModel"
    model = build_model(arch, cfg, iter_checkpoint(path), torch.device("cpu"), dtype)
    tok = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model, tok, cfg, generation_config_of(path, cfg), arch, path)


def draw_images(n: int, seed: int = 0, size=(64, 40)) -> list[Image.Image]:
    """``n`` different RGB images: a coloured background with rectangles, ellipses and a line of text."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        w, h = int(size[0] + rng.integers(-8, 9)), int(size[1] + rng.integers(-8, 9))
        im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            box = (x0, y0, x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (d.rectangle if rng.random() < 0.5 else d.ellipse)(box, fill=fill)
        d.text((2, h // 3), f"item {i}", fill=(0, 0, 0))
        images.append(im)
    return images


DONUT_TASKS = ["<s_cord>", "<s_docvqa>", "<s_question>", "</s_question>", "<s_answer>"]


def random_donut(
    path: Path,
    seed: int = 0,
    encoder: dict | None = None,
    decoder: dict | None = None,
    image_size: tuple[int, int] = (64, 48),
):
    """A Donut-shaped model (Swin encoder, mBART decoder) with a Donut image processor and task tokens
    (``DONUT_TASKS``, ids 4..8) in its tokenizer."""
    from transformers import DonutImageProcessor, DonutSwinConfig, MBartConfig

    torch.manual_seed(seed)
    enc_kw = dict(
        image_size=list(image_size),
        patch_size=4,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
    )
    enc_kw.update(encoder or {})
    dec_kw = dict(
        vocab_size=300,
        d_model=32,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        scale_embedding=True,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
    )
    dec_kw.update(decoder or {})
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        DonutSwinConfig(**enc_kw), MBartConfig(**dec_kw)
    )
    model = VisionEncoderDecoderModel(cfg)
    proc = DonutImageProcessor(
        size={"height": image_size[0], "width": image_size[1]}, do_align_long_axis=False, do_thumbnail=True
    )
    return save_vision_model(path, model, proc, dec_kw["vocab_size"], extra_tokens=DONUT_TASKS, seed=seed)
