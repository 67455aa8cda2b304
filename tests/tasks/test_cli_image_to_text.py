"""``encdec image-to-text`` end to end on a random-weight TrOCR-shaped model: image folders, stdin
lists, Parquet/JSONL image columns, bad images as error records, txt/jsonl/parquet outputs, resume;
texts equal to transformers' generate on the same images."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel
from typer.testing import CliRunner

from encdec_cli.cli import app
from encdec_cli.io.images import load_image
from tests.support.text_models import single_thread
from tests.support.vision_models import draw_images, random_trocr

MAX_NEW = 12


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def encdec(*args, input: bytes | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trocr")
    random_trocr(path)
    return path


def hf_texts(model_dir: Path, images) -> list[str]:
    model = VisionEncoderDecoderModel.from_pretrained(model_dir).eval()
    proc = AutoImageProcessor.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pixels = proc(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (what a decompression bomb looks like to a reader)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def jpeg_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


BAD = {
    "truncated.jpg": "damaged image",
    "empty.png": "empty image file",
    "notes.png": "not an image Pillow can read",
    "bomb.png": "decompression bomb",
}


def make_folder(root: Path):
    """Three good images (one in a subfolder, one JPEG) and the four bad ones; returns the good images
    as decoded from disk, in the job's order (sorted walk)."""
    images = draw_images(3, seed=7)
    (root / "sub").mkdir(parents=True)
    images[0].save(root / "a.png")
    (root / "b.jpg").write_bytes(jpeg_bytes(images[1]))
    images[2].save(root / "sub" / "c.png")
    (root / "truncated.jpg").write_bytes(jpeg_bytes(images[1])[:400])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("these are notes, not an image\n")
    (root / "bomb.png").write_bytes(png_header(20000, 20000))
    (root / "readme.md").write_text("not an image extension: not an input\n")
    return {name: load_image(root / name) for name in ("a.png", "b.jpg", "sub/c.png")}


def test_bad_images_fail_alone():
    from encdec_cli.io.images import load_image as load

    for data, expected in [
        (b"", "empty image"),
        (b"hello", "not an image"),
        (png_header(20000, 20000), "400,000,000 pixels is larger than the limit"),
    ]:
        with pytest.raises(ValueError, match=expected):
            load(data)
    im = draw_images(1)[0]
    assert load(jpeg_bytes(im)).size == im.size
    with pytest.raises(ValueError, match="damaged image"):
        load(jpeg_bytes(im)[:-200])


def test_folder_to_txt_with_bad_images_and_resume(model_dir, tmp_path):
    good = make_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    r = encdec(
        "image-to-text", tmp_path / "imgs", "-m", model_dir, "-o", out, "--max-new-tokens", MAX_NEW, "-q"
    )
    assert r.exit_code == 1, r.output  # some images failed
    expected = dict(zip(good, hf_texts(model_dir, list(good.values()))))
    for name, text in expected.items():
        assert (out / (name.rsplit(".", 1)[0] + ".txt")).read_text() == text + "\n"
    manifest = [json.loads(line) for line in (out / ".encdec-manifest.jsonl").read_text().splitlines()]
    errors = {
        Path(e["key"].split("\0")[0].split("|")[0]).name: e.get("error") for e in manifest if e.get("error")
    }
    assert len(errors) == len(BAD), manifest
    for name, message in BAD.items():
        assert any(name in k and message in (v or "") for k, v in errors.items()), (name, errors)
    assert "4 FAILED" in r.stderr
    # a re-run skips everything (the failed images count: exit 1), --retry-failed redoes the bad ones
    r = encdec(
        "image-to-text", tmp_path / "imgs", "-m", model_dir, "-o", out, "--max-new-tokens", MAX_NEW, "-q"
    )
    assert r.exit_code == 1 and "7 already done or failed before" in r.stderr, r.stderr


