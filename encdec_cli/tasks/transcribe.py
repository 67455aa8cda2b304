"""Transcription: audio items -> Whisper requests, results -> stitched, timed transcripts.

Two long-form modes (``TranscribeOptions.long_form``), both batching windows of many files in one
engine so the batch stays full:

- ``chunked`` (default): every file is cut into <= 30 s windows at quiet points
  (``encdec_cli.io.audio``) and all windows of all files are decoded independently, at once.
- ``sequential``: openai-whisper's algorithm. Each file is a stream of 30 s windows over its
  log-mel spectrogram; the next window starts at the last complete timestamp of the previous one
  (with word timestamps: at its last word's end, unless it ended in a single timestamp) and may be
  prompted with its text. A file has one window in flight at a time; many files run
  side by side, each submitting its next window as soon as the previous one is done (the request
  iterator yields None meanwhile).

Every window is decoded with timestamp tokens (unless ``timestamps`` is off), falls back to the
next temperature while it looks repetitive or unlikely, and is skipped when it looks silent
(``whisper_rules``). A background thread decodes audio ahead of the engine. Each finished file
becomes a ``Transcript`` handed to ``on_done``; a file that cannot be read becomes an error,
never a crash. ``on_audio(read, transcribed, started)`` reports progress: seconds of audio read
ahead (the work planned; negative for what a failed file leaves undone), seconds transcribed
(windows decoded or skipped as silent), and files begun.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from encdec_cli.engine import Engine, Request, Result
from encdec_cli.io.audio import load_audio
from encdec_cli.io.inputs import AudioItem, read_windows
from encdec_cli.io.records import Segment, Transcript
from encdec_cli.tasks.vad import Chunk, VoiceActivity
from encdec_cli.tasks.whisper_rules import (
    TranscribeOptions,
    WhisperPrompts,
    WindowStats,
    compression_ratio,
    parse_timestamps,
)
from encdec_cli.tasks.whisper_words import AlignJob, WordAligner, add_word_timestamps
from encdec_models.audio import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    file_log_mel,
)

PREFETCH_WINDOWS = 64  # decoded windows buffered ahead of the engine (64 x 30 s x 4 B = 123 MB max)
PREFETCH_FILES = 4  # sequential mode: whole-file spectrograms buffered ahead (1 h of audio = 115 MB)
EXTRA_FILES = 4  # sequential mode: files in flight beyond one per engine slot (covers turnaround)
ALIGN_BATCH = 16  # windows per word-alignment pass
SILENT_RMS = 10 ** (-60 / 20)  # a window whose every 10 ms frame is below -60 dBFS is skipped undecoded
LEADING_SILENCE_FRAMES = 500  # a window starting with >= 5 s of such silence starts later instead
SILENCE_MARGIN_FRAMES = 50  # ... 0.5 s before the sound (the first timestamp must be <= 1 s in)


def engine_window(max_num_seqs: int) -> int:
    """``EngineConfig.window`` for transcription: twice the batch keeps it full as audio decodes."""
    return max(2 * max_num_seqs, 16)


def frame_rms(audio: np.ndarray) -> np.ndarray:
    """[ceil(samples / HOP_LENGTH)] RMS of each mel frame's 10 ms of audio."""
    pad = -len(audio) % HOP_LENGTH
    x = np.pad(audio, (0, pad)).reshape(-1, HOP_LENGTH) if pad else audio.reshape(-1, HOP_LENGTH)
    return np.sqrt(np.mean(np.square(x, dtype=np.float32), axis=1))


@dataclass(eq=False)
class _File:
    n: int  # input order
    item: AudioItem
    language: str | None = None
    error: str | None = None
    n_chunks: int | None = None  # known once the whole file is read
    held: dict[int, tuple[int, Any]] = field(default_factory=dict)  # chunks read before the language is known
    open_streams: int = 0
    aligning: int = 0  # windows waiting for word timings
    done: dict[int, list[Segment]] = field(default_factory=dict)  # chunk index -> its segments
    duration: float = 0.0  # seconds read so far
    read: float = 0.0  # seconds of audio reported read (progress)
    transcribed: float = 0.0  # seconds of audio reported transcribed (progress)
    chunks: dict[int, Chunk] = field(default_factory=dict)  # --vad: each chunk's speech regions


