"""Extraction definitions: every bad value a project could write is refused when the file loads, naming the
file, the key and the problem."""

from __future__ import annotations

import pytest
import yaml
from pacsflow.core.settings import DefinitionError, load_definition
from pacsflow.demo.environment import DEMO_DEFINITION


def write(tmp_path, **changes):
    body = yaml.safe_load(DEMO_DEFINITION.read_text())
    for key, value in changes.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    path = tmp_path / f"{body['id']}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_the_demo_definition_loads(tmp_path):
    definition = load_definition(DEMO_DEFINITION)
    assert definition.dag_id == "pacsflow__demo" and definition.start_date.tzinfo is not None
    assert definition.series_rules.drop_reason({"Modality": "US"}) is not None


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {"resolution": {"strip_leading_zeros": "false"}},
            "resolution.strip_leading_zeros: Input should be a valid boolean",
        ),
        ({"resolution": {"site_prefixes": "AB"}}, "resolution.site_prefixes: must be a list of prefixes"),
        (
            {"resolution": {"patient_date_window_days": 100000000}},
            "resolution.patient_date_window_days: Input should be less",
        ),
        ({"resolution": {"rules": ["guess"]}}, "resolution.rules.0: Input should be"),
        (
            {"series_rules": {"exclude_descriptions": ["("]}},
            "series_rules.exclude_descriptions: invalid regular expression",
        ),
        (
            {"series_rules": {"exclude_modality": ["US"]}},
            "series_rules.exclude_modality: Extra inputs are not permitted",
        ),
        ({"cohort": {"sql_template": "../secrets.sql"}}, "cohort.sql_template: String should match pattern"),
        ({"cohort": {"params": {"interval_start": "2020"}}}, "bound by pacsflow from the run's data interval"),
        ({"cohort": {"max_size": 0}}, "cohort.max_size: Input should be greater than or equal to 1"),
        ({"retrieval": {"batch_size": "ten"}}, "retrieval.batch_size: Input should be a valid integer"),
        ({"schedule": "@often"}, "schedule: Value error, '@often' is neither a cron expression"),
        ({"data_root": "/tmp/anywhere"}, "data_root: Extra inputs are not permitted"),
    ],
)
def test_a_bad_value_is_refused_at_load_naming_the_file_and_key(tmp_path, changes, problem):
    with pytest.raises(DefinitionError) as refused:
        load_definition(write(tmp_path, **changes))
    assert str(refused.value).startswith("demo.yaml: ") and problem.replace("Value error, ", "") in str(refused.value)


def test_the_id_must_be_the_file_name(tmp_path):
    path = write(tmp_path)
    path.rename(tmp_path / "other.yaml")
    with pytest.raises(DefinitionError, match=r"other\.yaml: id 'demo' must equal the file name"):
        load_definition(tmp_path / "other.yaml")
