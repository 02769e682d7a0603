import pytest
from pacsflow.core.series_rules import DropReason, SeriesRules, SeriesRulesError

RULES = SeriesRules.parse(
    {
        "include_modalities": ["ct", "MG"],
        "exclude_descriptions": ["scout", "topogram"],
        "include_body_parts": [],
        "min_instances": 2,
    }
)


def series(modality="CT", description="AX 1.0", body_part="SHOULDER", count=10):
    return {
        "Modality": modality,
        "SeriesDescription": description,
        "BodyPartExamined": body_part,
        "NumberOfSeriesRelatedInstances": count,
    }


def test_keeps_a_matching_series():
    assert RULES.drop_reason(series()) is None


@pytest.mark.parametrize(
    ("match", "reason"),
    [
        (series(modality="US"), DropReason.MODALITY),
        (series(description="Topogram 0.6"), DropReason.DESCRIPTION),
        (series(description="SCOUT"), DropReason.DESCRIPTION),
        (series(count=1), DropReason.INSTANCE_COUNT),
    ],
)
def test_drops_with_the_reason(match, reason):
    assert RULES.drop_reason(match) is reason


def test_missing_attributes_are_not_crashes():
    assert SeriesRules.parse({"include_modalities": ["CT"]}).drop_reason({}) is DropReason.MODALITY
    assert SeriesRules().drop_reason({"NumberOfSeriesRelatedInstances": None}) is None


def test_body_part_and_include_description_filters():
    rules = SeriesRules.parse({"include_body_parts": ["shoulder"], "include_descriptions": ["arthro"]})
    assert rules.drop_reason(series(description="ARTHRO AX", body_part="KNEE")) is DropReason.BODY_PART
    assert rules.drop_reason(series(description="AX")) is DropReason.DESCRIPTION
    assert rules.drop_reason(series(description="Arthro ax")) is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"exclude_modality": ["US"]}, "exclude_modality: Extra inputs are not permitted"),
        ({"exclude_descriptions": "scout"}, "must be a list of strings"),
        ({"exclude_descriptions": ["("]}, "invalid regular expression"),
        ({"min_instances": -1}, "min_instances"),
    ],
)
def test_malformed_configuration_is_explained(config, message):
    with pytest.raises(SeriesRulesError, match=message):
        SeriesRules.parse(config)


def test_a_backtracking_pattern_runs_in_linear_time():
    """``^(a+)+$`` doubles a backtracking engine's time per character; RE2 answers at once even for 100,000."""
    rules = SeriesRules.parse({"include_descriptions": ["^(a+)+$"]})
    assert rules.drop_reason({"Modality": "CT", "SeriesDescription": "a" * 100_000 + "b"}) == DropReason.DESCRIPTION
    assert rules.drop_reason({"Modality": "CT", "SeriesDescription": "A" * 100_000}) is None


def test_a_pattern_the_linear_engine_cannot_run_is_refused_with_its_key():
    with pytest.raises(SeriesRulesError, match=r"exclude_descriptions: invalid regular expression '\(\?<=x\)y'"):
        SeriesRules.parse({"exclude_descriptions": ["(?<=x)y"]})
