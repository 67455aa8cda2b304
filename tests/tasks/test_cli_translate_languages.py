"""``encdec translate`` with many-to-many models (NLLB-200, M2M100; random weights, real tokenizer
classes): --source-lang / --target-lang give transformers' translation, --target-lang-column
runs rows into several languages in one job, and a wrong code is a usage error listing close
matches."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import M2M100ForConditionalGeneration

from tests.support.text_models import single_thread
from tests.support.translation_models import build_translation_model, sentence
from tests.tasks.test_cli_seq2seq import encdec, read_output


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def nllb(tmp_path_factory):
    return build_translation_model("nllb", tmp_path_factory.mktemp("nllb"))


@pytest.fixture(scope="module")
def m2m100(tmp_path_factory):
    return build_translation_model("m2m100", tmp_path_factory.mktemp("m2m100"))


TEXTS = [sentence(random.Random(i)) for i in range(10)]


def hf_translate(model, texts: list[str], src: str, tgt: str) -> list[str]:
    """transformers' translations (the folder's generation config, forced target language)."""
    tok = model.tokenizer(src)
    hf = M2M100ForConditionalGeneration.from_pretrained(model.path).eval()
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf.generate(**batch, forced_bos_token_id=model.lang_id(tgt))
    return [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]


@pytest.mark.parametrize("name,src,tgt", [("nllb", "eng_Latn", "fra_Latn"), ("m2m100", "en", "fr")])
def test_source_and_target_language(name, src, tgt, request, tmp_path):
    model = request.getfixturevalue(name)
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out.jsonl"
    r = encdec("translate", tmp_path / "in.txt", "-m", model.path, "-o", out, "-q",
               "--source-lang", src, "--target-lang", tgt)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    got = [row["translation"] for row in read_output(out)]
    assert got == hf_translate(model, TEXTS, src, tgt)
    assert len(set(got)) == len(TEXTS)
    # the source language is in the encoder input: another one changes the output
    other = "deu_Latn" if name == "nllb" else "de"
    assert hf_translate(model, TEXTS, other, tgt) != got


def test_two_target_languages_in_one_job(nllb, tmp_path):
    langs = ["fra_Latn", "deu_Latn"] * (len(TEXTS) // 2)
    rows = [{"id": i, "text": t, "lang": lang} for i, (t, lang) in enumerate(zip(TEXTS, langs))]
    rows.append({"id": 99, "text": TEXTS[0], "lang": "fra_latn"})  # a bad code fails its row only
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    r = encdec("translate", tmp_path / "in.jsonl", "-m", nllb.path, "-o", out, "-q",
               "--source-lang", "eng_Latn", "--target-lang-column", "lang")  # fmt: skip
    assert r.exit_code == 1, r.stderr  # one row failed
    got = read_output(out)
    fr = hf_translate(nllb, TEXTS, "eng_Latn", "fra_Latn")
    de = hf_translate(nllb, TEXTS, "eng_Latn", "deu_Latn")
    expected = [(fr if lang == "fra_Latn" else de)[i] for i, lang in enumerate(langs)]
    assert [row["translation"] for row in got[:-1]] == expected
    assert all(row["error"] is None for row in got[:-1])
    assert fr != de
    assert got[-1]["translation"] is None and "'fra_latn'" in got[-1]["error"]
    assert "close matches: fra_Latn" in got[-1]["error"]


def test_language_code_errors(nllb, m2m100, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(TEXTS[:2]) + "\n")
    out = tmp_path / "out.jsonl"
    r = encdec("translate", tmp_path / "in.txt", "-m", nllb.path, "-o", out, "--target-lang", "fra_latn")
    assert r.exit_code == 2
    assert "--target-lang 'fra_latn' is not a language code" in r.stderr and "fra_Latn" in r.stderr
    r = encdec("translate", tmp_path / "in.txt", "-m", nllb.path, "-o", out,
               "--source-lang", "english", "--target-lang", "fra_Latn")  # fmt: skip
    assert r.exit_code == 2 and "--source-lang 'english'" in r.stderr and "eng_Latn" in r.stderr
    r = encdec("translate", tmp_path / "in.txt", "-m", m2m100.path, "-o", out, "--target-lang", "fra")
    assert r.exit_code == 2 and "--target-lang 'fra'" in r.stderr
    assert "fr" in r.stderr.split("close matches:")[1]
    # a many-to-many model needs a target language
    r = encdec("translate", tmp_path / "in.txt", "-m", nllb.path, "-o", out)
    assert r.exit_code == 2 and "--target-lang fra_Latn" in r.stderr
    r = encdec("translate", tmp_path / "in.txt", "-m", nllb.path, "-o", out, "--target-lang-column", "lang")
    assert r.exit_code == 2 and "no column 'lang'" in r.stderr
    assert not out.exists()
