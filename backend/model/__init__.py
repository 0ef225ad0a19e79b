"""Segmentation models: U-Mamba networks, training, inference, metrics and checkpoints.

Nothing is imported here on purpose: ``import backend.model`` must stay cheap (torch loads only
when a submodule that needs it is imported). Entry points: :mod:`backend.model.spec`
(``ModelSpec``, presets), :mod:`backend.model.networks` (``build_model``), :mod:`backend.model.train` (``train``),
:mod:`backend.model.predict` (``Predictor``), :mod:`backend.model.checkpoint`,
:mod:`backend.model.metrics`.
"""