def test_tables_stdin_and_table_outputs(model_dir, tmp_path):
    images = draw_images(4, seed=11)
    files = []
    for i, im in enumerate(images[:2]):
        im.save(tmp_path / f"p{i}.png")
        files.append(tmp_path / f"p{i}.png")
    # a Parquet table: the datasets {bytes, path} struct, plain bytes and a bad row
    struct_rows = [
        {"bytes": jpeg_bytes(images[2]), "path": "x.jpg"},
        {"bytes": None, "path": str(files[0])},
        {"bytes": b"junk", "path": "junk.png"},
    ]
    table = pa.table({"id": ["r0", "r1", "r2"], "image": struct_rows})
    pq.write_table(table, tmp_path / "t.parquet")
    # a JSONL table of paths
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": str(files[1])}) + "\n")
    out = tmp_path / "o.parquet"
    args = [
        files[0],
        tmp_path / "t.parquet",
        tmp_path / "t.jsonl",
        "-m",
        model_dir,
        "-f",
        "parquet",
        "-o",
        out,
    ]
    r = encdec("image-to-text", *args, "--max-new-tokens", MAX_NEW, "-q")
    assert r.exit_code == 1, r.output
    rows = pq.read_table(out).to_pylist()
    decoded = [load_image(files[0]), load_image(files[1]), load_image(jpeg_bytes(images[2]))]
    t0, t1, t2 = hf_texts(model_dir, decoded)
    assert [row["text"] for row in rows] == [t0, t2, t0, None, t1]
    assert [row["row"] for row in rows] == [None, 0, 1, 2, 0]
    assert "not an image" in rows[3]["error"] and all(
        row["error"] is None for i, row in enumerate(rows) if i != 3
    )
    # finished: a re-run of the same job skips every row (the failed one counts: exit 1)
    r = encdec("image-to-text", *args, "--max-new-tokens", MAX_NEW, "-q")
    assert r.exit_code == 1 and "5 already done" in r.stderr, r.stderr
    assert pq.read_table(out).to_pylist() == rows
    # a list of paths on stdin, JSON Lines on stdout, in input order
    stdin = f"{files[0]}\n{files[1]}\n".encode()
    r = encdec(
        "image-to-text",
        "-",
        "-m",
        model_dir,
        "-f",
        "jsonl",
        "-o",
        "-",
        "--max-new-tokens",
        MAX_NEW,
        input=stdin,
    )
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["text"] for x in lines] == [t0, t1] and [x["input"] for x in lines] == [str(f) for f in files]


def test_usage_errors(model_dir, tmp_path):
    from tests.support.text_models import build_tiny_model

    bart = build_tiny_model("bart", tmp_path / "bart", max_steps=0)
    (tmp_path / "a.png").write_bytes(b"")
    r = encdec("image-to-text", tmp_path / "a.png", "-m", model_dir, "-f", "parquet", "-o", "-")
    assert r.exit_code == 2 and "-f jsonl" in r.stderr
    r = encdec("image-to-text", tmp_path / "a.png", "-m", bart.path)
    assert r.exit_code == 2 and "does not read images" in r.stderr
    (tmp_path / "t.jsonl").write_text('{"text": "w1 w2"}\n')
    r = encdec("summarize", tmp_path / "t.jsonl", "-m", model_dir)
    assert r.exit_code == 2 and "use it with encdec image-to-text" in r.stderr
    r = encdec("image-to-text", tmp_path / "a.png", "-m", model_dir, "--task", "<nope>")
    assert r.exit_code == 2 and "--task" in r.stderr


def test_donut_task_prompt(tmp_path):
    """--task starts the decoder with Donut's task prompt, as transformers' generate(decoder_input_ids)."""
    from tests.support.vision_models import random_donut

    model = tmp_path / "donut"
    hf = random_donut(model)
    images = draw_images(2, seed=4)
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
    r = encdec(
        "image-to-text", tmp_path / "0.png", tmp_path / "1.png", "-m", model, "--task", "<s_docvqa>",
        "--prompt", "<s_question> w3 w4 </s_question>", "-f", "jsonl", "-o", "-", "--max-new-tokens", MAX_NEW,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = [json.loads(line)["text"] for line in r.stdout.splitlines()]
    tok = AutoTokenizer.from_pretrained(model)
    prompt = tok(
        "<s_docvqa> <s_question> w3 w4 </s_question>", add_special_tokens=False, return_tensors="pt"
    ).input_ids
    proc = AutoImageProcessor.from_pretrained(model)
    expected = []
    for im in images:
        pixels = proc(
            images=load_image(tmp_path / f"{images.index(im)}.png"), return_tensors="pt"
        ).pixel_values
        with torch.no_grad():
            out = hf.generate(
                pixel_values=pixels, decoder_input_ids=prompt, max_new_tokens=MAX_NEW, do_sample=False
            )
        expected.append(tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip())
    assert got == expected


@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory) -> tuple[Path, object]:
    from tests.support.vision_models import random_florence2

    path = tmp_path_factory.mktemp("florence2")
    return path, random_florence2(path)


