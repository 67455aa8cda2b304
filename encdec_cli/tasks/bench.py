"""The standard workloads of benchmarks/WORKLOADS.md (W1..W9, T1, T2): ours vs transformers in one
run (W6: ours with the prefix cache on vs off).

Random weights of the real architectures (seed 0); output lengths are fixed per request (EOS
suppressed before the target length, forced at it), so both systems do exactly the same work.
The same weights are loaded into both: the transformers model is built first and its state dict
is loaded into ours.
"""

from __future__ import annotations

import gc
import json
import platform
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from encdec_models.audio import N_AUDIO_CTX, N_SAMPLES

# speculative decoding with oracle drafts (run_oracle_sweep): draft acceptance probabilities and draft
# lengths swept by ``encdec bench --speculative oracle``
ORACLE_ALPHAS = (0.0, 0.5, 0.7, 0.9)
ORACLE_KS = (2, 4, 8)
# each (alpha, K) runs once per oracle seed, enough seeds that at least this many requests' drafts
# are averaged: one request's 128 tokens are one draw of which drafts are wrong (W5 at alpha 0.7, K 4:
# 2.51-2.91 tokens a step over seeds 0-7, benchmarks/oracle_tokens.py), the workload's mean needs several
ORACLE_PATHS = 8
# fra_Latn in NLLB-200's tokenizer ("translation to one language"): the language codes follow the
# 256,000 sentencepiece pieces and the fairseq offset of 1, in transformers' FAIRSEQ_LANGUAGE_CODES
# order (models/nllb/tokenization_nllb.py), where fra_Latn is entry 56: 256000 + 56 + 1
# (eng_Latn, entry 46, is the well-known 256047)
NLLB_FRA_LATN = 256057
COPY_BYTES = 1 << 30  # a 1 GiB device-to-device copy measures the copy bandwidth
MATMUL_N = 8192  # [N, N] @ [N, N] bf16 matmuls measure the matmul rate


@dataclass(frozen=True)
class Workload:
    id: str
    model: str  # "whisper-large-v3" | "bart-large-cnn" | "flan-t5-large" | "nllb-200-distilled-600M" | ...
    requests: int
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    metric: str = "output tok/s"
    # TensorRT-LLM's shape (T1/T2): every request makes exactly this many tokens, and the engine and
    # the baseline both run at ``batch`` sequences (the engine's max_num_seqs = batch)
    output_tokens: int | None = None
    batch: int | None = None
    published: tuple[tuple[str, float], ...] = ()  # TensorRT-LLM's published H100 tok/s at this batch
    forced_bos: int | None = None  # a token forced first (NLLB: the target language)


# the engine's sequences per step (``--max-num-seqs``; a workload with fewer takes its own count):
# 1024 against 512 on an H100 (benchmarks/README.md, twenty-third session): W3 (beam 4, so 256
# requests in flight instead of 128) about 1.3x at the median of noisy runs, W2 +8%, W4 +3%
ENGINE_SEQS = 1024


# TensorRT-LLM's published H100 numbers (bf16, greedy, 260-440 input tokens, 128 output tokens):
# legacy TensorRT path, then its PyTorch backend, at batch 32 / 64 / 128 (benchmarks/WORKLOADS.md)
TRTLLM_H100 = {
    "bart-large-cnn": {"legacy": (12611, 22007, 31544), "pytorch": (10662, 16209, 23518)},
    "flan-t5-xl": {"legacy": (3153, 3863, 4601), "pytorch": (3312, 4184, 4768)},
}
TRT_BATCHES = (32, 64, 128)


def _trt_workloads(tid: str, model: str) -> dict:
    return {
        f"{tid}-B{b}": Workload(
            f"{tid}-B{b}",
            model,
            4 * b,  # four full batches: a steady state, not one batch's start
            output_tokens=128,
            batch=b,
            published=tuple((k, v[i]) for k, v in TRTLLM_H100[model].items()),
        )
        for i, b in enumerate(TRT_BATCHES)
    }


WORKLOADS = {
    "W1": Workload("W1", "whisper-large-v3", 512, metric="RTFx"),
    "W2": Workload("W2", "bart-large-cnn", 1024),
    "W3": Workload("W3", "bart-large-cnn", 512, num_beams=4, length_penalty=2.0, no_repeat_ngram_size=3),
    "W4": Workload("W4", "flan-t5-large", 1024),
    "W5": Workload("W5", "whisper-large-v3", 1, metric="tok/s"),
    "W6": Workload("W6", "whisper-large-v3", 256, metric="RTFx"),
    "W9": Workload("W9", "florence-2-large", 512),
    "W7": Workload("W7", "nllb-200-distilled-600M", 1024, forced_bos=NLLB_FRA_LATN),
    "W8": Workload("W8", "moonshine-base", 512, metric="RTFx"),
    **_trt_workloads("T1", "bart-large-cnn"),
    **_trt_workloads("T2", "flan-t5-xl"),
}
# a group id runs all of its members: ``encdec bench T1`` is T1 at batch 32, 64 and 128
GROUPS = {t: [w for w in WORKLOADS if w.startswith(f"{t}-")] for t in ("T1", "T2")}
DEFAULT_WORKLOADS = ("W1", "W2", "W3", "W4", "W5")


def expand_ids(ids: list[str]) -> tuple[list[str], list[str]]:
    """Workload ids (groups expanded, in order, case-insensitive) and the unknown ones."""
    out, bad = [], []
    for i in (x.upper() for x in ids):
        members = GROUPS.get(i) or ([i] if i in WORKLOADS else [])
        out += [m for m in members if m not in out]
        bad += [] if members else [i]
    return out, bad


# W6 (automatic prefix caching): a quarter of the windows are exact copies of others, and 30% of the
# distinct windows (their copies too) are decoded again after their greedy decoding, as Whisper's
# temperature fallback does: W6_BEST_OF candidates sampled at W6_TEMPERATURE (openai-whisper's first
# fallback step and default best_of)
W6_DUPLICATES, W6_FALLBACK, W6_BEST_OF, W6_TEMPERATURE = 0.25, 0.30, 5, 0.2

