"""Shared test support code: no tests live here, only what several test modules use.

- :mod:`tests.support.frames`: the one synthetic ultrasound frame generator (:func:`synthetic_frame`),
  PNG bytes, and :func:`dataset_pairs` (the shared usgra-seg images when present, generated otherwise).
- :mod:`tests.support.models`: the one tiny network spec (:func:`tiny_spec`), tiny checkpoints and
  training, model versions recorded through ``backend.services.versions``, and a deterministic
  stand-in model (:class:`ThresholdModel`, :func:`fake_loader`).
- :mod:`tests.support.servers`: any WSGI app on a loopback port (:class:`ServedApp`, :func:`free_port`).
- :mod:`tests.support.fake_labelstudio`: the Label Studio endpoints sonoseg calls, in memory
  (:class:`FakeLabelStudio`), and the host a presigned URL points to (:class:`FakeCloud`).
- :mod:`tests.support.payloads`: webhook and API bodies as Label Studio sends them.
- :mod:`tests.support.processes`: real processes: Label Studio from ``.venv-ls`` and ``sonoseg worker``,
  configured from the same :class:`~backend.settings.Settings` as the code under test.
- :mod:`tests.support.imaging`: sample image files for the imaging tests (written by SimpleITK,
  pydicom and by hand, never by ``backend.imaging``).

Modules here import ``backend`` lazily where it is heavy (torch, the model engine), so importing a
helper costs a test only what it uses.
"""
