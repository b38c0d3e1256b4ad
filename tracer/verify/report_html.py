"""report.html: the deep verification as one self-contained page (inline CSS and SVG, no script).

:func:`render` takes the dict of ``VerifyReport.to_dict()`` (as stored in report.json under
"verify"), so a report can be redrawn from the JSON alone. The page holds the verdict, every
problem with its cause, the first divergent node with both values' statistics, per-output
differences, a plot of each node's error along the graph depth (log scale, tolerance line, first
divergence marked), the nodes with the largest errors linked to the user's source lines,
gradient parity and the conversion facts.
"""
from __future__ import annotations

import math
from collections import Counter
from html import escape
import json
from pathlib import Path
from typing import Any, Iterable

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d232b;background:#f4f6f8}
main{max-width:1040px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5dbe1;padding-bottom:4px}
.verdict{padding:14px 18px;border-radius:8px;color:#fff;font-size:18px;font-weight:600;margin:12px 0}
.ok{background:#1f8a4c}.bad{background:#c0392b}
.card{background:#fff;border:1px solid #d5dbe1;border-radius:8px;padding:12px 16px;margin:10px 0}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #d5dbe1;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}td.num{text-align:right;font-family:ui-monospace,monospace;white-space:nowrap}
td code{overflow-wrap:anywhere}
tr.fail td{background:#fdecea}code,pre{font-family:ui-monospace,Menlo,monospace;font-size:12px}
pre{background:#f6f8fa;padding:6px 8px;border-radius:4px;margin:4px 0;white-space:pre-wrap}
.tag{display:inline-block;border-radius:4px;padding:0 6px;font-size:12px;color:#fff}
.tag.ok{background:#1f8a4c}.tag.bad{background:#c0392b}.tag.warn{background:#b9770e}
ul{margin:4px 0 4px 18px;padding:0}.muted{color:#5d6b79}
svg text{font:11px system-ui,sans-serif;fill:#33404d}
"""

_W, _H, _ML, _MR, _MT, _MB = 960, 340, 64, 20, 20, 46


def render(verify: dict, title: str = "tracer verification", conversion: dict | None = None) -> str:
    """The report page for ``verify`` (VerifyReport.to_dict()); ``conversion``: facts() if not inside."""
    facts = conversion or verify.get("facts") or {}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><main>",
             f"<h1>{escape(title)}</h1>",
             f"<div class='muted'>inputs: {escape(', '.join(verify.get('inputs', {}).get('trials', [])))}</div>",
             _verdict(verify), _problems(verify), _first(verify.get("first_divergence")),
             "<h2>Error along the graph</h2>", plot_svg(verify.get("nodes", []), verify.get("node_tolerance", 1e-5),
                                                        verify.get("first_divergence"),
                                                        [d["name"] for d in verify.get("divergences", [])]),
             _largest(verify.get("nodes", [])), _outputs(verify.get("outputs", {})),
             _gradients(verify.get("gradients")), _tflite(verify.get("tflite_nodes"), verify.get("node_tolerance")),
             _facts(facts, verify), "</main></body></html>"]
    return "\n".join(p for p in parts if p)


def write(path: str | Path, verify: dict, **kw: Any) -> Path:
    path = Path(path)
    path.write_text(render(verify, **kw), encoding="utf-8")
    return path


def write_html(outdir: str | Path, report: dict, title: str | None = None) -> Path:
    """``outdir/report.html`` from a report.json dict that has a "verify" section."""
    return write(Path(outdir) / "report.html", report["verify"],
                 title=title or f"tracer: {report.get('target', 'model')}")


def write_reports(outdir: Path, verify: dict, title: str | None = None) -> Path:
    """``verify`` (strict-JSON VerifyReport dict) into ``outdir/report.json`` under "verify", keeping what
    else a report.json there holds (written whole, then renamed), and ``outdir/report.html``."""
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["verify"] = verify
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    return write_html(outdir, report, title)


# ---- sections -----------------------------------------------------------------------------------
def _verdict(v: dict) -> str:
    ok = v.get("ok")
    n = len(v.get("nodes", []))
    kinds = Counter(p["kind"] for p in v.get("problems", []))
    text = (f"Parity: {n} nodes and all outputs match PyTorch" if ok else
            f"Parity failed: {sum(kinds.values())} problem(s) ({', '.join(f'{k} {c}' for k, c in kinds.items())})")
    return (f"<div class='verdict {'ok' if ok else 'bad'}' id='verdict'>{escape(text)}"
            f"<div style='font-size:13px;font-weight:400'>max node error {_num(v.get('max_node_error', 0))}"
            f" (tolerance {_num(v.get('node_tolerance', 0))}, max|diff| / max(1, max|torch|))</div></div>")


def _problems(v: dict) -> str:
    items = [f"<li><span class='tag bad'>{escape(p['kind'])}</span> <b>{escape(p['where'])}</b>: "
             f"{escape(p['message'])}</li>" for p in v.get("problems", [])]
    items += [f"<li><span class='tag warn'>warning</span> {escape(w)}</li>" for w in v.get("warnings", [])]
    return f"<h2>Findings</h2><ul id='problems'>{''.join(items)}</ul>" if items else ""


def _first(d: dict | None) -> str:
    if not d:
        return ""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in [
        ("node", f"<code>{escape(d['name'])}</code>"), ("op", f"<code>{escape(d['op'])}</code>"),
        ("rule", f"<code>{escape(d['rule'])}</code>"), ("module", escape(d.get("module_path") or "(top level)")),
        ("source", _source_link(d)), ("cause", escape(d.get("detail", ""))),
        ("PyTorch", _stats(d.get("torch"))), ("Keras", _stats(d.get("keras"))),
        ("trial", escape(d.get("trial", "")))])
    code = f"<pre>{escape(d['code'])}</pre>" if d.get("code") else ""
    return (f"<h2>First divergence</h2><div class='card' id='first-divergence'>The first node whose error exceeds "
            f"the tolerance while every input it reads is within it.{code}<table>{rows}</table></div>")


def _largest(nodes: list[dict], k: int = 15) -> str:
    worst = sorted(nodes, key=lambda n: -_err(n))[:k]
    if not worst:
        return ""
    head = "<tr><th>node</th><th>op / rule</th><th>module</th><th>source</th><th>error</th><th>max abs</th></tr>"
    rows = "".join(
        f"<tr class='{'' if n['ok'] else 'fail'}'><td><code>{escape(n['name'])}</code></td>"
        f"<td><code>{escape(n['op'])}</code><br><span class='muted'>{escape(n['rule'])}</span></td>"
        f"<td>{escape(n.get('module_path') or '')}</td><td>{_source_link(n)}"
        f"{'<pre>' + escape(n['code']) + '</pre>' if n.get('code') else ''}</td>"
        f"<td class='num'>{_num(n['error'])}</td><td class='num'>{_num(n['max_abs'])}</td></tr>" for n in worst)
    return f"<h2>Largest errors</h2><table id='largest'>{head}{rows}</table>"


def _outputs(parity: dict) -> str:
    rows = []
    for t in parity.get("trials", []):
        for o in t.get("outputs", []):
            rows.append(f"<tr class='{'' if o['ok'] else 'fail'}'><td>{escape(t['label'])}</td><td>{o['output']}</td>"
                        f"<td>{escape(str(tuple(o['shape'])))}</td><td class='num'>{_num(o['max_abs'])}</td>"
                        f"<td class='num'>{_num(o['max_rel'])}</td><td>{_tag(o['ok'])}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Outputs</h2><table id='outputs'><tr><th>input</th><th>output</th><th>shape</th><th>max abs</th>"
            f"<th>scaled</th><th></th></tr>{''.join(rows)}</table>")


def _gradients(g: dict | None) -> str:
    if not g:
        return ""
    items = [f"<li><span class='tag bad'>{escape(m['kind'])}</span> <b>{escape(m['name'])}</b>: {escape(m['message'])}</li>"
             for m in g.get("mismatches", [])]
    known = [f"<li><span class='tag warn'>known difference</span> {escape(k)}</li>" for k in g.get("known_differences", [])]
    if len(known) > 2:
        known = [f"<li><details><summary>{len(known)} known differences (BatchNorm moving variance)</summary>"
                 f"<ul>{''.join(known)}</ul></details></li>"]
    items += known + [f"<li>{escape(n)}</li>" for n in g.get("notes", [])]
    rows = "".join(f"<tr class='{'' if d['ok'] else 'fail'}'><td><code>{escape(d['name'])}</code></td>"
                   f"<td><code>{escape(d.get('keras', ''))}</code></td><td>{escape(str(tuple(d['shape'])))}</td>"
                   f"<td class='num'>{_num(d['error'])}</td><td>{_tag(d['ok'])}</td></tr>"
                   for d in g.get("inputs", []) + g.get("params", []))
    bn = "".join(f"<tr class='{'' if d['ok'] else 'fail'}'><td><code>{escape(d['name'])}</code></td>"
                 f"<td class='num'>{_num(d['max_abs'])}</td><td>{_tag(d['ok'])}</td></tr>" for d in g.get("bn_stats", []))
    return (f"<h2>Gradient parity</h2><div class='card' id='gradients'>{_tag(g['ok'])} training mode "
            f"({escape(g.get('torch_runs', ''))}), batch {g['batch']}, loss PyTorch {_num(g['loss_torch'])} / "
            f"Keras {_num(g['loss_keras'])}; max error {_num(g['max_error'])} (tolerance {_num(g['tolerance'])}), "
            f"one SGD step compared for {len(g.get('steps', []))} weights.<ul>{''.join(items)}</ul></div>"
            f"<table><tr><th>gradient of</th><th>Keras weight</th><th>shape</th><th>error</th><th></th></tr>{rows}</table>"
            + (f"<h3>BatchNorm moving statistics after one step</h3><table><tr><th>statistic</th><th>max abs diff</th>"
               f"<th></th></tr>{bn}</table>" if bn else ""))


def _tflite(nodes: list[dict] | None, tol: float | None) -> str:
    if nodes is None:
        return ""
    bad = [n for n in nodes if not n["ok"]]
    worst = max((_err(n) for n in nodes), default=0.0)
    first = f" First divergence: <code>{escape(bad[0]['name'])}</code> at {_source_link(bad[0])}." if bad else ""
    return (f"<h2>TFLite fp32, node by node</h2><div class='card' id='tflite'>{_tag(not bad)} {len(nodes)} "
            f"intermediate tensors compared in LiteRT; max error {_num(worst)} (tolerance {_num(tol or 0)}).{first}</div>")


def _facts(f: dict, v: dict) -> str:
    if not f:
        return ""
    rules = "".join(f"<tr><td><code>{escape(k)}</code></td><td class='num'>{n}</td></tr>"
                    for k, n in f.get("ops_by_rule", {}).items())
    notes = "".join(f"<li>{escape(n)}</li>" for n in f.get("notes", [])) or "<li class='muted'>none</li>"
    params = f"Keras {f.get('keras_params', 0):,}"
    if "torch_params" in f:
        params = f"PyTorch {f['torch_params']:,} / " + params
    capture = f.get("capture", {})
    return (f"<h2>Conversion facts</h2><div class='card' id='facts'>{f.get('nodes', 0)} ops converted in "
            f"{f.get('seconds', 0)} s; <b>{f.get('transpose_ops', 0)}</b> Transpose op(s) in the Keras model; "
            f"parameters: {params}"
            + (f"; captured with {escape(capture.get('method', ''))}" if capture else "")
            + f"<h3>Fixes and notes</h3><ul>{notes}</ul></div>"
            f"<table id='rules'><tr><th>rule</th><th>ops</th></tr>{rules}</table>")


# ---- the plot -----------------------------------------------------------------------------------
def plot_svg(nodes: list[dict], tol: float, first: dict | None, roots: Iterable[str] = ()) -> str:
    """Per-node error against graph depth on a log axis, tolerance line, first divergence marked.

    Blue: within tolerance; red: a divergence (its inputs were fine); orange: an error carried
    from an earlier divergence. Errors of 0 sit on the bottom line, infinite ones on the top.
    """
    roots = set(roots)
    if not nodes:
        return "<p class='muted'>no nodes compared</p>"
    finite = [_err(n) for n in nodes if math.isfinite(_err(n)) and _err(n) > 0]
    lo = math.floor(math.log10(min(finite + [tol]) )) - 1
    hi = math.ceil(math.log10(max(finite + [tol * 10])))
    lo = max(lo, hi - 12)
    max_depth = max(n["depth"] for n in nodes) or 1
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def x(depth: float) -> float:
        return _ML + pw * depth / max_depth

    def y(err: float) -> float:
        e = min(max(err, 10.0 ** lo), 10.0 ** hi) if math.isfinite(err) else 10.0 ** hi
        return _MT + ph * (hi - math.log10(e)) / (hi - lo)

    out = [f"<svg id='error-plot' xmlns='http://www.w3.org/2000/svg' width='{_W}' height='{_H}' "
           f"viewBox='0 0 {_W} {_H}' role='img' aria-label='per-node error along graph depth'>",
           f"<rect x='{_ML}' y='{_MT}' width='{pw}' height='{ph}' fill='#fff' stroke='#c7ced6'/>"]
    for d in range(lo, hi + 1):
        yy = y(10.0 ** d)
        out.append(f"<line class='grid' x1='{_ML}' x2='{_ML + pw}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#eceff2'/>"
                   f"<text x='{_ML - 6}' y='{yy + 4:.1f}' text-anchor='end'>{'&#8804;' if d == lo else ''}1e{d}</text>")
    for d in _ticks(max_depth):
        out.append(f"<text x='{x(d):.1f}' y='{_MT + ph + 16}' text-anchor='middle'>{d}</text>")
    out.append(f"<text x='{_ML + pw / 2}' y='{_H - 8}' text-anchor='middle'>graph depth (longest path from an input)</text>"
               f"<text transform='translate(14 {_MT + ph / 2}) rotate(-90)' text-anchor='middle'>"
               "error: max|diff| / max(1, max|torch|)</text>")
    by_depth: dict[int, float] = {}
    for n in nodes:
        by_depth[n["depth"]] = max(by_depth.get(n["depth"], 0.0), _err(n))
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(d):.1f},{y(e):.1f}" for i, (d, e) in enumerate(sorted(by_depth.items())))
    out.append(f"<path id='max-error-line' d='{path}' fill='none' stroke='#7f8c9a' stroke-width='1'/>")
    out.append("<g id='node-points'>")
    for n in nodes:
        e = _err(n)
        color = "#1f77b4" if n["ok"] else "#c0392b" if n["name"] in roots or not roots else "#e67e22"
        out.append(f"<circle class='node-point' cx='{x(n['depth']):.1f}' cy='{y(e):.1f}' r='3' fill='{color}' "
                   f"fill-opacity='0.75'><title>{escape(n['name'])} ({escape(n['op'])}) at "
                   f"{escape(n.get('source') or '')}: error {_num(e)}</title></circle>")
    out.append("</g>")
    ty = y(tol)
    out.append(f"<line id='tolerance-line' x1='{_ML}' x2='{_ML + pw}' y1='{ty:.1f}' y2='{ty:.1f}' stroke='#c0392b' "
               f"stroke-dasharray='6 4'/><text x='{_ML + pw - 4}' y='{ty - 5:.1f}' text-anchor='end' "
               f"fill='#c0392b'>tolerance {_num(tol)}</text>")
    if first:
        fx_, fy = x(first["depth"]), y(_err(first))
        anchor = "end" if fx_ > _ML + pw * 0.6 else "start"
        dx = -10 if anchor == "end" else 10
        out.append(f"<g id='first-divergence-marker'><circle cx='{fx_:.1f}' cy='{fy:.1f}' r='8' fill='none' "
                   f"stroke='#c0392b' stroke-width='2'/><line x1='{fx_:.1f}' x2='{fx_:.1f}' y1='{_MT}' "
                   f"y2='{_MT + ph}' stroke='#c0392b' stroke-width='1' stroke-opacity='0.4'/>"
                   f"<text x='{fx_ + dx:.1f}' y='{min(fy + 18, _MT + ph - 6):.1f}' text-anchor='{anchor}' "
                   f"fill='#c0392b'>first divergence: {escape(first['name'])}</text></g>")
    out.append("</svg>")
    return "".join(out)


# ---- helpers ------------------------------------------------------------------------------------
def _err(n: dict) -> float:
    e = n.get("error", 0.0)
    return float(e) if not isinstance(e, str) else float("inf")


def _ticks(max_depth: int) -> Iterable[int]:
    step = max(1, round(max_depth / 10))
    return range(0, max_depth + 1, step)


def _num(v: Any) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return escape(str(v))
    if not math.isfinite(v):
        return "inf" if v > 0 else ("nan" if v != v else "-inf")
    return "0" if v == 0 else f"{v:.3e}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4g}"


def _tag(ok: bool) -> str:
    return f"<span class='tag {'ok' if ok else 'bad'}'>{'ok' if ok else 'FAIL'}</span>"


def _stats(s: dict | None) -> str:
    if not s:
        return ""
    bad = f", <b>{s['nonfinite']} NaN/Inf</b>" if s.get("nonfinite") else ""
    return (f"min {_num(s['min'])} &middot; max {_num(s['max'])} &middot; mean {_num(s['mean'])} "
            f"&middot; std {_num(s['std'])}{bad}")


def _source_link(n: dict) -> str:
    if not n.get("file"):
        return "<span class='muted'>unknown</span>"
    path = Path(n["file"])
    uri = path.as_uri() if path.is_absolute() else escape(str(path))
    return f"<a href='{escape(uri)}'>{escape(path.name)}:{n['line']}</a> <span class='muted'>{escape(str(path.parent))}</span>"
