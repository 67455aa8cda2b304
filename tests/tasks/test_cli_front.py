"""The command line's front: checks before work starts, help texts, stop signals, faults as faults.

Real files and, where signals or imports matter, real subprocesses (``python -m encdec_cli``).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from encdec_cli.cli import TEXT_TASKS, app
from encdec_cli.io.manifest import MANIFEST_NAME

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def encdec(*args, env: dict | None = None, preexec_fn=None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "encdec_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        preexec_fn=preexec_fn,
        timeout=timeout,
    )


def one_error_line(stderr: str, *words: str) -> str:
    """The stderr of a command that ended in a fault: one ``error:`` line with these words, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """An untrained tiny BART folder: loadable, and slow to finish (it rarely stops early)."""
    from tests.support.text_models import build_tiny_model

    return build_tiny_model("bart", tmp_path_factory.mktemp("bart"), max_steps=0).path


@pytest.fixture(scope="module")
def audio(tmp_path_factory, example_clips) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    shutil.copy(example_clips[0].path, folder / "one.wav")
    return folder / "one.wav"


def whisper_config_only(folder: Path, multilingual: bool) -> Path:
    """A Hugging Face Whisper folder with a config and language tokens but no weights: any check that
    passes it on would fail at loading ("no weights"), so an error naming a flag came first."""
    folder.mkdir()
    vocab = 51865 if multilingual else 51864
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": vocab,
    }
    (folder / "config.json").write_text(json.dumps(config))
    added = [{"id": 50259 + i, "content": f"<|{code}|>"} for i, code in enumerate(("en", "de", "fr"))]
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    return folder


# ---- help -------------------------------------------------------------------------------------------


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from encdec_cli.cli import app\n"
        "for args in ([], ['--help'], *([c, '--help'] for c in ('transcribe', 'summarize', 'translate', "
        "'generate', 'eval', 'bench'))):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code in (0, 2) and 'Usage: ' in r.output, (args, r.output)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr


def test_bash_completion(tmp_path):
    """``encdec --show-completion`` (run from bash) prints a script that bash sources; with it, the
    completion of commands and options works, and answers without importing torch or transformers."""
    script = Path(sys.executable).parent / "encdec"
    if not script.exists():
        script = Path(shutil.which("encdec") or "encdec")
    probe = tmp_path / "probe.py"  # the console script, noting what a completion request imported
    probe.write_text(
        "import sys, atexit\n"
        "note = sys.argv[1]\n"
        "atexit.register(lambda: open(note, 'w').write(' '.join(\n"
        "    m for m in ('torch', 'transformers') if m in sys.modules)))\n"
        "sys.argv = ['encdec', *sys.argv[2:]]\n"
        "from encdec_cli.__main__ import main\n"
        "main()\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "encdec").write_text(f'#!/bin/sh\nexec {sys.executable} {probe} {tmp_path / "heavy"} "$@"\n')
    (bin_dir / "encdec").chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV.get('PATH', '')}"}
    shown = subprocess.run(["bash", "-c", f"{script} --show-completion"], capture_output=True, text=True,
                           env=env, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "complete -o default -F _encdec_completion encdec" in shown.stdout
    assert "_ENCDEC_COMPLETE=complete_bash" in shown.stdout
    completing = (
        'eval "$(encdec --show-completion)"\n'
        'COMP_WORDS=(encdec tra); COMP_CWORD=1; _encdec_completion encdec; echo "${COMPREPLY[*]}"\n'
        "COMP_WORDS=(encdec summarize --num); COMP_CWORD=2; _encdec_completion encdec; "
        'echo "${COMPREPLY[*]}"\n'
    )
    r = subprocess.run(["bash", "-c", completing], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["transcribe translate", "--num-beams --num-return-sequences"], r.stdout
    assert (tmp_path / "heavy").read_text() == ""  # completion stays as light as --help


def _help(*args) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], prog_name="encdec", env={"COLUMNS": "100"})
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())  # line breaks of the wrapped help do not matter


