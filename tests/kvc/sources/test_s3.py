from __future__ import annotations

import pytest

from kvc.api.models import VolumeConfig
from kvc.sources._nodelocal import data_path_problem, slots_to_fill
from kvc.sources.s3 import S3Source, distribution, source_digest


def config(replicas: int = 1, **options: str) -> VolumeConfig:
    base = {"sourceURL": "s3://bucket/data/", "awsCredentialsSecretName": "creds", **options}
    return VolumeConfig.model_validate({"id": "d", "sourceType": "S3", "replicas": replicas, "options": base})


def test_distribution_strategy_must_add_up_to_replicas() -> None:
    assert distribution(config(3, distributionStrategy='{"*train*": 2, "*test*": 1}')) == {"*train*": 2, "*test*": 1}
    with pytest.raises(ValueError, match="places 3 replicas but replicas is 2"):
        distribution(config(2, distributionStrategy='{"*train*": 2, "*test*": 1}'))


@pytest.mark.parametrize(
    ("strategy", "problem"),
    [
        ("not json", "must be JSON such as"),
        ("[1, 2]", "must be a JSON object of glob: number of nodes"),
        ('{"*": 0}', "'*' must map to a whole number of nodes >= 1"),
        ('{"*": true}', "'*' must map to a whole number of nodes >= 1"),
        ('{"*": 1.5}', "'*' must map to a whole number of nodes >= 1"),
    ],
)
def test_bad_distribution_strategies_say_what_to_fix(strategy: str, problem: str) -> None:
    problems = S3Source().validate(config(1, distributionStrategy=strategy))
    assert any(problem in p for p in problems), problems


def test_slots_already_held_are_not_assigned_again() -> None:
    slots = [{"include": "a"}, {"include": "a"}, {"include": "b"}]
    assert slots_to_fill(slots, [{"include": "a"}, {"other": "x"}]) == [{"include": "a"}, {"include": "b"}]
    assert slots_to_fill(slots, [{"include": "a"}, {"include": "a"}, {"include": "b"}]) == []
    assert slots_to_fill([], [{"include": "a"}]) == []


def test_what_is_fetched_decides_the_path() -> None:
    assert source_digest(config()) == source_digest(config())
    assert source_digest(config()) != source_digest(config(unpack="tar"))
    assert source_digest(config()) != source_digest(config(sourceURL="s3://bucket/other/"))
    assert source_digest(config(1, distributionStrategy='{"*": 1}')) != source_digest(config(1))


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"sourceURL": ""}, "options.sourceURL is required for S3 volumes"),
        ({"awsCredentialsSecretName": ""}, "options.awsCredentialsSecretName is required for S3 volumes"),
        ({"sourceURL": "s3://"}, "names no bucket"),
        ({"endpointURL": "minio:9000"}, "options.endpointURL must be an https:// URL"),
        ({"endpointURL": "http://10.1.2.3:9000"}, "options.endpointURL uses plaintext http"),
        ({"unpack": "7z"}, "options.unpack must be one of tar, tar.gz, zip"),
    ],
)
def test_validation_names_the_option(options: dict[str, str], problem: str) -> None:
    problems = S3Source().validate(config(1, **options))
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("data_path", "allowed", "problem"),
    [
        ("/data/kvc/team-a", ("/data/kvc",), None),
        ("/data/kvc", ("/data/kvc",), None),
        (
            "/etc/cron.d",
            ("/data/kvc",),
            "options.dataPath /etc/cron.d is not under a data root the cluster admin allows (/data/kvc)",
        ),
        ("/data/kvc/../../etc", ("/data/kvc",), "must be a normalised absolute path"),
        ("data/kvc", ("/data/kvc",), "must be a normalised absolute path"),
        ("/data/kvcx", ("/data/kvc",), "is not under a data root"),
        ("/data/kvc/x", (), "allows (none)"),
    ],
)
def test_data_path_must_be_under_an_allowed_root(data_path: str, allowed: tuple[str, ...], problem: str | None) -> None:
    found = data_path_problem(data_path, allowed)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


def test_loopback_http_endpoints_are_allowed_for_local_servers() -> None:
    assert S3Source().validate(config(endpointURL="http://127.0.0.1:9000")) == []
