"""The mistake browser: the report's confusion matrix made clickable (fastai's plot_top_losses and most_confused in
one). A click on a cell lists that cell's test images (true class = its row, predicted class = its column), at most
CELL_LIMIT, highest loss first, each beside its Grad-CAM map; everything is embedded in the page, so it works offline
and from a file:// URL.

Per image the page holds the image as a small JPEG data URI and its heat map as MAP_SIDE x MAP_SIDE bytes that a
short inline script colours (inferno, as `explain.heat_colors`) and lays over a copy of the image: about 2 KB an
image. The page embeds at most MAX_IMAGES images: all of CIFAR-10's 100 cells x 25 fit; with more classes the
mistakes come first (the most confused cells first), then the correct predictions (the fullest cells first), as long
as the budget lasts, and a cell left out says so when clicked.

Loss and probabilities are those of the probabilities as served (softmax of the logits / the checkpoint's
temperature), the ones the rest of the report shows.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..explain import heat_colors
from ..names import shown

CELL_LIMIT = 25  # images listed per cell, as the issue asks
MAX_IMAGES = 2500  # = CIFAR-10's 100 cells x 25, about 5 MB of page; more would make the page slow to open
MAP_SIDE = 16  # Grad-CAM maps are upsampled from the last feature map (4x4 or 8x8 for CIFAR nets): 16x16 keeps it all
THUMB_SIDE = 64  # larger images are shrunk to this for the browser (CIFAR's 32x32 are embedded as they are)
JPEG_QUALITY = 90  # with 4:4:4 chroma, ~1 KB for a 32x32 image and no visible loss at 3x zoom


def image_losses(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image: -log of the probability of its true class (what training minimizes, image by image)."""
    p = probs[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
    return -np.log(np.clip(p.astype(np.float64), 1e-12, None))


def cell_images(
    labels: np.ndarray, preds: np.ndarray, losses: np.ndarray, limit: int = CELL_LIMIT
) -> dict[tuple[int, int], list[int]]:
    """For each non-empty cell (true, predicted): the indices of its first `limit` images by loss, highest first
    (equal losses: lower index first)."""
    order = np.lexsort((np.arange(len(losses)), -losses))
    cells: dict[tuple[int, int], list[int]] = {}
    for k, t, p in zip(order.tolist(), labels[order].tolist(), preds[order].tolist()):
        shown = cells.setdefault((t, p), [])
        if len(shown) < limit:
            shown.append(k)
    return cells


def pick_cells(
    cells: dict[tuple[int, int], list[int]], counts: np.ndarray, budget: int = MAX_IMAGES
) -> list[tuple[int, int]]:
    """The cells the page embeds: mistakes first (most confused first), then correct predictions (fullest first),
    while their images fit in `budget`."""
    order = sorted(cells, key=lambda c: (c[0] == c[1], -int(counts[c]), c))
    chosen, total = [], 0
    for cell in order:
        if total + len(cells[cell]) > budget:
            break
        chosen.append(cell)
        total += len(cells[cell])
    return chosen


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def jpeg_base64(image: np.ndarray) -> str:
    """A uint8 image (3, H, W) as a base64 JPEG, shrunk to THUMB_SIDE when larger."""
    im = Image.fromarray(np.ascontiguousarray(np.asarray(image).transpose(1, 2, 0)))
    if max(im.size) > THUMB_SIDE:
        im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return _b64(buf.getvalue())


def map_base64(heat: np.ndarray) -> str:
    """A map (H, W) in [0, 1] as MAP_SIDE x MAP_SIDE bytes (area-averaged, 0..255), base64."""
    side = min(MAP_SIDE, heat.shape[-1])
    small = Image.fromarray(np.asarray(heat, dtype=np.float32)).resize((side, side), Image.Resampling.BOX)
    return _b64((np.clip(np.asarray(small), 0, 1) * 255).round().astype(np.uint8).tobytes())


def colour_table() -> str:
    """The inferno colours of the byte values 0..255 (256 x RGB), base64: what the page colours maps with."""
    return _b64(heat_colors(np.linspace(0.0, 1.0, 256)).tobytes())


def browser_data(
    cells: dict[tuple[int, int], list[int]],
    chosen: Sequence[tuple[int, int]],
    counts: np.ndarray,
    images: Any,
    maps: dict[int, np.ndarray] | None,
    labels: np.ndarray,
    probs: np.ndarray,
    losses: np.ndarray,
) -> dict[str, Any]:
    """What the page's script reads: per chosen cell "true,pred" its image count and, per image shown,
    [test index, probability of the predicted class and of the true class (percent), loss, JPEG, map or ""]."""
    out: dict[str, Any] = {}
    for t, p in chosen:
        rows = []
        for i in cells[(t, p)]:
            heat = map_base64(maps[i]) if maps is not None else ""
            # rounded as shown (percent to 0.1, loss to 0.001), so the page does not round twice
            row = [i, round(100 * float(probs[i, p]), 1), round(100 * float(probs[i, labels[i]]), 1)]
            row.append(round(float(losses[i]), 3))
            rows.append(row + [jpeg_base64(images[i]), heat])
        out[f"{t},{p}"] = {"count": int(counts[t, p]), "images": rows}
    return {
        "limit": CELL_LIMIT,
        "budget": MAX_IMAGES,
        "embedded": len(chosen),
        "maps": maps is not None,
        "colours": colour_table(),
        "cells": out,
    }


BROWSER_CSS = """
#confusion-matrix td{cursor:pointer}#confusion-matrix td.sel{outline:3px solid #d62728;outline-offset:-2px}
#browser{margin-top:12px}#browser .shots{display:flex;flex-wrap:wrap;gap:10px}
#browser figure{margin:0;background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:5px;width:202px}
#browser .pair{display:flex;gap:4px}#browser .tile{position:relative;width:96px;height:96px}
#browser .tile img{width:96px;height:96px;image-rendering:pixelated;border:0;border-radius:0;display:block}
#browser .tile canvas{position:absolute;left:0;top:0;width:96px;height:96px;opacity:.55}
#browser figcaption{font-size:11.5px;line-height:1.35;margin-top:3px}
"""

# Builds the panel with DOM calls and textContent only (class names come from folder names: never parsed as HTML).
# A map's bytes become a MAP_SIDE x MAP_SIDE canvas in the colour table's colours, scaled smoothly by the browser
# over the image at 55% opacity: the same blend as explain.overlay.
BROWSER_JS = """
(function () {
  const data = JSON.parse(document.getElementById('browser-data').textContent);
  const classes = JSON.parse(document.getElementById('browser-classes').textContent);
  const table = document.getElementById('confusion-matrix');
  const panel = document.getElementById('browser');
  const colours = Uint8Array.from(atob(data.colours), (c) => c.charCodeAt(0));
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const pct = (p) => p.toFixed(1) + '%';
  function heat(b64) {
    const bytes = atob(b64), side = Math.round(Math.sqrt(bytes.length));
    const canvas = el('canvas');
    canvas.width = canvas.height = side;
    const ctx = canvas.getContext('2d'), im = ctx.createImageData(side, side);
    for (let k = 0; k < bytes.length; k++) {
      const v = 3 * bytes.charCodeAt(k);
      im.data.set([colours[v], colours[v + 1], colours[v + 2], 255], 4 * k);
    }
    ctx.putImageData(im, 0, 0);
    return canvas;
  }
  function tile(jpeg, map) {
    const t = el('div', 'tile'), img = el('img');
    img.src = 'data:image/jpeg;base64,' + jpeg;
    t.appendChild(img);
    if (map) t.appendChild(heat(map));
    return t;
  }
  function show(i, j, count) {
    const cell = data.cells[i + ',' + j];
    panel.replaceChildren();
    panel.dataset.cell = i + ',' + j;
    const what = 'true ' + classes[i] + ', predicted ' + classes[j] + ': ' + count +
      (count === 1 ? ' image' : ' images');
    if (!count) { panel.appendChild(el('p', 'sub', what + '.')); return; }
    if (!cell) {
      panel.appendChild(el('p', 'note', what + '. Not embedded: this page holds the images of the ' + data.embedded +
        ' cells that fit in ' + data.budget + ' images, mistakes first.'));
      return;
    }
    const shown = cell.images.length;
    panel.appendChild(el('p', 'sub', what + (shown < count ? ', the ' + shown + ' with the highest loss' : '') +
      ', highest loss first' +
      (data.maps ? '; beside each image its Grad-CAM map for the predicted class.' : '.')));
    const shots = el('div', 'shots');
    for (const [index, pPred, pTrue, loss, jpeg, map] of cell.images) {
      const fig = el('figure');
      fig.dataset.index = index;
      const pair = el('div', 'pair');
      pair.appendChild(tile(jpeg, ''));
      if (map) pair.appendChild(tile(jpeg, map));
      const cap = el('figcaption');
      cap.append(el('b', '', '#' + index), ' loss ' + loss.toFixed(3), el('br'),
        'predicted ' + classes[j] + ' ' + pct(pPred), el('br'), 'true ' + classes[i] + ' ' + pct(pTrue));
      fig.append(pair, cap);
      shots.appendChild(fig);
    }
    panel.appendChild(shots);
  }
  table.addEventListener('click', (e) => {
    const td = e.target.closest('td');
    if (!td || !table.contains(td)) return;
    for (const s of table.querySelectorAll('td.sel')) s.classList.remove('sel');
    td.classList.add('sel');
    show(td.parentElement.rowIndex - 1, td.cellIndex - 1, parseInt(td.textContent, 10));
  });
})();
"""


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element (a '</' would end it)."""
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def render_browser(data: dict[str, Any], classes: Sequence[str]) -> str:
    """The panel, its data and its script, placed after the confusion-matrix table (id confusion-matrix)."""
    return (
        '<div id="browser"></div>'
        f'<script type="application/json" id="browser-classes">{_script_json([shown(c) for c in classes])}</script>'
        f'<script type="application/json" id="browser-data">{_script_json(data)}</script>'
        f"<script>{BROWSER_JS}</script>"
    )