def test_help_texts():
    transcribe = _help("transcribe")
    assert "tiny.en [the default], base [multilingual]" in transcribe  # brackets are not markup
    assert "Usage: encdec transcribe [OPTIONS] INPUTS... " in transcribe and "{inputs}" not in transcribe
    assert "Usage: encdec bench [OPTIONS] [WORKLOADS]..." in _help("bench")
    from encdec_cli.tasks.seq2seq import Seq2SeqOptions, default_output

    for task, (column, _) in TEXT_TASKS.items():
        text = _help(task)
        assert f"Usage: encdec {task} [OPTIONS] INPUT " in text
        model_help = text.split("-m, --model")[1].split("-o, --output")[0]
        assert "Hugging Face folder" in model_help and "hf download" in model_help
        assert "Whisper" not in model_help and "tiny.en" not in model_help and "CTranslate2" not in model_help
        named = default_output("in.parquet", Seq2SeqOptions(task=task))
        assert f"in.parquet -> {named} " in text and named == f"in.{column}.parquet"
    commands = typer.main.get_command(app).commands
    for name, command in commands.items():
        for param in command.params:
            if param.name != "help":
                assert (param.help or "").strip(), f"encdec {name} {param.opts[0]} has no help"


# ---- checks before work starts --------------------------------------------------------------------


def test_model_must_fit_the_command(tmp_path, text_model, audio):
    (tmp_path / "in.txt").write_text("w1 w2\n")
    r = encdec("summarize", tmp_path / "in.txt", "-m", "tiny.en", "-q")
    assert r.returncode == 2
    one_error_line(r.stderr, "Whisper speech model", "encdec transcribe")
    only_config = tmp_path / "bart-config"  # the config decides; the weights are never read
    only_config.mkdir()
    shutil.copy(text_model / "config.json", only_config)
    r = encdec("transcribe", audio, "-m", only_config, "-o", tmp_path / "out", "-q")
    assert r.returncode == 2
    one_error_line(r.stderr, "text model (BartForConditionalGeneration)", "summarize")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--task", "translate"], ["--task translate", "English-only", "-m base"]),
        (["--language", "de"], ["--language de", "English-only"]),
        (["-f", "docx"], ["unknown output format 'docx'"]),
        (["-o", "transcripts.txt"], ["-o transcripts.txt", "folder"]),
        (["--temperature", "x"], ["--temperature"]),
        (["--speculative", "ngram", "--beam-size", "2"], ["--speculative", "beam search", "--beam-size 1"]),
        (["--speculative", "model:"], ["--speculative", "draft model"]),
    ],
)
def test_cheap_checks_come_before_the_model_loads(tmp_path, audio, args, words):
    model = whisper_config_only(tmp_path / "english-only", multilingual=False)
    r = encdec("transcribe", audio, "-m", model, "-o", tmp_path / "out", *args)
    assert r.returncode == 2
    one_error_line(r.stderr, *words)


def test_language_checked_against_the_models_tokenizer(tmp_path, audio):
    model = whisper_config_only(tmp_path / "multilingual", multilingual=True)
    r = encdec("transcribe", audio, "-m", model, "--language", "xx")
    assert r.returncode == 2
    one_error_line(r.stderr, "unknown --language 'xx'", "de, en, fr")
    r = encdec("transcribe", audio, "-m", model, "--language", "de", "--task", "translate", "-q")
    assert r.returncode == 2 and "no weights" in r.stderr  # the checks passed; loading failed


def test_text_output_extension_checked_first(tmp_path):
    (tmp_path / "in.txt").write_text("w1 w2\n")
    r = encdec("summarize", tmp_path / "in.txt", "-m", tmp_path / "no-such-model", "-o", tmp_path / "o.xlsx")
    assert r.returncode == 2
    one_error_line(r.stderr, "-o ", "o.xlsx", ".parquet, .jsonl or .csv")


@pytest.mark.skipif(torch.cuda.is_available(), reason="float16 is refused on the CPU only")
def test_float16_on_the_cpu_is_refused(tmp_path, text_model):
    (tmp_path / "in.txt").write_text("w1 w2\n")
    r = encdec(
        "summarize", tmp_path / "in.txt", "-m", text_model, "--dtype", "float16", "-o", tmp_path / "o.jsonl"
    )
    assert r.returncode == 2
    one_error_line(r.stderr, "--dtype float16", "CPU", "--dtype float32")
    assert not (tmp_path / "o.jsonl").exists()