@dataclass(eq=False)
class _Stream:
    """Consecutive windows over one stretch of audio: a chunk of a file (chunked mode) or the whole
    file (sequential mode). The next window starts where the last complete timestamp pair of the
    previous one ended, and may be prompted with the text decoded so far."""

    file: _File
    idx: int  # chunk index (0 in sequential mode)
    source: Any  # waveform [samples] (chunked) or log-mel [n_mels, frames] (sequential)
    rms: np.ndarray  # [frames] loudness of each 10 ms mel frame (finds silent windows)
    offset: float  # seconds from the file start to the source start
    total: int  # mel frames in the source
    seek: int = 0  # mel frames done
    tokens: list[int] = field(default_factory=list)  # decoded so far, timestamps included (prompt source)
    prompt_from: int = 0  # tokens[prompt_from:] prompt the next window
    segments: list[Segment] = field(default_factory=list)
    last_speech: float = 0.0  # end of the last segment with words (word timestamps' heuristics)


@dataclass(eq=False)
class _Window:
    """One window of a stream being decoded: a request per candidate at the current temperature."""

    stream: _Stream
    features: Any  # waveform slice (engine computes log-mel) or log-mel [n_mels, 3000]
    frames: int  # mel frames of real audio in the window (<= 3000)
    prev: list[int]  # previous-text tokens for the prompt (may be empty)
    attempt: int = 0  # index into the temperatures
    requests: list[Request] = field(default_factory=list)  # candidates at this temperature
    probe: Request | None = None  # a separate no-speech probe (beam search with forced task tokens)
    results: dict[int, Result] = field(default_factory=dict)  # by candidate index; the probe is -1
    no_speech_prob: float = 0.0

    @property
    def offset(self) -> float:
        return self.stream.offset + self.stream.seek / FRAMES_PER_SECOND


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


