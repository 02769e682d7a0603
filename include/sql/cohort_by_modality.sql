-- Cohort: every exam of the given modalities whose exam time falls in the run's data interval.
-- Bound parameters (named, never formatted in): interval_start, interval_end (always) and modalities (a list).
SELECT accession_number,
       patient_id,
       study_instance_uid,
       exam_datetime,
       modality
FROM exams
WHERE exam_datetime >= :interval_start
  AND exam_datetime < :interval_end
  AND modality IN :modalities
ORDER BY accession_number
