"""Use cases on top of the database, the store and the engine.

Two kinds of functions live here:

- **core** functions take ``session`` (and ``store``) as arguments and never commit: the caller
  (a view, a Celery task, a CLI command) owns the unit of work. Most of this package.
- **workflows** that interleave network I/O or training with writes (webhook processing,
  reconciliation, ``/predict``, batch re-prediction, executing a training run) open short units of
  work of their own from the session factory they are given, because no transaction may be held
  across a download or a training run (with SQLite every transaction holds the write lock).
  Each says so in its docstring.

Where things are: a mask stored (:mod:`.masks`), an annotation applied (:mod:`.annotations`), a
webhook recorded and processed (:mod:`.webhooks`), Label Studio pulled (:mod:`.reconciliation`),
a prediction served (:mod:`.predictions`), a model trained (:mod:`.training`), a version promoted
(:mod:`.versions`, :mod:`.gate`). Must not import ``backend.api``, ``workers`` or ``cli``.
"""
