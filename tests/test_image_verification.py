"""Build-time image verification: ``jpeg_check.verify_jpeg`` and the builder's ``verify_images``.

PIL silences libjpeg's warnings, so a JPEG whose entropy-coded data were overwritten
usually *loads* without any error; these tests pin that ``verify_jpeg`` still rejects it
(and truncated, constant and non-JPEG files), and that the builder reports such an image
as ``bad_image`` under both ``on_bad_record`` modes.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from bioscan_jax.data import schema
from tfds_builder.bioscan5m import BadRecordError, jpeg_check, make_dummy_data
from test_tfds_builder import _build, _image, _tree  # the official-layout copy of dummy_data/ to break

EOI = b"\xff\xd9"


def _jpeg(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _noisy(seed: int = 0, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """A textured image (gradients plus noise): dense entropy-coded data."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x, y, (x + y) // 2], -1) * 0.8
    return np.clip(base + np.random.default_rng(seed).normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def good() -> bytes:
    return _jpeg(_noisy(), quality=90)


def _scan(data: bytes) -> tuple[int, int]:
    """(first byte of the entropy-coded data, offset of the end-of-image marker)."""
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    assert data.endswith(EOI)
    return start, len(data) - 2


def _overwritten(data: bytes, fraction: float, span: int = 256, seed: int = 1) -> bytes:
    """``span`` random bytes (never 0xFF, so no marker) written over the entropy-coded data at
    ``fraction`` of its length; the end-of-image marker and the length are unchanged."""
    start, end = _scan(data)
    at = start + int((end - start) * fraction)
    junk = np.random.default_rng(seed).integers(0, 255, span, dtype=np.uint8).tobytes()
    out = data[:at] + junk + data[at + span :]
    assert len(out) == len(data) and out.endswith(EOI) and out != data
    return out


# ----------------------------------------------------------------------------- sound images pass


@pytest.mark.parametrize("draft", [True, False])
def test_a_valid_jpeg_passes(good, draft):
    assert jpeg_check.verify_jpeg(good, draft=draft) is None
    grey = _jpeg(_noisy(3, (97, 131))[..., 0], quality=75)
    assert jpeg_check.verify_jpeg(grey, draft=draft) is None


def test_every_dummy_data_image_passes():
    paths = sorted(pathlib.Path(make_dummy_data.DUMMY_DIR, schema.IMAGES_RELDIR).rglob("*.jpg"))
    assert len(paths) == 4 * 16
    assert {str(p): jpeg_check.verify_jpeg(p.read_bytes()) for p in paths} == {str(p): None for p in paths}


def test_a_fine_pattern_whose_draft_is_constant_is_not_called_constant():
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    data = _jpeg(stripes, quality=95)
    draft = Image.open(io.BytesIO(data))
    draft.draft("RGB", (8, 8))
    assert draft.getextrema() == ((128, 128),) * 3  # at 1/8 scale it looks constant ...
    assert jpeg_check.verify_jpeg(data) is None  # ... so it is confirmed at full size


# ----------------------------------------------------------------------------- bad images fail


def test_a_jpeg_truncated_mid_data_fails(good, monkeypatch):
    start, end = _scan(good)
    cut = good[: (start + end) // 2]
    assert "truncated" in jpeg_check.verify_jpeg(cut)
    # Truncated with an end-of-image marker appended: found by decoding, not by the structure.
    patched = cut + EOI
    assert jpeg_check.jpeg_problem(patched) is None
    assert "premature end" in jpeg_check.verify_jpeg(patched)
    # PIL's permissive mode does not change the verdict (the decoder is driven directly).
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert "premature end" in jpeg_check.verify_jpeg(patched)
    assert "truncated" in jpeg_check.verify_jpeg(cut)


@pytest.mark.parametrize("draft", [True, False])
@pytest.mark.parametrize("fraction", [1 / 3, 1 / 2, 2 / 3])
def test_bytes_overwritten_inside_the_scan_data_fail(good, fraction, draft, monkeypatch):
    bad = _overwritten(good, fraction)
    assert jpeg_check.jpeg_problem(bad) is None  # the structure is intact
    problem = jpeg_check.verify_jpeg(bad, draft=draft)
    assert problem is not None and problem.startswith("corrupt JPEG data"), problem
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert jpeg_check.verify_jpeg(bad, draft=draft) == problem


def test_bytes_left_over_after_the_image_fail(good):
    """Extra bytes before the end-of-image marker: libjpeg's 'extraneous bytes', which PIL ignores."""
    _, end = _scan(good)
    padded = good[:end] + b"\x12\x34" * 50 + good[end:]
    assert jpeg_check.jpeg_problem(padded) is None
    assert "complete before the end" in jpeg_check.verify_jpeg(padded)


@pytest.mark.parametrize(
    "array, colour",
    [
        (np.zeros((48, 40, 3), np.uint8), "(0, 0, 0)"),
        (np.full((48, 40, 3), (200, 40, 40), np.uint8), "(200, 40, 40)"),
        (np.full((33, 17), 7, np.uint8), "7"),
    ],
    ids=["black", "one-colour", "grey"],
)
@pytest.mark.parametrize("draft", [True, False])
def test_a_constant_jpeg_fails(array, colour, draft):
    assert jpeg_check.verify_jpeg(_jpeg(array, quality=90), draft=draft) == f"constant image (every pixel is {colour})"
    one_off = array.copy()
    one_off[0, 0] = 255  # a single different pixel is not constant
    assert jpeg_check.verify_jpeg(_jpeg(one_off, quality=90), draft=draft) is None


def test_a_png_fails_as_not_a_jpeg():
    buf = io.BytesIO()
    Image.fromarray(_noisy()).save(buf, format="PNG")
    assert "not a JPEG" in jpeg_check.verify_jpeg(buf.getvalue())


def test_markers_around_junk_fail():
    junk = b"\xff\xd8\xff\xe0" + b"x" * 10 + EOI
    assert jpeg_check.jpeg_problem(junk) is None
    assert jpeg_check.verify_jpeg(junk).startswith("unreadable JPEG header")


# ----------------------------------------------------------------------------- checking processes


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_checker_processes_answer_each_chunk_in_order_as_verify_jpeg_does(good, workers):
    kinds = [good, _overwritten(good, 0.5), _jpeg(np.zeros((8, 8, 3), np.uint8)), good[: len(good) // 2], b"GIF89a..."]
    chunks = [(f"chunk{i}", [kinds[(i + j) % len(kinds)] for j in range(i % 4)]) for i in range(11)]  # some empty
    with jpeg_check.CheckerProcesses(workers) as checkers:
        answers = list(checkers.map(iter(chunks)))
    assert [key for key, _ in answers] == [key for key, _ in chunks]
    assert [a for _, a in answers] == [[jpeg_check.verify_jpeg(d) for d in datas] for _, datas in chunks]
    assert any(a is None for _, chunk in answers for a in chunk) and any(a for _, chunk in answers for a in chunk)


def test_a_checking_process_that_dies_is_one_clear_error_naming_the_chunk(good):
    import sys

    dies = (sys.executable, "-c", "import sys; sys.stdin.buffer.read(1); sys.exit(3)")
    with pytest.raises(jpeg_check.CheckerDied, match=r"stopped while checking the chunk 'DMY1'\.\.'DMY9' \(exit code 3\)"):
        with jpeg_check.CheckerProcesses(1, command=dies) as checkers:
            list(checkers.map([("'DMY1'..'DMY9'", [good])]))


def test_a_worker_runs_without_this_package_or_tensorflow(good, tmp_path):
    """The worker command is the module file run in isolated mode: only PIL and the stdlib."""
    import pickle
    import subprocess

    chunk = [good, good[:100]]
    out = subprocess.run([*jpeg_check.WORKER_COMMAND], input=pickle.dumps(chunk), capture_output=True, check=True,
                         cwd=tmp_path, timeout=60)
    assert pickle.loads(out.stdout) == [None, jpeg_check.verify_jpeg(good[:100])]


# ----------------------------------------------------------------------------- the builder


def _constant_jpeg() -> bytes:
    return _jpeg(np.zeros((8, 11, 3), np.uint8), quality=90)


def _corrupt_inside_jpeg() -> bytes:
    return _overwritten(_jpeg(_noisy(), quality=90), 0.5)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-checker-processes"])
@pytest.mark.parametrize("make, detail", [(_corrupt_inside_jpeg, "corrupt JPEG data"), (_constant_jpeg, "constant image")],
                         ids=["corrupt-inside", "constant"])
def test_builder_raises_or_skips_and_counts_an_image_that_only_decoding_finds(tmp_path, make, detail, workers, monkeypatch):
    monkeypatch.setattr(jpeg_check, "default_worker_count", lambda: workers)
    root = _tree(tmp_path)
    bad = make()
    assert jpeg_check.jpeg_problem(bad) is None  # the old structural check lets it through
    _image(root, "DMY104-24").write_bytes(bad)
    with pytest.raises(BadRecordError, match=rf"record 'DMY104-24': {detail}.*DMY104-24\.jpg.*\[bad_image\]"):
        _build("cropped_256", tmp_path / "raise", root)
    b = _build("cropped_256", tmp_path / "skip", root, on_bad_record="skip")
    assert b.info.metadata["image_check"] == "decoded"
    assert b.info.metadata["skipped"]["bad_image"] == 1 and b.info.metadata["skipped_total"] == 1
    assert "DMY104-24" in b.info.metadata["skipped_examples"]["bad_image"][0]
    assert b.info.splits["val"].num_examples == 1
    assert b.info.splits.total_num_examples == 15  # every other record is written


def test_builder_without_image_verification_keeps_such_an_image(tmp_path):
    root = _tree(tmp_path)
    _image(root, "DMY104-24").write_bytes(_corrupt_inside_jpeg())
    b = _build("cropped_256", tmp_path / "out", root, verify_images=False)
    assert b.info.metadata["image_check"] == "structure"
    assert b.info.metadata["skipped_total"] == 0 and b.info.splits.total_num_examples == 16


@pytest.mark.parametrize("config_module", ["barcodebert", "clibd", "zsc"])
def test_data_verify_images_reaches_the_builder(config_module, monkeypatch):
    import importlib

    from bioscan_jax.data import sources as data_sources
    from bioscan_jax.data import tfds_source

    config = importlib.import_module(f"configs.{config_module}").get_config()
    assert config.data.verify_images is True
    seen = {}

    class Prepared(Exception):
        pass

    def prepare(*args, **kwargs):
        seen.update(kwargs)
        raise Prepared

    monkeypatch.setattr(tfds_source, "prepare", prepare)
    config.data.source = "tfds"
    config.data.verify_images = False
    with pytest.raises(Prepared):
        data_sources.open_splits(config.data, ["train"])
    assert seen["verify_images"] is False


_ABANDON = """
import io, sys
import numpy as np
from PIL import Image
from tfds_builder.bioscan5m import jpeg_check

buf = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(buf, format="JPEG")
heavy = [buf.getvalue()] * 32  # a chunk that keeps the checker busy after the first answer
with jpeg_check.CheckerProcesses(int(sys.argv[1])) as checkers:
    for key, answers in checkers.map((n, heavy) for n in range(8)):
        break  # as the builder does when a record raises: chunks are still being checked
print("stopped", flush=True)
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_checking_processes_exit_quietly_when_the_builder_stops_reading(workers):
    """A build that raises on a bad record closes the checkers while they still answer queued
    chunks: their answers meet a closed pipe, and they must exit without a traceback (the
    build's one-line error must be the only thing on stderr)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _ABANDON, str(workers)], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "stopped", out.stderr
    assert out.stderr == "", out.stderr  # no BrokenPipeError from a helper process


def test_serve_returns_at_end_of_input_and_on_a_broken_answer_pipe(good):
    import pickle

    class Closed(io.BytesIO):
        def write(self, data):
            raise BrokenPipeError(32, "Broken pipe")

    two = io.BytesIO(pickle.dumps([good]) * 2)
    jpeg_check._serve(two, Closed())  # returns at once, nothing raised
    cut = pickle.dumps([good, good])
    answers = io.BytesIO()
    jpeg_check._serve(io.BytesIO(cut[: len(cut) // 2]), answers)  # input cut short: the parent died
    assert answers.getvalue() == b""
