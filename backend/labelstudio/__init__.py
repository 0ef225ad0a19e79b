"""Label Studio's side of the wire: payload parsing (:mod:`.payloads`, parse once), the label
config, brush RLE, results <-> masks, the API client and image fetching under the URL policy.

Knows nothing of the database: it turns Label Studio's JSON and HTTP into typed values and
arrays. Must not import ``backend.services``, ``backend.api``, ``workers`` or ``cli``.
"""
