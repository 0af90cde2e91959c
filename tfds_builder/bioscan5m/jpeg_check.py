"""Is this JPEG usable? The builder's image checks, and processes that run them.

* :func:`jpeg_problem`: a cheap structural check (start and end markers);
* :func:`verify_jpeg`: a real decode with PIL that also finds data corrupt *inside* the
  entropy-coded segment, and constant images;
* :class:`CheckerProcesses`: :func:`verify_jpeg` in worker processes, fed chunks of JPEG
  bytes while the builder serialises the previous ones.

Why processes, not a thread: the TFDS writer is pure Python and holds the GIL; a checking
thread that releases it inside libjpeg waits for it again after every decode call (and
PIL's header parsing is Python too), so on a 2-core machine a thread overlapped almost
nothing (2,000 checks beside a busy Python loop took as long as the two one after the
other). A worker process runs them on the other core.

This module imports only the standard library and PIL: a worker runs it as a script
(``python jpeg_check.py``), without importing TensorFlow Datasets or this package.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence

from PIL import Image

_SOI = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"
#: How far from the end of the file the end-of-image marker may lie (trailing bytes).
_EOI_WINDOW = 1024


def jpeg_problem(data: bytes) -> str | None:
    """Why ``data`` is not a complete JPEG (``None`` if it looks like one).

    A cheap structural check (start-of-image marker, end-of-image marker within the
    last bytes): it catches non-JPEG files and truncated downloads without decoding.
    """
    if len(data) < 4:
        return f"only {len(data)} bytes"
    if not data.startswith(_SOI):
        return f"not a JPEG (starts with {data[:4]!r})"
    if data.rfind(_EOI, max(0, len(data) - _EOI_WINDOW)) < 0:
        return "truncated JPEG (no end-of-image marker)"
    return None


#: Bytes fed after the entropy-coded data in place of the end-of-image marker: libjpeg's
#: Huffman decoder reads at most 8 bytes ahead of the bits it uses (its bit buffer holds
#: 64 bits; 32 in 32-bit builds), so a sound image always completes on them, while a
#: corrupt one that needs more bits than the file holds runs out of them and asks for more.
_LOOKAHEAD_FILLER = b"\x00" * 8
#: Start-of-frame markers of sequential Huffman-coded JPEGs (baseline, extended).
_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)


def _first_scan(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, components in the frame, components in the first scan) from the
    marker segments before the first start-of-scan; ``None`` if they do not parse
    (PIL then reports the problem)."""
    at, sof, frame_components = 2, None, None
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 10 > len(data):
                return None
            sof, frame_components = marker, data[at + 9]
        elif marker == 0xDA:
            if sof is None or at + 5 > len(data):
                return None
            return sof, frame_components, data[at + 4]
        at += 2 + length
    return None


def _decode(data: bytes, end: int, *, draft: bool, account: bool) -> tuple[Image.Image | None, str | None]:
    """Decodes ``data`` with PIL's JPEG decoder; returns (image, None) or (None, reason).

    ``end`` is the offset of the end-of-image marker. PIL's decoder is driven directly,
    as ``ImageFile.load`` does, so ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never consulted
    (no end-of-image marker is made up for a short file). With ``account`` (a
    sequential single-scan, single-frame JPEG), the data are fed in two steps that
    expose what libjpeg only *warns* about (PIL discards libjpeg's warnings):

    1. all but the last byte of the entropy-coded data: a sound image cannot be
       complete without that byte (the encoder pads only the last byte, with fewer than
       8 one bits), so an image complete now had bytes left over -- libjpeg's
       "Corrupt JPEG data: N extraneous bytes before marker 0xd9";
    2. the last byte plus :data:`_LOOKAHEAD_FILLER` instead of the end-of-image marker:
       a sound image completes; one that still asks for data needed more bits than the
       file holds -- libjpeg's "Corrupt JPEG data: premature end of data segment"
       (which it otherwise pads with zero bits, silently through PIL).
    """
    try:
        im = Image.open(io.BytesIO(data), formats=("JPEG",))
        if draft:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        if len(im.tile) != 1:
            return None, f"unexpected JPEG layout ({len(im.tile)} tiles)"
        if getattr(im, "n_frames", 1) != 1:  # MPO: the first frame ends before the file does
            account = False
        im.load_prepare()
        codec, extents, offset, args = im.tile[0]
        decoder = Image._getdecoder(im.mode, codec, args, im.decoderconfig)  # pylint: disable=protected-access
    except Image.UnidentifiedImageError:
        return None, "unreadable JPEG header (PIL cannot identify the image)"
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds on a bad header
        return None, f"unreadable JPEG header ({type(e).__name__}: {e})"
    stop = end
    while stop > offset and data[stop - 1] == 0xFF:  # fill bytes before the marker are not data
        stop -= 1
    try:
        decoder.setimage(im.im, extents)
        if account:
            cut = stop - 2 if data[stop - 2 : stop] == b"\xff\x00" else stop - 1
            consumed, err = decoder.decode(data[offset:cut])
            if consumed < 0:
                if err < 0:
                    return None, "corrupt JPEG data (libjpeg: broken data stream)"
                return None, "corrupt JPEG data (the image is complete before the end of its entropy-coded data)"
            consumed, err = decoder.decode(data[offset + consumed : stop] + _LOOKAHEAD_FILLER)
            if consumed >= 0:
                return None, "corrupt JPEG data (premature end of the entropy-coded data)"
        else:
            consumed, err = decoder.decode(data[offset:])
            if consumed >= 0:
                return None, "truncated JPEG data (the decoder needs more than the file holds)"
        if err < 0:
            return None, "corrupt JPEG data (libjpeg: broken data stream)"
    except Exception as e:  # pylint: disable=broad-except
        return None, f"undecodable JPEG ({type(e).__name__}: {e})"
    finally:
        decoder.cleanup()
    im.tile = []  # decoded: im.im holds the pixels
    return im, None


