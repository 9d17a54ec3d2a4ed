"""S3: copies of an object or a prefix on ``replicas`` nodes, mounted as a hostPath."""

from __future__ import annotations

import dataclasses
import json
from urllib.parse import urlsplit

from kvc.agent.files import Manifest
from kvc.api import names
from kvc.api.models import VolumeConfig, VolumePhase, VolumeStatus
from kvc.api.units import parse_duration
from kvc.sources import _egress, _nodelocal, _s3url
from kvc.sources.base import FetchRequest, SourceContext, required_options, url_problem
from kvc.sources.transfer import FetchError

ACCESS_KEY_FIELD = "awsAccessKeyID"
SECRET_KEY_FIELD = "awsSecretAccessKey"  # noqa: S105 - the name of a key in the user's Secret


def source_digest(config: VolumeConfig) -> str:
    """New data at a new path whenever what is fetched changes."""
    return names.short_hash(
        config.options.get("sourceURL", "").strip(),
        config.options.get("endpointURL", "").strip(),
        config.options.get("unpack", "").strip(),
        config.options.get("distributionStrategy", "").strip(),
        config.options.get("dataPath", "").strip(),
    )


def distribution(config: VolumeConfig) -> dict[str, int]:
    """The distributionStrategy as {glob: nodes}; raises ValueError with what to fix."""
    text = config.options.get("distributionStrategy", "").strip()
    if not text:
        return {}
    try:
        strategy = json.loads(text)
    except ValueError:
        raise ValueError(
            f'options.distributionStrategy must be JSON such as {{"*.tfrecord-0*": 1}}, not {text!r}'
        ) from None
    if not isinstance(strategy, dict) or not strategy:
        raise ValueError("options.distributionStrategy must be a JSON object of glob: number of nodes")
    for glob, count in strategy.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"options.distributionStrategy: {glob!r} must map to a whole number of nodes >= 1")
    total = sum(strategy.values())
    if total != config.replicas:
        raise ValueError(
            f"options.distributionStrategy places {total} replicas but replicas is {config.replicas}: "
            "make the numbers add up to replicas"
        )
    return {str(glob): int(count) for glob, count in strategy.items()}


class S3Source(_nodelocal.NodeLocalSource):
    source_type = "S3"
    known_options = (
        "sourceURL",
        "awsCredentialsSecretName",
        "endpointURL",
        "region",
        "distributionStrategy",
        "timeoutForDataDownload",
        "dataPath",
        "unpack",
    )
    agent_options = ("sourceURL", "endpointURL", "region", "timeoutForDataDownload", "unpack")
    credentials_option = "awsCredentialsSecretName"

    def validate_options(self, config: VolumeConfig) -> list[str]:
        options = config.options
        problems = required_options(
            config,
            {
                "sourceURL": "s3://bucket/key for one object, or s3://bucket/prefix/ for every object under it",
                "awsCredentialsSecretName": (
                    f"a Secret in this namespace with keys {ACCESS_KEY_FIELD} and {SECRET_KEY_FIELD}"
                ),
            },
        )
        url = options.get("sourceURL", "").strip()
        if url:
            try:
                _s3url.parse_url(url)
            except ValueError as exc:
                problems.append(f"options.{exc}")
        endpoint = options.get("endpointURL", "").strip()
        problem = url_problem("endpointURL", endpoint) if endpoint else None
        if problem:
            problems.append(problem)
        problems += super().validate_options(config)
        try:
            distribution(config)
        except ValueError as exc:
            problems.append(str(exc))
        return problems

    def digest(self, config: VolumeConfig) -> str:
        return source_digest(config)

    def replica(self, config: VolumeConfig) -> _nodelocal.Replica:
        slots = tuple({"include": glob} for glob, count in sorted(distribution(config).items()) for _ in range(count))
        root = config.options.get("dataPath", "").strip() or None
        return dataclasses.replace(super().replica(config), slots=slots, root=root)

    def provision(self, ctx: SourceContext, config: VolumeConfig) -> VolumeStatus:
        data_path = config.options.get("dataPath", "").strip()
        problem = _nodelocal.data_path_problem(data_path, ctx.allowed_data_roots) if data_path else None
        if problem:
            return VolumeStatus(id=config.id, sourceType=config.source_type, phase=VolumePhase.FAILED, message=problem)
        return super().provision(ctx, config)

    def fetch(self, request: FetchRequest) -> Manifest:
        options = request.options
        access_key = request.credentials.get(ACCESS_KEY_FIELD)
        secret_key = request.credentials.get(SECRET_KEY_FIELD)
        if not access_key or not secret_key:
            raise FetchError(f"the credentials Secret needs both {ACCESS_KEY_FIELD} and {SECRET_KEY_FIELD} keys")
        from kvc.sources import s3_fetch  # noqa: PLC0415 - boto3 only where data is fetched: the agents

        workers = 16
        client = s3_fetch.make_client(
            options.get("endpointURL"), options.get("region"), access_key, secret_key, workers
        )
        # The host boto3 will reach for this bucket (virtual-host or path style), before it does.
        # Without a proxy this is an early, clear failure: every connection of the fetch is
        # made by ObjectGetter to an address checked then. Through a proxy (the environment's,
        # which boto3 honours too) boto3 does the fetch and this check is all there is: the
        # proxy resolves the name (one this machine cannot resolve passes) and the agent
        # connects only to the proxy.
        bucket = _s3url.parse_url(options["sourceURL"].strip()).bucket
        endpoint = urlsplit(client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"}))
        try:
            request.egress.check_url(f"{endpoint.scheme}://{endpoint.netloc}")
        except _egress.EgressError as exc:
            raise FetchError(f"the S3 endpoint {endpoint.scheme}://{endpoint.netloc}: {exc}") from None
        except OSError as exc:
            raise FetchError(f"cannot resolve the S3 endpoint {endpoint.netloc}: {exc}") from None
        timeout = options.get("timeoutForDataDownload")
        return s3_fetch.fetch(
            client,
            options["sourceURL"].strip(),
            request.replica,
            request.progress,
            workers=workers,
            timeout=parse_duration(timeout) if timeout else None,
            stop=request.stop,
            egress=request.egress,
            limits=request.limits,
            unpack=options.get("unpack") or None,
            include=options.get("include") or None,
        )