def test_a_hub_id_not_cached_says_how_to_get_it(tmp_path):
    (tmp_path / "in.txt").write_text("w1 w2\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    r = encdec("summarize", tmp_path / "in.txt", "-m", "someone/some-bart", env=env)
    assert r.returncode == 2
    one_error_line(r.stderr, "'someone/some-bart'", "hub could not be reached", "hf download", "-m")


def test_summarize_without_a_model_says_how_to_get_one(tmp_path):
    (tmp_path / "in.txt").write_text("w1 w2\n")
    r = encdec("summarize", tmp_path / "in.txt")
    assert r.returncode == 2
    one_error_line(r.stderr, "summarize needs a text model", "local Hugging Face model folder", "hf download")


# ---- faults are reported as faults ------------------------------------------------------------------


def test_a_pickle_payload_is_refused(tmp_path, text_model):
    model = tmp_path / "evil"
    shutil.copytree(text_model, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model.shared.weight": Payload()}, model / "pytorch_model.bin")
    (tmp_path / "in.txt").write_text("w1 w2\n")
    r = encdec("summarize", tmp_path / "in.txt", "-m", model, "-o", tmp_path / "o.jsonl", "-q")
    assert r.returncode == 2
    one_error_line(r.stderr, str(model / "pytorch_model.bin"), "safetensors")
    assert not marker.exists() and not (tmp_path / "o.jsonl").exists()


def test_a_manifest_path_that_is_a_folder(tmp_path, audio):
    out = tmp_path / "out"
    (out / MANIFEST_NAME).mkdir(parents=True)
    r = encdec("transcribe", audio, "-o", out, "-q")
    assert r.returncode == 3
    one_error_line(r.stderr, str(out / MANIFEST_NAME), "folder")


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")
def test_a_read_only_output_folder(tmp_path, audio):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        r = encdec("transcribe", audio, "-o", out, "-q")
    finally:
        out.chmod(0o700)
    assert r.returncode == 3
    one_error_line(r.stderr, str(out), "-o")


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_disk_error_in_a_text_job_is_an_io_failure(tmp_path, text_model):
    lines = "".join(f"w{i % 100} w{(i * 7) % 100}\n" for i in range(64))
    (tmp_path / "in.txt").write_text(lines)
    r = encdec(
        "summarize",
        tmp_path / "in.txt",
        "-m",
        text_model,
        "-o",
        tmp_path / "o.jsonl",
        "-q",
        "--max-new-tokens",
        "8",
        env={"ENCDEC_PART_ROWS": "8"},
        preexec_fn=_file_size_limit(512),
    )
    assert r.returncode == 3, r.stderr  # not 2: that is for usage errors
    one_error_line(r.stderr, str(tmp_path), "File too large")


def test_a_disk_error_in_transcribe_is_an_io_failure(tmp_path, example_clips):
    clips = [c.path for c in example_clips[:3]]
    out = tmp_path / "out"
    r = encdec("transcribe", *clips, "-o", out, "-q", preexec_fn=_file_size_limit(300))
    assert r.returncode == 3, r.stderr
    one_error_line(r.stderr, str(out), "File too large")


def test_a_full_disk_says_a_rerun_resumes(tmp_path, monkeypatch):
    import encdec_cli.commands.common as common
    import encdec_cli.tasks.seq2seq as seq2seq

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".o.jsonl.parts" / "part-3"))

    monkeypatch.setattr(common, "check_model", lambda *a, **k: tmp_path)
    monkeypatch.setattr(common, "load_engine", lambda *a, **k: None)
    monkeypatch.setattr(seq2seq, "run_seq2seq", full)
    (tmp_path / "in.txt").write_text("w1\n")
    r = CliRunner().invoke(app, ["summarize", str(tmp_path / "in.txt"), "-m", "x"])
    assert r.exit_code == 3
    one_error_line(r.stderr, "part-3", "No space left on device", "run the same command again", "resumes")


