"""The training-run lifecycle, one module per step (where a model is trained: :mod:`.execute`).

- :mod:`.policy` (pure): when a project's labels warrant a run (threshold, debounce).
- :mod:`.requests`: what changed since the last trained version; single-flight run requests
  (``annotations``, ``manual``, ``start_training``, ``schedule``) and the policy sweep.
- :mod:`.queue`: the outbox (dispatch), the claim (compare-and-set), the heartbeat, the reaper,
  and how a run ends (with its follow-up run).
- :mod:`.plan`: the snapshot a run trains on, the budget, training with device fallbacks and the
  evaluation of a checkpoint on held-out labels.
- :mod:`.execute`: one claimed run from start to end (a :class:`~.execute.RunContext` value);
  its model version is registered through :func:`backend.services.versions.register_version`
  and promoted only by the gate (:mod:`backend.services.gate`).

Every function here takes the caller's session, except :func:`.execute.execute_run`, which
opens short units of work of its own: a run trains for minutes, and no transaction may be held
across training. Must not import ``backend.api``, ``workers`` or ``cli``.
"""
