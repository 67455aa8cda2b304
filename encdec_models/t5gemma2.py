"""T5Gemma 2 (``T5Gemma2ForConditionalGeneration``, transformers ``t5gemma2``) on the shared layers:
text, or an image with text, in; text out.

Gemma-3-style stacks, checked against transformers' modeling_t5gemma2.py:
- RMSNorm as norm(x) * (1 + w) (the 1 folded into our weights at load time), a norm before and
  after every sub-layer (``LayerConfig.sandwich``), a final norm; Gemma 3's per-head RMSNorm of
  queries and keys before rotary (``LayerConfig.qk_norm``);
- rotary (rotate-half) with one base per layer type: ``rope_parameters["sliding_attention"]``
  (local, 10k) and ``["full_attention"]`` (global, 1M; "linear" scaling divides its frequencies);
  each attention takes its kind's ``Rotary`` from a {kind: Rotary} position argument;
- grouped-query attention, K/V heads repeated to the query heads at load time;
- scores scaled by ``query_pre_attn_scalar**-0.5``; no score soft-capping (transformers passes
  ``attn_logit_softcapping`` to no attention call, so neither do we); logits soft-capped by
  ``final_logit_softcapping``;
- token embeddings times sqrt(hidden_size), except the end-of-image token (``eoi_token_index``),
  which takes its own unscaled ``eoi_embedding``; gated GELU-tanh MLP; no biases;
- sliding-window layers: decoder self keys with q - k < window; encoder keys at most
  (window + 1) // 2 - 1 positions behind and window // 2 ahead (transformers'
  ``sliding_window_mask_function``: for an even window one more ahead than behind);
- the decoder's **merged attention**: one module, one set of q/k/v/o projections and one softmax
  over [decoder's own causal keys; encoder keys]. The encoder keys are k_norm(k_proj(e)) (no
  rotary), the values v_proj(e): written once per request into the cross cache like any per-layer
  cross K/V; each step runs the paged self and cross attentions, each returning its log-sum-exp,
  and merges them exactly (``layers.Attention.decoder_merged``). Absorbed cross-attention cannot
  apply (the key norm is not linear).
- tied weights: the decoder's embedding (and eoi embedding) are the encoder's, the lm_head too
  when ``tie_word_embeddings``.
- images: SigLIP's vision tower (``vision.SiglipVisionEncoder``: patches, learned positions, the
  shared pre-norm layers on the packed encoder path, a final LayerNorm; its pooling head unused), then
  the projector: average pooling of the patch grid to ``mm_tokens_per_image`` tokens, a (1 + w)
  RMSNorm and a projection matrix; the image tokens (``image_token_index``) of the encoder input take
  them in place of their embeddings, and the text encoder runs as for text.
Encoder and decoder have the same width and vocabulary (transformers requires it). The decoder
starts from ``bos_token_id``. Encoder inputs are token ids, or a dict with ``pixel_values`` [C, H, W]
(the image processor's) and ``input_ids`` holding the image's ``mm_tokens_per_image`` image tokens
(the processor's layout; ``encdec_cli.tasks.image_to_text`` builds both); one image an input.

The config is the transformers one where the installed transformers has ``t5gemma2``, else read
from config.json (``config_from_dict``) with transformers' defaults; the model code needs neither.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from encdec_models.base import EncoderBatch, host_to_device
from encdec_models.florence2 import ImageTextBatch
from encdec_models.layers import (
    EncoderLayer,
    MergedDecoderLayer,
    Norm,
    Rotary,
    repeat_kv_heads,
)
from encdec_models.registry import UnsupportedModelError
from encdec_models.t5gemma import GemmaStackHooks, gemma_layer_config
from encdec_models.text import TextEncDecModel, as_token_ids
from encdec_models.vision import SiglipVisionEncoder, check_pixels

ARCHITECTURE = "T5Gemma2ForConditionalGeneration"
# transformers' T5Gemma2TextConfig / T5Gemma2DecoderConfig defaults (a config.json may leave them out)
_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131_072, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    attention_bias=False,
    query_pre_attn_scalar=256, sliding_window=4096, layer_types=None, final_logit_softcapping=None,
)  # fmt: skip
# transformers' SiglipVisionConfig defaults
_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
)  # fmt: skip
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
_LEGACY_THETA = {"full_attention": "rope_theta", "sliding_attention": "rope_local_base_freq"}

# HF (5.x save format, or the in-memory text_model names) -> ours, within a layer
_RENAME = {
    "self_attn.o_proj": "self_attn.out_proj",
    "mlp.gate_proj": "mlp.fc1",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.fc2",
    "pre_self_attn_layernorm": "self_attn_layer_norm",
    "post_self_attn_layernorm": "post_self_attn_layer_norm",
    "pre_feedforward_layernorm": "final_layer_norm",
    "post_feedforward_layernorm": "post_mlp_layer_norm",
}
_NAME_RE = re.compile(r"^model\.(encoder|decoder)\.(?:text_model\.)?(.+)$")
_KV_RE = re.compile(r"\.self_attn\.(k|v)_proj\.(weight|bias)$")


def _text_settings(d: dict) -> SimpleNamespace:
    """One stack's settings from its config dict, with transformers' defaults and rope conventions."""
    s = {k: d.get(k, v) for k, v in _TEXT_DEFAULTS.items()}
    if s["layer_types"] is None:
        pattern = d.get("sliding_window_pattern", 6)
        s["layer_types"] = [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(s["num_hidden_layers"])
        ]
    given = d.get("rope_parameters") or {}
    rope = {}
    for kind in ("full_attention", "sliding_attention"):
        params = dict(given.get(kind) or {"rope_type": "default"})
        if kind == "full_attention" and d.get("rope_scaling"):
            params.update(d["rope_scaling"])
        params.setdefault("rope_theta", d.get(_LEGACY_THETA[kind], _DEFAULT_THETA[kind]))
        rope[kind] = params
    s["rope_parameters"] = rope
    return SimpleNamespace(**s)


def _as_dict(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def settings(cfg) -> tuple[SimpleNamespace, SimpleNamespace, dict]:
    """(encoder text settings, decoder settings, top-level dict) of a transformers T5Gemma2Config or
    of config.json's dict."""
    d = _as_dict(cfg)
    enc = (d.get("encoder") or {}).get("text_config") or {}
    return _text_settings(enc), _text_settings(d.get("decoder") or {}), d


