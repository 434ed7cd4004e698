"""The numeric core (numpy/scipy only): everything the adapters (files, scene) and the apps share.

``series`` (the 4D series record), ``geometry`` (IJK->RAS grids, resampling), ``units``, ``registry``
(models and maps: parameters, bounds, titles, units, display windows), ``concentration``, ``aif``,
``models``, ``fitting``, ``regionstats``, ``options`` (the one options record), ``pipeline`` (the one
chain, ``analyse``), ``response`` (the call between two exams), ``size``, ``cohort``, ``phantom``.
"""
