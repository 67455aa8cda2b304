"""Whisper decoding rules for one 30 s window: token ids, prompts and sampling params, parsing
timestamp tokens into segments, and the quality checks behind temperature fallback and
no-speech skipping (openai-whisper ``transcribe``/``decoding``)."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, replace

from encdec_cli.engine import SamplingParams, TimestampRules
from encdec_cli.tasks.vad import VadOptions
from encdec_models.audio import FRAMES_PER_SECOND, INPUT_STRIDE, TIME_PRECISION

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # openai-whisper's fallback schedule
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
MULTILINGUAL_EOT = 50257  # <|endoftext|> of multilingual tokenizers (English-only: 50256)
_LANGUAGE_TOKEN = re.compile(r"<\|[a-z]{2,3}\|>")


@dataclass(frozen=True)
class TranscribeOptions:
    """The ``encdec transcribe`` options: how audio is windowed and each window decoded and checked."""

    language: str | None = None  # e.g. "en"; None: English-only models use English, others detect
    task: str = "transcribe"  # "transcribe" or "translate" (to English; multilingual models only)
    max_new_tokens: int | None = None  # per 30 s window; None: half the decoder length (224)
    timestamps: bool = True  # timestamp tokens -> several timed segments per window
    long_form: str = "chunked"  # "chunked": cut at quiet points, all windows at once; "sequential":
    # openai-whisper's 30 s windows seeking to the last timestamp (one window per file at a time)
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES  # tried in order while a window fails the checks
    beam_size: int = 1  # beams at temperature 0 (1 = greedy)
    best_of: int = 1  # candidates sampled at temperature > 0; the likeliest is kept
    initial_prompt: str | None = None  # text the first window (chunked: every window) continues
    condition_on_previous_text: bool = True  # sequential long-form: prompt with the previous text
    compression_ratio_threshold: float | None = 2.4  # gzip ratio above this: repetitive, fall back
    logprob_threshold: float | None = -1.0  # mean token log-probability below this: fall back
    no_speech_threshold: float | None = 0.6  # P(<|nospeech|>) above this and low logprob: silence
    max_initial_timestamp: float | None = 1.0  # seconds; the first timestamp is at most this
    seed: int = 0  # base seed of the sampling fallbacks (each window and attempt derive their own)
    word_timestamps: bool = False  # word times from cross-attention alignment heads (DTW)
    vad: VadOptions | None = None  # chunked: windows from Silero VAD's speech regions (tasks/vad.py)

    def __post_init__(self):
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"--task must be transcribe or translate, got {self.task!r}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"--temperature needs one or more values >= 0, got {self.temperatures}")
        if self.beam_size < 1 or self.best_of < 1:
            raise ValueError("--beam-size and --best-of must be >= 1")
        if self.long_form not in ("chunked", "sequential"):
            raise ValueError(f"--long-form must be chunked or sequential, got {self.long_form!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.vad is not None and self.long_form != "chunked":
            raise ValueError("--vad builds the windows of --long-form chunked; drop --vad or --long-form")
        if self.no_speech_threshold is not None and not 0 <= self.no_speech_threshold <= 1:
            raise ValueError(f"--no-speech-threshold must be in [0, 1], got {self.no_speech_threshold}")


@dataclass(frozen=True)
class WhisperVocab:
    """The special token ids of one Whisper tokenizer (English-only or multilingual)."""

    sot: int  # <|startoftranscript|>
    eot: int  # <|endoftext|>; text tokens are the ids below it
    sot_prev: int  # <|startofprev|>: previous text follows
    no_speech: int  # <|nospeech|> (<|nocaptions|> in English-only models)
    no_timestamps: int | None  # <|notimestamps|> (None: a fine-tune without it)
    timestamp_begin: int  # <|0.00|>; every id from here is a timestamp (0.02 s apart)
    timestamps: bool  # the model has the 1501 timestamp tokens (fine-tunes may drop them)
    multilingual: bool
    lang_ids: dict[str, int]  # "en" -> <|en|>
    task_ids: dict[str, int | None]  # "transcribe"/"translate" -> id

    @classmethod
    def from_engine(cls, engine) -> WhisperVocab:
        tok, gen = engine.tokenizer, engine.loaded.generation_config
        vocab = tok.get_vocab()
        no_ts = vocab.get("<|notimestamps|>")
        after_specials = vocab["<|startoftranscript|>"] + 1 if no_ts is None else no_ts + 1
        # multilingual: the config says so, or the tokenizer's text vocabulary is the multilingual one
        # (<|endoftext|> at 50257, not 50256); a fine-tune's changed vocabulary size cannot tell
        multilingual = bool(
            getattr(gen, "is_multilingual", False) or vocab["<|endoftext|>"] >= MULTILINGUAL_EOT
        )
        lang_ids = _language_ids(gen, vocab) if multilingual else {}
        return cls(
            sot=vocab["<|startoftranscript|>"],
            eot=vocab["<|endoftext|>"],
            sot_prev=vocab.get("<|startofprev|>", after_specials - 3),
            no_speech=vocab.get("<|nospeech|>", vocab.get("<|nocaptions|>", after_specials - 2)),
            no_timestamps=no_ts,
            timestamp_begin=after_specials,  # the timestamp tokens' text is missing from some tokenizer.json
            # <|0.00|> .. <|30.00|>: a fine-tune whose vocabulary stops short has none
            timestamps=no_ts is not None and engine.model.vocab_size >= after_specials + N_TIMESTAMPS,
            multilingual=multilingual,
            lang_ids=lang_ids,
            task_ids={"transcribe": vocab.get("<|transcribe|>"), "translate": vocab.get("<|translate|>")},
        )


def _language_ids(gen, vocab: dict[str, int]) -> dict[str, int]:
    """ "en" -> <|en|>: from the generation config, else (a fine-tune whose config lacks it) the
    tokenizer's language tokens, the ones between <|startoftranscript|> and <|translate|>."""
    found = getattr(gen, "lang_to_id", None)
    if found:
        return {t[2:-2]: i for t, i in found.items()}
    lo, hi = vocab["<|startoftranscript|>"], vocab.get("<|translate|>", -1)
    return {t[2:-2]: i for t, i in vocab.items() if lo < i < hi and _LANGUAGE_TOKEN.fullmatch(t)}