def config_from_dict(d: dict) -> SimpleNamespace:
    """The config of a folder whose config.json the installed transformers cannot read (no
    ``t5gemma2``): what loading and the tasks read of a config, and ``to_dict``."""
    _, dec, _ = settings(d)
    top = {
        k: d.get(k, getattr(dec, k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size")
    }
    return SimpleNamespace(
        architectures=d.get("architectures") or [ARCHITECTURE],
        model_type="t5gemma2",
        is_encoder_decoder=True,
        decoder_start_token_id=d.get("decoder_start_token_id"),
        to_dict=lambda: dict(d),
        **top,
    )


def _inv_freq(params: dict, head_dim: int) -> torch.Tensor:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise UnsupportedModelError(
            f"T5Gemma 2 rotary type {kind!r} is not supported (default and linear are)"
        )
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv = 1.0 / (float(params["rope_theta"]) ** exponent)
    return inv / float(params["factor"]) if kind == "linear" else inv


class Projector(nn.Module):
    """SigLIP patches -> image tokens of the text width: average pooling of the patch grid to
    ``mm_tokens_per_image`` tokens, Gemma's (1 + w) RMSNorm, a projection matrix (no bias)."""

    def __init__(self, d_vision: int, d_text: int, grid: int, tokens: int, eps: float):
        super().__init__()
        self.norm = Norm(d_vision, "rms", eps)
        self.weight = nn.Parameter(torch.empty(d_vision, d_text))
        self.grid, self.kernel = grid, grid // int(tokens**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, grid * grid, d_vision] -> [B, tokens, d_text]."""
        b, _, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        x = F.avg_pool2d(x, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return self.norm(x) @ self.weight


class T5Gemma2Stack(nn.Module):
    """Token embedding (+ the end-of-image embedding), rotary frequencies per layer type, layers
    and final norm."""

    def __init__(self, s: SimpleNamespace, layers: nn.ModuleList, causal: bool, eoi_token_index: int | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.eoi_embedding = nn.Parameter(torch.zeros(s.hidden_size))
        self.eoi_token_index = eoi_token_index
        self.layers = layers
        self.norm = Norm(s.hidden_size, "rms", s.rms_norm_eps)
        self.embed_scale = s.hidden_size**0.5
        self.rope = s.rope_parameters
        self.head_dim = s.head_dim
        self.kinds = sorted(set(s.layer_types))
        for kind in self.kinds:
            self.register_buffer(f"inv_freq_{kind}", torch.empty(s.head_dim // 2), persistent=False)
        for layer, kind in zip(layers, s.layer_types, strict=True):
            layer.self_attn.rope_kind = kind
            w = s.sliding_window
            if kind == "sliding_attention" and w is not None:
                # causal: keys with q - k < w; encoder: (w + 1) // 2 - 1 behind .. w // 2 ahead
                layer.self_attn.window = w if causal else ((w + 1) // 2, w // 2 + 1)

    def make_inv_freq(self) -> None:
        for kind in self.kinds:
            getattr(self, f"inv_freq_{kind}").copy_(_inv_freq(self.rope[kind], self.head_dim))

    def rotary(self, positions: torch.Tensor, dtype) -> dict[str, Rotary]:
        return {k: Rotary.at(getattr(self, f"inv_freq_{k}"), positions, dtype) for k in self.kinds}

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if self.eoi_token_index is not None and self.eoi_token_index < self.embed_tokens.num_embeddings:
            x = torch.where((tokens == self.eoi_token_index)[:, None], self.eoi_embedding.to(x.dtype), x)
        return x


class T5Gemma2(GemmaStackHooks, TextEncDecModel):
    """T5Gemma 2 encoder/decoder models (``config.encoder.text_config`` and ``.vision_config``,
    ``config.decoder``)."""

    family = "T5Gemma 2"

    config_from_dict = staticmethod(config_from_dict)  # loading.read_config: transformers without t5gemma2

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        enc, dec, top = settings(cfg)
        if enc.hidden_size != dec.hidden_size or enc.vocab_size != dec.vocab_size:
            raise UnsupportedModelError("T5Gemma 2 needs encoder and decoder of one width and vocabulary")
        encoder = top.get("encoder") or {}
        # transformers' defaults: the end-of-image token 256000 (the encoder's), image tokens 256001 (the
        # top-level value, which transformers copies into the encoder config)
        eoi = top.get("eoi_token_index") or encoder.get("eoi_token_index", 256_000)
        self.encoder = T5Gemma2Stack(
            enc,
            nn.ModuleList(
                EncoderLayer(gemma_layer_config(enc, softcap=None, qk_norm=True))
                for _ in range(enc.num_hidden_layers)
            ),
            False,
            eoi,
        )
        self.decoder = T5Gemma2Stack(
            dec,
            nn.ModuleList(
                MergedDecoderLayer(gemma_layer_config(dec, softcap=None, qk_norm=True))
                for _ in range(dec.num_hidden_layers)
            ),
            True,
            eoi,
        )
        self.lm_head = nn.Linear(dec.hidden_size, dec.vocab_size, bias=False)
        # with tie_word_embeddings transformers ties the decoder's embeddings and the lm_head to the encoder's
        tie = top.get("tie_word_embeddings", True)
        self.tied_weights = (
            {
                "decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
                "decoder.eoi_embedding": "encoder.eoi_embedding",
                "lm_head.weight": "encoder.embed_tokens.weight",
            }
            if tie
            else {}
        )
        self.vision_tower = self.projector = None
        if encoder.get("vision_config") is not None:  # the SigLIP tower: images in encdec's image-to-text
            vs = SimpleNamespace(
                **{k: encoder["vision_config"].get(k, v) for k, v in _VISION_DEFAULTS.items()}
            )
            self.vision_tower = SiglipVisionEncoder(vs)
            self.image_tokens = int(encoder.get("mm_tokens_per_image", 256))
            grid = self.vision_tower.grid
            self.projector = Projector(
                vs.hidden_size, enc.hidden_size, grid, self.image_tokens, vs.layer_norm_eps
            )
        self.image_token_id = top.get("image_token_index", 256_001)
        self.logit_softcap = dec.final_logit_softcapping
        self.set_shapes(enc, dec)
        # decode steps run on the kernels (causal windows, log-sum-exp): captured in CUDA graphs,
        # transformers' tokens (tests/gpu/test_new_models_gpu.py; passed on an H100, 2026-12-05)
        self.cuda_graphs = True

    def bind_cache(self, k_cache, v_cache, cross_rows=None, scales=None, first: int = 0) -> None:
        if cross_rows is not None:
            raise ValueError(
                "T5Gemma 2's merged attention normalises the encoder keys (k_norm), so absorbed "
                "cross-attention cannot apply; use per-layer cross K/V (absorb_cross=False, --cross kv)"
            )
        super().bind_cache(k_cache, v_cache, None, scales, first)

    def adapt_checkpoint(self, tensors):
        """Grouped-query K/V projections repeated to every query head (transformers' repeat_kv order)."""
        for name, w in tensors:
            m = _KV_RE.search(name)
            if m is not None and name.startswith("model.") and ".vision_tower." not in name:
                stack = "decoder" if name.startswith("model.decoder.") else "encoder"
                w = repeat_kv_heads(w, self.n_rep[stack], self.head_dims[stack])
            yield name, w

    # "model.encoder.layers.0.self_attn.o_proj.weight" (or model.encoder.text_model.layers...) ->
    # "encoder.layers.0.self_attn.out_proj.weight"; "model.encoder.vision_tower.X" -> "vision_tower.X'"
    def rename(self, name: str) -> str | None:
        if name in ("lm_head.out_proj.weight", "lm_head.weight"):
            return "lm_head.weight"
        if name.startswith("model.encoder.vision_tower."):
            ours = SiglipVisionEncoder.rename(name.removeprefix("model.encoder.vision_tower."))
            return None if ours is None or self.vision_tower is None else "vision_tower." + ours
        if name.startswith("model.encoder.multi_modal_projector.") and self.projector is not None:
            return {
                "mm_input_projection_weight": "projector.weight",
                "mm_soft_emb_norm.weight": "projector.norm.weight",
            }.get(name.removeprefix("model.encoder.multi_modal_projector."))
        m = _NAME_RE.match(name)
        if m is None:
            return None
        stack, rest = m[1], m[2]
        if rest in ("embed_tokens.weight", "norm.weight"):
            return f"{stack}.{rest}"
        if rest == "embed_tokens.eoi_embedding":
            return f"{stack}.eoi_embedding"
        lm = re.match(r"layers\.(\d+)\.(.+)$", rest)
        if lm is None:
            return None  # vision_tower.*, multi_modal_projector.*
        i, rest = lm[1], lm[2]
        for theirs, ours in _RENAME.items():
            if rest.startswith(theirs + "."):
                rest = ours + rest[len(theirs) :]
                break
        return f"{stack}.layers.{i}.{rest}"

    def gemma_parts(self) -> list[nn.Module]:
        return [self.encoder, self.decoder] + ([self.projector] if self.projector is not None else [])

    # ---- encoder inputs: token ids, or {"pixel_values": [C, H, W], "input_ids": ids} -----------------
    def _parts(self, item) -> tuple[torch.Tensor | None, object]:
        """(pixels or None, the item's token ids) of an encoder input."""
        if not isinstance(item, dict):
            ids = as_token_ids(item)
            if self.image_token_id is not None and (ids == self.image_token_id).any():
                raise ValueError(
                    "the encoder input holds image tokens but no image: pass a dict with pixel_values"
                )
            return None, ids
        if self.vision_tower is None:
            raise ValueError("this T5Gemma 2 checkpoint has no vision tower: its encoder input is token ids")
        if "pixel_values" not in item or "input_ids" not in item:
            raise ValueError(
                "a T5Gemma 2 image input is a dict with pixel_values [C, H, W] (its image processor's) and "
                "input_ids (its processor's prompt, with the image's tokens)"
            )
        pixels = check_pixels(item["pixel_values"], self.vision_tower.input_shape)
        ids = as_token_ids(item["input_ids"])
        found = int((ids == self.image_token_id).sum())
        if found != self.image_tokens:
            raise ValueError(f"input_ids hold {found} image tokens; one image takes {self.image_tokens}")
        return pixels, ids

    def encoder_length(self, item) -> int:
        return super().encoder_length(self._parts(item)[1])

    def prepare_encoder_batch(self, items, device) -> EncoderBatch:
        parts = [self._parts(x) for x in items]
        batch = super().prepare_encoder_batch([ids for _, ids in parts], device)
        images = [p.cpu() for p, _ in parts if p is not None]
        if not images:
            return batch
        pixels = host_to_device(torch.stack([p.to(images[0].dtype) for p in images]), device)
        return ImageTextBatch(batch.inputs, batch.cu_seqlens, batch.max_seqlen, pixels=pixels)

    def embed_encoder(self, batch: EncoderBatch) -> torch.Tensor:
        """batch.inputs: [T] packed token ids -> [T, d]; an image batch's image tokens take the
        projected SigLIP features of its images, in order."""
        x = super().embed_encoder(batch)
        pixels = getattr(batch, "pixels", None)
        if pixels is not None:
            image = self.projector(self.vision_tower(pixels.to(x.dtype)))
            x = x.masked_scatter(
                (batch.inputs == self.image_token_id)[:, None], image.reshape(-1, x.shape[-1])
            )
        return x
