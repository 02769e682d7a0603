-- Cohort: every exam with one of the given RIS exam codes (e.g. CTSHA, shoulder arthro-CT) in the interval.
-- Bound parameters: :interval_start, :interval_end (always), :exam_codes (a list, from cohort_params).
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