def _constant_colour(im: Image.Image) -> tuple[int, ...] | None:
    """The colour of every pixel if all are the same, else ``None``."""
    extrema = im.getextrema()
    if len(im.getbands()) == 1:
        extrema = (extrema,)
    if all(lo == hi for lo, hi in extrema):
        return tuple(int(lo) for lo, _ in extrema)
    return None


def verify_jpeg(data: bytes, *, draft: bool = True) -> str | None:
    """Why ``data`` is not a usable JPEG (``None`` if it is): a short reason.

    In order: the structural check (:func:`jpeg_problem`); a real decode with PIL (no
    TensorFlow) at 1/8 scale (``draft``: libjpeg still entropy-decodes every
    coefficient, so what is found in the data is the same as at full size, at a fraction
    of the cost); then the constant-image check (every pixel the same value in every
    channel, e.g. an all-black frame; a draft that looks constant is confirmed at full
    size, since a fine pattern can average to a constant draft).

    What PIL reports: truncated data and data that break libjpeg's decoder ("broken
    data stream") raise; but PIL silences libjpeg's *warnings* -- the usual outcome
    of bytes overwritten inside the entropy-coded data is that libjpeg warns
    ("Corrupt JPEG data: N extraneous bytes before marker 0xd9" or "premature end of
    data segment") and returns an image, no Python exception or warning. These are
    detected by feeding the decoder in two steps (see :func:`_decode`): the image must
    not be complete before the last byte of its entropy-coded data, and must be
    complete with it. Measured against libjpeg itself (warnings counted as errors) on
    ~1,500 damaged copies of the synthetic images (random bytes written over 1 to 256
    bytes, spans zeroed or deleted, truncations with an end marker appended): the same
    verdict on all but one, a "bad Huffman code" warning after which decoding
    re-synchronised; no false alarm on ~3,000 valid JPEGs of all kinds (sizes 1-300 px,
    quality 1-100, grey/RGB/CMYK, subsampling, optimized, progressive, restart markers).

    Not detected: damage after which the Huffman decoding re-synchronises and ends
    exactly at the end of the data -- libjpeg reports nothing either (bar the odd "bad
    Huffman code"); it is the fate of about 60% of 1-byte, 35% of 16-byte and 10% of
    64-byte random overwrites, and leaves a changed block and usually a colour shift
    of the rest of the image. For progressive, multi-scan or multi-frame (MPO) JPEGs
    only decoder errors and truncation are detected, and with restart markers only
    damage in the last restart interval is.
    """
    problem = jpeg_problem(data)
    if problem:
        return problem
    end = data.rfind(_EOI, max(0, len(data) - _EOI_WINDOW))
    scan = _first_scan(data)
    account = scan is not None and scan[0] in _SEQUENTIAL_HUFFMAN and scan[1] == scan[2]
    im, problem = _decode(data, end, draft=draft, account=account)
    if problem:
        return problem
    colour = _constant_colour(im)
    if colour is not None and draft:  # rare: confirm at full size
        im, problem = _decode(data, end, draft=False, account=account)
        if problem:
            return problem
        colour = _constant_colour(im)
    if colour is not None:
        return f"constant image (every pixel is {colour[0] if len(colour) == 1 else colour})"
    return None


# ----------------------------------------------------------------------------- worker processes


