"""Verdicts that judge and name: a quantized TFLite result is judged (and a poor int8 points at
its calibration data); a failed deep verification names the checks that failed."""
from __future__ import annotations

from tracer.verify.litert import LiteRTReport
from tracer.verify.parity import OutputDiff, ParityReport, Trial
from tracer.verify.report import Problem, VerifyReport


def _parity(*errors: tuple[str, float, float]) -> ParityReport:
    """One output (max|y| given) per trial: (label, max abs error, max|y|)."""
    trials = [Trial(label, ((8, 10),), (OutputDiff(0, (8, 10), err, err / max(1.0, ref), ref, True,
                                                   err / max(1.0, ref) <= 1e-5),)) for label, err, ref in errors]
    return ParityReport(tolerance=1e-5, trials=trials)


def test_int8_with_90_percent_error_is_judged_poor_and_points_at_calibration():
    report = LiteRTReport("int8", _parity(("sample", 0.9, 1.0), ("random0", 0.85, 1.0)), strict=False,
                          top1_agreement=[0.25], calib_trial=None)
    text = report.summary()
    assert text.startswith("tflite int8: POOR (90% of range)")
    assert "calibrated on random inputs" in text and "--calib" in text
    assert report.to_dict()["judgement"] == "poor" and report.ok  # judged, not failed
    lucky = LiteRTReport("int8", _parity(("sample", 0.02, 1.0)), strict=False, calib_trial=None)
    assert lucky.judgement()[0] == "good" and "judged on random inputs only" in lucky.summary()


def test_int8_judged_on_its_calibration_samples():
    """Random-normal inputs lie outside the calibrated ranges; the real samples decide."""
    report = LiteRTReport("int8", _parity(("sample", 0.6, 3.0), ("calibration", 0.04, 2.0)), strict=False,
                          top1_agreement=[0.95], top1_by_trial={"calibration": [1.0]}, calib_trial="calibration")
    assert report.judgement() == ("good", 0.02, "the calibration samples")
    assert report.summary().startswith("tflite int8: good (2% of range)")
    bad = LiteRTReport("int8", _parity(("sample", 0.6, 3.0), ("calibration", 1.5, 2.0)), strict=False,
                       calib_trial="calibration")
    assert "check that --calib holds real inputs preprocessed exactly as the model's" in bad.summary()


def test_fp16_small_error_is_good_and_top1_disagreement_is_poor():
    assert LiteRTReport("fp16", _parity(("sample", 2e-3, 1.0)), strict=False).judgement()[0] == "good"
    assert LiteRTReport("dynamic", _parity(("sample", 1e-2, 1.0)), strict=False,
                        top1_agreement=[0.5]).judgement()[0] == "poor"


def test_deep_verify_failure_names_the_failed_checks():
    """Small node errors and a gradient problem: the summary says the gradients failed, not only
    "FAILED (... max node error 3e-07, tolerance 1e-05)"."""
    report = VerifyReport(tolerance=1e-5, node_tolerance=1e-5, inputs={}, outputs=_parity(("sample", 3e-7, 1.0)),
                          problems=[Problem("gradient", "conv.weight", "relative error 3e-2"),
                                    Problem("gradient", "conv.bias", "relative error 2e-2"),
                                    Problem("sgd_step", "step", "weights after one step differ")])
    head = report.summary().splitlines()[0]
    assert head.startswith("deep verify: FAILED: gradient parity (2 problems), training step (1 problem) (")
    assert report.to_dict()["failed_checks"] == ["gradient parity (2 problems)", "training step (1 problem)"]


def test_deep_verify_output_failure_named_once():
    report = VerifyReport(tolerance=1e-5, node_tolerance=1e-5, inputs={}, outputs=_parity(("sample", 0.5, 1.0)),
                          problems=[Problem("tolerance", "output 0", "scaled error 5e-01 on sample")])
    assert report.failed_checks() == ["output parity (1 problem)"]
    ok = VerifyReport(tolerance=1e-5, node_tolerance=1e-5, inputs={}, outputs=_parity(("sample", 1e-7, 1.0)))
    assert ok.summary().startswith("deep verify: OK (0 nodes compared on 1 inputs")
