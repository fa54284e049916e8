"""Write a :class:`~.content.Report` as one self-contained HTML file or as Markdown.

The HTML embeds every figure as a base64 PNG and carries its CSS inline: it
opens offline, from an e-mail attachment, with no CDN. A few lines of script
record, once the page has loaded, how many images decoded
(``<body data-images-loaded="N/M">``), which the tests read back from a
headless browser.
"""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from unbackdoor.core.files import atomic_path
from unbackdoor.report.content import Cards, Details, Figure, Note, Report, Table

CSS = """
:root{--ink:#1f2933;--muted:#5f6b7a;--line:#e3e8ee;--bg:#f5f7fa;--card:#fff;--accent:#2e86ab;
--good:#1e7d4f;--good-bg:#e3f4ea;--warn:#9a6700;--warn-bg:#fff4d6;--bad:#b42335;--bad-bg:#fde8eb}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.55 -apple-system,BlinkMacSystemFont,"Segoe UI",
Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
header.top{background:linear-gradient(120deg,#16324f 0%,#2e86ab 100%);color:#fff;padding:34px 0 26px}
.wrap{max-width:1160px;margin:0 auto;padding:0 28px}
header.top h1{margin:0 0 6px;font-size:28px;font-weight:650;letter-spacing:-.01em}
header.top p{margin:0;opacity:.85;font-size:14px;word-break:break-all}
nav.toc{position:sticky;top:0;z-index:5;background:rgba(255,255,255,.94);backdrop-filter:blur(6px);
border-bottom:1px solid var(--line)}
nav.toc .wrap{display:flex;gap:6px;flex-wrap:wrap;padding-top:8px;padding-bottom:8px}
nav.toc a{font-size:13px;color:var(--ink);text-decoration:none;padding:4px 10px;border-radius:999px;
background:var(--bg);border:1px solid var(--line)}
nav.toc a:hover{border-color:var(--accent);color:var(--accent)}
main{padding:8px 0 40px}
section.l2{background:var(--card);border:1px solid var(--line);border-radius:12px;margin:22px 0 0;
padding:22px 26px;box-shadow:0 1px 2px rgba(16,24,40,.04)}
section.l3{background:var(--card);border:1px solid var(--line);border-top:none;border-radius:0 0 12px 12px;
margin:-6px 0 0;padding:6px 26px 20px}
section.l2.has-sub{border-radius:12px 12px 0 0}
section.l3.mid{border-radius:0}
h2{font-size:21px;margin:0 0 2px;letter-spacing:-.01em}
h3{font-size:16px;margin:14px 0 10px;padding-top:14px;border-top:1px solid var(--line);color:#243b53}
.sub{color:var(--muted);font-size:13px;margin:0 0 14px;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0 16px}
.card{flex:1 1 180px;border:1px solid var(--line);border-radius:10px;padding:12px 14px;background:#fbfcfd;
border-left:4px solid var(--line)}
.card .k{font-size:12.5px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em;font-weight:600}
.card .v{font-size:26px;font-weight:680;margin:2px 0 0;font-variant-numeric:tabular-nums}
.card .s{font-size:12.5px;color:var(--muted)}
.card.good{border-left-color:var(--good)}.card.good .v{color:var(--good)}
.card.warn{border-left-color:#d99a00}.card.warn .v{color:var(--warn)}
.card.bad{border-left-color:var(--bad)}.card.bad .v{color:var(--bad)}
.tablewrap{overflow-x:auto;margin:8px 0 4px}
table{border-collapse:collapse;width:100%;font-size:14px;font-variant-numeric:tabular-nums}
th{text-align:left;font-weight:600;color:var(--muted);font-size:12.5px;text-transform:uppercase;letter-spacing:.03em;
border-bottom:2px solid var(--line);padding:8px 10px;white-space:nowrap}
td{padding:7px 10px;border-bottom:1px solid var(--line);white-space:nowrap}
td:first-child{font-weight:600}
tbody tr:hover{background:#f8fafc}
td.num{text-align:right}th.num{text-align:right}
td.path{color:var(--muted);font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;font-weight:400}
.tone{display:inline-block;padding:1px 8px;border-radius:999px}
.tone.good{background:var(--good-bg);color:var(--good)}
.tone.warn{background:var(--warn-bg);color:var(--warn)}
.tone.bad{background:var(--bad-bg);color:var(--bad)}
p.caption,figcaption{color:var(--muted);font-size:13px;margin:6px 0 14px;max-width:900px}
figure{margin:14px 0 6px}
figure img{display:block;max-width:100%;height:auto;border:1px solid var(--line);border-radius:8px;background:#fff}
.note{border-radius:8px;padding:9px 12px;background:#eef6fb;color:#1c4e6b;font-size:13.5px;margin:10px 0}
.note.warn{background:var(--warn-bg);color:var(--warn)}
details{margin:8px 0;font-size:13px}
details summary{cursor:pointer;color:var(--muted)}
details pre{background:#0f1d2b;color:#dbe7f3;padding:12px 14px;border-radius:8px;overflow-x:auto;font-size:12.5px;
line-height:1.45}
footer{color:var(--muted);font-size:12.5px;padding:18px 0 30px;text-align:center}
@media print{nav.toc{display:none}section.l2,section.l3{box-shadow:none;break-inside:avoid}}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
"""

_NUMERIC_HINTS = ("accuracy", "asr", "der", "time", "precision", "recall", "f1", "auroc", "ap", "poisoned", "removed", "kept")


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _is_num_col(name: str) -> bool:
    n = name.lower()
    return any(n == h or n.startswith(h) or n.endswith(h) for h in _NUMERIC_HINTS)