# ---- stop signals ---------------------------------------------------------------------------------


def _stopped(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture
def blocked_model(tmp_path, text_model) -> Path:
    """A text model whose weights file is a FIFO nobody opens for writing: the loader's open() of it
    blocks until a signal. (A writer would let the open return, and the loader then fails at once:
    torch.load seeks, which a FIFO cannot.)"""
    model = tmp_path / "blocked"
    shutil.copytree(text_model, model)
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "pytorch_model.bin")
    return model


@functools.cache
def _opening_a_fifo_is_seen() -> bool:
    """Whether this system shows what a process waits on (:func:`_opening_a_fifo` can be true)."""
    fifo = Path(tempfile.mkdtemp()) / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'rb')"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _opening_a_fifo(proc.pid):
                return True
            time.sleep(0.05)
        return False
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(fifo.parent)


def _opening_a_fifo(pid: int) -> bool:
    """Whether process ``pid``'s main thread waits in open() of a FIFO for a writer (Linux)."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"
    except OSError:
        return False


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("delay", [0.4, 1.5, "loading"])
def test_a_stop_signal_at_any_moment_is_one_line(tmp_path, blocked_model, sig, status, delay):
    """During imports (the delays) or while the model loads: the status, one line, no traceback."""
    (tmp_path / "in.txt").write_text("w1 w2\n")
    args = [
        sys.executable,
        "-m",
        "encdec_cli",
        "summarize",
        str(tmp_path / "in.txt"),
        "-m",
        str(blocked_model),
        "--summary-json",
        str(tmp_path / "summary.json"),
    ]
    if delay == "loading" and not _opening_a_fifo_is_seen():
        pytest.skip("needs /proc/PID/wchan (Linux) to see the loader wait on the weights")
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        if delay == "loading":  # the command began; its loader waits in open() of the weights
            deadline = time.monotonic() + 120
            while not _opening_a_fifo(proc.pid):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        else:
            time.sleep(delay)
        code, err = _stopped(proc, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == status, err
    assert "Traceback" not in err and "nanobind" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] in ("interrupted (Ctrl-C)", "stopped by SIGTERM"), err
    assert len([line for line in lines if "interrupted" in line or "stopped" in line]) == 1, err
    if delay == "loading":  # the command had begun: its summary JSON says how it ended
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["exit_code"] == status
        assert summary["error"] == lines[-1] and summary["counts"]["done"] == 0


def test_a_stop_signal_while_the_summary_is_written_is_only_noted(tmp_path, monkeypatch):
    """When a command's summary JSON is written its outcome is decided: a stop signal then (sent here
    from inside the write) neither cuts the file short nor changes the outcome; it is only noted."""
    from encdec_cli.tasks import interrupts, summary

    as_dict = summary.Report.as_dict

    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return as_dict(self, *args, **kwargs)

    monkeypatch.setattr(summary.Report, "as_dict", signalled)
    previous = {sig: signal.getsignal(sig) for sig in interrupts.STOP_SIGNALS}
    interrupts.install()
    interrupts.reset()
    try:
        summary.begin(tmp_path / "summary.json", "summarize")
        summary.finish(3, "cannot read or write in.txt")
        assert interrupts.exit_status() == 143  # noted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        interrupts.reset()
    report = json.loads((tmp_path / "summary.json").read_text())
    assert report["status"] == "io_error" and report["exit_code"] == 3
    assert report["error"] == "cannot read or write in.txt"


_STOP_INSIDE_AN_IMPORT_HOOK = """
import importlib.abc, importlib.machinery, os, signal, sys

class Descriptor:  # a class attribute whose __set_name__ runs while its module imports
    def __set_name__(self, owner, name):
        os.kill(os.getpid(), signal.SIGINT)

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "encdec_cli.tasks.seq2seq":  # what the summarize command imports first
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_with_a_descriptor_first(module):
            type("User", (), {"orgs": Descriptor()})
            exec_module(module)

        spec.loader.exec_module = exec_with_a_descriptor_first
        return spec

