"""Tiny trained text encoder/decoder models (BART, mBART, Marian, Pegasus, T5 v1.0, T5 v1.1, mT5)
with real tokenizers, saved as Hugging Face folders that ``encdec_models.loading.load_model`` reads.

Random-weight decoders tend to repeat one token whatever the input, and two such outputs agreeing
proves little. So every model here is trained (single-threaded, 300-1000 steps, ~5-30 s each) to
copy a random word sequence: its greedy output then depends on every input token, on
positions, and on what it has generated so far (it is only partly trained: long inputs give
imperfect, still input-dependent copies). Each model keeps its family's real quirks: special-token
layout, decoder start token (BART/mBART: </s>; Marian: <pad>; Pegasus/T5: <pad> = 0), a forced
first token (BART-large's <s>, mBART-50's target language), sinusoidal vs learned positions, a
random ``final_logits_bias``, tied vs own lm_head, T5 v1.1's decoder shallower than its encoder.

``tests/conftest.py`` exposes them through the session fixture ``tiny_text_model``.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForSeq2SeqLM,
    BartConfig,
    MarianConfig,
    MBartConfig,
    MT5Config,
    PegasusConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

from encdec_models.bart import sinusoidal_table

N_WORDS = 100  # plain word tokens "w0".."w99"
MAX_WORDS = 12  # training sentences have 1..MAX_WORDS words
MAX_POSITIONS = 64  # max_position_embeddings of the BART family models
# Training stops once the mean loss of the last LOSS_WINDOW steps is below TARGET_LOSS (the copy is
# then mostly learned; when that happens varies a lot: learning to align is a sudden jump), after
# MIN_STEPS at least and MAX_STEPS at most (~17-30 ms a step on one core).
MIN_STEPS, MAX_STEPS, TARGET_LOSS, LOSS_WINDOW = 300, 1500, 0.3, 25
BATCH = 32
SRC_LANG, TGT_LANG = "en_XX", "de_DE"  # mBART language codes (the target one is forced first)


@dataclass(frozen=True)
class TinyTextModel:
    """A saved tiny model folder and the token ids a test needs to drive it."""

    name: str  # "bart", "mbart", "marian", "pegasus", "t5", "t5_v1_1", "mt5"
    path: Path  # config.json, model.safetensors, generation_config.json, tokenizer files
    architecture: str  # e.g. "BartForConditionalGeneration"
    decoder_start_token_id: int
    eos_token_id: int
    pad_token_id: int
    forced_bos_token_id: int | None  # forced first new token: BART-large <s>, mBART-50 target language
    train_steps: int  # training steps taken
    train_seconds: float  # how long training took

    @property
    def prompt_ids(self) -> list[int]:
        """Decoder prompt of a request: the decoder start token."""
        return [self.decoder_start_token_id]

    @property
    def forced_tokens(self) -> tuple[tuple[int, int], ...]:
        """SamplingParams.forced_tokens equivalent of transformers' forced_bos_token_id."""
        return () if self.forced_bos_token_id is None else ((0, self.forced_bos_token_id),)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)


@dataclass(frozen=True)
class _Spec:
    specials: tuple[str, ...]  # special tokens before the words (ids 0..)
    trailing: tuple[str, ...]  # special tokens after the words (Marian's <pad>, mBART's languages)
    template: str  # tokenizer post-processor for one sentence
    decoder_start: str
    forced_bos: str | None = None


_BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
SPECS = {
    "bart": _Spec(_BART_SPECIALS, (), "<s> $A </s>", "</s>", forced_bos="<s>"),
    "mbart": _Spec(_BART_SPECIALS, (SRC_LANG, TGT_LANG), f"{SRC_LANG} $A </s>", "</s>", forced_bos=TGT_LANG),
    "marian": _Spec(("</s>", "<unk>"), ("<pad>",), "$A </s>", "<pad>"),
    "pegasus": _Spec(_T5_SPECIALS, (), "$A </s>", "<pad>"),
    "t5": _Spec(_T5_SPECIALS, (), "$A </s>", "<pad>"),
    "t5_v1_1": _Spec(_T5_SPECIALS, (), "$A </s>", "<pad>"),
    "mt5": _Spec(_T5_SPECIALS, (), "$A </s>", "<pad>"),
}
NAMES = tuple(SPECS)


