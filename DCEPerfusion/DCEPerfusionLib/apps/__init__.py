"""Applications: ``cli`` (the ``dceperfusion`` command), ``batch`` (a cohort on Dask) and ``demo``."""
