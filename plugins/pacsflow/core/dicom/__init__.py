"""DICOM networking: the PACS client (C-ECHO/C-FIND/C-MOVE/C-GET) and pacsflow's C-STORE receiver."""
