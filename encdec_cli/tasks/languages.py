"""Language codes of translation tokenizers: mBART (``en_XX``), NLLB-200 (``eng_Latn``) and
M2M100 (``en``, the token ``__en__``). A code names the token the tokenizer puts before the source
text (``tokenizer.src_lang``) and the token the decoder is forced to start with (the target).
A code the tokenizer does not know is an error that lists the close matches."""

from __future__ import annotations

import difflib
import re

# mBART-50 "en_XX", NLLB-200 "eng_Latn": special tokens of this shape are language codes
_CODE_TOKEN = re.compile(r"[a-z]{2,3}_[A-Z][A-Za-z]{1,3}")


def language_codes(tok) -> dict[str, int]:
    """code -> token id of every language the tokenizer knows; empty for other tokenizers."""
    m2m = getattr(tok, "lang_code_to_id", None)
    if isinstance(m2m, dict) and hasattr(tok, "get_lang_token"):  # M2M100: "en" -> "__en__"
        return {str(code): int(tid) for code, tid in m2m.items()}
    specials = getattr(tok, "all_special_tokens", None) or []
    return {t: int(tok.convert_tokens_to_ids(t)) for t in specials if _CODE_TOKEN.fullmatch(t)}


def close_matches(code: str, codes) -> list[str]:
    """Known codes that look like ``code`` (case-insensitive), best first."""
    lower = {c.lower(): c for c in codes}
    found = difflib.get_close_matches(code.lower(), list(lower), n=5, cutoff=0.6)
    return [lower[c] for c in found]


def language_token_id(tok, code: str, what: str) -> int:
    """The token id of language ``code``; ValueError naming ``what`` (e.g. "--target-lang") and the
    close matches when the tokenizer does not know it."""
    codes = language_codes(tok)
    if code in codes:
        return codes[code]
    if not codes:  # a tokenizer without a list of codes: any single known token
        tid = tok.convert_tokens_to_ids(code)
        if isinstance(tid, int) and tid != tok.unk_token_id:
            return tid
    msg = f"{what} {code!r} is not a language code of this model's tokenizer"
    close = close_matches(code, codes)
    if close:
        msg += "; close matches: " + ", ".join(close)
    elif codes:
        shown = sorted(codes)
        msg += f"; it knows {len(shown)}: " + ", ".join(shown[:12]) + (", ..." if len(shown) > 12 else "")
    raise ValueError(msg)


def example_code(tok) -> str | None:
    """A language code of the tokenizer to show in a message (French if it has it)."""
    codes = language_codes(tok)
    for c in ("fra_Latn", "fr", "fr_XX"):
        if c in codes:
            return c
    return min(codes) if codes else None
