"""The HTTP side: the Label Studio ML-backend protocol, ``/metrics``, errors as JSON.

Owns Flask and HTTP statuses (:data:`backend.api.errors.HTTP_STATUS`); views open the unit of
work and call :mod:`backend.services`. Nothing outside ``cli`` imports this package; it must not
import ``workers`` or ``cli``.
"""