def default_worker_count() -> int:
    """Checking processes for this machine: one per core beside the writer's, at most 8;
    0 (check in the writer's process) on a single core, where a process gains nothing."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


class CheckerDied(RuntimeError):
    """A checking process exited before it answered (e.g. libjpeg crashed on an image)."""


class _Worker:
    """One ``python jpeg_check.py`` process: reads pickled lists of JPEG bytes on stdin,
    writes the pickled list of :func:`verify_jpeg` answers for each on stdout.

    A feeder thread writes the chunks, so the parent never blocks on a full pipe while the
    worker blocks writing its answers (no deadlock, whatever their size).
    """

    def __init__(self, command: Sequence[str]):
        self.proc = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self._outbox: queue.Queue = queue.Queue()
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        try:
            while (chunk := self._outbox.get()) is not None:
                # One write call for the whole chunk: it blocks in the kernel (GIL released)
                # until the worker has read it, instead of waking for the GIL per pipe buffer.
                self.proc.stdin.write(pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL))
                self.proc.stdin.flush()
        except (BrokenPipeError, OSError):  # the worker died; the reader reports it
            pass
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def send(self, chunk: list[bytes]) -> None:
        self._outbox.put(chunk)

    def receive(self) -> list[str | None]:
        try:
            return pickle.load(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError) as e:
            raise CheckerDied(f"exit code {self.proc.wait()}") from e

    def close(self) -> None:
        """Ends the worker: its stdin is closed once the queued chunks are written, and it
        exits at end of input (killed if it is still running after that)."""
        self._outbox.put(None)
        self._feeder.join()
        self.proc.stdout.close()  # unread answers (an abandoned map) cannot block its exit
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


#: The command of one checking process: this file run as a script by the same Python.
WORKER_COMMAND = (sys.executable, "-I", os.path.abspath(__file__))


class CheckerProcesses:
    """:func:`verify_jpeg` over chunks of JPEG bytes in ``workers`` processes, answers in order.

    ``map(chunks)`` takes an iterable of ``(key, list of bytes)`` and yields ``(key, list of
    answers)`` in the same order, keeping every worker one chunk ahead of the consumer: a
    chunk is checked while the caller handles the previous one. With ``workers=0`` the
    checks run in this process. Use as a context manager (the processes end on exit).
    """

    def __init__(self, workers: int, command: Sequence[str] = WORKER_COMMAND):
        self._workers = [_Worker(command) for _ in range(workers)]
        self._mapping = False

    def __enter__(self) -> "CheckerProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers = []

    def map(self, chunks: Iterable[tuple[object, list[bytes]]]) -> Iterator[tuple[object, list[str | None]]]:
        if self._mapping:
            raise RuntimeError("CheckerProcesses.map is already running: one map at a time (answers come in order)")
        self._mapping = True
        try:
            if not self._workers:
                for key, datas in chunks:
                    yield key, [verify_jpeg(d) for d in datas]
                return
            pending: collections.deque = collections.deque()  # (key, worker), oldest first
            depth = 2 * len(self._workers)  # each worker: one chunk in work, one queued
            for n, (key, datas) in enumerate(chunks):
                worker = self._workers[n % len(self._workers)]
                worker.send(datas)
                pending.append((key, worker))
                if len(pending) >= depth:
                    yield self._answer(*pending.popleft())
            while pending:
                yield self._answer(*pending.popleft())
        finally:
            self._mapping = False

    @staticmethod
    def _answer(key, worker: _Worker) -> tuple[object, list[str | None]]:
        try:
            return key, worker.receive()
        except CheckerDied as e:
            raise CheckerDied(f"an image-checking process stopped while checking the chunk {key} ({e})") from None


def _serve(stdin=None, stdout=None) -> None:
    """The worker's loop: answer each pickled chunk until stdin closes.

    Returns quietly when the parent goes away: end of input (also mid-chunk, e.g. the parent
    was killed) or a broken answer pipe (the parent stopped reading, e.g. the build raised on
    a bad record and closed the checkers while chunks were still queued). The parent reports
    whatever happened; a traceback from this helper would only bury that one line.
    """
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    while True:
        try:
            chunk = pickle.load(stdin)
        except (EOFError, pickle.UnpicklingError, OSError):  # end of input, or input cut short
            return
        try:
            pickle.dump([verify_jpeg(d) for d in chunk], stdout, protocol=pickle.HIGHEST_PROTOCOL)
            stdout.flush()
        except (BrokenPipeError, ConnectionResetError):  # nobody reads the answers any more
            return


def _main() -> int:
    """The worker process: :func:`_serve` on stdin/stdout, silent when its parent goes away."""
    try:
        _serve()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        return 130
    finally:
        # Answers left in a buffer that can no longer be written would make the interpreter's
        # exit flush print "Exception ignored ... BrokenPipeError": point stdout at /dev/null.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_main())
