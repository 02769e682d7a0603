-- Cohort for a RIS that keeps the exam date as text 'YYYYMMDD' (a DICOM DA value), e.g. exam_date = '20210215'.
-- Text never compares correctly with a bound timestamp ('20210215' < '2021-02-01 00:00:00' as text), so this
-- template uses the interval's day bounds, bound as 'YYYYMMDD' text: interval_start_yyyymmdd (inclusive) and
-- interval_end_yyyymmdd (exclusive). Exact for intervals from midnight to midnight (daily, weekly, monthly).
SELECT accession_number,
       patient_id,
       study_instance_uid,
       modality
FROM exams_text_dates
WHERE exam_date >= :interval_start_yyyymmdd
  AND exam_date < :interval_end_yyyymmdd
  AND modality IN :modalities
ORDER BY accession_number
