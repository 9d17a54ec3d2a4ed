from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvc.wiring.grammar import GrammarError, VolumeRef, parse


def test_no_kvc_annotation_asks_for_nothing() -> None:
    assert parse({}) is None
    assert parse({"team": "vision", "kvc.kubeflow.org/other": "x"}) is None


def test_one_volume_with_defaults() -> None:
    request = parse({"kvc/volume": "cifar100"})
    assert request is not None
    assert request.refs == (VolumeRef("cifar100"),)
    assert request.mount_paths == {VolumeRef("cifar100"): "/var/datasets/cifar100"}
    assert request.containers is None
    assert request.read_only is True


def test_several_volumes_refs_paths_containers_and_writable() -> None:
    request = parse(
        {
            "kvc/volume": " cifar100 , models/bert ",
            "kvc/mount-path.bert": "/models/bert/",
            "kvc/containers": "trainer, init-data, trainer",
            "kvc/read-only": "False",
        }
    )
    assert request is not None
    assert request.refs == (VolumeRef("cifar100"), VolumeRef("bert", "models"))
    assert request.mount_paths[VolumeRef("bert", "models")] == "/models/bert"
    assert request.mount_paths[VolumeRef("cifar100")] == "/var/datasets/cifar100"
    assert request.containers == ("trainer", "init-data")
    assert request.read_only is False


def test_single_mount_path_applies_to_the_only_volume() -> None:
    request = parse({"kvc/volume": "ds/cifar", "kvc/mount-path": "/data"})
    assert request is not None
    assert request.mount_paths == {VolumeRef("cifar", "ds"): "/data"}


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"kvc/volume": ""}, "kvc/volume is empty: name at least one volume id"),
        ({"kvc/volume": "a,,b"}, "has an empty entry between commas"),
        ({"kvc/volume": "Cifar"}, "'Cifar' is not a volume id"),
        (
            {"kvc/volume": "ns/vm/id"},
            "has more than one '/': write <id> or <volumemanager>/<id> "
            "(volumes are found in the workload's own namespace only)",
        ),
        ({"kvc/volume": "Bad_VM/id"}, "'Bad_VM' is not a VolumeManager name"),
        ({"kvc/volume": "a, a"}, "kvc/volume lists a twice"),
        ({"kvc/volume": "a,b", "kvc/mount-path": "/d"}, "applies when one volume is asked for"),
        ({"kvc/volume": "a", "kvc/mount-path.b": "/d"}, "names a volume that kvc/volume does not ask for (a)"),
        ({"kvc/volume": "x/a,y/a", "kvc/mount-path.a": "/d"}, "is ambiguous"),
        ({"kvc/volume": "a", "kvc/mount-path": "/d", "kvc/mount-path.a": "/e"}, "both set the mount path of a"),
        ({"kvc/volume": "a", "kvc/mount-path": "data"}, "must be an absolute path"),
        ({"kvc/volume": "a", "kvc/mount-path": "/data/../etc"}, "without '..'"),
        ({"kvc/volume": "a", "kvc/mount-path": "/"}, "without '..'"),
        (
            {"kvc/volume": "a,b", "kvc/mount-path.a": "/d", "kvc/mount-path.b": "/d"},
            "two volumes would be mounted at /d",
        ),
        (
            {"kvc/volume": "a,b", "kvc/mount-path.a": "/d", "kvc/mount-path.b": "/d/sub"},
            "mounted one inside the other, at /d and /d/sub",
        ),
        ({"kvc/volume": "a", "kvc/containers": ""}, "must list container names"),
        ({"kvc/volume": "a", "kvc/containers": "Main"}, "'Main' is not a container name"),
        ({"kvc/volume": "a", "kvc/read-only": "no"}, 'kvc/read-only must be "true" or "false"'),
        ({"kvc/volume": "a", "kvc/mountpath": "/d"}, "unknown annotation kvc/mountpath"),
        ({"kvc/mount-path": "/d"}, "kvc/mount-path given without kvc/volume"),
        # A misspelt kvc/volume is named as unknown, with the key meant, not as a missing kvc/volume.
        ({"kvc/volumes": "a"}, "unknown annotation kvc/volumes (did you mean kvc/volume?): KVC reads kvc/volume,"),
        ({"kvc/mount-path": "/d", "kvc/zzz": "1"}, "unknown annotation kvc/zzz: KVC reads"),
    ],
)
def test_mistakes_name_the_annotation_and_the_fix(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(GrammarError) as excinfo:
        parse(annotations)
    assert message in str(excinfo.value)


@given(
    st.dictionaries(
        st.sampled_from(["kvc/volume", "kvc/mount-path", "kvc/containers", "kvc/read-only", "kvc/mount-path.a", "x"]),
        st.text(max_size=40),
    )
)
def test_any_annotations_parse_or_fail_cleanly(annotations: dict[str, str]) -> None:
    try:
        request = parse(annotations)
    except GrammarError:
        return
    if request is not None:
        assert request.refs
        assert set(request.mount_paths) == set(request.refs)
        assert all(path.startswith("/") for path in request.mount_paths.values())