FLORENCE_IMAGE = 768  # W9: 768 x 768 images, Florence-2's own size: (768 / 32)^2 + 1 = 577 image tokens
FLORENCE_IMAGE_TOKEN = 51289
# <s>, 6 text tokens, </s>: as long as the prompt Florence-2's processor makes of <CAPTION> ("<s>What does
# the image describe?</s>"); which tokens does not change the work
FLORENCE_CAPTION_PROMPT = [0, 2264, 473, 5, 2274, 6190, 116, 2]


def text_config(config):
    """The config holding a model's token ids (Florence-2: its language model's)."""
    return getattr(config, "text_config", None) or config


AUDIO_SECONDS = {"whisper-large-v3": 30.0, "moonshine-base": 10.0}  # each request's audio
# the inputs' token-length range and the outputs' of the text workloads (seeded rng(1), rng(2))
TEXT_LENGTHS = {"nllb-200-distilled-600M": ((20, 61), (16, 65))}


def is_audio(name: str) -> bool:
    return name in AUDIO_SECONDS


# the BART-large shape that NLLB-200-distilled-600M's and Florence-2-large's language model share
LARGE_12_12 = dict(
    d_model=1024,
    encoder_layers=12,
    decoder_layers=12,
    encoder_attention_heads=16,
    decoder_attention_heads=16,
    encoder_ffn_dim=4096,
    decoder_ffn_dim=4096,
    max_position_embeddings=1024,
)


def hf_config(name: str):
    from transformers import BartConfig, M2M100Config, MoonshineConfig, T5Config, WhisperConfig

    # facebook/nllb-200-distilled-600M's config.json (the hub is not reachable from here: checked
    # against public copies of it). Its embedding has 256206 rows, two more than the tokenizer's
    # 256204 ids (the 202 language codes end at 256202, <mask> is 256203).
    if name == "nllb-200-distilled-600M":
        return M2M100Config(
            **LARGE_12_12,
            vocab_size=256206,
            activation_function="relu",
            scale_embedding=True,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            architectures=["M2M100ForConditionalGeneration"],
        )
    # UsefulSensors/moonshine-base's config.json, checked against public copies of it (keras-hub's
    # conversion script for that checkpoint, which loads its weights: vocabulary 32768, 416 wide,
    # 8 + 8 layers, 8 heads, 1664, partial rotary 0.62, 194 positions). transformers' MoonshineConfig
    # defaults are moonshine-tiny's (288 wide, 6 + 6 layers, partial rotary 0.9). Head dim 52
    # (transformers pads it to 56 for its attention, scaling by 52**-0.5; same result), 32 rotary.
    if name == "moonshine-base":
        return MoonshineConfig(
            vocab_size=32768,
            hidden_size=416,
            intermediate_size=1664,
            encoder_num_hidden_layers=8,
            decoder_num_hidden_layers=8,
            encoder_num_attention_heads=8,
            decoder_num_attention_heads=8,
            max_position_embeddings=194,
            pad_head_dim_to_multiple_of=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.62},
            decoder_start_token_id=1,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            architectures=["MoonshineForConditionalGeneration"],
        )

    if name == "florence-2-large":
        from transformers import Florence2Config, Florence2VisionConfig

        text = BartConfig(
            **LARGE_12_12,
            vocab_size=51290,  # 51289 BART + locations and task tokens, then the image token
            forced_bos_token_id=None,
            forced_eos_token_id=None,
            decoder_start_token_id=2,
            eos_token_id=2,
            bos_token_id=0,
            pad_token_id=1,
        )
        vision = Florence2VisionConfig(
            depths=[1, 1, 9, 1],
            embed_dim=[256, 512, 1024, 2048],
            num_heads=[8, 16, 32, 64],
            num_groups=[8, 16, 32, 64],
            window_size=12,
            projection_dim=1024,
            drop_path_rate=0.0,
        )
        return Florence2Config(
            vision_config=vision,
            text_config=text,
            image_token_id=FLORENCE_IMAGE_TOKEN,
            architectures=["Florence2ForConditionalGeneration"],
        )
    if name == "whisper-large-v3":
        return WhisperConfig(
            vocab_size=51866,
            num_mel_bins=128,
            d_model=1280,
            encoder_layers=32,
            decoder_layers=32,
            encoder_attention_heads=20,
            decoder_attention_heads=20,
            encoder_ffn_dim=5120,
            decoder_ffn_dim=5120,
            max_target_positions=448,
            decoder_start_token_id=50258,
            eos_token_id=50257,
            pad_token_id=50256,
            bos_token_id=50257,
            suppress_tokens=[],
            begin_suppress_tokens=[],
            architectures=["WhisperForConditionalGeneration"],
        )
    if name == "bart-large-cnn":
        return BartConfig(
            **LARGE_12_12,
            vocab_size=50264,
            forced_bos_token_id=None,
            architectures=["BartForConditionalGeneration"],
        )
    if name in ("flan-t5-large", "flan-t5-xl"):
        xl = name == "flan-t5-xl"
        return T5Config(
            vocab_size=32128,
            d_model=2048 if xl else 1024,
            d_kv=64,
            d_ff=5120 if xl else 2816,
            num_layers=24,
            num_decoder_layers=24,
            num_heads=32 if xl else 16,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
            architectures=["T5ForConditionalGeneration"],
        )
    raise ValueError(name)