def vocabulary(name: str) -> dict[str, int]:
    spec = SPECS[name]
    tokens = [*spec.specials, *(f"w{i}" for i in range(N_WORDS)), *spec.trailing]
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with the family's special tokens and post-processor."""
    spec, vocab = SPECS[name], vocabulary(name)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    used = [t for t in spec.template.split() if t != "$A"]
    tok.post_processor = processors.TemplateProcessing(
        single=spec.template, special_tokens=[(t, vocab[t]) for t in used]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    extra = [t for t in spec.trailing if t != "<pad>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>" if "<s>" in vocab else None,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=extra or None,
    )


def build_config(name: str):
    """A small config of the family (2 layers, d_model 48) with its real quirks."""
    vocab = vocabulary(name)
    spec = SPECS[name]
    ids = dict(
        vocab_size=len(vocab),
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["</s>"],
        decoder_start_token_id=vocab[spec.decoder_start],
    )
    if name.startswith("t5") or name == "mt5":
        t5 = dict(
            d_model=48,
            d_kv=16,
            num_heads=4,
            d_ff=96,
            num_layers=2,
            dropout_rate=0.0,
            relative_attention_num_buckets=16,
            relative_attention_max_distance=32,
            **ids,
        )
        if name == "t5":  # v1.0: ReLU, tied lm_head, output rescale
            return T5Config(feed_forward_proj="relu", **t5)
        if name == "t5_v1_1":  # v1.1 / Flan: gated-GELU, own lm_head, encoder deeper than decoder
            return T5Config(
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
                **{**t5, "num_layers": 3, "num_decoder_layers": 2},
            )
        return MT5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **t5)
    bart = dict(
        d_model=48,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=96,
        decoder_ffn_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        dropout=0.0,
        **ids,
    )
    if name == "bart":
        # scale_embedding: without it this tiny BART does not learn within the step budget
        return BartConfig(bos_token_id=vocab["<s>"], activation_function="gelu", scale_embedding=True, **bart)
    if name == "mbart":
        return MBartConfig(
            bos_token_id=vocab["<s>"], activation_function="gelu", scale_embedding=True, **bart
        )
    if name == "marian":
        return MarianConfig(activation_function="swish", scale_embedding=True, **bart)
    return PegasusConfig(activation_function="relu", scale_embedding=True, **bart)


def random_words(rng: random.Random, n: int) -> list[str]:
    return [f"w{rng.randrange(N_WORDS)}" for _ in range(n)]


def random_text_requests(
    tiny, tok, n: int, seed: int = 0, words=(1, 12), max_new=(3, 18), min_new=(0, 0, 2), **params
) -> list:
    """``n`` engine requests of random "wN" texts (``words``: the range of their word counts) for a
    tiny text model, each with a random length limit (``max_new``) and minimum (one of ``min_new``);
    ``params``: more SamplingParams fields."""
    from encdec_cli.engine import Request, SamplingParams

    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(*words)))
        p = SamplingParams(
            max_new_tokens=rng.randint(*max_new),
            min_new_tokens=rng.choice(min_new),
            stop_token_ids=(tiny.eos_token_id,),
            forced_tokens=tiny.forced_tokens,
            **params,
        )
        out.append(Request(tok(text).input_ids, tiny.prompt_ids, p, i))
    return out


