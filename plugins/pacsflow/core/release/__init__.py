"""The de-identified research release (DICOM PS3.15 Basic Application Level Confidentiality Profile).

``settings`` (what a team chooses; light, imported when definitions load), ``profile`` (the element rules),
``keys`` (per-project secrets), ``runner`` (worker processes) and ``stage`` (the release stage of a run).
"""
