"""Transcription: audio items -> Whisper requests, results -> stitched transcripts.

Every file is cut into <= 30 s windows at quiet points (``encdec_cli.io.audio``); the windows of
all files stream through one engine together, so the GPU batch stays full across files. A
background thread decodes audio ahead of the engine. Each finished file becomes a
``Transcript`` handed to ``on_done``; a file that cannot be read becomes an error, never a crash.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encdec_cli.engine import Engine, Request, Result, SamplingParams
from encdec_cli.io.audio import iter_audio_windows, load_audio, split_on_silence
from encdec_cli.io.records import Segment, Transcript
from models.audio import SAMPLE_RATE

PREFETCH_WINDOWS = 64  # decoded windows buffered ahead of the engine (64 x 30 s x 4 B = 123 MB max)


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None  # e.g. "en"; None: English-only models use English, others detect
    task: str = "transcribe"  # "transcribe" or "translate" (to English; multilingual models only)
    max_new_tokens: int | None = None  # per 30 s window; None: the model's limit

    def __post_init__(self):
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"--task must be transcribe or translate, got {self.task!r}")


@dataclass
class AudioItem:
    """One input: a path or in-memory file bytes, with a name for outputs and messages."""

    key: str  # identity for the manifest
    name: str  # shown to the user; relative output path without extension
    source: Any  # str path or bytes


@dataclass
class _FileState:
    item: AudioItem
    windows: dict[int, tuple[int, int]] = field(default_factory=dict)  # idx -> (start, end) samples
    results: dict[int, Result] = field(default_factory=dict)
    audio: dict[int, np.ndarray] = field(default_factory=dict)  # held until the language is known
    n_windows: int | None = None  # known once the whole file is read
    language: str | None = None
    error: str | None = None


class WhisperPrompts:
    """Decoder prompts and decoding rules for a Whisper model and tokenizer."""

    def __init__(self, engine: Engine, opts: TranscribeOptions):
        tok, gen = engine.tokenizer, engine.loaded.generation_config
        vocab = tok.get_vocab()
        self.sot = vocab["<|startoftranscript|>"]
        self.eot = vocab["<|endoftext|>"]
        self.no_timestamps = vocab["<|notimestamps|>"]
        self.multilingual = bool(
            getattr(gen, "is_multilingual", False)
            or "<|translate|>" in vocab
            and engine.model.vocab_size >= 51865
        )
        self.lang_ids = {t[2:-2]: i for t, i in (getattr(gen, "lang_to_id", None) or {}).items()}
        self.task_ids = {"transcribe": vocab.get("<|transcribe|>"), "translate": vocab.get("<|translate|>")}
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
        room = engine.model.max_target_positions // 2
        self.params = SamplingParams(
            max_new_tokens=min(opts.max_new_tokens or room, room),
            stop_token_ids=(self.eot,),
            suppress_tokens=tuple(gen.suppress_tokens or ()),
            begin_suppress_tokens=tuple(gen.begin_suppress_tokens or ()),
            logprobs=True,
        )
        self.detect_params = SamplingParams(
            max_new_tokens=1, allowed_tokens=tuple(sorted(self.lang_ids.values()))
        )
        self.id_to_lang = {i: lang for lang, i in self.lang_ids.items()}

    def needs_detection(self) -> bool:
        return self.multilingual and self.opts.language is None

    def prompt(self, language: str | None) -> list[int]:
        if not self.multilingual:
            return [self.sot, self.no_timestamps]
        return [self.sot, self.lang_ids[language or "en"], self.task_ids[self.opts.task], self.no_timestamps]


def _read_windows(item: AudioItem) -> Iterator[tuple[int, np.ndarray]]:
    if isinstance(item.source, (bytes, bytearray, memoryview)):
        audio = load_audio(item.source)
        for s, e in split_on_silence(audio):
            yield s, audio[s:e]
    else:
        yield from iter_audio_windows(item.source)


class Transcriber:
    """Runs many audio items through one engine; calls ``on_done(item, transcript, error)`` per item
    as soon as all its windows are decoded (error is a message or None)."""

    def __init__(self, engine: Engine, opts: TranscribeOptions | None = None):
        self.engine = engine
        self.opts = opts or TranscribeOptions()
        self.prompts = WhisperPrompts(engine, self.opts)
        self.tokenizer = engine.tokenizer

    def run(
        self,
        items: Iterable[AudioItem],
        on_done: Callable[[AudioItem, Transcript | None, str | None], None],
        on_audio: Callable[[float], None] | None = None,
    ) -> None:
        audio_q: queue.Queue = queue.Queue(maxsize=PREFETCH_WINDOWS)
        stop = threading.Event()
        reader = threading.Thread(target=self._reader, args=(items, audio_q, stop), daemon=True)
        reader.start()
        self.files: dict[int, _FileState] = {}
        self.pending: deque[Request] = deque()
        self.on_done, self.on_audio = on_done, on_audio
        try:
            for result in self.engine.generate(self._requests(audio_q, reader)):
                self._on_result(result)
        finally:
            stop.set()

    # ---- reading thread -------------------------------------------------------------------------
    def _reader(self, items, audio_q: queue.Queue, stop: threading.Event) -> None:
        def put(msg):
            while not stop.is_set():
                try:
                    audio_q.put(msg, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        for n, item in enumerate(items):
            count = 0
            try:
                for start, audio in _read_windows(item):
                    if not put(("window", n, item, count, start, audio)):
                        return
                    count += 1
                if count == 0:
                    raise ValueError(f"{item.name} contains no audio")
                put(("end", n, item, count))
            except Exception as e:  # every decoding failure is the item's error, never the job's
                put(("error", n, item, str(e) or type(e).__name__))
        put(("done",))

    # ---- requests -------------------------------------------------------------------------------
    def _requests(self, audio_q: queue.Queue, reader: threading.Thread) -> Iterator[Request | None]:
        done = False
        while True:
            if self.pending:
                yield self.pending.popleft()
                continue
            if done:
                if not any(f.n_windows is None or len(f.results) < f.n_windows for f in self.files.values()):
                    return
                yield None  # results still to come may queue more requests (held windows)
                continue
            busy = not self.engine.scheduler.idle
            try:
                msg = audio_q.get(timeout=0.001 if busy else 0.5)
            except queue.Empty:
                yield None
                continue
            if msg[0] == "done":
                done = True
            else:
                self._on_audio_msg(msg)

    def _on_audio_msg(self, msg) -> None:
        kind, n, item = msg[0], msg[1], msg[2]
        f = self.files.setdefault(n, _FileState(item, language=self.opts.language))
        if kind == "error":
            f.error, f.n_windows = msg[3], len(f.windows)  # wait for windows in flight
            self._maybe_finish(n)
        elif kind == "end":
            f.n_windows = msg[3]
            self._maybe_finish(n)
        else:
            idx, start, audio = msg[3], msg[4], msg[5]
            f.windows[idx] = (start, start + len(audio))
            if self.on_audio:
                self.on_audio(len(audio) / SAMPLE_RATE)
            if self.prompts.needs_detection() and f.language is None:
                if idx == 0:
                    self.pending.append(
                        Request(audio, [self.prompts.sot], self.prompts.detect_params, (n, "lang"))
                    )
                f.audio[idx] = audio
            else:
                self._submit(n, idx, audio)

    def _submit(self, n: int, idx: int, audio: np.ndarray) -> None:
        f = self.files[n]
        self.pending.append(Request(audio, self.prompts.prompt(f.language), self.prompts.params, (n, idx)))

    # ---- results --------------------------------------------------------------------------------
    def _on_result(self, r: Result) -> None:
        n, idx = r.request_id
        f = self.files[n]
        if idx == "lang":
            f.language = self.prompts.id_to_lang.get(r.token_ids[0] if r.token_ids else -1, "en")
            for i in sorted(f.audio):
                self._submit(n, i, f.audio.pop(i))
            return
        if r.error and f.error is None:
            f.error = r.error
        f.results[idx] = r
        self._maybe_finish(n)

    def _maybe_finish(self, n: int) -> None:
        f = self.files[n]
        if f.n_windows is None or len(f.results) < f.n_windows or f.audio:
            return
        del self.files[n]
        if f.error:
            self.on_done(f.item, None, f.error)
            return
        segments = []
        for i in range(f.n_windows):
            r, (start, end) = f.results[i], f.windows[i]
            text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
            if not text.strip():
                continue
            lps = r.logprobs or [0.0]
            segments.append(
                Segment(
                    id=len(segments),
                    start=start / SAMPLE_RATE,
                    end=end / SAMPLE_RATE,
                    text=text,
                    tokens=list(r.token_ids),
                    avg_logprob=float(np.mean(lps)),
                )
            )
        duration = max((e for _, e in f.windows.values()), default=0) / SAMPLE_RATE
        language = f.language or ("en" if not self.prompts.multilingual else "")
        self.on_done(
            f.item, Transcript("".join(s.text for s in segments), segments, language, duration), None
        )
