"""Requests, sampling options, results, and the engine's per-sequence state (no tensors)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def packed_rows(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows packed sequence after sequence, counts[b] rows for sequence b (a step's inputs or its
    verification rows) -> (each sequence's first row, each row's sequence, each row's index within
    its sequence)."""
    n = len(counts)
    first = np.zeros(n, np.int64)
    np.cumsum(counts[:-1], out=first[1:])
    owner = np.repeat(np.arange(n), counts)
    return first, owner, np.arange(len(owner)) - first[owner]


@dataclass(frozen=True)
class TimestampRules:
    """Whisper's timestamp-token grammar, over token ids (openai-whisper ``ApplyTimestampRules``,
    transformers ``WhisperTimeStampLogitsProcessor``). Counted from ``SamplingParams.begin_index``:
    the first free token is a timestamp (at most ``max_initial_timestamp_index``); timestamps come
    in pairs (one may stand alone before EOT) and never decrease; a pair closing a segment is
    followed by text; and when the timestamps together are likelier than the likeliest text
    token, a timestamp is taken."""

    timestamp_begin: int  # id of <|0.00|>; every id >= this is a timestamp, 0.02 s apart
    eot: int  # <|endoftext|>; text tokens are the ids below it
    no_timestamps: int  # <|notimestamps|>: never generated in timestamp mode
    max_initial_timestamp_index: int | None = 50  # first timestamp <= 50 x 0.02 s = 1.0 s; None: any


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request. Frozen and hashable: the sampler batches rows sharing params."""

    max_new_tokens: int | None = None  # None: up to the model's decoder length limit
    min_new_tokens: int = 0  # stop tokens are suppressed until this many tokens exist
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # per-request generator seed for sampling
    stop_token_ids: tuple[int, ...] = ()  # tokens that end a sequence (EOS)
    suppress_tokens: tuple[int, ...] = ()  # never generated
    begin_suppress_tokens: tuple[int, ...] = ()  # not generated as the first new token
    allowed_tokens: tuple[int, ...] = ()  # when set, only these tokens can be generated
    forced_tokens: tuple[tuple[int, int], ...] = ()  # (index among new tokens, token id)
    repetition_penalty: float = 1.0  # 1.0 = off (transformers' definition)
    no_repeat_ngram_size: int = 0  # 0 = off
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences never completed
    num_beams: int = 1  # > 1: beam search
    length_penalty: float = 1.0  # beam score = sum logprob / length ** length_penalty
    early_stopping: bool | str = False  # beam search stop rule: True, False or "never"
    num_return_sequences: int = 1  # best hypotheses returned (<= num_beams)
    logprobs: bool = False  # record each chosen token's log-probability
    begin_index: int = 0  # forced new tokens before the free ones; begin_suppress/timestamp rules start here
    timestamp_rules: TimestampRules | None = None  # Whisper timestamp grammar; None: off
    record_first_step_probs: tuple[int, ...] = ()  # tokens whose first-step probability (unprocessed
    # logits, i.e. after the last prompt token) is stored in Request.first_step_probs

    def __post_init__(self):
        # token lists given as lists (or any iterable) become tuples: the params stay hashable (the
        # sampler keys rules on them) and cannot change under a running request
        for name in ("stop_token_ids", "suppress_tokens", "begin_suppress_tokens", "allowed_tokens",
                     "record_first_step_probs"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(type(t) is int for t in value):
                object.__setattr__(self, name, tuple(int(t) for t in value))
        for name in ("forced_tokens", "bad_words_ids"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(w, tuple) for w in value):
                object.__setattr__(self, name, tuple(tuple(int(t) for t in w) for w in value))
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError("num_return_sequences must be between 1 and num_beams")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("beam search with sampling is not supported; set temperature 0 or num_beams 1")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.begin_index < 0:
            raise ValueError(f"begin_index must be >= 0, got {self.begin_index}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.num_beams == 1

    @property
    def count_based_rules(self) -> bool:
        """Whether every logits rule depends only on how many tokens were generated, not on which
        (so a step can run before the previous tokens are known on the host) and no log-probs are
        asked for."""
        return (
            self.timestamp_rules is None
            and not self.no_repeat_ngram_size
            and not self.bad_words_ids
            and self.repetition_penalty == 1.0
            and not self.logprobs
        )


@dataclass
class Request:
    """One unit of work: an encoder input and a decoder prompt.

    encoder_input: what the model family encodes (Whisper: a 16 kHz waveform <= 30 s or log-mel
    [n_mels, 3000]; text models: a list of token ids). prompt_ids: decoder prompt (at least the
    decoder start token). request_id: anything; returned with the result.
    """

    encoder_input: Any
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: Any = None


@dataclass
class Completion:
    """One finished hypothesis. token_ids exclude the prompt and the stop token."""

    token_ids: list[int]
    logprobs: list[float] | None
    score: float  # cumulative logprob (greedy/sampling) or length-penalised beam score
    finish_reason: str  # "stop" | "length"
    # log-probability of the stop token that ended a greedy/sampled hypothesis (logprobs on)
    stop_logprob: float | None = None


@dataclass
class Result:
    """What the engine returns per request (best completion first in ``completions``)."""

    request_id: Any
    completions: list[Completion]
    error: str | None = None  # set when the request could not run; completions is then empty
    text: str | None = None  # decoded best completion (when the engine has a tokenizer)
    # arrival / first_token / finish times (s), encoder_len; greedy / sampled requests also
    # decode_steps, generated_tokens, draft_tokens, accepted_tokens (speculative decoding); from the
    # prefix cache: encoder_cached (its encoder output was reused: no encoder run) and
    # cached_prompt_tokens (decoder prompt tokens reused)
    metrics: dict = field(default_factory=dict)
    # softmax probabilities of params.record_first_step_probs at the first step (Whisper's no-speech)
    first_step_probs: dict[int, float] = field(default_factory=dict)

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids if self.completions else []

    @property
    def logprobs(self) -> list[float] | None:
        return self.completions[0].logprobs if self.completions else None

    @property
    def finish_reason(self) -> str:
        return self.completions[0].finish_reason if self.completions else "error"

    @property
    def stop_logprob(self) -> float | None:
        return self.completions[0].stop_logprob if self.completions else None

    @property
    def acceptance_rate(self) -> float | None:
        """Share of its speculative draft tokens that were accepted (None: no drafts)."""
        drafted = self.metrics.get("draft_tokens")
        return self.metrics["accepted_tokens"] / drafted if drafted else None

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens generated per decode step (1.0 without speculative decoding; None for beams)."""
        steps = self.metrics.get("decode_steps")
        return self.metrics["generated_tokens"] / steps if steps else None


