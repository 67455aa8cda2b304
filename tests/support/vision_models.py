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
    decoder_type: str = "trocr",
):
    """A TrOCR-shaped model (ViT or DeiT encoder, TrOCR or RoBERTa decoder) with a ViT image processor."""
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
    if decoder_type == "roberta":
        from transformers import RobertaConfig

        dec_cfg = RobertaConfig(
            vocab_size=dec_kw["vocab_size"],
            hidden_size=dec_kw["d_model"],
            num_hidden_layers=dec_kw["decoder_layers"],
            num_attention_heads=dec_kw["decoder_attention_heads"],
            intermediate_size=dec_kw["decoder_ffn_dim"],
            max_position_embeddings=dec_kw["max_position_embeddings"] + 2,
            bos_token_id=BOS,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
    else:
        dec_cfg = TrOCRConfig(**dec_kw)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc_cfg, dec_cfg)
    model = VisionEncoderDecoderModel(cfg)
    proc = ViTImageProcessor(size={"height": image_size, "width": image_size})
    return save_vision_model(path, model, proc, dec_kw["vocab_size"], seed=seed)


def load_ours(path: Path, dtype=torch.float32) -> LoadedModel:
    """Our model from a saved folder, with its tokenizer and generation config."""
    from transformers import AutoConfig, AutoTokenizer

    from encdec_models.registry import architecture_of

    cfg = AutoConfig.from_pretrained(path)
    arch = architecture_of(cfg)
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


FLORENCE_TASK_WORDS = (
    "What is the text in the image? What is the text in the image, with regions? What does the image "
    "describe? Describe in detail what is shown in the image. Locate the objects with category name in "
    "the image."
).split()
FLORENCE_POST_PROCESSOR = {
    "ocr": {
        "PATTERN": r"(.+?)" + r"<loc_(\d+)>" * 8,
        "AREA_THRESHOLD": 0.0,
    },
    "phrase_grounding": {"FILTER_BY_BLACK_LIST": True},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


def florence_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Specials 0-3, <image> (4), the words of the task prompts, <loc_0>..<loc_999>, then words w0, w1..
    Words carry a leading '▁' (Metaspace), so <loc_*> tokens decode right after a word, as in BART's
    tokenizer."""
    words = list(dict.fromkeys(f"▁{w}" for w in FLORENCE_TASK_WORDS))
    locs = [f"<loc_{i}>" for i in range(1000)]
    fixed = [*SPECIALS, "<image>", *words, *locs]
    fillers = [f"▁w{i}" for i in range(vocab_size - len(fixed))]
    vocab = {t: i for i, t in enumerate(fixed + fillers)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": locs})
    return fast


IMAGE_TOKEN = 4


def random_florence2(
    path: Path,
    seed: int = 0,
    vision: dict | None = None,
    text: dict | None = None,
    image_size: tuple[int, int] = (64, 64),
):
    """A Florence-2-shaped model (two DaViT stages, a small BART) with its processor (a CLIP image
    processor and the post-processor's parsing rules) saved into ``path``."""
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    torch.manual_seed(seed)
    v_kw = dict(
        depths=[1, 1],
        patch_size=[7, 3],
        patch_stride=[4, 2],
        patch_padding=[3, 1],
        patch_prenorm=[False, True],
        embed_dim=[16, 32],
        num_heads=[2, 4],
        num_groups=[2, 4],
        window_size=3,
        projection_dim=32,
        max_position_embeddings=20,
        drop_path_rate=0.0,
    )
    v_kw.update(vision or {})
    vocab_size = 1200
    t_kw = dict(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=160,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    t_kw.update(text or {})
    cfg = Florence2Config(
        vision_config=Florence2VisionConfig(**v_kw),
        text_config=BartConfig(**t_kw),
        image_token_id=IMAGE_TOKEN,
    )
    model = Florence2ForConditionalGeneration(cfg)
    discriminating_init_(model, seed)
    model.eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS
    )
    model.save_pretrained(path)
    tok = florence_tokenizer(vocab_size)
    h, w = image_size
    for k, s, p in zip(v_kw["patch_size"], v_kw["patch_stride"], v_kw["patch_padding"]):
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    proc = CLIPImageProcessor(
        size={"height": image_size[0], "width": image_size[1]},
        do_center_crop=False,
        image_seq_length=h * w + 1,
    )
    Florence2Processor(
        image_processor=proc, tokenizer=tok, post_processor_config=FLORENCE_POST_PROCESSOR
    ).save_pretrained(path)
    return model
