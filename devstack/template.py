"""What the stack copies from the SAM template (template.yaml at the repo root), so the local
wiring follows the deployed one: the stills function's S3 trigger filters, the HTTP API's
routes, the functions' timeouts and memory, and the global FACEFLOW_* defaults.

CloudFormation tags (!Ref, !Sub, !If, ...) are read as their plain values; anything that cannot
be read falls back to the defaults below (with a warning), so a broken template never stops
the stack.
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


@dataclass
class FunctionConfig:
    handler: str
    timeout: float | None = None
    memory_size: int | None = None
    service_name: str | None = None


@dataclass
class TemplateConfig:
    s3_filters: list[dict[str, str]] = field(default_factory=lambda: [dict(f) for f in DEFAULT_S3_FILTERS])
    routes: list[str] = field(default_factory=lambda: list(DEFAULT_ROUTES))
    settings: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SETTINGS))
    functions: dict[str, FunctionConfig] = field(default_factory=dict)  # by handler


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def any_tag(loader, suffix, node):  # !Ref X -> "X", !Sub [...] -> [...], !If [...] -> [...]
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_scalar(node)
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
    for resource in resources.values():
        if not isinstance(resource, dict) or resource.get("Type") != "AWS::Serverless::Function":
            continue
        props = resource.get("Properties") or {}
        command = (props.get("ImageConfig") or {}).get("Command") or [props.get("Handler")]
        handler = command[0] if command and isinstance(command[0], str) else None
        variables = ((props.get("Environment") or {}).get("Variables") or {})
        if handler:
            config.functions[handler] = FunctionConfig(
                handler, timeout=_number(props.get("Timeout")), memory_size=_int(props.get("MemorySize")),
                service_name=variables.get("POWERTOOLS_SERVICE_NAME"))
        for event in (props.get("Events") or {}).values():
            if not isinstance(event, dict):
                continue
            eprops = event.get("Properties") or {}
            if event.get("Type") == "HttpApi" and eprops.get("Method") and eprops.get("Path"):
                routes.append(f"{str(eprops['Method']).upper()} {eprops['Path']}")
            elif (event.get("Type") == "S3" and eprops.get("Bucket") == "InputBucket"
                  and handler == "functions.stills.app.handler"):  # the video split function has its own
                rules = ((eprops.get("Filter") or {}).get("S3Key") or {}).get("Rules") or []
                s3_filters.append({str(r["Name"]).lower(): str(r["Value"]) for r in rules})
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


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None
