"""Image and label-map I/O (``io``) and the DICOM de-identification contract (``dicom``).

Nothing is re-exported here, so importing ``backend.imaging.dicom`` (e.g. for its allow-list)
does not load SimpleITK; import ``backend.imaging.io`` where pixels are needed.
"""