class WhisperPrompts:
    """Decoder prompts and sampling params for a Whisper model, tokenizer and options.

    A window's prompt ends with <|startoftranscript|> when the no-speech probability is wanted: the
    first step's logits then give P(<|nospeech|>) (``SamplingParams.record_first_step_probs``), and
    the language / task / <|notimestamps|> tokens follow as forced tokens (``begin_index`` of them).
    """

    def __init__(self, engine, opts: TranscribeOptions):
        gen = engine.loaded.generation_config
        self.vocab = v = WhisperVocab.from_engine(engine)
        self.sot, self.eot, self.no_timestamps = v.sot, v.eot, v.no_timestamps
        self.multilingual, self.lang_ids, self.task_ids = v.multilingual, v.lang_ids, v.task_ids
        self.tokenizer = engine.tokenizer
        if opts.timestamps and not v.timestamps:  # segments are then timed by their windows
            opts = replace(opts, timestamps=False)
        self.opts = opts
        if opts.language is not None:
            if not self.multilingual and opts.language != "en":
                raise ValueError(f"this model is English-only; --language {opts.language} is not possible")
            if self.multilingual and opts.language not in self.lang_ids:
                raise ValueError(
                    f"unknown language {opts.language!r}; known: {', '.join(sorted(self.lang_ids))}"
                )
        if opts.task == "translate" and not self.multilingual:
            raise ValueError("--task translate needs a multilingual model (e.g. -m base)")
        self.max_prev = engine.model.max_target_positions // 2 - 1  # 223 previous-text tokens at most
        room = engine.model.max_target_positions // 2
        rules = None
        if opts.timestamps:
            mx = opts.max_initial_timestamp
            rules = TimestampRules(
                v.timestamp_begin, v.eot, v.no_timestamps, None if mx is None else round(mx / TIME_PRECISION)
            )
        self.params = SamplingParams(
            max_new_tokens=min(opts.max_new_tokens or room, room),
            stop_token_ids=(v.eot,),
            suppress_tokens=tuple(gen.suppress_tokens or ()),
            begin_suppress_tokens=tuple(gen.begin_suppress_tokens or ()),
            logprobs=True,
            timestamp_rules=rules,
        )
        self.detect_params = SamplingParams(
            max_new_tokens=1, allowed_tokens=tuple(sorted(self.lang_ids.values()))
        )
        self.id_to_lang = {i: lang for lang, i in self.lang_ids.items()}
        self.initial_prompt = (
            self.tokenizer.encode(" " + opts.initial_prompt.strip(), add_special_tokens=False)
            if opts.initial_prompt
            else []
        )
        self._cache: dict = {}

    def needs_detection(self) -> bool:
        return self.multilingual and self.opts.language is None

    def task_tokens(self, language: str | None) -> list[int]:
        """The tokens after <|startoftranscript|>: language and task (multilingual), <|notimestamps|>."""
        out = [self.lang_ids[language or "en"], self.task_ids[self.opts.task]] if self.multilingual else []
        return out if self.opts.timestamps or self.no_timestamps is None else out + [self.no_timestamps]

    def sot_sequence(self, language: str | None) -> list[int]:
        """<|startoftranscript|> and, on multilingual models, the language and task tokens."""
        if not self.multilingual:
            return [self.sot]
        return [self.sot, self.lang_ids[language or "en"], self.task_ids[self.opts.task]]

    def prompt(self, language: str | None) -> list[int]:
        """The plain prompt (no previous text), as transformers builds it; use with ``params``."""
        return [self.sot, *self.task_tokens(language)]

    def prev_prompt(self, prev: list[int]) -> list[int]:
        """<|startofprev|> and the last ``max_prev`` previous tokens, or nothing."""
        return [self.vocab.sot_prev, *prev[-self.max_prev :]] if prev else []

    def window(
        self, language: str | None, prev: list[int], temperature: float, seed: int | None, probe: bool
    ) -> tuple[list[int], SamplingParams]:
        """(prompt ids, params) of one window request. ``probe``: end the prompt at
        <|startoftranscript|> and force the task tokens, to record P(<|nospeech|>) on the way."""
        task = self.task_tokens(language)
        head = self.prev_prompt(prev) + [self.sot]
        key = (language, temperature, seed, probe)
        params = self._cache.get(key)
        if params is None:
            forced = tuple(enumerate(task)) if probe else ()
            params = replace(
                self.params,
                temperature=temperature,
                seed=seed if temperature > 0 else None,
                num_beams=self.opts.beam_size if temperature == 0 else 1,
                forced_tokens=forced,
                begin_index=len(forced),
                record_first_step_probs=(self.vocab.no_speech,) if probe else (),
            )
            if len(self._cache) < 4096:
                self._cache[key] = params
        return (head if probe else head + task), params

    def probe_request(self, prev: list[int]) -> tuple[list[int], SamplingParams]:
        """A one-token request whose only purpose is P(<|nospeech|>) (beam search with forced
        task tokens cannot carry it)."""
        p = SamplingParams(max_new_tokens=1, record_first_step_probs=(self.vocab.no_speech,))
        return self.prev_prompt(prev) + [self.sot], p

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t < self.eot], skip_special_tokens=True)


