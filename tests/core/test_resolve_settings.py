import pytest
from pacsflow.core.resolve import Resolution, ResolutionSettings, ResolutionSettingsError, Rule, resolve_accession
from pacsflow.core.ris import RisExam


class RefusingFinder:
    """Fails the test if anything reaches the PACS."""

    def find(self, level, query):
        raise AssertionError("an invalid AN must never be sent to the PACS")


def test_variants_strip_zeros_and_add_or_remove_site_prefixes():
    settings = ResolutionSettings.parse({"site_prefixes": ["SITEA"]})
    assert settings.normalized_variants("000123") == ["123", "SITEA000123"]
    assert settings.normalized_variants("SITEA77") == ["SITEASITEA77", "77"]
    assert settings.normalized_variants("123") == ["SITEA123"]


def test_rules_are_ordered_and_validated():
    assert ResolutionSettings().rules == (
        Rule.ACCESSION_NUMBER,
        Rule.RIS_STUDY_UID,
        Rule.NORMALIZED_ACCESSION,
        Rule.PATIENT_DATE,
    )
    assert ResolutionSettings.parse({"rules": ["ris_study_uid"]}).rules == (Rule.RIS_STUDY_UID,)
    with pytest.raises(ResolutionSettingsError, match="rules"):
        ResolutionSettings.parse({"rules": ["guess"]})
    with pytest.raises(ResolutionSettingsError, match="site_prefix: Extra inputs are not permitted"):
        ResolutionSettings.parse({"site_prefix": "X"})
    with pytest.raises(ResolutionSettingsError, match="wildcards"):
        ResolutionSettings.parse({"site_prefixes": ["S*"]})


@pytest.mark.parametrize("an", ["", "  ", "12*", "1?3", "A\\B", "X" * 17])
def test_wildcards_and_malformed_accession_numbers_are_refused_before_the_pacs(an):
    result = resolve_accession(RefusingFinder(), RisExam(an), ResolutionSettings())
    assert result.resolution is Resolution.INVALID
    assert an.strip() == "" or an not in (result.detail or "")
