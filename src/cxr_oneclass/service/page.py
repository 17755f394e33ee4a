"""The worklist page and a study's page: server-rendered HTML and a little JavaScript (drag-and-drop upload, the
heat-map toggle). Nothing to build; every value is escaped."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1a1a1a;max-width:1200px}
h1{font-size:1.3rem;margin:0 0 .3rem}.ruo{color:#a00;font-weight:600}
.summary{margin:.6rem 0 1rem;padding:.6rem .8rem;background:#f4f6f8;border-radius:6px}
table{border-collapse:collapse;width:100%}th,td{padding:.35rem .5rem;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
th{background:#fafafa}.flag{font-weight:600;padding:.1rem .45rem;border-radius:4px}
.abnormal{background:#fde2e1;color:#8a1c13}.normal{background:#e3f4e6;color:#1d5a2b}.error{background:#fff1cc;color:#7a5200}
.skipped{background:#eee;color:#555}img.film{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccc}
#dropzone{border:2px dashed #889;border-radius:8px;padding:1rem;text-align:center;margin:1rem 0;color:#445}
#dropzone.over{background:#eef3ff}button{cursor:pointer}
"""

TOGGLE_JS = """
function toggleHeat(btn){const img=document.getElementById(btn.dataset.img);
 const heat=img.dataset.showing!=='heatmap';img.src=heat?img.dataset.heatmap:img.dataset.thumbnail;
 img.dataset.showing=heat?'heatmap':'thumbnail';btn.textContent=heat?'hide heat map':'show heat map';}
"""

UPLOAD_JS = """
const zone=document.getElementById('dropzone'),input=document.getElementById('file-input'),status=document.getElementById('upload-status');
async function send(files){if(!files.length)return;const form=new FormData();for(const f of files)form.append('files',f,f.name);
 status.textContent='scoring '+files.length+' file(s)...';
 const r=await fetch('/v1/images',{method:'POST',body:form,credentials:'same-origin'});const body=await r.json();
 const bad=(body.errors||[]).map(e=>e.file+': '+e.problem);
 status.textContent=r.ok?'scored '+body.images.length+' file(s)':'not all files could be scored: '+bad.join('; ');
 setTimeout(()=>location.reload(),r.ok?300:2500);}
zone.addEventListener('dragover',e=>{e.preventDefault();zone.classList.add('over');});
zone.addEventListener('dragleave',()=>zone.classList.remove('over'));
zone.addEventListener('drop',e=>{e.preventDefault();zone.classList.remove('over');send(e.dataTransfer.files);});
input.addEventListener('change',()=>send(input.files));
"""


def _flag(flag: str) -> str:
    return f'<span class="flag {escape(flag)}">{escape(flag)}</span>'


def _score(v: Any) -> str:
    return "–" if v is None else f"{float(v):.3f}"


def _film(image_id: Any, key: str, show: bool) -> str:
    """A thumbnail with its heat-map toggle (both PNGs come from the API)."""
    if image_id is None or not show:
        return "–"
    base = f"/v1/images/{int(image_id)}"
    return (f'<img class="film" id="img-{key}" src="{base}/thumbnail.png" data-thumbnail="{base}/thumbnail.png" '
            f'data-heatmap="{base}/heatmap.png" data-showing="thumbnail" alt="film"> '
            f'<button class="toggle" data-img="img-{key}" onclick="toggleHeat(this)">show heat map</button>')


def _head(title: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>")


def worklist_page(worklist: dict, summary: dict, model: dict) -> str:
    threshold = model.get("threshold")
    cleared = summary.get("normal", 0)
    rows = []
    for n, s in enumerate(worklist["items"]):
        key = str(s["study_key"])
        shown = s["flag"] in ("abnormal", "normal")
        rows.append(
            f'<tr class="study" data-study="{escape(key)}"><td>{n + 1}</td><td>{_flag(s["flag"])}</td><td>{_score(s["score"])}</td>'
            f'<td>{escape(str(s.get("patient_id") or "–"))}</td><td>{escape(str(s.get("accession") or "–"))}</td>'
            f'<td>{escape(str(s.get("study_date") or s.get("date") or ""))}</td>'
            f'<td>{s["n_scored"]} of {s["n_images"]}</td><td>{_film(s.get("top_image"), f"s{n}", shown)}</td>'
            f'<td><a class="open" href="/studies/{quote(key, safe="")}">open</a></td></tr>')
    body = "".join(rows) or '<tr><td colspan="9">No studies yet: drop films above, or send them to the DICOM receiver.</td></tr>'
    return (
        _head("cxr-oneclass worklist")
        + "<h1>Chest X-ray worklist</h1><div class='ruo'>For research use only. Not for diagnostic use.</div>"
        + f"<div class='summary' id='summary'>Operating point: threshold <b>{_score(threshold)}</b> ({escape(str(model.get('rule') or 'none'))}). "
        + f"<b id='cleared'>{cleared}</b> of <b id='total'>{summary.get('studies', 0)}</b> studies auto-cleared (normal); "
        + f"{summary.get('abnormal', 0)} abnormal, {summary.get('error', 0)} need review (not scored), "
        + f"{summary.get('skipped', 0)} with no frontal film. Studies needing review come first, then by score.</div>"
        + "<div id='dropzone'>Drop DICOM or PNG films here, or <label><u>choose files</u>"
        + "<input id='file-input' type='file' multiple></label><div id='upload-status'></div></div>"
        + "<table id='worklist'><thead><tr><th>#</th><th>flag</th><th>score</th><th>patient</th><th>accession</th><th>date</th>"
        + f"<th>films scored</th><th>top film</th><th></th></tr></thead><tbody>{body}</tbody></table>"
        + f"<script>{TOGGLE_JS}{UPLOAD_JS}</script></body></html>"
    )


def study_page(study: dict, model: dict) -> str:
    rows = []
    for n, img in enumerate(study["images"]):
        shown = img["flag"] in ("abnormal", "normal")
        pct = "" if img.get("normal_percentile") is None else f"{img['normal_percentile']:.0f}"
        rows.append(
            f'<tr class="image"><td>{escape(str(img["file_name"]))}</td><td>{escape(str(img.get("view") or "–"))}</td>'
            f'<td>{_flag(img["flag"])}</td><td>{_score(img["score"])}</td>'
            f'<td>{pct}</td>'
            f'<td>{_film(img["id"], f"i{n}", shown)}</td><td>{escape(str(img.get("error") or ""))}</td></tr>')
    return (
        _head(f"study {study['study_key']}")
        + "<p><a href='/'>&larr; worklist</a></p>"
        + f"<h1>Study {escape(str(study.get('study_uid') or study['study_key']))}</h1>"
        + "<div class='ruo'>For research use only. Not for diagnostic use.</div>"
        + f"<div class='summary'>{_flag(study['flag'])} score {_score(study['score'])} (threshold {_score(model.get('threshold'))}); "
        + f"patient {escape(str(study.get('patient_id') or '–'))}, accession {escape(str(study.get('accession') or '–'))}</div>"
        + "<table id='images'><thead><tr><th>file</th><th>view</th><th>flag</th><th>score</th><th>normal percentile</th>"
        + f"<th>film</th><th>note</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        + f"<script>{TOGGLE_JS}</script></body></html>"
    )