def compression_ratio(text: str) -> float:
    """len(text) / len(zlib(text)) in UTF-8 bytes (openai-whisper's repetition measure)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass
class TimedPiece:
    """A part of a window's tokens with times in seconds from the window start."""

    start: float
    end: float
    tokens: list[int]  # including its timestamp tokens


@dataclass
class ParsedWindow:
    pieces: list[TimedPiece]  # closed segments (and, with ``keep_tail``, the unfinished last one)
    seek_frames: int  # mel frames consumed: where the next sequential window starts
    single_ending: bool  # the tokens end in one timestamp after text: the window was fully transcribed


def parse_timestamps(tokens: list[int], timestamp_begin: int, frames: int, keep_tail: bool) -> ParsedWindow:
    """Split a window's tokens (no EOT) at consecutive timestamp pairs, as openai-whisper does.

    ``frames``: mel frames of real audio in the window. A window ending in a single timestamp was
    fully transcribed; otherwise the text after the last pair is unfinished: sequential decoding
    drops it and seeks to the last pair (``keep_tail`` False), chunked decoding keeps it, ending
    at the window end. Without pairs the whole window is one segment, ending at its last timestamp
    when there is one (other than 0.00)."""
    is_ts = [t >= timestamp_begin for t in tokens]
    duration = frames / FRAMES_PER_SECOND
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    if not cuts:
        stamps = [t for t in tokens if t >= timestamp_begin]
        end = duration
        if stamps and stamps[-1] != timestamp_begin:
            end = (stamps[-1] - timestamp_begin) * TIME_PRECISION
        return ParsedWindow([TimedPiece(0.0, end, list(tokens))], frames, single_ending)
    if single_ending:
        cuts.append(len(tokens))
    pieces, last = [], 0
    for cut in cuts:
        part = tokens[last:cut]
        pieces.append(
            TimedPiece(
                (part[0] - timestamp_begin) * TIME_PRECISION,
                (part[-1] - timestamp_begin) * TIME_PRECISION,
                part,
            )
        )
        last = cut
    if single_ending:
        return ParsedWindow(pieces, frames, True)
    if not keep_tail:
        return ParsedWindow(pieces, (tokens[last - 1] - timestamp_begin) * INPUT_STRIDE, False)
    tail = tokens[last:]
    if any(t < timestamp_begin for t in tail):
        start = (tail[0] - timestamp_begin) * TIME_PRECISION if is_ts[last] else pieces[-1].end
        pieces.append(TimedPiece(start, max(duration, start), tail))
    return ParsedWindow(pieces, frames, False)


