"""The demo: a synthetic hospital (RIS + PACS files + ground truth), a sandbox PACS, and ``make demo``."""