def _html_table(t: Table) -> str:
    numeric = [_is_num_col(c) for c in t.columns]
    head = "".join(f'<th class="num">{_e(c)}</th>' if nc else f"<th>{_e(c)}</th>" for c, nc in zip(t.columns, numeric))
    body = []
    for row in t.rows:
        tds = []
        for j, cell in enumerate(row):
            cls = []
            if j < len(numeric) and numeric[j]:
                cls.append("num")
            if j < len(t.columns) and t.columns[j] == "Run":
                cls.append("path")
            attrs = f' class="{" ".join(cls)}"' if cls else ""
            if cell.value is not None and not isinstance(cell.value, (list, dict)):
                attrs += f' data-value="{_e(repr(cell.value) if isinstance(cell.value, float) else cell.value)}"'
            elif isinstance(cell.value, list):
                attrs += f' data-value="{_e(",".join(map(str, cell.value)))}"'
            text = _e(cell.text)
            if cell.tone:
                text = f'<span class="tone {cell.tone}">{text}</span>'
            tds.append(f"<td{attrs}>{text}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    name = f' data-table="{_e(t.name)}"' if t.name else ""
    cap = f'<p class="caption">{_e(t.caption)}</p>' if t.caption else ""
    return (f'<div class="tablewrap"><table{name}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            f"</table></div>{cap}")


def _html_block(b) -> str:
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        return (f'<figure id="fig-{_e(b.name)}"><img alt="{_e(b.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_e(b.caption)}</figcaption></figure>")
    if isinstance(b, Note):
        return f'<div class="note {b.tone}">{_e(b.text)}</div>'
    if isinstance(b, Cards):
        cards = "".join(f'<div class="card {tone}"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div>'
                        f'<div class="s">{_e(s)}</div></div>' for k, v, s, tone in b.items)
        return f'<div class="cards">{cards}</div>'
    if isinstance(b, Details):
        return f"<details><summary>{_e(b.summary)}</summary><pre>{_e(b.text)}</pre></details>"
    raise TypeError(f"unknown block {type(b).__name__}")


def render_html(report: Report) -> str:
    """One self-contained HTML page (inline CSS, base64 images, no external requests)."""
    secs = report.sections
    parts = []
    for i, s in enumerate(secs):
        nxt = secs[i + 1] if i + 1 < len(secs) else None
        cls = f"l{s.level}"
        if s.level == 2 and nxt is not None and nxt.level == 3:
            cls += " has-sub"
        if s.level == 3 and nxt is not None and nxt.level == 3:
            cls += " mid"
        tag = "h2" if s.level == 2 else "h3"
        sub = f'<p class="sub">{_e(s.subtitle)}</p>' if s.subtitle else ""
        parts.append(f'<section class="{cls}" id="{_e(s.anchor)}"><{tag}>{_e(s.title)}</{tag}>{sub}'
                     + "".join(_html_block(b) for b in s.blocks) + "</section>")
    toc = "".join(f'<a href="#{_e(s.anchor)}">{_e(s.title)}</a>' for s in secs if s.level == 2)
    meta = report.meta
    foot = f"unbackdoor {_e(meta.get('version', ''))} · generated {_e(meta.get('generated', ''))}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="unbackdoor {_e(meta.get('version', ''))}">
<title>{_e(report.title)}</title>
<style>{CSS}</style></head>
<body data-images-loaded="pending">
<header class="top"><div class="wrap"><h1>{_e(report.title)}</h1><p>{_e(report.subtitle)}</p></div></header>
<nav class="toc"><div class="wrap">{toc}</div></nav>
<main><div class="wrap">{"".join(parts)}</div></main>
<footer>{foot}</footer>
<script>{SCRIPT}</script>
</body></html>
"""


# ---------------------------------------------------------------------------- Markdown
def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_escape(c) for c in t.columns) + " |",
             "|" + "|".join("---:" if _is_num_col(c) else "---" for c in t.columns) + "|"]
    for row in t.rows:
        cells = []
        for c in row:
            txt = _md_escape(c.text)
            cells.append(f"**{txt}**" if c.tone == "bad" else txt)
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    return out + (f"\n\n*{_md_escape(t.caption)}*" if t.caption else "")


def render_markdown(report: Report, fig_dir: str | os.PathLike, relative_to: str | os.PathLike) -> str:
    """Markdown text; figures are written as PNG files into ``fig_dir`` and linked relative to ``relative_to``."""
    fig_dir = Path(fig_dir)
    out = [f"# {report.title}", "", report.subtitle, ""]
    for s in report.sections:
        out += [("## " if s.level == 2 else "### ") + s.title, ""]
        if s.subtitle:
            out += [f"`{s.subtitle}`", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out += [_md_table(b), ""]
            elif isinstance(b, Figure):
                fig_dir.mkdir(parents=True, exist_ok=True)
                path = fig_dir / f"{b.name}.png"
                with atomic_path(path) as tmp:
                    tmp.write_bytes(b.png)
                rel = os.path.relpath(path, relative_to).replace(os.sep, "/")
                out += [f"![{_md_escape(b.alt)}]({rel})", "", f"*{_md_escape(b.caption)}*", ""]
            elif isinstance(b, Note):
                out += [f"> {'**Note:** ' if b.tone else ''}{b.text}", ""]
            elif isinstance(b, Cards):
                out += ["  ·  ".join(f"**{k}**: {v} ({s_})" for k, v, s_, _ in b.items), ""]
            elif isinstance(b, Details):
                out += ["<details><summary>" + html.escape(b.summary) + "</summary>", "", "```yaml", b.text.rstrip(), "```",
                        "", "</details>", ""]
    meta = report.meta
    out += ["---", f"*unbackdoor {meta.get('version', '')} · generated {meta.get('generated', '')}*", ""]
    return "\n".join(out)