def inputs_for(w: Workload):
    """(encoder inputs, target output lengths), seeded as benchmarks/WORKLOADS.md says."""
    (in_lo, in_hi), (out_lo, out_hi) = TEXT_LENGTHS.get(w.model, ((260, 441), (32, 129)))
    if w.model.startswith("whisper"):
        targets = np.random.default_rng(0).integers(16, 193, w.requests)
    elif w.model == "moonshine-base":
        targets = np.random.default_rng(0).integers(16, 97, w.requests)
    else:
        targets = np.random.default_rng(2).integers(out_lo, out_hi, w.requests)
    if w.id == "W5":
        targets = np.array([128])
    if w.model.startswith("florence"):  # captions
        targets = np.random.default_rng(2).integers(16, 65, w.requests)
    if w.output_tokens:
        targets = np.full(w.requests, w.output_tokens)
    if is_audio(w.model):
        g = torch.Generator().manual_seed(0)
        n = int(AUDIO_SECONDS[w.model] * 16000)
        waves = [torch.randn(n, generator=g).numpy() * 0.1 for _ in range(w.requests)]
        return waves, targets.tolist()
    if w.model.startswith("florence"):
        return florence_inputs(w.requests), targets.tolist()
    lens = np.random.default_rng(1).integers(in_lo, in_hi, w.requests)
    vocab = hf_config(w.model).vocab_size
    rng = np.random.default_rng(3)
    return [rng.integers(4, vocab - 1, n).tolist() for n in lens], targets.tolist()


