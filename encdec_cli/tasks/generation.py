"""A model's ``generation_config.json`` (transformers' ``GenerationConfig``) as engine SamplingParams.

Each field means what transformers 5.x ``generate`` makes of it, with one deliberate difference: a
config without ``max_length`` / ``max_new_tokens`` decodes up to the model's decoder limit (the
engine's default) instead of transformers' implicit 20 new tokens.
"""

from __future__ import annotations

import dataclasses
import warnings

from transformers import GenerationConfig

from encdec_cli.engine import SamplingParams

DEFAULT_TOP_K = 50  # transformers' top_k when sampling and the config leaves it unset

# Overridable fields named as in GenerationConfig; they are applied to the config's values first.
GENERATION_FIELDS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "no_repeat_ngram_size",
    "repetition_penalty",
    "min_length",
    "min_new_tokens",
    "max_length",
    "max_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "bad_words_ids",
    "num_return_sequences",
)
# SamplingParams fields a config does not have; overrides set them on the result.
_PARAMS_ONLY = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in GENERATION_FIELDS)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _effective(gen: GenerationConfig, overrides: dict) -> dict:
    """The config's generation fields with the overrides (None = keep) applied, CLI-style: an
    override wins over a config field that would otherwise take precedence over it."""
    vals = {k: getattr(gen, k, None) for k in GENERATION_FIELDS}
    given = {k: v for k, v in overrides.items() if v is not None and k in GENERATION_FIELDS}
    if "max_length" in given and "max_new_tokens" not in given:
        vals["max_new_tokens"] = None  # transformers lets max_new_tokens win; the user asked otherwise
    if "min_length" in given and "min_new_tokens" not in given:
        vals["min_new_tokens"] = None
    if "temperature" in given and "do_sample" not in given:
        given["do_sample"] = given["temperature"] > 0  # --temperature 0.7 means "sample"
    vals.update(given)
    return vals


def sampling_params_from_generation_config(
    gen: GenerationConfig, prompt_len: int, overrides: dict | None = None
) -> SamplingParams:
    """SamplingParams for one request whose decoder prompt has ``prompt_len`` tokens.

    ``overrides``: CLI-style values that win over the config; None keeps the config's value.
    Keys are GenerationConfig field names (``GENERATION_FIELDS``: e.g. ``num_beams``,
    ``max_new_tokens``, ``temperature`` — a temperature > 0 turns sampling on, 0 turns it off) or
    SamplingParams fields a config lacks (``seed``, ``logprobs``, ``stop_token_ids``, ...).
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(GENERATION_FIELDS) - set(_PARAMS_ONLY))
    if unknown:
        raise ValueError(
            f"unknown generation option(s) {', '.join(unknown)}; valid: "
            f"{', '.join(sorted(GENERATION_FIELDS + _PARAMS_ONLY))}"
        )
    if prompt_len < 1:
        raise ValueError(f"the decoder prompt needs at least one token (the decoder start), got {prompt_len}")
    v = _effective(gen, overrides)

    # Lengths: max_length / min_length count the decoder prompt; the *_new_tokens forms win.
    max_new = v["max_new_tokens"]
    if max_new is None and v["max_length"] is not None:
        max_new = v["max_length"] - prompt_len
        if max_new < 1:
            raise ValueError(
                f"max_length {v['max_length']} leaves no room after the {prompt_len}-token decoder "
                "prompt; raise max_length or set max_new_tokens"
            )
    min_new = v["min_new_tokens"]
    if min_new is None:
        min_new = max(0, (v["min_length"] or 0) - prompt_len)

    # Forced tokens, at indices among the new tokens (transformers' ForcedBOS/ForcedEOS processors).
    forced = []
    forced_bos = v["forced_bos_token_id"]
    if forced_bos is not None and prompt_len == 1:  # transformers forces it only after a 1-token prompt
        forced.append((0, int(forced_bos)))
    forced_eos = _ids(v["forced_eos_token_id"])
    if forced_eos:
        if max_new is None:
            warnings.warn(
                "forced_eos_token_id needs a max_length or max_new_tokens; it is ignored", stacklevel=2
            )
        else:
            forced.append((max_new - 1, forced_eos[0]))  # several ids: transformers ties them; take the first

    stop = _ids(v["eos_token_id"])
    begin_suppress = _ids(v["begin_suppress_tokens"])
    if begin_suppress and forced_bos is not None and prompt_len == 1:
        # transformers then suppresses them at the second new token, which SamplingParams cannot say
        warnings.warn(
            "begin_suppress_tokens together with forced_bos_token_id is not supported; "
            "begin_suppress_tokens are ignored",
            stacklevel=2,
        )
        begin_suppress = ()
    # transformers drops a bad word that is a single stop token (it would forbid ending)
    bad_words = tuple(
        tuple(int(t) for t in w) for w in (v["bad_words_ids"] or ()) if not (len(w) == 1 and w[0] in stop)
    )

    if v["do_sample"] and (v["temperature"] is None or v["temperature"] > 0):
        temperature = 1.0 if v["temperature"] is None else float(v["temperature"])
        top_k = DEFAULT_TOP_K if v["top_k"] is None else int(v["top_k"])
        top_p = 1.0 if v["top_p"] is None else float(v["top_p"])
    else:  # greedy or beam search
        temperature, top_k, top_p = 0.0, 0, 1.0

    params = SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token_ids=stop,
        suppress_tokens=_ids(v["suppress_tokens"]),
        begin_suppress_tokens=begin_suppress,
        forced_tokens=tuple(forced),
        repetition_penalty=1.0 if v["repetition_penalty"] is None else float(v["repetition_penalty"]),
        no_repeat_ngram_size=v["no_repeat_ngram_size"] or 0,
        bad_words_ids=bad_words,
        num_beams=v["num_beams"] or 1,
        length_penalty=1.0 if v["length_penalty"] is None else float(v["length_penalty"]),
        early_stopping=False if v["early_stopping"] is None else v["early_stopping"],
        num_return_sequences=v["num_return_sequences"] or 1,
    )
    extra = {k: val for k, val in overrides.items() if k in _PARAMS_ONLY and val is not None}
    return dataclasses.replace(params, **extra) if extra else params


def decoder_prompt(gen: GenerationConfig, config) -> list[int]:
    """The decoder prompt of a request: the decoder start token, from the generation config, else the
    model config, else (as transformers falls back) the BOS token."""
    for source, name in (
        (gen, "decoder_start_token_id"),
        (config, "decoder_start_token_id"),
        (gen, "bos_token_id"),
        (config, "bos_token_id"),
    ):
        value = getattr(source, name, None)
        if value is not None:
            if not isinstance(value, int):
                raise ValueError(f"{name} must be one token id, got {value!r}")
            return [value]
    raise ValueError(
        "the model defines no decoder_start_token_id (or bos_token_id) in config.json or "
        "generation_config.json; add one"
    )