sys.meta_path.insert(0, Finder())
sys.argv = ["encdec", *sys.argv[1:]]
from encdec_cli.__main__ import main
main()
"""


def _summarize_stopped(tmp_path, text_model, script: str) -> subprocess.CompletedProcess:
    """``encdec summarize`` run by ``script`` (which stops it while it imports): status 130, its last
    line the stop's, its summary JSON interrupted."""
    (tmp_path / "in.txt").write_text("w1 w2\n")
    args = ["summarize", str(tmp_path / "in.txt"), "-m", str(text_model)]
    args += ["--summary-json", str(tmp_path / "summary.json")]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "interrupted (Ctrl-C)", proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 130
    return proc


def test_a_stop_signal_inside_an_import_hook_is_still_one_line(tmp_path, text_model):
    """A stop signal in a class's __set_name__ while a module imports (huggingface_hub's dataclasses,
    while transformers imports; Python 3.11 would wrap a KeyboardInterrupt raised there in a
    RuntimeError) is held until the import ends: status 130, one line."""
    proc = _summarize_stopped(tmp_path, text_model, _STOP_INSIDE_AN_IMPORT_HOOK)
    assert "Traceback" not in proc.stderr


_STOP_TURNED_INTO_AN_ERROR = """
import importlib.abc, importlib.machinery, signal, sys
from encdec_cli.tasks import interrupts

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "encdec_cli.tasks.seq2seq":  # what the summarize command imports first
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)

        def exec_module(module):  # the KeyboardInterrupt raised in Python code torch called, as
            interrupts._note(signal.SIGINT)  # torch reports it: an error of its own, not chained
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Finder())
sys.argv = ["encdec", *sys.argv[1:]]
from encdec_cli.__main__ import main
main()
"""


def test_a_stop_signal_that_native_code_turned_into_an_error_is_still_one_line(tmp_path, text_model):
    """A KeyboardInterrupt raised in Python code that native code called (torch.tensor's sequence
    checks) comes out as the native code's own error, not chained to it (once in CI: "error: could
    not determine the shape of object type ...", status 2): after a stop signal, any error is the
    stop's. Status 130, one line, the summary says interrupted."""
    proc = _summarize_stopped(tmp_path, text_model, _STOP_TURNED_INTO_AN_ERROR)
    assert proc.stderr.strip().splitlines() == ["interrupted (Ctrl-C)"], proc.stderr


