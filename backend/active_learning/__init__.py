"""Active learning: which unlabelled frame a sonographer should label next.

Pure (numpy only, no database, no torch): :mod:`.candidates` holds the typed values the
services hand in (one :class:`~.candidates.Candidate` per unlabelled image, built from the
scores the serving model stored for it); :mod:`.strategies` turns a pool of candidates into a
ranked batch. The database side (cached scores, leases) lives in ``backend/services``.
"""
