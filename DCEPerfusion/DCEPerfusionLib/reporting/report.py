"""A self-contained HTML report: headings, text, tables and figures embedded as PNG (base64), one
file that opens in any browser and can be mailed or archived. No templating library needed."""

from __future__ import annotations

import base64
import html
import io as _io
import math
import os

import numpy as np

from ..files.atomic import replacing


class Report:
    """Collects sections; :meth:`write` renders them into one HTML file."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def html(self, fragment: str) -> None:
        """Trusted HTML written by this package (e.g. a coloured call)."""
        self.parts.append(fragment)

    def table(self, rows: list[dict], caption: str = "", digits: int = 3, colours: dict | None = None,
              colour_column: str = "call") -> None:
        """A table from dict rows; floats are rounded; ``colours`` {cell text: CSS colour} colours the
        cells of ``colour_column``."""
        if not rows:
            return
        head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
        body = []
        for r in rows:
            cells = []
            for key, v in r.items():
                text = _fmt(v, digits)
                coloured = colours and key == colour_column and text in colours
                style = f' style="color:{colours[text]};font-weight:bold"' if coloured else ""
                cells.append(f"<td{style}>{html.escape(text)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")

    def figure(self, fig_or_png, caption: str = "", width: str = "100%") -> None:
        """A matplotlib figure (or PNG bytes), embedded as base64 PNG."""
        data = _png_bytes(fig_or_png)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img style="max-width:{width}" src="data:image/png;base64,'
                          f'{base64.b64encode(data).decode()}" alt="{html.escape(caption)}">{cap}</figure>')

    def motion(self, label: str, t_s, estimate, folder: str = "", fig=None) -> None:
        """An exam's motion correction (a :class:`core.motion.MotionEstimate`): what was done, the largest
        displacement in mm and voxels, and the figure of the displacement over time
        (:func:`figures.motion_figure`, or ``fig`` when already drawn); ``folder``: where its motion.csv is."""
        from .figures import motion_figure
        worst = int(np.argmax(estimate.displacement_mm))
        over = int(np.sum(np.asarray(estimate.displacement_mm) > estimate.voxel_mm))
        ref = estimate.reference_frames
        where = f" Every frame's parameters are in {folder.rstrip('/')}/motion.csv." if folder else ""
        self.text(f"{label}: {estimate.kind} motion correction - every frame registered to the mean of frames "
                  f"{ref[0]}-{ref[-1]} (the enhancement plateau) before the fit. Largest displacement of the fit "
                  f"region {estimate.max_displacement_mm:.1f} mm ({estimate.max_displacement_voxels:.1f} voxels of "
                  f"{estimate.voxel_mm:g} mm) at frame {worst} ({float(np.asarray(t_s)[worst]):g} s); {over} of "
                  f"{len(estimate.displacement_mm)} frames moved more than 1 voxel.{where}")
        self.figure(fig if fig is not None else motion_figure(t_s, estimate), width="75%",
                    caption=f"motion: {label} ({estimate.kind} correction), displacement and rigid parameters per "
                            "frame")

    def write(self, path: str) -> str:
        doc = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}"
               f"</title><style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"
               + "\n".join(self.parts) + "</body></html>")
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(doc)
        return path


def _fmt(v, digits):
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _png_bytes(obj) -> bytes:
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    buf = _io.BytesIO()
    obj.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}caption{text-align:left;
font-style:italic;padding:.3em 0}figure{margin:1em 0}figcaption{font-size:.9em;color:#555}"""
