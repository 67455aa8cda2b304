"""Word-level timestamps, as openai-whisper computes them (``whisper/timing.py``).

The engine's attention kernels return no attention weights, so each window's final text tokens
are run once more, teacher-forced, through the model's plain-PyTorch decoder pass
(``Whisper.teacher_forced``) that keeps the cross-attention of the model's alignment heads. The
window's encoder output comes from the engine's prefix cache when it is still there (absorbed
cross-attention, the GPU default for Whisper), else from one more encoder run. Per
window: softmax of the heads' cross-attention logits over the real audio frames, normalised over
tokens, median filtered along time, averaged over heads; dynamic time warping then maps tokens to
encoder frames (20 ms each), and the token boundaries of each word give its start and end.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from encdec_cli.io.records import Segment, Word

TOKENS_PER_SECOND = 50  # encoder positions per second (20 ms each)
MEDFILT_WIDTH = 7  # median filter over time, in encoder positions
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}  # split into words by character


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float  # seconds from the window start
    end: float
    probability: float


@dataclass
class AlignJob:
    """One window to align: its encoder input, the decoder prefix before <|notimestamps|>
    (<|startoftranscript|>, language, task), its text tokens (all its kept segments), the real
    audio frames in it and the language (how words are split)."""

    features: object
    sot_sequence: list[int]
    text_tokens: list[int]
    num_frames: int
    language: str


def alignment_heads(engine) -> list[tuple[int, int]]:
    """(layer, head) pairs from the generation config (the CTranslate2 folder's ``alignment_heads``),
    else openai-whisper's default: every head of the second half of the decoder layers."""
    heads = getattr(engine.loaded.generation_config, "alignment_heads", None)
    if heads:
        return [(int(layer), int(head)) for layer, head in heads]
    layers = engine.model.decoder_layers()
    n_heads = engine.model.cache_spec.num_heads
    return [(li, h) for li in range(len(layers) // 2, len(layers)) for h in range(n_heads)]


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window of the last dim, reflect-padded (openai-whisper's)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    lead = x.shape[:-1]
    y = F.pad(x.reshape(1, -1, x.shape[-1]), (pad, pad), mode="reflect")
    return y.unfold(-1, width, 1).sort()[0][..., pad].reshape(*lead, -1)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """openai-whisper's dynamic time warping over ``cost`` [N, M] (same tie-breaking), computed one
    anti-diagonal at a time; returns the path's (row indices, column indices)."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    acc[0, 0] = 0
    x = cost.astype(np.float32)
    for d in range(2, n + m + 1):  # cells (i, j) with i + j = d, 1 <= i <= n, 1 <= j <= m
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        c0, c1, c2 = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        acc[i, j] = x[i - 1, j - 1] + np.choose(t, [c0, c1, c2])
        trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    path = np.array(path[::-1])
    return path[:, 0], path[:, 1]


class WordAligner:
    """Teacher-forced decoder passes that keep the alignment heads' cross-attention."""

    def __init__(self, engine):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.eot = engine.tokenizer.get_vocab()["<|endoftext|>"]
        self.no_timestamps = engine.tokenizer.get_vocab().get("<|notimestamps|>")
        if self.no_timestamps is None:
            raise ValueError("--word-timestamps needs a tokenizer with <|notimestamps|>; this one has none")
        self.encoder_runs_saved = 0  # windows whose encoder output came from the prefix cache
        self.heads: dict[int, list[int]] = {}
        for layer, head in alignment_heads(engine):
            self.heads.setdefault(layer, []).append(head)

    @torch.inference_mode()
    def align(self, jobs: list[AlignJob]) -> list[list[WordTiming]]:
        """Word timings of each job's text tokens (seconds from its window start)."""
        model = self.model
        dev = next(model.parameters()).device
        seqs = [[*j.sot_sequence, self.no_timestamps, *j.text_tokens, self.eot] for j in jobs]
        width = max(len(s) for s in seqs)
        tokens = torch.tensor([s + [self.eot] * (width - len(s)) for s in seqs], device=dev)  # [B, T]
        enc = self._encoder_outputs(jobs, dev)  # [B, S, d]
        logits, weights = model.teacher_forced(tokens, enc, self.heads)  # [B, T, V], [B, n, T, S]
        out = []
        for b, (job, seq) in enumerate(zip(jobs, seqs)):
            prefix, n_text = len(job.sot_sequence), len(job.text_tokens)
            if n_text == 0:
                out.append([])
                continue
            probs = logits[b, prefix : prefix + n_text, : self.eot].float().softmax(-1)
            text_probs = probs[torch.arange(n_text, device=dev), torch.tensor(job.text_tokens, device=dev)]
            w = weights[b, :, : len(seq), : job.num_frames // 2].float().softmax(-1)  # [heads, T, S']
            std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
            w = median_filter((w - mean) / std, MEDFILT_WIDTH)
            matrix = w.mean(0)[prefix:-1]  # [n_text + 1, S']: the steps predicting each text token, EOT
            out.append(self._words(job, matrix.cpu().numpy(), text_probs.tolist()))
        return out

    def _encoder_outputs(self, jobs: list[AlignJob], dev) -> torch.Tensor:
        """[B, S, d]: each window's encoder output, from the engine's prefix cache where it is
        still there (absorbed cross-attention keeps the encoder output itself), else one encoder
        run over the others."""
        rows = [self.engine.cached_encoder_output(j.features) for j in jobs]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            model = self.model
            enc = model.encode(model.prepare_encoder_batch([jobs[i].features for i in missing], dev))
            for i, e in zip(missing, enc.view(len(missing), -1, enc.shape[-1])):
                rows[i] = e
        self.encoder_runs_saved += len(jobs) - len(missing)
        return torch.stack(rows)

    def _words(self, job: AlignJob, matrix: np.ndarray, text_probs: list[float]) -> list[WordTiming]:
        text_idx, time_idx = dtw(-matrix)
        words, word_tokens = self.split_words(job.text_tokens + [self.eot], job.language)
        if len(word_tokens) <= 1:
            return []
        bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
        jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
        jump_times = time_idx[jumps] / TOKENS_PER_SECOND
        starts, ends = jump_times[bounds[:-1]], jump_times[bounds[1:]]
        probs = [float(np.mean(text_probs[i:j])) for i, j in zip(bounds[:-1], bounds[1:])]
        return [
            WordTiming(w, t, float(s), float(e), p)
            for w, t, s, e, p in zip(words, word_tokens, starts, ends, probs)
        ]

    # ---- words from tokens (openai-whisper's tokenizer.split_to_word_tokens) ----------------------
    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def split_words(self, tokens: list[int], language: str) -> tuple[list[str], list[list[int]]]:
        subwords, subword_tokens = self._split_unicode(tokens)
        if language in NO_SPACE_LANGUAGES:
            return subwords, subword_tokens
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for sub, toks in zip(subwords, subword_tokens):
            special = toks[0] >= self.eot
            if special or sub.startswith(" ") or sub.strip() in string.punctuation or not words:
                words.append(sub)
                word_tokens.append(list(toks))
            else:
                words[-1] += sub
                word_tokens[-1].extend(toks)
        return words, word_tokens

    def _split_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        full = self._decode(tokens)
        words, word_tokens, current, offset = [], [], [], 0
        for t in tokens:
            current.append(t)
            decoded = self._decode(current)
            if "\ufffd" not in decoded or full[offset + decoded.index("\ufffd")] == "\ufffd":
                words.append(decoded)
                word_tokens.append(current)
                current = []
                offset += len(decoded)
        return words, word_tokens


def merge_punctuations(alignment: list[WordTiming]) -> None:
    """Attach leading punctuation to the next word and trailing punctuation to the previous one."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        prev, nxt = alignment[i], alignment[j]
        if prev.word.startswith(" ") and prev.word.strip() in PREPEND_PUNCTUATIONS:
            nxt.word, nxt.tokens = prev.word + nxt.word, prev.tokens + nxt.tokens
            prev.word, prev.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        prev, nxt = alignment[i], alignment[j]
        if not prev.word.endswith(" ") and nxt.word in APPEND_PUNCTUATIONS:
            prev.word, prev.tokens = prev.word + nxt.word, prev.tokens + nxt.tokens
            nxt.word, nxt.tokens = "", []
        else:
            i = j
        j += 1


def add_word_timestamps(
    segments: list[Segment], alignment: list[WordTiming], window_start: float, last_speech: float
) -> float:
    """Give ``segments`` (one window's, in order) their words, and move their start/end to the speech
    (openai-whisper's ``add_word_timestamps``, with its long-word heuristics): a segment with words
    runs from its first word's start to its last word's end. Returns the new last-speech time
    (seconds from the file start)."""
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):  # words at sentence ends are not longer than twice the median
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > longest:
                if alignment[i].word in SENTENCE_END_MARKS:
                    alignment[i].end = alignment[i].start + longest
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    alignment[i].start = alignment[i].end - longest
    merge_punctuations(alignment)
    k = 0
    for seg in segments:
        saved, words = 0, []
        while k < len(alignment) and saved < len(seg.tokens):
            t = alignment[k]
            if t.word:
                words.append(
                    Word(
                        t.word,
                        round(window_start + t.start, 2),
                        round(window_start + t.end, 2),
                        t.probability,
                    )
                )
            saved += len(t.tokens)
            k += 1
        if words:
            first, last = words[0], words[-1]
            # the first word after a pause is not longer than twice the median either
            if first.end - last_speech > median * 4 and (
                first.end - first.start > longest
                or (len(words) > 1 and words[1].end - first.start > longest * 2)
            ):
                if len(words) > 1 and words[1].end - words[1].start > longest:
                    boundary = max(words[1].end / 2, words[1].end - longest)
                    first.end = words[1].start = boundary
                first.start = max(0.0, first.end - longest)
            # prefer the segment's own start/end when the first/last word runs too long
            if seg.start < first.end and seg.start - 0.5 > first.start:
                first.start = max(0.0, min(first.end - median, seg.start))
            if seg.end > last.start and seg.end + 0.5 < last.end:
                last.end = max(last.start + median, seg.end)
            # the segment spans its words: openai-whisper keeps the segment's own time in the two
            # cases above, which can leave the first/last word up to `median` outside its segment
            seg.start, seg.end = first.start, last.end
            last_speech = seg.end
        seg.words = words
    return last_speech


__all__ = ["AlignJob", "WordAligner", "WordTiming", "add_word_timestamps", "alignment_heads", "dtw"]