_seq_ids = itertools.count()


class Sequence:
    """One decoder sequence: prompt + generated tokens and its self-attention blocks."""

    def __init__(self, group: SequenceGroup, tokens: list[int], num_prompt: int):
        self.seq_id = next(_seq_ids)
        self.group = group
        self.tokens = tokens
        self.num_prompt = num_prompt
        self.num_cached = 0  # tokens whose K/V are in the cache
        self.num_reused = 0  # of those, tokens found in the prefix cache at (re)admission
        self.block_table: list[int] = []
        self.logprobs: list[float] = []
        self.cum_logprob = 0.0
        self.stop_logprob: float | None = None  # set by the sampler when a stop token ends it
        self.ngrams = None  # sampling.NgramIndex for no_repeat_ngram_size, built on first use

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    def fork(self, ngrams: bool = True) -> Sequence:
        """A copy sharing nothing mutable. ``ngrams`` False: without the n-gram index (a beam step
        launched ahead: the rule runs on the device; the host rebuilds an index when it needs one)."""
        s = Sequence(self.group, list(self.tokens), self.num_prompt)
        s.num_cached, s.logprobs, s.cum_logprob = self.num_cached, list(self.logprobs), self.cum_logprob
        if ngrams and self.ngrams is not None:
            s.ngrams = self.ngrams.copy()
        return s


class SequenceGroup:
    """A request in flight: its live sequences (beams share cross blocks), cross-cache blocks,
    and finished hypotheses."""

    def __init__(self, request: Request, encoder_len: int, max_new_tokens: int, order: int):
        self.request = request
        self.params = request.params
        self.encoder_len = encoder_len
        self.max_new_tokens = max_new_tokens
        self.order = order  # arrival order (preemption picks the newest)
        self.seqs = [Sequence(self, list(request.prompt_ids), len(request.prompt_ids))]
        self.cross_blocks: list[int] = []
        self.encoder_key: bytes | None = None  # prefix cache key of the encoder input (None: uncached)
        self.encoded = False  # cross blocks written (or written by this step's encoder run)
        self.encoder_cached = False  # admitted with its encoder output in the prefix cache
        self.cached_prompt_tokens = 0  # decoder prompt tokens found in the prefix cache at admission
        self.preempted = False
        self.preempted_now = False  # set while the scheduler is preempting it in this step
        self.finished: list[Completion] = []
        self.first_step_probs: dict[int, float] = {}  # see SamplingParams.record_first_step_probs
        self.beam = None  # beam-search state (engine/beam.py) when num_beams > 1
        self.cohort = 0  # its micro-batch (Scheduler.cohorts), from admission to its end
        self.generator = None  # torch.Generator for seeded sampling
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        # decode steps of its (one) sequence, tokens it generated (the stop token too), and
        # speculative draft tokens proposed / accepted
        self.decode_steps = 0
        self.generated_tokens = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0

    @property
    def num_seqs_reserved(self) -> int:
        """Sequences this group may hold at once (beams expand after the first step)."""
        return max(self.params.num_beams, len(self.seqs))

    @property
    def done(self) -> bool:
        return not self.seqs
