"""Progress and timing: every stage that takes time is announced and timed, the total is true."""
from __future__ import annotations

import io
import re
import time

import pytest
import torch

from tracer.progress import Progress, as_progress


def test_plain_lines_name_each_stage_and_its_time():
    stream = io.StringIO()
    track = Progress(stream=stream, bar=False)
    with track.stage("capture", "with torch.fx"):
        time.sleep(0.05)
    with track.stage("parity"):
        track("a message inside a stage")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[tracer] capture: with torch.fx"
    assert re.fullmatch(r"\[tracer\] capture: 0\.\d\ds", lines[1])
    assert lines[2] == "[tracer] a message inside a stage"
    assert re.fullmatch(r"\[tracer\] parity: 0\.\d\ds", lines[3])
    assert list(track.times) == ["capture", "parity"] and track.times["capture"] >= 0.05
    summary = track.summary()
    assert summary.startswith("time: capture 0.") and ", parity 0." in summary
    total = float(re.search(r"total (\d+\.\d+)s", summary).group(1))
    assert total >= track.times["capture"] + track.times["parity"] - 0.01


def test_a_stage_that_fails_prints_no_time_and_stays_named():
    stream = io.StringIO()
    track = Progress(stream=stream, bar=False)
    with pytest.raises(KeyboardInterrupt):
        with track.stage("writing", "out/"):
            raise KeyboardInterrupt
    assert stream.getvalue() == "[tracer] writing: out/\n"
    assert track.current == "writing" and "writing" in track.times


def test_bar_mode_draws_on_a_terminal_and_prints_the_stage_lines():
    stream = io.StringIO()
    track = Progress(stream=stream, bar=True)
    with track.stage("emission", "Keras for 400 operations"):
        for k in range(1, 401):
            track.advance(k, 400)
    track.close()
    text = stream.getvalue()
    assert re.search(r"\[tracer\] emission: 0\.\d\ds \(Keras for 400 operations\)", text)
    assert "nodes emitted" not in text  # the bar counts the nodes; no quarter lines


def test_plain_mode_reports_long_emissions_by_quarters():
    lines: list[str] = []
    track = as_progress(lines.append)
    with track.stage("emission"):
        for k in range(1, 401):
            track.advance(k, 400)
    assert lines[:3] == ["  100/400 nodes emitted", "  200/400 nodes emitted", "  300/400 nodes emitted"]


def test_quiet_prints_nothing_but_still_times():
    stream = io.StringIO()
    track = Progress(stream=stream, quiet=True)
    with track.stage("capture", "with torch.fx"):
        pass
    assert stream.getvalue() == "" and "capture" in track.times and not track.bar


def test_progress_must_be_a_progress_or_a_callable():
    with pytest.raises(TypeError, match="progress must be"):
        as_progress(42)


def test_convert_model_times_its_stages():
    from tracer.api import convert_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    lines: list[str] = []
    result = convert_model(model, torch.randn(1, 3, 8, 8), progress=lines.append)
    assert list(result.stage_seconds) == ["capture", "passes", "emission", "parity"]
    for stage in result.stage_seconds:
        assert any(re.fullmatch(rf"{stage}: \d+\.\d\ds", line) for line in lines), (stage, lines)
    assert "capture: with torch.fx" in lines and "parity: checking on 4 inputs" in lines


def test_nested_stages_keep_the_outer_stage_on_the_bar():
    stream = io.StringIO()
    track = Progress(stream=stream, bar=True)
    with track.stage("verify", "every node"):
        with track.stage("capture", "again"):
            track.advance(1, 2)
        track.advance(2, 2)  # the outer stage's bar again
    track.close()
    assert list(track.times) == ["capture", "verify"] and track.current is None
    assert "[tracer] capture: " in stream.getvalue() and "[tracer] verify: " in stream.getvalue()
