-- Cohort: every exam with one of the given RIS exam codes (e.g. CTSHA, shoulder arthro-CT) in the interval.
-- Bound parameters (named, never formatted in): interval_start, interval_end (always) and exam_codes (a list).
SELECT accession_number,
       patient_id,
       study_instance_uid,
       exam_datetime,
       modality
FROM exams
WHERE exam_datetime >= :interval_start
  AND exam_datetime < :interval_end
  AND exam_code IN :exam_codes
ORDER BY accession_number
