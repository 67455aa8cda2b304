"""The audio reader thread never hangs a job: a failing input listing ends it with that error."""

import pytest

from encdec_cli.engine import Engine
from encdec_cli.io.inputs import AudioItem
from encdec_cli.tasks.transcribe import Transcriber
from encdec_models.loading import load_model


def test_input_listing_error_ends_the_job(tiny_en_dir, example_clips):
    engine = Engine(load_model(tiny_en_dir, device="cpu"))
    done = []

    def items():
        yield AudioItem("a", "a", str(example_clips[0].path))
        raise OSError("listing the input folder failed")

    with pytest.raises(OSError, match="listing the input folder failed"):
        Transcriber(engine).run(items(), lambda item, t, err: done.append(item.name))
