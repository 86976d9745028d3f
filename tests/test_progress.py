"""The one progress helper: tqdm on a terminal, log lines (visible at the agent's default level)
everywhere else; the training, measuring and loading printers all go through it."""

from __future__ import annotations

import io
import logging

import pytest

from detransformer_edge.progress import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "detransformer_edge.progress"]


def test_not_a_terminal_gives_log_lines_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with progress("dev1 weights smollm2-135m", total=4, unit="shard", stream=io.StringIO()) as bar:
        for _ in range(4):
            bar.update(1)
    lines = _lines(caplog)
    assert lines[0].startswith("dev1 weights smollm2-135m:   0%") and "0/4" in lines[0]
    assert lines[-1].startswith("dev1 weights smollm2-135m: 100%") and "4/4" in lines[-1]
    assert len(lines) == 2  # one line at the start, one at the end: the 10 s interval holds the rest back
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "detransformer_edge.progress")


def test_a_terminal_gets_tqdms_bar(caplog: pytest.LogCaptureFixture) -> None:
    tty = _Tty()
    with progress("loading", total=2, stream=tty) as bar:
        bar.update(2)
    assert "loading: 100%" in tty.getvalue() and "\r" in tty.getvalue() and not _lines(caplog)


def test_training_measuring_and_status_printers_use_it(caplog: pytest.LogCaptureFixture) -> None:
    from detransformer_edge.commands._status import StatusLine
    from detransformer_edge.planner.measure import Progress as MeasureProgress
    from detransformer_edge.training.convert import Progress as TrainProgress

    caplog.set_level(logging.WARNING)
    train = TrainProgress(10, 2, "distil", stream=io.StringIO())
    train.update(10, loss=0.25)
    train.close()
    assert "distil: 100%" in _lines(caplog)[-1] and "10/10" in _lines(caplog)[-1] and "loss=0.2500" in _lines(caplog)[-1]

    caplog.clear()
    status = StatusLine(stream=io.StringIO())
    status("reading weights")
    status("dequantising GGUF tensors: 272/272")
    status.done()
    assert _lines(caplog)[0] == "reading weights" and _lines(caplog)[-1] == "dequantising GGUF tensors: 272/272"

    quiet = MeasureProgress(3, quiet=True)
    quiet.step("matmul")
    quiet.close()
