"""Transcription with speech models that have no Whisper decoding rules (Moonshine).

Each file is cut into <= 30 s chunks at quiet points, exactly as the chunked long-form mode cuts
Whisper's windows (``encdec_cli.io.inputs.read_windows``); every chunk is one request of its own
length (the model reads the raw waveform: no 30 s padding, no log-mel), all chunks of all files
batched together. The model has no timestamp tokens, so each chunk is one segment timed by the
chunk's boundaries. The decoder prompt and stop token come from the model folder's generation
config; a chunk may produce at most ``TOKENS_PER_SECOND`` tokens per second of audio (Moonshine's
own rule against runaway repetition) and at most ``--max-new-tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from encdec_cli.engine import Engine, Request, Result, SamplingParams
from encdec_cli.io.inputs import AudioItem, read_windows
from encdec_cli.io.records import Segment, Transcript
from encdec_cli.tasks.generation import decoder_prompt
from encdec_cli.tasks.whisper_rules import TranscribeOptions, compression_ratio
from encdec_models.audio import SAMPLE_RATE

TOKENS_PER_SECOND = 6.5


def max_new_tokens(num_samples: int, prompt_len: int, max_target: int, cap: int | None = None) -> int:
    """Most new tokens for a chunk of ``num_samples``: 6.5 a second, within the decoder's room."""
    n = max(1, math.ceil(num_samples / SAMPLE_RATE * TOKENS_PER_SECOND))
    n = min(n, max_target - prompt_len)
    return min(n, cap) if cap else n


@dataclass
class _File:
    item: AudioItem
    chunks: dict[int, tuple[int, int]] = field(default_factory=dict)  # idx -> (start, samples)
    results: dict[int, Result] = field(default_factory=dict)
    n_chunks: int | None = None  # known once the file is read to its end
    error: str | None = None


class ChunkTranscriber:
    """``Transcriber``'s interface (``run(items, on_done, on_audio)``) for chunk-timed models."""

    def __init__(self, engine: Engine, opts: TranscribeOptions | None = None):
        self.engine = engine
        self.opts = opts = opts or TranscribeOptions()
        if opts.word_timestamps:
            raise ValueError("--word-timestamps needs a Whisper model (its alignment heads)")
        if opts.task == "translate" or opts.language not in (None, "en"):
            raise ValueError("this speech model transcribes English only: drop --task translate / --language")
        loaded = engine.loaded
        self.prompt = decoder_prompt(loaded.generation_config, loaded.config)
        eos = loaded.generation_config.eos_token_id
        self.stop = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        self.tokenizer = engine.tokenizer
        self.model = engine.model

    def _params(self, num_samples: int) -> SamplingParams:
        room = self.model.max_target_positions
        n = max_new_tokens(num_samples, len(self.prompt), room, self.opts.max_new_tokens)
        return SamplingParams(max_new_tokens=n, stop_token_ids=self.stop, logprobs=True)

    def run(
        self,
        items: Iterable[AudioItem],
        on_done: Callable[[AudioItem, Transcript | None, str | None], None],
        on_audio: Callable[[float, float, int], None] | None = None,
    ) -> None:
        files: dict[int, _File] = {}

        def report(read: float = 0.0, done: float = 0.0, started: int = 0) -> None:
            if on_audio:
                on_audio(read, done, started)

        def finish(n: int) -> None:
            f = files[n]
            if f.error is None and (f.n_chunks is None or len(f.results) < f.n_chunks):
                return
            del files[n]
            errors = [r.error for r in f.results.values() if r.error]
            if f.error or errors:
                on_done(f.item, None, f.error or errors[0])
                return
            on_done(f.item, self._transcript(f), None)

        def requests() -> Iterator[Request]:
            for n, item in enumerate(items):
                f = files[n] = _File(item)
                report(started=1)
                idx = 0
                try:
                    if item.error:
                        raise ValueError(item.error)
                    read = 0
                    for start, audio in read_windows(item):
                        read += len(audio)
                        report(read=len(audio) / SAMPLE_RATE)
                        try:
                            self.model.encoder_length(audio)
                        except ValueError:  # a sliver too short for the model (at the end): nothing said
                            report(done=len(audio) / SAMPLE_RATE)
                            continue
                        f.chunks[idx] = (start, len(audio))
                        yield Request(audio, list(self.prompt), self._params(len(audio)), (n, idx))
                        idx += 1
                    if not f.chunks and read == 0:
                        raise ValueError(f"{item.name} contains no audio")
                except Exception as e:  # the file cannot be read: its error, never the job's
                    f.error = str(e) or type(e).__name__
                f.n_chunks = idx
                finish(n)

        for r in self.engine.generate(requests()):
            n, idx = r.request_id
            f = files[n]
            f.results[idx] = r
            report(done=f.chunks[idx][1] / SAMPLE_RATE)
            finish(n)

    def _transcript(self, f: _File) -> Transcript:
        segments = []
        duration = 0.0
        for idx in sorted(f.chunks):
            start, samples = f.chunks[idx]
            duration = max(duration, (start + samples) / SAMPLE_RATE)
            r = f.results[idx]
            tokens = list(r.token_ids)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if not text.strip():
                continue
            text = " " + text.strip()
            logprobs = r.logprobs or []
            segments.append(
                Segment(
                    id=len(segments),
                    start=round(start / SAMPLE_RATE, 3),
                    end=round((start + samples) / SAMPLE_RATE, 3),
                    text=text,
                    tokens=tokens,
                    avg_logprob=sum(logprobs) / max(len(logprobs), 1),
                    compression_ratio=compression_ratio(text),
                )
            )
        return Transcript(
            text="".join(s.text for s in segments).strip(),
            segments=segments,
            language="en",
            duration=duration,
            warnings=list(f.item.warnings),
        )
