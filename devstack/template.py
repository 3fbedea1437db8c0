"""What the stack copies from the SAM template (template.yaml at the repo root), so the local
wiring follows the deployed one: every function (handler, timeout, memory, environment, its
S3 / SQS / SNS / HTTP API events, its asynchronous retries and on-failure destination), the
SQS queues with their redrive policies, the SNS topics, the input bucket's queue
notifications, the HTTP API's routes, and the global FACEFLOW_* defaults.

CloudFormation tags are read as their plain values (`!Ref X` is the string "X", marked as a
`Ref`; `!GetAtt X.Arn` is "X.Arn", marked as a `GetAtt`); anything that cannot be read falls
back to the defaults below (with a warning), so a broken template never stops the stack.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("devstack.template")

DEFAULT_S3_FILTERS = [{"prefix": "uploads/"}]
DEFAULT_ROUTES = ["POST /v1/jobs", "GET /v1/jobs/{id}", "GET /v1/jobs/{id}/result", "POST /v1/analyze",
                  "POST /v1/anonymize", "GET /v1/openapi.json"]
# template.yaml's Globals for the FACEFLOW_* limits (Parameters' defaults)
DEFAULT_SETTINGS = {"FACEFLOW_JOB_TTL_S": "604800", "FACEFLOW_MAX_UPLOAD_BYTES": "26214400",
                    "FACEFLOW_MAX_SYNC_BYTES": "4194304", "FACEFLOW_URL_TTL_S": "900"}


class Ref(str):
    """The logical id of `!Ref X` (or {"Ref": X})."""


class GetAtt(str):
    """`!GetAtt X.Attr` as "X.Attr"; `.resource` is X."""

    @property
    def resource(self) -> str:
        return self.split(".", 1)[0]


@dataclass
class EventSource:
    """One event of a function: kind "S3" (`filters`: one rule dict per event), "SQS"
    (`source`: the queue's logical id), "SNS" (`source`: the topic's logical id) or "HttpApi"."""
    kind: str
    source: str = ""
    filters: list[dict[str, str]] = field(default_factory=list)
    batch_size: int = 10
    report_batch_item_failures: bool = False


@dataclass
class FunctionConfig:
    handler: str
    timeout: float | None = None
    memory_size: int | None = None
    service_name: str | None = None
    name: str = ""                    # FunctionName without the stack prefix: "stills", "chunk-worker"
    logical_id: str = ""
    variables: dict[str, Any] = field(default_factory=dict)   # Environment.Variables, tags kept as Ref/GetAtt
    events: list[EventSource] = field(default_factory=list)
    max_retries: int = 2              # EventInvokeConfig.MaximumRetryAttempts (asynchronous invocations)
    on_failure: str | None = None     # the on-failure destination queue's logical id
    condition: str | None = None


@dataclass
class QueueConfig:
    logical_id: str
    visibility_timeout: int | None = None
    dead_letter: str | None = None    # the dead-letter queue's logical id
    max_receive_count: int | None = None


@dataclass
class TemplateConfig:
    s3_filters: list[dict[str, str]] = field(default_factory=lambda: [dict(f) for f in DEFAULT_S3_FILTERS])
    routes: list[str] = field(default_factory=lambda: list(DEFAULT_ROUTES))
    settings: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SETTINGS))
    functions: dict[str, FunctionConfig] = field(default_factory=dict)  # by handler
    lambdas: dict[str, FunctionConfig] = field(default_factory=dict)    # by name, in template order
    queues: dict[str, QueueConfig] = field(default_factory=dict)        # by logical id
    topics: list[str] = field(default_factory=list)                     # logical ids
    # the input bucket's own QueueConfigurations: (queue logical id, filter rules)
    bucket_queues: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)            # Parameters' defaults
    # the GPU endpoint's notification topics (SageMaker async OutputConfig): logical ids
    gpu_topics: dict[str, str] = field(default_factory=dict)            # "success"/"error" → topic
    # the buckets' CORS rules (S3's CORSRules shape, parameters resolved to their defaults)
    bucket_cors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # "InputBucket" → rules
    # routes the HTTP API's DefinitionBody leaves without an authorizer (`security: []`)
    public_routes: list[str] = field(default_factory=list)


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def any_tag(loader, suffix, node):  # !Ref X -> "X", !Sub [...] -> [...], !If [...] -> [...]
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            return Ref(value) if suffix == "Ref" else GetAtt(value) if suffix == "GetAtt" else value
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_mapping(node, deep=True)

    Loader.add_multi_constructor("!", any_tag)
    return Loader


def load(path: Path) -> TemplateConfig:
    config = TemplateConfig()
    try:
        import yaml

        document = yaml.load(Path(path).read_text(), Loader=_loader())  # noqa: S506 - a safe loader
        resources: dict[str, Any] = document.get("Resources") or {}
        parameters: dict[str, Any] = document.get("Parameters") or {}
    except FileNotFoundError:
        return config
    except Exception as exc:  # noqa: BLE001 - fall back, say so
        log.warning("devstack: cannot read %s (%s); using built-in defaults", path, exc)
        return config

    s3_filters: list[dict[str, str]] = []
    routes: list[str] = []
    config.parameters = {name: str(p["Default"]) for name, p in parameters.items()
                         if isinstance(p, dict) and p.get("Default") is not None}
    for logical_id, resource in resources.items():
        if not isinstance(resource, dict):
            continue
        kind, props = resource.get("Type"), resource.get("Properties") or {}
        if kind == "AWS::SQS::Queue":
            redrive = props.get("RedrivePolicy") or {}
            target = redrive.get("deadLetterTargetArn")
            config.queues[logical_id] = QueueConfig(
                logical_id, _int(props.get("VisibilityTimeout")),
                target.resource if isinstance(target, GetAtt) else None, _int(redrive.get("maxReceiveCount")))
        elif kind == "AWS::SNS::Topic":
            config.topics.append(logical_id)
        elif kind == "AWS::SageMaker::EndpointConfig":
            notes = (((props.get("AsyncInferenceConfig") or {}).get("OutputConfig") or {})
                     .get("NotificationConfig") or {})
            for outcome, name in (("success", "SuccessTopic"), ("error", "ErrorTopic")):
                if isinstance(notes.get(name), Ref):
                    config.gpu_topics[outcome] = str(notes[name])
        elif kind == "AWS::Serverless::HttpApi":
            paths = (props.get("DefinitionBody") or {}).get("paths") or {}
            config.public_routes = [f"{method.upper()} {path}" for path, item in paths.items() if isinstance(item, dict)
                                    for method, op in item.items() if isinstance(op, dict) and op.get("security") == []]
        if kind == "AWS::S3::Bucket" and (props.get("CorsConfiguration") or {}).get("CorsRules"):
            config.bucket_cors[logical_id] = [_cors_rule(rule, config.parameters)
                                              for rule in props["CorsConfiguration"]["CorsRules"]]
        if kind == "AWS::S3::Bucket" and logical_id == "InputBucket":
            for item in (props.get("NotificationConfiguration") or {}).get("QueueConfigurations") or []:
                if isinstance(item.get("Queue"), GetAtt):
                    config.bucket_queues.append((item["Queue"].resource, _rules(item.get("Filter"))))
    for logical_id, resource in resources.items():
        if not isinstance(resource, dict) or resource.get("Type") != "AWS::Serverless::Function":
            continue
        props = resource.get("Properties") or {}
        command = (props.get("ImageConfig") or {}).get("Command") or [props.get("Handler")]
        handler = command[0] if command and isinstance(command[0], str) else None
        variables = ((props.get("Environment") or {}).get("Variables") or {})
        function = None
        if handler:
            invoke = props.get("EventInvokeConfig") or {}
            destination = ((invoke.get("DestinationConfig") or {}).get("OnFailure") or {}).get("Destination")
            function = FunctionConfig(
                handler, timeout=_number(props.get("Timeout")), memory_size=_int(props.get("MemorySize")),
                service_name=variables.get("POWERTOOLS_SERVICE_NAME"), name=_function_name(logical_id, props),
                logical_id=logical_id, variables=dict(variables),
                max_retries=_int(invoke.get("MaximumRetryAttempts")) if invoke.get("MaximumRetryAttempts") is not None else 2,
                on_failure=destination.resource if isinstance(destination, GetAtt) else None,
                condition=resource.get("Condition"))
            config.functions[handler] = function
            config.lambdas[function.name] = function
        for event in (props.get("Events") or {}).values():
            if not isinstance(event, dict):
                continue
            eprops = event.get("Properties") or {}
            etype = event.get("Type")
            if etype == "HttpApi" and eprops.get("Method") and eprops.get("Path"):
                routes.append(f"{str(eprops['Method']).upper()} {eprops['Path']}")
                if function:
                    function.events.append(EventSource("HttpApi"))
            elif etype == "S3" and eprops.get("Bucket") == "InputBucket":
                rules = _rules(eprops.get("Filter"))
                if handler == "functions.stills.app.handler":  # the stills trigger's own filters
                    s3_filters.append(rules)
                if function:
                    if not function.events or function.events[-1].kind != "S3":
                        function.events.append(EventSource("S3"))
                    function.events[-1].filters.append(rules)
            elif etype in ("SQS", "SNS") and function:
                source = eprops.get("Queue") if etype == "SQS" else eprops.get("Topic")
                source = source.resource if isinstance(source, GetAtt) else str(source or "")
                function.events.append(EventSource(
                    etype, source, batch_size=_int(eprops.get("BatchSize")) or 10,
                    report_batch_item_failures="ReportBatchItemFailures" in (eprops.get("FunctionResponseTypes") or [])))
    if s3_filters:
        config.s3_filters = s3_filters
    if routes:
        config.routes = routes
    for name, parameter in (("FACEFLOW_JOB_TTL_S", "JobTtlSeconds"), ("FACEFLOW_MAX_UPLOAD_BYTES", "MaxUploadBytes"),
                            ("FACEFLOW_MAX_SYNC_BYTES", "MaxSyncBytes"), ("FACEFLOW_URL_TTL_S", "UrlTtlSeconds")):
        default = (parameters.get(parameter) or {}).get("Default")
        if default is not None:
            config.settings[name] = str(default)
    return config


_CORS_FIELDS = {"Id": "ID", "AllowedMethods": "AllowedMethods", "AllowedOrigins": "AllowedOrigins",
                "AllowedHeaders": "AllowedHeaders", "ExposedHeaders": "ExposeHeaders", "MaxAge": "MaxAgeSeconds"}


def _cors_rule(rule: dict, parameters: dict[str, str]) -> dict[str, Any]:
    """A template CorsRule (CloudFormation's names) as S3's PutBucketCors takes it; a !Ref to a
    parameter becomes its default (a CommaDelimitedList's items)."""
    out: dict[str, Any] = {}
    for name, value in rule.items():
        if name not in _CORS_FIELDS:
            continue
        if isinstance(value, Ref):
            value = [v.strip() for v in parameters.get(str(value), "").split(",") if v.strip()]
        out[_CORS_FIELDS[name]] = value
    return out


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _rules(filter_: Any) -> dict[str, str]:
    rules = ((filter_ or {}).get("S3Key") or {}).get("Rules") or []
    return {str(r["Name"]).lower(): str(r["Value"]) for r in rules}


def _function_name(logical_id: str, props: dict) -> str:
    """FunctionName's part after the stack name (`!Sub ${AWS::StackName}-chunk-worker` →
    "chunk-worker"), else the logical id in kebab case without "Function"."""
    declared = props.get("FunctionName")
    if isinstance(declared, str) and "}-" in declared:
        return declared.rsplit("}-", 1)[1]
    import re
    stem = logical_id[:-len("Function")] if logical_id.endswith("Function") and logical_id != "Function" else logical_id
    return re.sub(r"(?<!^)(?=[A-Z])", "-", stem).lower()
