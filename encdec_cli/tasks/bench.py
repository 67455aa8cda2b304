"""The standard workloads of benchmarks/WORKLOADS.md (W1..W5, T1, T2): ours vs transformers in one run.

Random weights of the real architectures (seed 0); output lengths are fixed per request (EOS
suppressed before the target length, forced at it), so both systems do exactly the same work.
The same weights are loaded into both: the transformers model is built first and its state dict
is loaded into ours.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from encdec_models.audio import N_AUDIO_CTX, N_SAMPLES

COPY_BYTES = 1 << 30  # a 1 GiB device-to-device copy measures the copy bandwidth
MATMUL_N = 8192  # [N, N] @ [N, N] bf16 matmuls measure the matmul rate


@dataclass(frozen=True)
class Workload:
    id: str
    model: str  # "whisper-large-v3" | "bart-large-cnn" | "flan-t5-large"
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


def hf_config(name: str):
    from transformers import BartConfig, T5Config, WhisperConfig

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
            vocab_size=50264,
            d_model=1024,
            encoder_layers=12,
            decoder_layers=12,
            encoder_attention_heads=16,
            decoder_attention_heads=16,
            encoder_ffn_dim=4096,
            decoder_ffn_dim=4096,
            max_position_embeddings=1024,
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
    targets = (
        np.random.default_rng(0).integers(16, 193, w.requests)
        if w.model.startswith("whisper")
        else np.random.default_rng(2).integers(32, 129, w.requests)
    )
    if w.id == "W5":
        targets = np.array([128])
    if w.output_tokens:
        targets = np.full(w.requests, w.output_tokens)
    if w.model.startswith("whisper"):
        g = torch.Generator().manual_seed(0)
        waves = [torch.randn(N_SAMPLES, generator=g).numpy() * 0.1 for _ in range(w.requests)]
        return waves, targets.tolist()
    lens = np.random.default_rng(1).integers(260, 441, w.requests)
    vocab = hf_config(w.model).vocab_size
    rng = np.random.default_rng(3)
    return [rng.integers(4, vocab - 1, n).tolist() for n in lens], targets.tolist()


def build_models(w: Workload, device, dtype, with_hf: bool):
    """The transformers model (random init, seed 0) and ours with the same weights."""
    from transformers import AutoModelForSeq2SeqLM, WhisperForConditionalGeneration

    from encdec_models.loading import LoadedModel, build_model
    from encdec_models.registry import architecture_of

    cfg = hf_config(w.model)
    torch.manual_seed(0)
    with torch.device(device):
        if w.model.startswith("whisper"):
            hf = WhisperForConditionalGeneration(cfg)
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

    params = {
        t: SamplingParams(
            max_new_tokens=t,
            min_new_tokens=t,
            stop_token_ids=(config.eos_token_id,),
            num_beams=w.num_beams,
            length_penalty=w.length_penalty,
            no_repeat_ngram_size=w.no_repeat_ngram_size,
        )
        for t in set(targets)
    }
    start = [config.decoder_start_token_id]
    return [Request(x, start, params[t], i) for i, (x, t) in enumerate(zip(enc_inputs, targets, strict=True))]


def warmup_requests(w: Workload, config, enc_inputs, targets) -> list:
    """A small untimed batch before the timed run (compiles kernels, autotunes): up to 4 of the
    workload's inputs (W5 has one), all with the first request's output length."""
    warm = enc_inputs[:4]
    return workload_requests(w, config, warm, [targets[0]] * len(warm))


def run_ours(w: Workload, loaded, enc_inputs, targets, **engine_cfg) -> tuple[float, int, dict]:
    from encdec_cli.engine import Engine

    cfg = {k: v for k, v in engine_cfg.items() if k != "profile"}
    # never more sequence slots than the workload has sequences (W5: one): the engine sizes its CUDA
    # graphs and its cross-attention layout (runner.ABSORB_MIN_SEQS) by them
    cfg["max_num_seqs"] = min(cfg.get("max_num_seqs", 512), len(enc_inputs) * w.num_beams)
    if w.batch:  # TensorRT-LLM's shape: exactly this many sequences per step
        cfg["max_num_seqs"] = w.batch
    engine = Engine(loaded, **cfg)
    list(engine.generate(warmup_requests(w, loaded.config, enc_inputs, targets)))
    engine.reset_stats()  # count the timed run's steps only
    requests = workload_requests(w, loaded.config, enc_inputs, targets)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = list(engine.generate(requests))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in out)
    errors = [r.error for r in out if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    stats = engine.stats
    info = {
        "max_num_seqs": cfg["max_num_seqs"],
        "num_blocks": engine.num_blocks,
        "preemptions": stats.preemptions,
        "graphs": engine.uses_cuda_graphs,
        "steps": stats.steps,
        "ahead_steps": stats.ahead_steps,
        "absorb_cross": engine.absorbs_cross,
    }
    if stats.stage_busy_seconds:  # pipeline parallel: each stage's compute seconds (not waiting)
        info["stage_busy_s"] = [round(b, 3) for b in stats.stage_busy_seconds]
    if engine_cfg.get("profile"):  # a second, synchronized run: where the time goes per step phase
        engine.reset_stats(profile=True)
        list(engine.generate(workload_requests(w, loaded.config, enc_inputs, targets)))
        info["profile_s"] = {k: round(v, 3) for k, v in engine.stats.phase_seconds.items()}
    engine.close()
    del engine
    torch.cuda.empty_cache()
    return wall, tokens, info


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

    cfg = hf.config
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
        if fe is not None:
            feats = fe(xs, sampling_rate=16000, return_tensors="pt", device="cuda").input_features
            return hf.generate(input_features=feats.to(dev, hf.dtype), **kw)
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


def floors(
    w: Workload, model, enc_inputs, targets, max_num_seqs: int, absorbed: bool, rates: dict, counts=None
) -> dict:
    """Lower bounds on a run's time on this device (benchmarks/WORKLOADS.md, "Floors").

    decode: the bytes that must move, over this device's copy bandwidth: the decoder weights once per
    step, plus every step's reads of each running sequence's cross-attention cache in the layout the
    engine used (``absorbed``: the encoder rows, read by every layer; else every layer's cross K and
    V) and its self-attention K/V so far, all bf16. The step count assumes full batches of
    ``max_num_seqs`` sequences, each as long as the mean output.
    encoder: the encoder's matmul FLOPs (weights and attention) over this device's bf16 matmul rate.
    ``counts``: {parameter: elements} taken before a pipeline-parallel run dropped other stages' layers.
    """
    counts = counts or {n: p.numel() for n, p in model.named_parameters()}
    dec_bytes = 2 * sum(c for n, c in counts.items() if not n.startswith("encoder"))
    enc_params = sum(c for n, c in counts.items() if n.startswith("encoder"))
    spec = model.cache_spec
    kv_token = 2 * spec.num_layers * spec.num_heads * spec.head_dim * 2  # K+V of one token, all layers
    cross_row = spec.num_layers * model.d_model * 2 if absorbed else kv_token  # per encoder position
    enc_lens = [N_AUDIO_CTX if w.model.startswith("whisper") else len(x) for x in enc_inputs]
    seqs = len(targets) * w.num_beams
    steps = int(np.ceil(seqs / max_num_seqs)) * int(np.mean(targets))
    cache_bytes = sum(w.num_beams * t * (cross_row * e + kv_token * t / 2) for e, t in zip(enc_lens, targets))
    decode_s = (steps * dec_bytes + cache_bytes) / rates["copy_bytes_per_s"]
    d = spec.num_heads * spec.head_dim
    layers = len(model.encoder.layers) if hasattr(model, "encoder") else 0
    enc_flops = sum(2 * enc_params * e + 4 * e * e * d * layers for e in enc_lens)
    encoder_s = enc_flops / rates["bf16_flop_per_s"]
    return {
        "decode_floor_s": decode_s,
        "encoder_floor_s": encoder_s,
        "floor_s": decode_s + encoder_s,
        "floor_layout": "absorbed" if absorbed else "kv",
    }


def run_workload(
    wid: str,
    baseline: bool,
    batches: tuple[int, ...],
    engine_cfg: dict,
    scale: float = 1.0,
    rates: dict | None = None,
) -> dict:
    """One workload, ours and (``baseline``) transformers; ``rates``: ``device_rates()`` of this run."""
    w = WORKLOADS[wid]
    if scale != 1.0:
        w = Workload(**{**asdict(w), "requests": max(1, int(w.requests * scale))})
    dev, dtype = "cuda", torch.bfloat16
    enc_inputs, targets = inputs_for(w)
    hf, loaded = build_models(w, dev, dtype, with_hf=baseline)
    counts = {n: p.numel() for n, p in loaded.model.named_parameters()}  # before stages drop layers
    ours_wall, ours_tokens, info = run_ours(w, loaded, enc_inputs, targets, **engine_cfg)
    rates = rates or device_rates()
    seqs, absorbed = info["max_num_seqs"], info["absorb_cross"]
    fl = floors(w, loaded.model, enc_inputs, targets, seqs, absorbed, rates, counts)
    audio_s = 30.0 * w.requests
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
    res["ours"] = audio_s / ours_wall if w.metric == "RTFx" else ours_tokens / ours_wall
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
