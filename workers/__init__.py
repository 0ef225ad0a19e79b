"""Celery: the app (:mod:`.celery_app`), task names and queues (:mod:`.names`), the beat schedule
(:mod:`.schedules`), process signals (:mod:`.signals`) and the tasks (:mod:`.tasks`).

Every task is a thin call into :mod:`backend.services`: it takes the process's
:class:`backend.runtime.Runtime` (``runtime_of(app)``), opens the unit of work and hands the
session over. Must not import ``backend.api`` or ``cli``; ``backend`` never imports this package.
"""