def florence_reference(path: Path, model, task: str, images, max_new: int) -> list:
    """transformers' processor + generate + post_process_generation, image by image."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    parsed = []
    for im in images:
        x = proc(text=task, images=im, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=max_new, do_sample=False, num_beams=1)
        text = proc.batch_decode(out, skip_special_tokens=False)[0]
        parsed.append(proc.post_process_generation(text=text, task=task, image_size=im.size)[task])
    return parsed


@pytest.mark.parametrize("task", ["<CAPTION>", "<OD>", "<OCR_WITH_REGION>"])
def test_florence2_tasks(florence_dir, tmp_path, task):
    """Plain-text tasks give text; coordinate tasks give the post-processor's boxes in image pixels:
    NAME.json with -f txt, a 'regions' JSON column in tables."""
    path, hf = florence_dir
    images = draw_images(3, seed=9, size=(90, 70))
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
    decoded = [load_image(tmp_path / f"{i}.png") for i in range(3)]
    expected = florence_reference(path, hf, task, decoded, MAX_NEW)
    out = tmp_path / "out"
    args = ["image-to-text", *(tmp_path / f"{i}.png" for i in range(3)), "-m", path, "--task", task, "-q"]
    r = encdec(*args, "-o", out, "--max-new-tokens", MAX_NEW)
    assert r.exit_code == 0, r.output
    r = encdec(*args, "-f", "jsonl", "-o", tmp_path / "t.jsonl", "--max-new-tokens", MAX_NEW)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    for i, want in enumerate(expected):
        if task == "<CAPTION>":
            assert (out / f"{i}.txt").read_text() == want + "\n"
            assert rows[i]["text"] == want and "regions" not in rows[i]
        else:
            written = json.loads((out / f"{i}.json").read_text())
            assert {k: v for k, v in written.items() if k != "text"} == want
            assert json.loads(rows[i]["regions"]) == want
            assert set(want) == ({"bboxes", "labels"} if task == "<OD>" else {"quad_boxes", "labels"})


def test_florence2_task_errors(florence_dir, tmp_path):
    path, _ = florence_dir
    draw_images(1)[0].save(tmp_path / "a.png")
    r = encdec("image-to-text", tmp_path / "a.png", "-m", path, "--task", "<NOPE>")
    assert r.exit_code == 2 and "<OD>" in r.stderr and "<CAPTION>" in r.stderr
    r = encdec("image-to-text", tmp_path / "a.png", "-m", path, "--task", "<OD>", "--prompt", "a car")
    assert r.exit_code == 2 and "takes no --prompt" in r.stderr


def test_prefetch_map_keeps_order_bounds_lookahead_and_captures_errors():
    import threading
    import time

    from encdec_cli.tasks.image_to_text import prefetch_map

    started, threads = [], set()

    def work(x):
        started.append(x)
        threads.add(threading.current_thread().name)
        time.sleep(0.002 * (x % 3))
        if x % 5 == 4:
            raise ValueError(f"bad {x}")
        return x * x

    consumed = 0
    for x, (value, error) in prefetch_map(work, range(40), workers=4, ahead=6):
        assert x == consumed and len(started) <= consumed + 6  # in order, at most 6 ahead
        assert (value, error) == ((None, f"bad {x}") if x % 5 == 4 else (x * x, None))
        consumed += 1
    assert consumed == 40 and len(threads) > 1 and all(t.startswith("encdec-images") for t in threads)


def test_outputs_and_inputs_that_do_not_fit(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "out.txt").write_text("")
    r = encdec("image-to-text", tmp_path / "empty", "-m", model_dir, "-o", tmp_path / "o", "-q")
    assert r.exit_code == 1 and "no image files in" in r.stderr and ".png" in r.stderr
    r = encdec("image-to-text", tmp_path / "empty", "-m", model_dir, "-o", tmp_path / "out.txt")
    assert r.exit_code == 2 and "folder" in r.stderr
    r = encdec("image-to-text", tmp_path / "empty", "-m", model_dir, "-f", "parquet", "-o", tmp_path)
    assert r.exit_code == 2 and "one table file" in r.stderr
    r = encdec("image-to-text", tmp_path / "missing.png", "-m", model_dir)
    assert r.exit_code == 2 and "does not exist" in r.stderr