@dataclass
class WindowStats:
    """The quality of one decoding of a window (openai-whisper's DecodingResult fields)."""

    avg_logprob: float  # sum of token log-probabilities (with EOT) / (tokens + 1)
    compression_ratio: float
    no_speech_prob: float
    temperature: float

    def needs_fallback(self, opts: TranscribeOptions) -> bool:
        """Too repetitive or too unlikely, unless it looks like silence (then it is skipped instead)."""
        low_logprob = opts.logprob_threshold is not None and self.avg_logprob < opts.logprob_threshold
        if (
            low_logprob
            and opts.no_speech_threshold is not None
            and self.no_speech_prob > opts.no_speech_threshold
        ):
            return False
        too_repetitive = (
            opts.compression_ratio_threshold is not None
            and self.compression_ratio > opts.compression_ratio_threshold
        )
        return too_repetitive or low_logprob

    def is_silence(self, opts: TranscribeOptions) -> bool:
        """Skip the window: <|nospeech|> likely and (when set) the text unlikely."""
        if opts.no_speech_threshold is None or self.no_speech_prob <= opts.no_speech_threshold:
            return False
        return opts.logprob_threshold is None or self.avg_logprob <= opts.logprob_threshold


__all__ = [
    "DEFAULT_TEMPERATURES",
    "TranscribeOptions",
    "ParsedWindow",
    "TimedPiece",
    "WhisperPrompts",
    "WhisperVocab",
    "WindowStats",
    "compression_ratio",
    "parse_timestamps",
]
