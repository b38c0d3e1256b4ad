"""``OUT/summary.html``: the batch as one self-contained page (inline CSS and script, no network).

Counts by status at the top, then one row per model: status in its colour, the reason, seconds,
peak memory, max abs difference, Transpose ops, and links to the model's report.html (written with
``verify: deep``), report.json and convert.log. Every column sorts on a click on its header; the
page opens sorted by ``#sort=COLUMN`` (``-COLUMN`` descending) when the address carries one.
"""
from __future__ import annotations

from html import escape
from pathlib import Path

COLOURS = {"ok": "#1f8a4c", "parity_failed": "#c0392b", "bad_input": "#b9770e", "unsupported": "#7d3c98",
           "crashed": "#1d232b", "timeout": "#2e6da4"}
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d232b;background:#f4f6f8}
main{max-width:1200px;margin:0 auto;padding:24px}h1{font-size:22px;margin:0 0 4px}.muted{color:#5d6b79}
.counts{display:flex;flex-wrap:wrap;gap:8px;margin:14px 0}
.count{border-radius:8px;color:#fff;padding:8px 14px;font-size:16px;font-weight:600}
.count.zero{opacity:.35}table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #d5dbe1;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;cursor:pointer;user-select:none;white-space:nowrap}th[aria-sort]::after{content:' \\2195';color:#8a96a3}
th[aria-sort=ascending]::after{content:' \\25B2';color:#1d232b}th[aria-sort=descending]::after{content:' \\25BC';color:#1d232b}
td.num{text-align:right;font-family:ui-monospace,monospace;white-space:nowrap}
.status{display:inline-block;border-radius:4px;padding:1px 8px;color:#fff;font-weight:600;white-space:nowrap}
td.reason{overflow-wrap:anywhere;max-width:520px}a{color:#2e6da4}.skip{color:#5d6b79;font-size:12px}
"""
_SCRIPT = """
(function(){
  var table=document.getElementById('models'), heads=table.tHead.rows[0].cells;
  function key(cell,num){var v=cell.getAttribute('data-v');
    if(num){var f=parseFloat(v);return isNaN(f)?Infinity:f;}return (v||'').toLowerCase();}
  function sortBy(col,desc){
    var th=heads[col],num=th.getAttribute('data-type')==='num',body=table.tBodies[0];
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=key(a.cells[col],num),y=key(b.cells[col],num);
      var c=x<y?-1:x>y?1:0;return desc?-c:c;});
    rows.forEach(function(r){body.appendChild(r);});
    for(var i=0;i<heads.length;i++){heads[i].setAttribute('aria-sort','none');}
    th.setAttribute('aria-sort',desc?'descending':'ascending');
    table.setAttribute('data-sorted',th.getAttribute('data-col')+(desc?' desc':' asc'));
  }
  for(var i=0;i<heads.length;i++){(function(col){heads[col].addEventListener('click',function(){
    sortBy(col,heads[col].getAttribute('aria-sort')==='ascending');});})(i);}
  var m=/sort=(-?)([a-z_]+)/.exec(location.hash);
  if(m){for(var j=0;j<heads.length;j++){if(heads[j].getAttribute('data-col')===m[2]){sortBy(j,m[1]==='-');}}}
})();
"""
_COLUMNS = (("name", "model", "text"), ("status", "status", "text"), ("reason", "reason", "text"),
            ("seconds", "seconds", "num"), ("peak_rss_mb", "peak MB", "num"), ("max_abs", "max abs", "num"),
            ("transposes", "Transpose", "num"), ("links", "reports", "text"))


def render(summary: dict, title: str = "tracer batch") -> str:
    models = summary.get("models", [])
    counts = summary.get("counts", {})
    tiles = "".join(f"<div class='count{'' if counts.get(s) else ' zero'}' id='count-{s}' "
                    f"style='background:{c}'>{escape(s)}: {counts.get(s, 0)}</div>" for s, c in COLOURS.items())
    head = "".join(f"<th data-col='{k}' data-type='{t}' aria-sort='none'>{escape(label)}</th>"
                   for k, label, t in _COLUMNS)
    rows = "\n".join(_row(r) for r in models)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><main><h1>{escape(title)}</h1>"
            f"<div class='muted'>{len(models)} model(s), {summary.get('skipped', 0)} skipped as unchanged; "
            f"{escape(str(summary.get('backend', '')))}; {summary.get('wall_seconds', 0):.1f} s</div>"
            f"<div class='counts'>{tiles}</div>"
            f"<table id='models'><thead><tr>{head}</tr></thead><tbody>\n{rows}\n</tbody></table>"
            f"<script>{_SCRIPT}</script></main></body></html>")


def _row(r: dict) -> str:
    status = r.get("status", "")
    name = escape(r.get("name", ""))
    files = {o.split("/", 1)[-1] for o in r.get("outputs", [])}
    links = [f"<a class='report' href='{name}/{f}'>{f}</a>" for f in ("report.html", "report.json") if f in files]
    if r.get("log"):
        links.append(f"<a href='{escape(r['log'])}'>convert.log</a>")
    skip = " <span class='skip'>(unchanged, skipped)</span>" if r.get("skipped") else ""
    cells = [_cell(r.get("name"), f"{name}{skip}<div class='muted'>{escape(str(r.get('model', '')))}</div>"),
             _cell(status, f"<span class='status' style='background:{COLOURS.get(status, '#888')}'>{escape(status)}</span>"),
             _cell(r.get("reason"), escape(str(r.get("reason", ""))), "reason"),
             _num(r.get("seconds"), "{:.1f}"), _num(r.get("peak_rss_mb"), "{:.0f}"), _num(r.get("max_abs"), "{:.2e}"),
             _num(r.get("transposes"), "{:d}"), _cell(" ".join(links), " ".join(links))]
    return f"<tr class='row' data-status='{escape(status)}'>{''.join(cells)}</tr>"


def _cell(value: object, html: str, cls: str = "") -> str:
    attr = f" class='{cls}'" if cls else ""
    return f"<td{attr} data-v='{escape(str(value if value is not None else ''), quote=True)}'>{html}</td>"


def _num(value: object, fmt: str) -> str:
    if value is None:
        return "<td class='num' data-v=''>-</td>"
    return f"<td class='num' data-v='{value}'>{fmt.format(value)}</td>"


def write_summary_html(out: str | Path, summary: dict) -> Path:
    path = Path(out) / "summary.html"
    tmp = path.with_name("summary.html.partial")
    tmp.write_text(render(summary, title=f"tracer batch: {Path(out).resolve().name}"), encoding="utf-8")
    tmp.replace(path)
    return path


def counts_line(counts: dict) -> str:
    return ", ".join(f"{counts.get(s, 0)} {s}" for s in COLOURS if counts.get(s))