def test_a_stop_signal_while_a_module_imports_waits_for_the_import(tmp_path, monkeypatch):
    """Native extensions run Python code while they import (torch's, through pybind11, which aborts
    the process on an exception there): a stop signal then is held until the import has ended, and a
    second one acts at once."""
    from encdec_cli.tasks import interrupts

    (tmp_path / "signalled_mid_import.py").write_text(
        "import os, signal\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "for _ in range(100_000):  # (the handler would raise here, between bytecodes)\n"
        "    pass\n"
        "body_finished = True\n"
    )
    (tmp_path / "signalled_twice.py").write_text(
        "import os, signal\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "body_finished = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = {sig: signal.getsignal(sig) for sig in (*interrupts.STOP_SIGNALS, signal.SIGALRM)}
    interrupts.install()
    interrupts.reset()
    try:
        with pytest.raises(KeyboardInterrupt):
            import signalled_mid_import

            assert signalled_mid_import.body_finished
            time.sleep(5)  # the held signal acts within 20 ms of the import's end
        assert sys.modules["signalled_mid_import"].body_finished
        assert interrupts.exit_status() == 143
        assert signal.getsignal(signal.SIGALRM) == previous[signal.SIGALRM]  # (its checks are done)
        with pytest.raises(KeyboardInterrupt):
            import signalled_twice  # noqa: F401
        assert "signalled_twice" not in sys.modules  # the second signal cut the import short
        assert signal.getsignal(signal.SIGALRM) == previous[signal.SIGALRM]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.setitimer(signal.ITIMER_REAL, 0)
        interrupts.reset()
        for name in ("signalled_mid_import", "signalled_twice"):
            sys.modules.pop(name, None)


def test_sigterm_stops_a_text_job_in_order(tmp_path, text_model):
    """SIGTERM mid-job, as Slurm or Kubernetes send it: the job saves, prints its summary, exits 143."""
    lines = "".join(f"w{i % 100} w{(i * 7) % 100} w{(i * 13) % 100}\n" for i in range(600))
    (tmp_path / "in.txt").write_text(lines)
    out = tmp_path / "o.jsonl"
    args = ["summarize", tmp_path / "in.txt", "-m", text_model, "-o", out, "--max-num-seqs", "8"]
    args += ["--max-new-tokens", "40", "--min-new-tokens", "40", "--summary-json", tmp_path / "s.json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "encdec_cli", *map(str, args)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**ENV, "ENCDEC_PART_ROWS": "8"},
    )
    first = proc.stderr.readline()  # "model ... on cpu (float32)": the job is about to start
    assert first.startswith("model "), first
    time.sleep(3)  # some rows done (600 rows take a minute and more)
    code, err = _stopped(proc, signal.SIGTERM)
    assert code == 143, err
    assert "Traceback" not in err and "nanobind" not in err
    summary = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "INTERRUPTED" in summary and "re-run" in summary, err
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["status"] == "interrupted" and saved["exit_code"] == 143 and saved["interrupted"]
    assert 0 < saved["counts"]["done"] < 600 and saved["tokens"] == 40 * saved["counts"]["done"]


def test_ctrl_c_mid_transcription_leaves_quietly(tmp_path, example_clips):
    """Ctrl-C while 44.1 kHz files stream through soxr: 130, the summary, no native leak report."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        shutil.copy(example_clips[2].path, corpus / f"c{i:02d}.flac")  # 44.1 kHz: resampled by soxr
    proc = subprocess.Popen(
        [sys.executable, "-m", "encdec_cli", "transcribe", str(corpus), "-o", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    first = proc.stderr.readline()
    assert first.startswith("model "), first
    time.sleep(2)
    code, err = _stopped(proc, signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err and "nanobind" not in err and "leaked" not in err, err
    assert "INTERRUPTED" in err.replace("\r", "\n").strip().splitlines()[-1], err


# ---- progress -------------------------------------------------------------------------------------

PLAIN_PROGRESS = re.compile(
    r"summarize: (\d+)/~?40 rows, ETA (\d+:\d\d|\?), ([\d,]+) tokens \(([\d,]+)/s\), \d+:\d\d elapsed"
)


def test_progress_off_a_terminal_is_plain_lines(tmp_path, text_model):
    """stderr not a terminal (CI logs, nohup): progress is whole lines, no redraws; rows done of the
    total, an ETA, tokens and their rate, time elapsed; at most one line per ENCDEC_PROGRESS_SECONDS."""
    (tmp_path / "in.txt").write_text("".join(f"w{i} w{i + 1} w{i + 2}\n" for i in range(40)))
    args = ["summarize", tmp_path / "in.txt", "-m", text_model, "--max-num-seqs", "4"]
    args += ["--max-new-tokens", "5", "--min-new-tokens", "5"]
    r = encdec(*args, "-o", tmp_path / "a.jsonl", env={**ENV, "ENCDEC_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr
    *lines, summary = [line for line in r.stderr.splitlines() if line.startswith("summarize: ")]
    matches = [PLAIN_PROGRESS.fullmatch(line) for line in lines]
    assert len(lines) >= 10 and all(matches), lines
    rows = [int(m[1]) for m in matches]
    tokens = [int(m[3].replace(",", "")) for m in matches]
    assert rows == sorted(rows) and rows[-1] == 40 and tokens[-1] == 200
    assert all(t == 5 * n for n, t in zip(rows, tokens))  # every row done made 5 tokens
    assert any(m[2] != "?" for m in matches) and any("/~40 rows" in line for line in lines)
    assert summary.startswith("summarize: 40 row(s) done, 200 tokens in ")
    # the default interval (5 s) on a job this short: no progress line at all, only the summary
    r = encdec(*args, "-o", tmp_path / "b.jsonl", env={**ENV, "ENCDEC_PROGRESS_SECONDS": "3600"})
    assert r.returncode == 0 and not [x for x in r.stderr.splitlines() if PLAIN_PROGRESS.match(x)], r.stderr
