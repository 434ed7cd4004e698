"""Reporting: ``figures`` (matplotlib: waterfall, ROC, box plot, image pairs) and ``report`` (one
self-contained HTML file)."""