def florence_inputs(n: int, size: int = FLORENCE_IMAGE) -> list[dict]:
    """W9's encoder inputs: normalised random images (float16 on the host: 3.4 MiB each) and the
    processor's layout of <CAPTION>: the image tokens, then <s>What does the image describe?</s>."""
    g = torch.Generator().manual_seed(0)
    tokens = (size // 32) ** 2 + 1
    ids = [FLORENCE_IMAGE_TOKEN] * tokens + FLORENCE_CAPTION_PROMPT
    return [
        {"pixel_values": torch.randn(3, size, size, generator=g).to(torch.float16), "input_ids": ids}
        for _ in range(n)
    ]


def build_models(w: Workload, device, dtype, with_hf: bool):
    """The transformers model (random init, seed 0) and ours with the same weights."""
    from transformers import (
        AutoModelForSeq2SeqLM,
        MoonshineForConditionalGeneration,
        WhisperForConditionalGeneration,
    )

    from encdec_models.loading import LoadedModel, build_model
    from encdec_models.registry import architecture_of

    cfg = hf_config(w.model)
    torch.manual_seed(0)
    with torch.device(device):
        if w.model.startswith("whisper"):
            hf = WhisperForConditionalGeneration(cfg)
        elif w.model.startswith("florence"):
            from transformers import Florence2ForConditionalGeneration

            hf = Florence2ForConditionalGeneration(cfg)
        elif w.model == "moonshine-base":
            hf = MoonshineForConditionalGeneration(cfg)
        else:
            hf = AutoModelForSeq2SeqLM.from_config(cfg)
        hf = hf.to(dtype).eval()
    arch = architecture_of(cfg)
    ours = build_model(arch, cfg, hf.state_dict().items(), torch.device(device), dtype)
    from transformers import GenerationConfig

    loaded = LoadedModel(ours, None, cfg, GenerationConfig.from_model_config(cfg), arch, Path("random"))
    if not with_hf:
        del hf
        hf = None
    return hf, loaded


def workload_requests(w: Workload, config, enc_inputs, targets) -> list:
    """The workload's engine requests: request i makes exactly targets[i] new tokens (EOS banned
    before, the length limit after), from the decoder start token."""
    from encdec_cli.engine import Request, SamplingParams

    config = text_config(config)
    params = {
        t: SamplingParams(
            max_new_tokens=t,
            min_new_tokens=t,
            stop_token_ids=(config.eos_token_id,),
            forced_tokens=() if w.forced_bos is None else ((0, w.forced_bos),),
            num_beams=w.num_beams,
            length_penalty=w.length_penalty,
            no_repeat_ngram_size=w.no_repeat_ngram_size,
        )
        for t in set(targets)
    }
    start = [config.decoder_start_token_id]
    return [Request(x, start, params[t], i) for i, (x, t) in enumerate(zip(enc_inputs, targets, strict=True))]


WARMUP_REQUESTS = 64  # more than one encoder batch of W1 / W8 / W9 (10, 39 and 28 inputs)


def warmup_requests(w: Workload, config, enc_inputs, targets) -> list:
    """An untimed batch before the timed run (compiles kernels, autotunes, and makes cuDNN plan the
    convolutions and attention of a full encoder batch): up to ``WARMUP_REQUESTS`` of the workload's
    inputs (W5 has one), all with the first request's output length. The caller then drops their
    prefix cache entries (``Engine.reset_prefix_cache``), so the timed run encodes every input."""
    warm = enc_inputs[:WARMUP_REQUESTS]
    return workload_requests(w, config, warm, [targets[0]] * len(warm))


def prefix_inputs(w: Workload) -> tuple[list, list[int], list[bool]]:
    """W6's windows in submission order: (waveforms, output lengths, whether the window falls
    back). Distinct windows: 30 s noise (torch seed 0, x 0.1) with W1's output lengths
    (rng(0).integers(16, 193)); copies (a new array with the same samples, as a copied file would
    give) of distinct ones picked by rng(4), shuffled in among them; the falling-back windows, also
    from rng(4), a share of the distinct ones (a copy falls back with its original)."""
    n = w.requests
    n_unique = n - int(round(n * W6_DUPLICATES))
    g = torch.Generator().manual_seed(0)
    unique = [torch.randn(N_SAMPLES, generator=g).numpy() * 0.1 for _ in range(n_unique)]
    lengths = np.random.default_rng(0).integers(16, 193, n_unique)
    rng = np.random.default_rng(4)
    source = np.concatenate(
        [np.arange(n_unique), rng.choice(n_unique, n - n_unique, replace=n - n_unique > n_unique)]
    )
    rng.shuffle(source)
    falls = set(rng.choice(n_unique, int(round(n_unique * W6_FALLBACK)), replace=False).tolist())
    return [unique[s].copy() for s in source], [int(lengths[s]) for s in source], [s in falls for s in source]


def run_prefix(engine, config, waves, targets, falls) -> tuple[float, int]:
    """One timed W6 run: every window greedy; when a falling-back window's result arrives, its
    W6_BEST_OF sampled candidates are submitted (the same waveform again, seeded per candidate).
    Fixed output lengths, so the cache on and off do the same decoding work. (wall s, tokens)."""
    from encdec_cli.engine import Request, SamplingParams

    eos, start = config.eos_token_id, [config.decoder_start_token_id]

    def params(t: int, **kw) -> SamplingParams:
        return SamplingParams(max_new_tokens=t, min_new_tokens=t, stop_token_ids=(eos,), **kw)

    greedy = {t: params(t) for t in set(targets)}
    pending = deque(Request(x, start, greedy[t], (i, -1)) for i, (x, t) in enumerate(zip(waves, targets)))
    outstanding = 0

    def source():
        nonlocal outstanding
        while pending or outstanding:
            if pending:
                outstanding += 1
                yield pending.popleft()
            else:
                yield None  # the fallbacks of windows still running come later

    tokens = 0
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    for r in engine.generate(source()):
        outstanding -= 1
        if r.error:
            raise RuntimeError(f"W6 request {r.request_id} failed: {r.error}")
        tokens += len(r.token_ids)
        i, k = r.request_id
        if k < 0 and falls[i]:
            for c in range(W6_BEST_OF):
                p = params(targets[i], temperature=W6_TEMPERATURE, seed=i * W6_BEST_OF + c)
                pending.append(Request(waves[i], start, p, (i, c)))
    sync()
    return time.perf_counter() - t0, tokens


def run_prefix_workload(w: Workload, loaded, engine_cfg: dict) -> dict:
    """W6 with the prefix cache off, then on, in one process (same weights, same engine settings)."""
    from encdec_cli.engine import Engine, Request, SamplingParams

    waves, targets, falls = prefix_inputs(w)
    g = torch.Generator().manual_seed(1)  # warm-up windows that are not in the workload
    warm_waves = [torch.randn(N_SAMPLES, generator=g).numpy() * 0.1 for _ in range(4)]
    cfg = {k: v for k, v in engine_cfg.items() if k not in ("profile", "prefix_cache")}
    cfg["max_num_seqs"] = min(cfg.get("max_num_seqs", ENGINE_SEQS), len(waves) * (1 + W6_BEST_OF))
    res: dict = {"decodings": len(waves) + W6_BEST_OF * sum(falls), "fallback_windows": sum(falls)}
    audio_s = 30.0 * len(waves)
    for on in (False, True):
        engine = Engine(loaded, prefix_cache=on, **cfg)
        start, eos = [loaded.config.decoder_start_token_id], loaded.config.eos_token_id
        warm = [  # greedy and sampled, so both paths are compiled before the timed run
            Request(
                x, start, SamplingParams(max_new_tokens=8, stop_token_ids=(eos,), temperature=t, seed=0), i
            )
            for i, (x, t) in enumerate(zip(warm_waves, (0.0, 0.0, W6_TEMPERATURE, W6_TEMPERATURE)))
        ]
        list(engine.generate(warm))
        engine.reset_stats()
        wall, tokens = run_prefix(engine, loaded.config, waves, targets, falls)
        stats = engine.stats
        info = _engine_info(engine, cfg["max_num_seqs"], stats)
        name = "ours" if on else "cache_off"
        res.update({name: audio_s / wall, f"{name}_wall_s": wall, f"{name}_output_tokens": tokens})
        res["engine" if on else "engine_cache_off"] = info
        if on:
            res["prefix_cache"] = {
                "hits": stats.prefix_cache_hits,
                "misses": stats.prefix_cache_misses,
                "evictions": stats.prefix_cache_evictions,
                "prompt_tokens": stats.prefix_cache_prompt_tokens,
                "encoder_seconds_saved": round(stats.encoder_seconds_saved, 3),
            }
        engine.close()  # its KV pool and graphs go before the next engine sizes its own
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    res["ratio"] = res["ours"] / res["cache_off"]
    return res


def _engine_info(engine, max_num_seqs: int, stats) -> dict:
    # one process's decode and verification graphs (none: eager, or pipeline stages)
    graphs = [g for g in (engine.runner.graphs, *(engine.runner.verify_graphs or ())) if g is not None]
    return {
        "max_num_seqs": max_num_seqs,
        "num_blocks": engine.num_blocks,
        "preemptions": stats.preemptions,
        "graphs": engine.uses_cuda_graphs,
        # steps replayed on graphs, and of them steps launched ahead on one-piece graphs
        # (cuda_graphs.WHOLE_AHEAD): an A/B's two sides tell themselves apart
        "graph_replays": sum(g.replays for g in graphs),
        "whole_graph_replays": sum(g.whole_replays for g in graphs),
        "steps": stats.steps,
        "ahead_steps": stats.ahead_steps,
        "lookahead": engine.config.lookahead,
        "micro_batches": engine.micro_batches,
        "micro_batch_steps": stats.micro_batch_steps,
        "absorb_cross": engine.absorbs_cross,
        "kv_dtype": engine.kv_dtype_name,
        "prefix_cache": engine.prefix_caching,
    }


def _engine_cfg(w: Workload, engine_cfg: dict, n: int) -> dict:
    cfg = {k: v for k, v in engine_cfg.items() if k != "profile"}
    # never more sequence slots than the workload has sequences (W5: one): the engine sizes its CUDA
    # graphs and its cross-attention layout (runner.ABSORB_MIN_SEQS) by them
    cfg["max_num_seqs"] = min(cfg.get("max_num_seqs", ENGINE_SEQS), n * w.num_beams)
    if w.batch:  # TensorRT-LLM's shape: exactly this many sequences per step
        cfg["max_num_seqs"] = w.batch
    return cfg


def _timed(w: Workload, engine, loaded, enc_inputs, targets, warmup: bool = True) -> tuple[float, list]:
    """One timed run of the workload on ``engine`` (after an untimed warm-up batch): (wall s, results)."""
    if warmup:
        list(engine.generate(warmup_requests(w, loaded.config, enc_inputs, targets)))
        engine.reset_prefix_cache()  # the warm-up's inputs are the workload's first: no free encoder runs
    engine.reset_stats()  # count the timed run's steps only
    requests = workload_requests(w, loaded.config, enc_inputs, targets)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    out = list(engine.generate(requests))
    sync()
    wall = time.perf_counter() - t0
    errors = [r.error for r in out if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return wall, out


def _settled_path(w, engine, loaded, enc_inputs, targets, recorded: dict, k: int, vocab: int,
                  alpha: float = 1.0, rounds: int = 6, seed: int = 0) -> tuple[dict, int]:  # fmt: skip
    """The greedy path the oracle's drafts follow on ``engine`` (a speculative one, K = ``k``) at
    ``alpha``.

    The plain run's tokens (``recorded``) are the target's greedy path as one-query decode steps
    compute it; verification steps run the (K + 1)-query kernels, whose reduced-precision rounding
    differs, and where a random model's top two logits nearly tie, the speculative run leaves that
    path and every draft after it is wrong whatever alpha is (the sweep then measures the tie, not
    alpha). Which steps verify how many tokens depends on which drafts are wrong, so the engine
    runs the workload untimed at the sweep's own alpha (and oracle ``seed``) and takes its output
    as the path, until a run stays on it (``rounds`` at most: each round moves the point where a
    request leaves its path further on). Settling at alpha 1 instead left W5 on an H100 at 0.38
    acceptance for alpha 0.7. Returns (the path, how many requests' paths moved). In float32 on the
    CPU nothing moves."""
    from encdec_cli.engine import OracleDrafter

    path, moved = dict(recorded), set()
    for _ in range(rounds):
        engine.set_drafter(OracleDrafter(path, alpha, k, vocab, seed=seed))
        out = list(engine.generate(workload_requests(w, loaded.config, enc_inputs, targets)))
        changed = {
            r.request_id: r.token_ids for r in out if not r.error and r.token_ids != path[r.request_id]
        }
        if not changed:
            break
        path.update(changed)
        moved |= changed.keys()
    return path, len(moved)


def _release(engine) -> None:
    """The engine's CUDA graphs and KV pool go (``Engine.close``: also the model's layers' views of
    the pool) before the next engine sizes its pool from the free memory. The caller drops its own
    reference (``del``) right after; nothing else of the run (stats snapshots, results, drafters)
    refers to the engine."""
    engine.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def speculation_info(stats) -> dict:
    """The speculative-decoding counters of a run (EngineStats) for the bench JSON."""
    return {
        "verify_steps": stats.verify_steps,
        "draft_tokens": stats.draft_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "acceptance_rate": stats.acceptance_rate,
        "tokens_per_step": stats.tokens_per_step,
    }


def run_ours(w: Workload, loaded, enc_inputs, targets, **engine_cfg) -> tuple[float, int, dict]:
    from encdec_cli.engine import Engine

    cfg = _engine_cfg(w, engine_cfg, len(enc_inputs))
    engine = Engine(loaded, **cfg)
    wall, out = _timed(w, engine, loaded, enc_inputs, targets)
    tokens = sum(len(r.token_ids) for r in out)
    stats = engine.stats
    info = _engine_info(engine, cfg["max_num_seqs"], stats)
    if cfg.get("speculative"):
        info.update(speculation_info(stats))
    if stats.stage_busy_seconds:  # pipeline parallel: each stage's compute seconds (not waiting)
        info["stage_busy_s"] = [round(b, 3) for b in stats.stage_busy_seconds]
    if engine_cfg.get("profile"):  # a second, synchronized run: where the time goes per step phase
        engine.reset_stats(profile=True)
        list(engine.generate(workload_requests(w, loaded.config, enc_inputs, targets)))
        info["profile_s"] = {k: round(v, 3) for k, v in engine.stats.phase_seconds.items()}
    _release(engine)
    del engine
    return wall, tokens, info


def oracle_seeds(requests: int) -> int:
    """Oracle seeds a sweep point runs: at least ORACLE_PATHS requests' drafts in all."""
    return max(1, -(-ORACLE_PATHS // requests))


def run_oracle_sweep(
    w: Workload, loaded, enc_inputs, targets, engine_cfg: dict, alphas, ks, value
) -> tuple[dict, tuple[float, int, dict]]:
    """Speculative decoding with oracle drafts (synthetic: random weights agree with no real draft).

    A plain run (look-ahead on, as ``run_ours``) records each request's greedy tokens; it and
    repeats of it up to the sweep points' seed count are the reference speed (their mean); then,
    for each K, one engine verifies K oracle drafts a step (``OracleDrafter``: the recorded
    continuation, each token wrong with probability 1 - alpha) and runs the workload once per
    alpha and oracle seed (``oracle_seeds``: a point's value is the seeds' tokens over
    their wall time, per seed in ``per_seed``). ``value(wall, tokens)``: the workload's metric. With
    ``profile`` in ``engine_cfg``, every run is followed by a GPU-synchronised one whose per-phase seconds
    (schedule / encode / draft / decode / sample) go into the JSON: where the time goes. Returns
    (the sweep for the JSON, the plain runs as ``run_ours`` returns one: their mean wall time)."""
    from encdec_cli.engine import Engine, OracleDrafter

    # no prefix cache: every alpha repeats the plain run's inputs, which would then skip their encoder
    # runs and look faster than speculation makes them
    cfg = {**_engine_cfg(w, engine_cfg, len(enc_inputs)), "prefix_cache": False}
    engine = Engine(loaded, **cfg)
    wall, out = _timed(w, engine, loaded, enc_inputs, targets)
    tokens = sum(len(r.token_ids) for r in out)
    recorded = {r.request_id: r.token_ids for r in out}
    stats = engine.stats
    plain_info = _engine_info(engine, cfg["max_num_seqs"], stats)
    profile = bool(engine_cfg.get("profile"))
    seeds = oracle_seeds(len(enc_inputs))
    # the reference speed over as many timed runs as a sweep point has seeds (W5: one request of
    # 128 tokens, 0.2 s a run, would otherwise divide eight runs' mean by one run)
    walls, runs_equal = [wall], True
    for _ in range(seeds - 1):
        again_wall, again = _timed(w, engine, loaded, enc_inputs, targets, warmup=False)
        walls.append(again_wall)
        runs_equal = runs_equal and all(r.token_ids == recorded[r.request_id] for r in again)
    wall = sum(walls) / len(walls)

    def phases(engine) -> dict:
        """A second, GPU-synchronised run of the workload: seconds per step phase."""
        engine.reset_stats(profile=True)
        list(engine.generate(workload_requests(w, loaded.config, enc_inputs, targets)))
        out = {k: round(v, 3) for k, v in engine.stats.phase_seconds.items()}
        engine.reset_stats(profile=False)
        return out

    if profile:
        plain_info["profile_s"] = phases(engine)
    _release(engine)
    del engine
    plain = value(wall, tokens)
    vocab = loaded.model.vocab_size
    runs = []
    for k in ks:
        engine = Engine(loaded, drafter=OracleDrafter(recorded, alphas[0], k, vocab), **cfg)
        for alpha in alphas:
            per_seed = []
            for seed in range(seeds):
                path, moved = _settled_path(
                    w, engine, loaded, enc_inputs, targets, recorded, k, vocab, alpha, seed=seed
                )
                drafter = OracleDrafter(path, alpha, k, vocab, seed=seed)
                engine.set_drafter(drafter)
                s_wall, s_out = _timed(w, engine, loaded, enc_inputs, targets, warmup=False)  # settled: warm
                per_seed.append(_SeedRun(seed, s_wall, s_out, engine.stats, drafter.off_track, path, moved))
            runs.append(_oracle_run(alpha, k, per_seed, recorded, value, plain, engine))
            if profile:  # (the last seed's drafter)
                runs[-1]["profile_s"] = phases(engine)
        _release(engine)
        del engine
    sweep = {
        "synthetic": True,
        "draft": "oracle",
        "adaptive_k": cfg.get("speculative_adaptive", True),  # K: the most drafts a step
        "note": "random weights: drafts are the target's own greedy tokens (the plain run's, settled on "
        "the verification steps' numerics), each replaced by a wrong token with probability 1 - alpha "
        "(synthetic acceptance; real acceptance needs real weights)",
        "oracle_seeds": seeds,
        "plain": {
            "value": plain,
            "wall_s": wall,  # the runs' mean
            "runs": len(walls),
            "per_run_wall_s": walls,
            "runs_equal": runs_equal,  # every run's tokens those of the first (the drafts' source)
            "steps": stats.steps,
            "ahead_steps": stats.ahead_steps,
        },
        "runs": runs,
    }
    return sweep, (wall, tokens, plain_info)


class _SeedRun(NamedTuple):
    """One oracle seed's timed run of a sweep point."""

    seed: int
    wall: float
    results: list
    stats: object  # EngineStats
    off_track: int  # proposals skipped: the sequence left the oracle's path
    path: dict  # the oracle's (settled) path
    moved: int  # requests whose path settling moved


def _oracle_run(alpha: float, k: int, per_seed: list, recorded: dict, value, plain: float, engine) -> dict:
    """One sweep point from its seeds' runs (``_SeedRun``): the seeds' tokens over their wall time,
    their counters summed."""
    walls = [r.wall for r in per_seed]
    tokens = [sum(len(x.token_ids) for x in r.results) for r in per_seed]
    n = len(per_seed)
    v = value(sum(walls) / n, sum(tokens) / n)
    st = replace(per_seed[0].stats)  # (the seeds' own stay as they were: per_seed below)
    for r in per_seed[1:]:
        for f in ("steps", "preemptions", "decode_rows", "generated_tokens", "verify_steps",
                  "draft_tokens", "accepted_tokens", "micro_batch_steps"):  # fmt: skip
            setattr(st, f, getattr(st, f) + getattr(r.stats, f))
    outs = [(x, r.path) for r in per_seed for x in r.results]
    return {
        "alpha": alpha,
        "k": k,
        "value": v,
        "speedup": v / plain,
        "wall_s": sum(walls) / n,
        "steps": st.steps / n,
        "micro_batches": engine.micro_batches,
        "micro_batch_steps": st.micro_batch_steps / n,
        "absorb_cross": engine.absorbs_cross,  # speculative engines keep per-layer K/V
        **speculation_info(st),
        "off_track_proposals": sum(r.off_track for r in per_seed),
        # more steps than the plain run at alpha 0 mean fewer sequences a step: an
        # out-of-memory recovery lowered the engine's sequence limit, or preemptions
        "max_num_seqs_after": engine.max_num_seqs,
        "preemptions": st.preemptions,
        "outputs_equal_to_plain": sum(x.token_ids == recorded[x.request_id] for x, _ in outs) / len(outs),
        # the drafts' path: the plain run's, or where verification steps' numerics leave
        # it, the speculative engine's own greedy path (``_settled_path``)
        "outputs_equal_to_oracle_path": sum(x.token_ids == p[x.request_id] for x, p in outs) / len(outs),
        "oracle_path_moved": sum(r.moved for r in per_seed),
        "seeds": n,
        "per_seed": [
            {"seed": r.seed, "value": value(r.wall, t), "tokens_per_step": r.stats.tokens_per_step}
            for r, t in zip(per_seed, tokens, strict=True)
        ],
    }


class _FixedLength:
    """transformers LogitsProcessor: EOS suppressed before each row's target length, forced at it."""

    def __init__(self, targets, eos: int, prompt_len: int, num_beams: int):
        self.targets = torch.tensor(targets).repeat_interleave(num_beams)
        self.eos, self.prompt_len = eos, prompt_len

    def __call__(self, input_ids, scores):
        n = input_ids.shape[1] - self.prompt_len  # tokens generated so far
        t = self.targets.to(scores.device)[: scores.shape[0]]
        before = (n < t)[:, None]
        at = (n >= t)[:, None]
        eos_col = torch.zeros_like(scores[:1], dtype=torch.bool)
        eos_col[0, self.eos] = True
        scores = scores.masked_fill(before & eos_col, float("-inf"))
        return scores.masked_fill(at & ~eos_col, float("-inf"))


def run_hf(w: Workload, hf, enc_inputs, targets, batch: int) -> tuple[float, int]:
    from transformers import LogitsProcessorList, WhisperFeatureExtractor

    cfg = text_config(hf.config)
    dev = next(hf.parameters()).device
    fe = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins) if w.model.startswith("whisper") else None
    tokens = 0

    def one(lo, hi):
        xs, ts = enc_inputs[lo:hi], targets[lo:hi]
        proc = LogitsProcessorList([_FixedLength(ts, cfg.eos_token_id, 1, w.num_beams)])
        kw = dict(
            max_new_tokens=max(ts) + 1,
            num_beams=w.num_beams,
            do_sample=False,
            logits_processor=proc,
            decoder_input_ids=torch.full((len(xs), 1), cfg.decoder_start_token_id, device=dev),
        )
        if w.num_beams > 1:
            kw.update(length_penalty=w.length_penalty, no_repeat_ngram_size=w.no_repeat_ngram_size)
        if w.forced_bos is not None:
            kw.update(forced_bos_token_id=w.forced_bos)
        if w.model == "moonshine-base":  # equal-length clips: one [B, samples] batch, no padding
            waves = torch.from_numpy(np.stack(xs)).to(dev, hf.dtype)
            return hf.generate(input_values=waves, **kw)
        if fe is not None:
            feats = fe(xs, sampling_rate=16000, return_tensors="pt", device="cuda").input_features
            return hf.generate(input_features=feats.to(dev, hf.dtype), **kw)
        if isinstance(xs[0], dict):  # Florence-2: images and prompts of one length
            pixels = torch.stack([x["pixel_values"] for x in xs]).to(dev, hf.dtype)
            ids = torch.tensor([x["input_ids"] for x in xs], device=dev)
            return hf.generate(input_ids=ids, pixel_values=pixels, **kw)
        n = max(len(x) for x in xs)
        ids = torch.full((len(xs), n), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(xs), n), dtype=torch.long)
        for i, x in enumerate(xs):
            ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        return hf.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw)

    with torch.inference_mode():
        # warm-up at the timed batch size: its first run of a shape pays the allocator's growth and
        # kernel selection (one cold batch of 128 ran 4x slower than a warm one)
        one(0, min(batch, len(enc_inputs)))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for lo in range(0, len(enc_inputs), batch):
            one(lo, lo + batch)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(targets)
    return wall, tokens


def _cuda_ms(fn, reps: int = 10) -> float:
    """Mean milliseconds of ``fn`` on the current CUDA stream, after one warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def copy_bandwidth() -> float:
    """This device's copy bandwidth in bytes/s, counting read + write."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / (_cuda_ms(lambda: dst.copy_(src)) * 1e-3)


def matmul_rate() -> float:
    """This device's bf16 matmul rate in FLOP/s (cuBLAS, [8192, 8192] squared)."""
    a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * MATMUL_N**3 / (_cuda_ms(lambda: a @ b) * 1e-3)


def device_rates() -> dict:
    """Measured at the start of a bench run (a few hundred ms): what the floors divide by."""
    rates = {"copy_bytes_per_s": copy_bandwidth(), "bf16_flop_per_s": matmul_rate()}
    torch.cuda.empty_cache()
    return rates


def image_flops(model, shape: tuple) -> int:
    """The matmul and convolution FLOPs of one image of ``shape`` [C, H, W] through a Florence-2
    model's vision tower and projector (torch's FlopCounterMode over one run; attention included),
    0 where this process holds no tower (a pipeline stage after the first)."""
    from torch.utils.flop_counter import FlopCounterMode

    tower = getattr(model, "vision_tower", None)
    p = next(tower.parameters(), None) if tower is not None else None
    if p is None:
        return 0
    pixels = torch.zeros((1, *shape), device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.image_features(pixels)
    return counter.get_total_flops()


def floors(
    w: Workload,
    model,
    enc_inputs,
    targets,
    max_num_seqs: int,
    absorbed: bool,
    rates: dict,
    kv_dtype: str = "bfloat16",
    counts=None,
) -> dict:
    """Lower bounds on a run's time on this device (benchmarks/WORKLOADS.md, "Floors").

    decode: the bytes that must move, over this device's copy bandwidth: the decoder weights once per
    step, plus every step's reads of each running sequence's cross-attention cache in the layout the
    engine used (``absorbed``: the encoder rows, read by every layer; else every layer's cross K and
    V) and its self-attention K/V so far, in bf16 or (``kv_dtype`` "fp8_e4m3") one byte a value plus
    a float32 scale per cached row. The step count assumes full batches of
    ``max_num_seqs`` sequences, each as long as the mean output.
    encoder: the encoder's matmul FLOPs (weights and attention; Florence-2's vision tower counted by
    ``image_flops``) over this device's bf16 matmul rate.
    ``counts``: {parameter: elements} taken before a pipeline-parallel run dropped other stages' layers.
    """
    counts = counts or {n: p.numel() for n, p in model.named_parameters()}
    florence = w.model.startswith("florence")
    if florence:  # the BART encoder's parameters here; the vision tower's FLOPs are counted below
        counts = {
            n.removeprefix("language_model."): c for n, c in counts.items() if n.startswith("language_model.")
        }
    dec_bytes = 2 * sum(c for n, c in counts.items() if not n.startswith("encoder"))
    enc_params = sum(c for n, c in counts.items() if n.startswith("encoder"))
    spec = model.cache_spec
    fp8 = kv_dtype == "fp8_e4m3"
    elem, row_scale = (1, 4) if fp8 else (2, 0)
    kv_token = 2 * spec.num_layers * spec.num_heads * (spec.head_dim * elem + row_scale)  # K+V, all layers
    cross_row = spec.num_layers * (model.d_model * elem + row_scale) if absorbed else kv_token  # per position
    if w.model.startswith("whisper"):
        enc_lens = [N_AUDIO_CTX] * len(enc_inputs)
    elif w.model == "moonshine-base":
        from encdec_models.moonshine import encoder_frames

        enc_lens = [encoder_frames(len(x)) for x in enc_inputs]
    else:
        enc_lens = [len(x["input_ids"]) if florence else len(x) for x in enc_inputs]
    seqs = len(targets) * w.num_beams
    steps = int(np.ceil(seqs / max_num_seqs)) * int(np.mean(targets))
    cache_bytes = sum(w.num_beams * t * (cross_row * e + kv_token * t / 2) for e, t in zip(enc_lens, targets))
    decode_s = (steps * dec_bytes + cache_bytes) / rates["copy_bytes_per_s"]
    d = spec.num_heads * spec.head_dim
    encoder = model.language_model.encoder if florence else getattr(model, "encoder", None)
    layers = len(encoder.layers) if encoder is not None else 0
    enc_flops = sum(2 * enc_params * e + 4 * e * e * d * layers for e in enc_lens)
    if florence:
        shapes = [tuple(x["pixel_values"].shape) for x in enc_inputs]
        per_image = {shape: image_flops(model, shape) for shape in set(shapes)}
        enc_flops += sum(per_image[shape] for shape in shapes)
    encoder_s = enc_flops / rates["bf16_flop_per_s"]
    return {
        "decode_floor_s": decode_s,
        "encoder_floor_s": encoder_s,
        "floor_s": decode_s + encoder_s,
        "floor_layout": ("absorbed" if absorbed else "kv") + (" fp8" if fp8 else ""),
    }


def run_workload(
    wid: str,
    baseline: bool,
    batches: tuple[int, ...],
    engine_cfg: dict,
    scale: float = 1.0,
    rates: dict | None = None,
    oracle: tuple[tuple[float, ...], tuple[int, ...]] | None = None,
) -> dict:
    """One workload, ours and (``baseline``) transformers; ``rates``: ``device_rates()`` of this run.
    ``oracle`` (alphas, Ks): also the speculative sweep of ``run_oracle_sweep`` (its plain run is
    ours)."""
    w = WORKLOADS[wid]
    if scale != 1.0:
        w = Workload(**{**asdict(w), "requests": max(1, int(w.requests * scale))})
    dev, dtype = "cuda", torch.bfloat16
    if w.id == "W6":  # the prefix cache on vs off: no transformers baseline, no floor
        _, loaded = build_models(w, dev, dtype, with_hf=False)
        res = {"workload": wid, "model": w.model, "requests": w.requests, "num_beams": 1}
        return {**res, **run_prefix_workload(w, loaded, engine_cfg), "metric": w.metric}
    enc_inputs, targets = inputs_for(w)
    hf, loaded = build_models(w, dev, dtype, with_hf=baseline)
    audio_s = AUDIO_SECONDS.get(w.model, 30.0) * w.requests

    def metric_of(wall: float, tokens: int) -> float:
        return audio_s / wall if w.metric == "RTFx" else tokens / wall

    counts = {n: p.numel() for n, p in loaded.model.named_parameters()}  # before stages drop layers
    sweep = None
    if oracle is not None:
        sweep, (ours_wall, ours_tokens, info) = run_oracle_sweep(
            w, loaded, enc_inputs, targets, engine_cfg, *oracle, metric_of
        )
    else:
        ours_wall, ours_tokens, info = run_ours(w, loaded, enc_inputs, targets, **engine_cfg)
    rates = rates or device_rates()
    seqs, absorbed = info["max_num_seqs"], info["absorb_cross"]
    fl = floors(
        w, loaded.model, enc_inputs, targets, seqs, absorbed, rates, info.get("kv_dtype", "bfloat16"), counts
    )  # fmt: skip
    res = {
        "workload": wid,
        "model": w.model,
        "requests": w.requests,
        "num_beams": w.num_beams,
        "ours_wall_s": ours_wall,
        "ours_output_tokens": ours_tokens,
        "engine": info,
        **fl,
        "floor_fraction": fl["floor_s"] / ours_wall,
    }
    res["ours"] = metric_of(ours_wall, ours_tokens)
    if sweep is not None:
        res["speculative"] = sweep
    if baseline:
        del loaded
        torch.cuda.empty_cache()
        if w.model.startswith("whisper"):
            batches = (64,) if w.requests > 1 else (1,)
        if w.batch:
            batches = (w.batch,)
        best = None
        for b in batches:
            wall, tokens = run_hf(w, hf, enc_inputs, targets, b)
            value = audio_s / wall if w.metric == "RTFx" else tokens / wall
            res.setdefault("baseline_by_batch", {})[b] = value
            if best is None or value > best[0]:
                best = (value, b, wall)
        res.update(
            baseline=best[0], baseline_batch=best[1], baseline_wall_s=best[2], ratio=res["ours"] / best[0]
        )
    if w.published:
        res["trtllm_published_h100"] = dict(w.published)
        res["vs_trtllm_published_h100"] = {k: res["ours"] / v for k, v in w.published}
    res["metric"] = w.metric
    return res


def environment() -> dict:
    import transformers
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(results: list[dict], out: Path, rates: dict | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    head = {**environment(), **({"device_rates": rates} if rates else {})}
    out.write_text(json.dumps({**head, "results": results}, indent=2))
