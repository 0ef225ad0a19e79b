"""sonoseg core: database, storage, imaging, Label Studio protocol, U-Mamba engine and the Flask app.

Heavy dependencies (torch, SimpleITK) are imported lazily inside ``backend.model`` and
``backend.imaging`` so that ``sonoseg --help`` and ``/health`` stay instant.
"""

__version__ = "0.1.0"