def source_ids(name: str, words: list[str]) -> list[int]:
    """Encoder token ids of a sentence, as the family's tokenizer makes them."""
    vocab, spec = vocabulary(name), SPECS[name]
    out = []
    for t in spec.template.split():
        out += [vocab[w] for w in words] if t == "$A" else [vocab[t]]
    return out


def target_ids(name: str, words: list[str]) -> list[int]:
    """Training labels: (forced first token: BART <s>, mBART target language), the words, </s>."""
    vocab, spec = vocabulary(name), SPECS[name]
    lead = [vocab[spec.forced_bos]] if spec.forced_bos else []
    return lead + [vocab[w] for w in words] + [vocab["</s>"]]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def train(model, name: str, max_steps: int, seed: int) -> int:
    """Teach ``model`` to copy word sequences (AdamW, batch 32, short warm-up); returns the steps
    taken (see TARGET_LOSS)."""
    rng = random.Random(seed)
    pad = model.config.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    losses = []
    for step in range(1, max_steps + 1):
        sents = [random_words(rng, rng.randint(1, MAX_WORDS)) for _ in range(BATCH)]
        src = _pad([source_ids(name, s) for s in sents], pad)
        labels = _pad([target_ids(name, s) for s in sents], -100)
        dec_in = labels.clone()  # decoder input: start token + labels shifted right
        dec_in[:, 1:] = labels[:, :-1]
        dec_in[:, 0] = model.config.decoder_start_token_id
        dec_in[dec_in == -100] = pad
        loss = model(input_ids=src, attention_mask=src.ne(pad), decoder_input_ids=dec_in, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step >= MIN_STEPS and sum(losses[-LOSS_WINDOW:]) / LOSS_WINDOW < TARGET_LOSS:
            break
    model.eval()
    return step


@contextmanager
def single_thread():
    """Tiny ops run far faster on one thread, above all on CPUs shared with other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_tiny_model(name: str, folder: Path, max_steps: int = MAX_STEPS, seed: int = 0) -> TinyTextModel:
    """Build, train and save (model + tokenizer + generation config) one tiny model into ``folder``.
    ``max_steps=0``: untrained (for tests that need a loadable folder, not a good model)."""
    vocab, spec = vocabulary(name), SPECS[name]
    torch.manual_seed(seed)
    config = build_config(name)
    model = AutoModelForSeq2SeqLM.from_config(config)
    with torch.no_grad():
        if name in ("t5_v1_1", "mt5"):  # transformers ties lm_head at init; give it its own weights
            lm_head = model.shared.weight.detach().clone() * config.d_model**-0.5
            model.lm_head.weight = torch.nn.Parameter(lm_head)
        if hasattr(model, "final_logits_bias"):  # a buffer (not trained): make it matter
            model.final_logits_bias.normal_(0.0, 0.1)
        if name in ("bart", "mbart"):  # learned positions: a smooth start, shared by both stacks,
            for stack in (model.model.encoder, model.model.decoder):  # makes copying learnable in time
                w = stack.embed_positions.weight
                w.copy_(sinusoidal_table(*w.shape) * 0.5)
    start = time.perf_counter()
    with single_thread():
        steps = train(model, name, max_steps, seed) if max_steps else 0
    seconds = time.perf_counter() - start
    forced_bos = vocab[spec.forced_bos] if spec.forced_bos else None
    gen = model.generation_config
    gen.decoder_start_token_id = vocab[spec.decoder_start]
    gen.eos_token_id, gen.pad_token_id = vocab["</s>"], vocab["<pad>"]
    gen.forced_bos_token_id, gen.forced_eos_token_id = forced_bos, None
    gen.max_length = 64
    model.save_pretrained(folder)
    build_tokenizer(name).save_pretrained(folder)
    return TinyTextModel(
        name=name,
        path=folder,
        architecture=type(model).__name__,
        decoder_start_token_id=vocab[spec.decoder_start],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        forced_bos_token_id=forced_bos,
        train_steps=steps,
        train_seconds=seconds,
    )