class Transcriber:
    """Runs many audio items through one engine; calls ``on_done(item, transcript, error)`` per item
    as soon as all its windows are decoded (error is a message or None)."""

    def __init__(self, engine: Engine, opts: TranscribeOptions | None = None):
        self.engine = engine
        self.opts = opts or TranscribeOptions()
        self.prompts = WhisperPrompts(engine, self.opts)
        self.opts = self.prompts.opts  # timestamps off for a model without timestamp tokens
        self.tokenizer = engine.tokenizer
        self.sequential = self.opts.long_form == "sequential"
        self.n_mels = getattr(engine.model, "n_mels", 80)
        self.max_files = max(engine.max_num_seqs // self.opts.beam_size, 1) + EXTRA_FILES
        # the no-speech probability rides on the first window request (its prompt then ends at
        # <|startoftranscript|>), except for beam search with forced task tokens: a probe request
        self.want_no_speech = self.opts.no_speech_threshold is not None
        self.probe_apart = self.opts.beam_size > 1 and bool(self.prompts.task_tokens("en"))
        self.aligner = WordAligner(engine) if self.opts.word_timestamps else None
        vad = self.opts.vad
        self.vad = None if vad is None or self.sequential else VoiceActivity(vad, engine.device)

    def run(
        self,
        items: Iterable[AudioItem],
        on_done: Callable[[AudioItem, Transcript | None, str | None], None],
        on_audio: Callable[[float, float, int], None] | None = None,
    ) -> None:
        audio_q: queue.Queue = queue.Queue(maxsize=PREFETCH_FILES if self.sequential else PREFETCH_WINDOWS)
        stop = threading.Event()
        reader = threading.Thread(target=self._reader, args=(items, audio_q, stop), daemon=True)
        reader.start()
        self.files: dict[int, _File] = {}  # in progress, by input order
        self.finished: set[int] = set()
        self.pending: deque[Request] = deque()
        # (job, stream, its segments, window start in seconds, frames to advance after the words or None)
        self.align_q: deque[tuple[AlignJob, _Stream, list[Segment], float, int | None]] = deque()
        self.on_done, self.on_audio = on_done, on_audio
        try:
            for result in self.engine.generate(self._requests(audio_q)):
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

        try:
            self._read_items(items, put)
        except BaseException as e:  # the input listing itself failed: end the job, never hang it
            put(("fatal", e))
            return
        put(("done",))

    def _read_items(self, items, put) -> None:
        for n, item in enumerate(items):
            count = 0
            try:
                if item.error:
                    raise ValueError(item.error)
                if self.sequential:
                    audio = load_audio(item.source, item.warnings)
                    if len(audio) == 0:
                        raise ValueError(f"{item.name} contains no audio")
                    if not put(("file", n, item, file_log_mel(audio, self.n_mels), frame_rms(audio))):
                        return
                    continue
                if self.vad is not None:  # windows of speech regions only
                    done_to = 0  # file samples accounted for (decoded or skipped as non-speech)
                    for chunk, audio in self.vad.stream(read_windows(item)):
                        skipped = (chunk.end - done_to - chunk.samples) / SAMPLE_RATE
                        if not put(("window", n, item, count, chunk.start, audio, chunk, skipped)):
                            return
                        count, done_to = count + 1, chunk.end
                    if self.vad.samples_read == 0:
                        raise ValueError(f"{item.name} contains no audio")
                    length = self.vad.samples_read
                    put(("end", n, item, count, (length - done_to) / SAMPLE_RATE, length / SAMPLE_RATE))
                    continue
                for start, audio in read_windows(item):
                    if not put(("window", n, item, count, start, audio)):
                        return
                    count += 1
                if count == 0:
                    raise ValueError(f"{item.name} contains no audio")
                put(("end", n, item, count))
            except Exception as e:  # every decoding failure is the item's error, never the job's
                put(("error", n, item, str(e) or type(e).__name__))

    # ---- requests -------------------------------------------------------------------------------
    def _requests(self, audio_q: queue.Queue) -> Iterator[Request | None]:
        done = False
        while True:
            if self.align_q and (len(self.align_q) >= ALIGN_BATCH or not self.pending):
                self._flush_alignments()
                continue
            if self.pending:
                yield self.pending.popleft()
                continue
            if done:
                if not self.files:
                    return
                yield None  # results still to come queue more requests (next windows, fallbacks)
                continue
            if self.sequential and len(self.files) >= self.max_files:
                yield None  # enough streams to fill the engine; take a new file when one finishes
                continue
            busy = not self.engine.idle
            try:
                msg = audio_q.get(timeout=0.001 if busy else 0.5)
            except queue.Empty:
                yield None
                continue
            if msg[0] == "done":
                done = True
            elif msg[0] == "fatal":
                raise msg[1]
            else:
                self._on_audio_msg(msg)

    def _on_audio_msg(self, msg) -> None:
        kind, n, item = msg[0], msg[1], msg[2]
        if n in self.finished:  # failed already (a window's error); the rest of it is not needed
            return
        f = self.files.get(n)
        if f is None:
            f = self.files[n] = _File(n, item, language=self.opts.language)
            self._progress(f, started=1)
        if kind == "error":
            f.error = msg[3]
            self._maybe_finish(f)
        elif kind == "end":
            f.n_chunks = msg[3]
            if len(msg) > 4:  # --vad: the silence after the last chunk, the file's length
                f.duration = msg[5]
                self._progress(f, read=msg[4], transcribed=msg[4])
            self._maybe_finish(f)
        elif kind == "file":  # sequential: the whole file's spectrogram is one stream
            mel, rms = msg[3], msg[4]
            f.n_chunks, f.duration = 1, mel.shape[1] / FRAMES_PER_SECOND
            self._progress(f, read=f.duration)
            self._arrived(f, 0, 0, (mel, rms))
        else:
            idx, start, audio = msg[3], msg[4], msg[5]
            if len(msg) > 6:  # --vad: speech regions joined; the silence before them is done
                chunk, skipped = msg[6], msg[7]
                f.chunks[idx] = chunk
                f.duration = max(f.duration, chunk.end / SAMPLE_RATE)
                self._progress(f, read=len(audio) / SAMPLE_RATE + skipped, transcribed=skipped)
            else:
                f.duration = max(f.duration, (start + len(audio)) / SAMPLE_RATE)
                self._progress(f, read=len(audio) / SAMPLE_RATE)
            self._arrived(f, idx, start, audio)

    def _progress(self, f: _File, read: float = 0.0, transcribed: float = 0.0, started: int = 0) -> None:
        f.read += read
        f.transcribed += transcribed
        if self.on_audio:
            self.on_audio(read, transcribed, started)

    def _arrived(self, f: _File, idx: int, start: int, source) -> None:
        """A chunk (or a whole file's spectrogram) is ready: start its stream, after language
        detection on the file's first window when the language is still unknown."""
        if self.prompts.needs_detection() and f.language is None:
            if not f.held and not f.done and not f.open_streams:
                feats = self._mel_window(source[0], 0)[0] if self.sequential else source[:N_SAMPLES]
                self.pending.append(
                    Request(feats, [self.prompts.sot], self.prompts.detect_params, ("lang", f))
                )
            f.held[idx] = (start, source)
            return
        if self.sequential:
            source, rms = source
        else:
            rms = frame_rms(source)
        st = _Stream(
            f, idx, source, rms, start / SAMPLE_RATE, len(rms), tokens=list(self.prompts.initial_prompt)
        )
        f.open_streams += 1
        self._next_window(st)

    @staticmethod
    def _mel_window(mel: torch.Tensor, seek: int) -> tuple[torch.Tensor, int]:
        """[n_mels, 3000] features from frame ``seek`` (zero-padded, as openai-whisper), and the
        number of real frames in them."""
        frames = min(N_FRAMES, mel.shape[1] - seek)
        feats = mel[:, seek : seek + frames]
        if frames < N_FRAMES:
            feats = torch.nn.functional.pad(feats, (0, N_FRAMES - frames))
        return feats.contiguous(), frames

    def _next_window(self, st: _Stream) -> None:
        """Submit the stream's next window (silent ones are skipped undecoded, when the no-speech
        guard is on), or close the stream when it is done."""
        f = st.file
        while st.seek < st.total and not f.error:
            frames = min(N_FRAMES, st.total - st.seek)
            loud = st.rms[st.seek : st.seek + frames] >= SILENT_RMS
            skip = frames if not loud.any() else int(loud.argmax()) - SILENCE_MARGIN_FRAMES
            if self.want_no_speech and (
                skip == frames or skip >= LEADING_SILENCE_FRAMES - SILENCE_MARGIN_FRAMES
            ):
                st.seek += skip  # a silent window, or a long silence before the speech in it
                self._progress(f, transcribed=skip / FRAMES_PER_SECOND)
                continue
            if self.sequential:
                feats = self._mel_window(st.source, st.seek)[0]
            else:  # the engine pads a waveform to 30 s and computes its log-mel
                feats = st.source[st.seek * HOP_LENGTH : st.seek * HOP_LENGTH + N_SAMPLES]
            self._submit(_Window(st, feats, frames, st.tokens[st.prompt_from :]))
            return
        f.open_streams -= 1
        f.done[st.idx] = st.segments
        self._maybe_finish(f)

    # ---- one window: candidates, fallback --------------------------------------------------------
    def _submit(self, w: _Window) -> None:
        opts, st = self.opts, w.stream
        temperature = opts.temperatures[w.attempt]
        first = w.attempt == 0 and self.want_no_speech  # P(<|nospeech|>) does not change on fallback
        w.requests, w.results, w.probe = [], {}, None
        for k in range(1 if temperature == 0 else opts.best_of):
            seed = (
                _seed(opts.seed, st.file.item.key, st.idx, st.seek, w.attempt, k) if temperature > 0 else None
            )
            probe = first and not self.probe_apart
            prompt, params = self.prompts.window(st.file.language, w.prev, temperature, seed, probe)
            w.requests.append(Request(w.features, prompt, params, ("win", w, k)))
        if first and self.probe_apart:
            prompt, params = self.prompts.probe_request(w.prev)
            w.probe = Request(w.features, prompt, params, ("win", w, -1))
            self.pending.append(w.probe)
        self.pending.extend(w.requests)

    def _on_window_result(self, w: _Window, k: int, r: Result) -> None:
        w.results[k] = r
        if len(w.results) < len(w.requests) + (w.probe is not None):
            return
        errors = [x.error for x in w.results.values() if x.error]
        if errors:
            w.stream.file.error = w.stream.file.error or errors[0]
            self._next_window(w.stream)
            return
        no_speech = self.prompts.vocab.no_speech
        for r in w.results.values():
            if no_speech in r.first_step_probs:
                w.no_speech_prob = r.first_step_probs[no_speech]
        _, tokens, avg_logprob = max(
            (self._candidate(req, w.results[k]) for k, req in enumerate(w.requests)), key=lambda c: c[0]
        )
        temperature = self.opts.temperatures[w.attempt]
        stats = WindowStats(
            avg_logprob, compression_ratio(self.prompts.text(tokens)), w.no_speech_prob, temperature
        )
        if stats.needs_fallback(self.opts) and w.attempt + 1 < len(self.opts.temperatures):
            w.attempt += 1
            self._submit(w)
            return
        self._window_done(w, tokens, stats)

    @staticmethod
    def _candidate(req: Request, r: Result) -> tuple[float, list[int], float]:
        """(rank score, free tokens, avg logprob) of one decoding; sampled candidates rank by
        sum logprob / length (openai-whisper's MaximumLikelihoodRanker)."""
        begin = req.params.begin_index
        tokens = r.token_ids[begin:]
        if req.params.num_beams > 1:
            avg = r.completions[0].score  # sum of log-probs (with EOT) / (tokens + 1): length_penalty 1
            return avg, tokens, avg
        total = sum((r.logprobs or [])[begin:]) + (r.stop_logprob or 0.0)
        return total / max(len(tokens), 1), tokens, total / (len(tokens) + 1)

    def _window_done(self, w: _Window, tokens: list[int], stats: WindowStats) -> None:
        """Stitch the window's segments into its stream and move the stream on (openai-whisper:
        to the last complete timestamp pair, or past the window)."""
        st, opts = w.stream, self.opts
        single_ending = False  # the window ended in a single timestamp (fully transcribed)
        if stats.is_silence(opts):
            frames, pieces = w.frames, []
        elif opts.timestamps:
            parsed = parse_timestamps(tokens, self.prompts.vocab.timestamp_begin, w.frames, keep_tail=False)
            frames, pieces = parsed.seek_frames, [(p.start, p.end, p.tokens) for p in parsed.pieces]
            single_ending = parsed.single_ending
        else:
            frames, pieces = w.frames, [(0.0, w.frames / FRAMES_PER_SECOND, tokens)]
        duration, offset = w.frames / FRAMES_PER_SECOND, w.offset
        kept, new = [], []
        for start, end, toks in pieces:
            text = self.prompts.text(toks)
            if not text.strip() or start == end:  # openai-whisper clears these
                continue
            kept += toks
            if start >= duration:  # timed after the end of the audio: a hallucination (openai-whisper
                continue  # and transformers keep it, and so does the prompt of the next window)
            new.append(
                Segment(
                    id=0,
                    start=round(offset + min(start, duration), 3),
                    end=round(offset + min(end, duration), 3),
                    text=text,
                    tokens=[t for t in toks if t < self.prompts.eot],
                    avg_logprob=stats.avg_logprob,
                    compression_ratio=stats.compression_ratio,
                    no_speech_prob=stats.no_speech_prob,
                    temperature=stats.temperature,
                    seek=round(offset * FRAMES_PER_SECOND),
                )
            )
        st.segments += new
        if pieces:
            st.tokens += kept
            if not opts.condition_on_previous_text or stats.temperature > 0.5:
                st.prompt_from = len(st.tokens)  # a high temperature's text is no reliable prompt
        # openai-whisper with word timestamps: unless the window ended in a single timestamp, the
        # next sequential window starts at the last word's end, known once the words are aligned
        after_words = self.sequential and self.aligner is not None and bool(new) and not single_ending
        if new and self.aligner is not None:  # word timings later, in a batch with other windows
            st.file.aligning += 1
            text = [t for seg in new for t in seg.tokens]
            language = st.file.language or "en"
            job = AlignJob(w.features, self.prompts.sot_sequence(language), text, w.frames, language)
            self.align_q.append((job, st, new, offset, frames if after_words else None))
        if not after_words:
            self._advance(st, frames)

    def _advance(self, st: _Stream, frames: int) -> None:
        """Move the stream ``frames`` mel frames on and submit its next window."""
        frames = min(frames, st.total - st.seek)
        st.seek += frames
        self._progress(st.file, transcribed=frames / FRAMES_PER_SECOND)
        self._next_window(st)

    def _flush_alignments(self) -> None:
        """Word timings for up to ALIGN_BATCH finished windows (one teacher-forced pass)."""
        batch = [self.align_q.popleft() for _ in range(min(ALIGN_BATCH, len(self.align_q)))]
        timings = self.aligner.align([job for job, *_ in batch])
        for (_, st, segments, offset, frames), words in zip(batch, timings):
            st.last_speech = add_word_timestamps(segments, words, offset, st.last_speech)
            st.file.aligning -= 1
            if frames is not None:  # the stream waits: its next window starts at the last word's end
                end = next((wd.end for s in reversed(segments) for wd in reversed(s.words)), segments[-1].end)
                if end > offset:  # so the next window's words never overlap this one's
                    frames = max(round((end - st.offset) * FRAMES_PER_SECOND) - st.seek, 1)
                self._advance(st, frames)
            self._maybe_finish(st.file)

    # ---- results --------------------------------------------------------------------------------
    def _on_result(self, r: Result) -> None:
        if r.request_id[0] == "win":
            _, w, k = r.request_id
            self._on_window_result(w, k, r)
            return
        f = r.request_id[1]  # language detection
        f.language = self.prompts.id_to_lang.get(r.token_ids[0] if r.token_ids else -1, "en")
        if r.error:
            f.error = f.error or r.error
        for idx in sorted(f.held):
            self._arrived(f, idx, *f.held.pop(idx))
        self._maybe_finish(f)

    def _maybe_finish(self, f: _File) -> None:
        if f.n not in self.files or f.open_streams or f.aligning:
            return
        if f.error is None and (f.n_chunks is None or f.held or len(f.done) < f.n_chunks):
            return
        del self.files[f.n]
        self.finished.add(f.n)
        if f.error:
            f.held.clear()
            self._progress(f, read=-(f.read - f.transcribed))  # planned work that will not be done
            self.on_done(f.item, None, f.error)
            return
        for i, chunk in f.chunks.items():  # --vad: times in joined speech -> times in the file
            _to_file_times(f.done[i], chunk, chunk.start / SAMPLE_RATE)
        segments = [s for i in range(f.n_chunks) for s in f.done[i]]
        for i, s in enumerate(segments):
            s.id = i
        language = f.language or ("en" if not self.prompts.multilingual else "")
        text = "".join(s.text for s in segments)
        self.on_done(f.item, Transcript(text, segments, language, f.duration, list(f.item.warnings)), None)


def _to_file_times(segments: list[Segment], chunk: Chunk, offset: float) -> None:
    """Segment and word times of a --vad chunk (``offset`` + seconds into its joined speech) moved
    onto the file's timeline."""
    for s in segments:
        s.start = round(chunk.to_file(s.start - offset), 3)
        s.end = round(chunk.to_file(s.end - offset, end=True), 3)
        for w in s.words or ():
            w.start = round(chunk.to_file(w.start - offset), 3)
            w.end = round(chunk.to_file(w.end - offset, end=True), 3)


__all__ = ["Transcriber", "TranscribeOptions", "WhisperPrompts"]
