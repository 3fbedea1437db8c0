"""The deployment: template.yaml (SAM), layers/Dockerfile, layers/requirements-function.txt.

Runs without Docker and without AWS: cfn-lint and `sam validate` lint the template offline,
the SAM transform runs in-process (samtranslator, a cfn-lint dependency), and the size test
installs the function image's dependencies for Python 3.12 / manylinux x86_64 into a
temporary folder through pip's configured index.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "template.yaml"
DOCKERFILE = ROOT / "layers" / "Dockerfile"
REQUIREMENTS = ROOT / "layers" / "requirements-function.txt"
DOCKERIGNORE = ROOT / ".dockerignore"
# Under a copied folder but left out of the Lambda image on purpose: the GPU worker's own image.
LEFT_OUT_OF_THE_IMAGE = ("functions/gpu/",)

LAMBDA_PYTHON_IMAGE = "public.ecr.aws/lambda/python:3.12"
MODEL_DIR = "/opt/faceflow/models"
UPLOAD_PREFIX, RESULT_PREFIX = "uploads/", "results/"  # functions/common/settings.py
ANALYZE_PREFIX = "analyze/"                             # the same, for analysis (report only)
TRIGGER_PREFIXES = (UPLOAD_PREFIX, ANALYZE_PREFIX)
SWAP_PREFIX = "swap/"   # the same: a face swap's uploads, of which only its manifest (.json) triggers
ROUTES = {("POST", "/v1/jobs"), ("GET", "/v1/jobs/{id}"), ("GET", "/v1/jobs/{id}/result"),
          ("GET", "/v1/jobs/{id}/upload"), ("POST", "/v1/jobs/{id}/complete"),
          ("POST", "/v1/analyze"), ("POST", "/v1/anonymize"), ("POST", "/v1/swap")}
# Managed policies SAM attaches (logs, X-Ray via Tracing: Active, ENIs via VpcConfig):
# explicit actions only. Anything else attached to a function role is a finding.
ALLOWED_MANAGED_POLICIES = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
    "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
}
# SAM adds this one to functions with an SQS event (receive/delete/attributes, on any queue);
# allowed only on those, which also grant the same actions on their own queue explicitly.
SQS_EXECUTION_POLICY = "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole"
VIDEO_HANDLERS = {"SplitFunction": "functions.video.split.split_handler",
                  "ChunkWorkerFunction": "functions.video.chunk_worker.chunk_worker_handler",
                  "SessionChunkFunction": "functions.video.session_chunk.session_chunk_handler",
                  "GpuResultFunction": "functions.video.gpu_result.gpu_result_handler"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".m4v", ".webm", ".avi", ".ts", ".mts"}
WORK_PREFIX, SESSION_PREFIX = "work/", "sessions/"  # functions/common/layout.py

# Installed size of the image's dependencies (requirements-function.txt, boto3/botocore
# included since the image installs them, numpy's tests removed as the Dockerfile does).
# Measured: 454.2 MiB (23.4 MiB of it boto3/botocore/s3transfer). Budget: measured + ~15%.
SIZE_BUDGET_MIB = 520


def _sam_env() -> dict:
    return {**os.environ, "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            "SAM_CLI_TELEMETRY": "0"}


# --- loading -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template() -> dict:
    cfn_yaml = pytest.importorskip(
        "cfnlint.decode.cfn_yaml",
        reason="cfn-lint is not installed (pip install cfn-lint): it parses the template's !Ref/!Sub tags")
    return cfn_yaml.load(str(TEMPLATE))


@pytest.fixture(scope="module")
def transformed() -> dict:
    """template.yaml after the SAM transform, as CloudFormation will see it. Image functions
    get a placeholder ImageUri, as `sam build` would give them."""
    pytest.importorskip("samtranslator", reason="aws-sam-translator (a cfn-lint dependency) is not installed")
    from samtranslator.translator.transform import transform
    from samtranslator.yaml_helper import yaml_parse

    raw = yaml_parse(TEMPLATE.read_text())
    for resource in raw["Resources"].values():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::Serverless::Function" and props.get("PackageType") == "Image":
            props.setdefault("ImageUri", "123456789012.dkr.ecr.us-east-1.amazonaws.com/faceflow:test")

    class NoManagedPolicies:  # the template names none by name; nothing to look up
        def load(self):
            return {}

    saved = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = saved or "us-east-1"
    try:
        return transform(raw, {}, NoManagedPolicies())
    finally:
        if saved is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)


def resources(tpl: dict, *types: str) -> dict:
    return {k: v for k, v in tpl["Resources"].items() if v["Type"] in types}


def functions(tpl: dict) -> dict:
    return resources(tpl, "AWS::Serverless::Function")


def fn_property(tpl: dict, fn: dict, name: str):
    """A function property, falling back to Globals.Function (as SAM does)."""
    props = fn.get("Properties", {})
    if name in props:
        return props[name]
    return tpl.get("Globals", {}).get("Function", {}).get(name)


def fn_environment(tpl: dict, fn: dict) -> dict:
    merged = dict(tpl.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {}))
    merged.update(fn.get("Properties", {}).get("Environment", {}).get("Variables", {}))
    return merged


def walk(node, path=()):
    """Every (path, value) in a nested dict/list structure."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, path + (i,))


def policy_statements(tpl: dict):
    """(where, statement) for every IAM statement anywhere in the template."""
    for path, node in walk(tpl):
        if isinstance(node, dict) and "Statement" in node:
            statements = node["Statement"]
            for i, statement in enumerate(statements if isinstance(statements, list) else [statements]):
                if isinstance(statement, dict) and "Effect" in statement:
                    yield "/".join(map(str, path + ("Statement", i))), statement


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def sub_string(value) -> str | None:
    if isinstance(value, dict) and "Fn::Sub" in value and isinstance(value["Fn::Sub"], str):
        return value["Fn::Sub"]
    return None


def bucket_name(tpl: dict, logical_id: str) -> str:
    name = sub_string(tpl["Resources"][logical_id]["Properties"]["BucketName"])
    assert name, f"{logical_id}: BucketName must be a !Sub string the policies can repeat"
    return name


# --- linters ---------------------------------------------------------------------------------

def test_cfn_lint_passes():
    exe = shutil.which("cfn-lint")
    if exe is None:
        pytest.skip("cfn-lint is not installed (pip install cfn-lint)")
    proc = subprocess.run([exe, str(TEMPLATE)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    print(proc.stdout, proc.stderr)
    # 0: no errors, warnings or informational findings.
    assert proc.returncode == 0, f"cfn-lint exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("args", [["validate"], ["validate", "--lint"]], ids=["sam-validate", "sam-validate-lint"])
def test_sam_validate_passes(args):
    exe = shutil.which("sam")
    if exe is None:
        pytest.skip("the SAM CLI is not installed (pip install aws-sam-cli)")
    proc = subprocess.run([exe, *args, "--template", str(TEMPLATE)], capture_output=True, text=True,
                          cwd=ROOT, env=_sam_env(), timeout=300)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, f"sam {' '.join(args)} exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "is a valid SAM Template" in proc.stdout + proc.stderr


# --- functions ---------------------------------------------------------------------------

def test_every_function_is_an_image_built_from_the_dockerfile(template):
    fns = functions(template)
    assert {"StillsFunction", "ApiFunction"} <= set(fns)
    for name, fn in fns.items():
        props = fn["Properties"]
        assert props.get("PackageType") == "Image", name
        assert "CodeUri" not in props and "Handler" not in props and "Runtime" not in props, name
        command = props["ImageConfig"]["Command"]
        assert isinstance(command, list) and len(command) == 1 and isinstance(command[0], str), name
        metadata = fn.get("Metadata", {})
        if "ImageUri" not in props:  # built by `sam build`
            assert metadata.get("DockerContext") == ".", name
            assert (ROOT / metadata["DockerContext"] / metadata["Dockerfile"]).resolve() == DOCKERFILE, name
            assert metadata.get("DockerTag"), name
        assert fn_property(template, fn, "Architectures") == ["x86_64"], name
        assert fn_property(template, fn, "AutoPublishAlias") == "live", name
        assert fn_property(template, fn, "Tracing") == "Active", name
        vpc = fn_property(template, fn, "VpcConfig")
        assert vpc == {"SubnetIds": {"Ref": "SubnetIds"}, "SecurityGroupIds": {"Ref": "SecurityGroupIds"}}, name


def test_function_handlers_and_sizes(template):
    fns = functions(template)
    stills, api = fns["StillsFunction"]["Properties"], fns["ApiFunction"]["Properties"]
    assert stills["ImageConfig"]["Command"] == ["functions.stills.app.handler"]
    assert api["ImageConfig"]["Command"] == ["functions.api.app.handler"]
    assert stills["MemorySize"] >= 2048 and stills["Timeout"] == 120
    assert api["Timeout"] <= 29  # the HTTP API gives up at 30 s
    for name, handler in VIDEO_HANDLERS.items():
        assert fns[name]["Properties"]["ImageConfig"]["Command"] == [handler], name
    split, worker = fns["SplitFunction"]["Properties"], fns["ChunkWorkerFunction"]["Properties"]
    assert (split["Timeout"], split["MemorySize"], split["EphemeralStorage"]) == (900, 3008, {"Size": 10240})
    assert (worker["Timeout"], worker["MemorySize"], worker["EphemeralStorage"]) == (300, 3008, {"Size": 10240})
    assert fns["SessionChunkFunction"]["Properties"]["Timeout"] == 300
    assert fns["GpuResultFunction"]["Condition"] == "GpuEnabled"
    env = fn_environment(template, fns["SplitFunction"])
    assert env["FACEFLOW_CHUNK_QUEUE_URL"] == {"Ref": "ChunkQueue"}
    assert env["FACEFLOW_CHUNK_SECONDS"] == {"Ref": "ChunkSeconds"}
    assert fn_environment(template, fns["SessionChunkFunction"])["FACEFLOW_SESSION_TTL_S"] == {"Ref": "SessionTtlSeconds"}


def test_environment_follows_settings(template):
    settings = (ROOT / "functions" / "common" / "settings.py").read_text()
    documented = set(re.findall(r"^\| (FACEFLOW_[A-Z_]+) \|", settings, re.M))
    assert {"FACEFLOW_INPUT_BUCKET", "FACEFLOW_OUTPUT_BUCKET", "FACEFLOW_REDIS_URL",
            "FACEFLOW_GPU_ENDPOINT"} <= documented
    # The video functions' own variables live beside them, in functions/video/config.py.
    video = (ROOT / "functions" / "video" / "config.py").read_text()
    documented |= set(re.findall(r"^\| (FACEFLOW_[A-Z_]+) \|", video, re.M))
    for name, fn in functions(template).items():
        env = fn_environment(template, fn)
        unknown = {k for k in env if k.startswith("FACEFLOW_")} - documented
        assert not unknown, f"{name}: variables settings.py does not document: {unknown}"
        for var in ("FACEFLOW_INPUT_BUCKET", "FACEFLOW_OUTPUT_BUCKET", "FACEFLOW_REDIS_URL",
                    "FACEFLOW_MAX_UPLOAD_BYTES", "FACEFLOW_MODEL_DIR", "POWERTOOLS_SERVICE_NAME",
                    "POWERTOOLS_METRICS_NAMESPACE", "POWERTOOLS_LOG_LEVEL"):
            assert var in env, f"{name}: {var} missing"
        assert env["FACEFLOW_MODEL_DIR"] == MODEL_DIR
        assert env["POWERTOOLS_METRICS_NAMESPACE"] == "faceflow"
        assert sub_string(env["FACEFLOW_INPUT_BUCKET"]) == bucket_name(template, "InputBucket")
        assert sub_string(env["FACEFLOW_OUTPUT_BUCKET"]) == bucket_name(template, "OutputBucket")
        create, created, given = env["FACEFLOW_REDIS_URL"]["Fn::If"]
        assert create == "CreateCache"
        assert sub_string(created).startswith("rediss://${Cache.Endpoint.Address}:${Cache.Endpoint.Port}")
        condition, tls, plain = given["Fn::If"]
        assert sub_string(tls).startswith("rediss://${RedisEndpoint}:${RedisPort}")
        assert sub_string(plain).startswith("redis://${RedisEndpoint}:${RedisPort}")
        assert template["Conditions"][condition] == {"Fn::Equals": [{"Ref": "RedisTls"}, "true"]}


def test_an_empty_redis_endpoint_creates_a_serverless_cache(template):
    assert template["Parameters"]["RedisEndpoint"]["Default"] == ""
    assert template["Conditions"]["CreateCache"] == {"Fn::Equals": [{"Ref": "RedisEndpoint"}, ""]}
    cache = template["Resources"]["Cache"]
    assert cache["Type"] == "AWS::ElastiCache::ServerlessCache" and cache["Condition"] == "CreateCache"
    assert cache["Properties"]["SubnetIds"] == {"Ref": "SubnetIds"}
    assert cache["Properties"]["SecurityGroupIds"] == {"Ref": "SecurityGroupIds"}
    ingress = template["Resources"]["CacheIngress"]
    assert ingress["Condition"] == "CreateCache"
    assert (ingress["Properties"]["FromPort"], ingress["Properties"]["ToPort"]) == (6379, 6380)


@pytest.mark.parametrize("redis_endpoint", ["", "cache.example.internal"], ids=["created", "existing"])
def test_cfn_lint_passes_with_and_without_a_redis_endpoint(redis_endpoint):
    exe = shutil.which("cfn-lint")
    if exe is None:
        pytest.skip("cfn-lint is not installed (pip install cfn-lint)")
    proc = subprocess.run([exe, str(TEMPLATE), "--parameters", f"RedisEndpoint={redis_endpoint}",
                           "SubnetIds=subnet-0123abcd,subnet-0456abcd", "SecurityGroupIds=sg-0123abcd"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"cfn-lint exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_provisioned_concurrency_is_conditional(template):
    param = template["Parameters"]["ProvisionedConcurrency"]
    assert param["Type"] == "Number" and str(param["Default"]) == "0"
    seen = 0
    for path, node in walk(template):
        if path and path[-1] == "ProvisionedConcurrencyConfig":
            seen += 1
            condition, when_on, when_off = node["Fn::If"]
            assert when_on == {"ProvisionedConcurrentExecutions": {"Ref": "ProvisionedConcurrency"}}, path
            assert when_off == {"Ref": "AWS::NoValue"}, path
            assert template["Conditions"][condition] == {
                "Fn::Not": [{"Fn::Equals": [{"Ref": "ProvisionedConcurrency"}, "0"]}]}, path
    assert seen, "no ProvisionedConcurrencyConfig"


def test_every_function_logs_to_its_own_log_group_with_retention(template):
    groups = resources(template, "AWS::Logs::LogGroup")
    assert groups
    for name, group in groups.items():
        assert group["Properties"].get("RetentionInDays") == {"Ref": "LogRetentionDays"}, name
    used = set()
    for name, fn in functions(template).items():
        ref = fn["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
        assert ref in groups, name
        used.add(ref)
        function_name = sub_string(fn["Properties"]["FunctionName"])
        assert sub_string(groups[ref]["Properties"]["LogGroupName"]) == f"/aws/lambda/{function_name}", name
    assert len(used) == len(functions(template)), "two functions share a log group"


def test_handlers_import(template, model_dir):
    """Each handler module imports as awslambdaric would import it in the image (faceflow
    and functions side by side, models from the bundle), and names a callable. Settings point
    at addresses nothing listens on: handlers must not connect at import."""
    import importlib.util
    missing = [m for m in ("boto3", "redis", "aws_lambda_powertools", "aws_xray_sdk", "pydantic")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the functions' runtime dependencies are not installed here: {', '.join(missing)} "
                    f"(pip install -r {REQUIREMENTS.relative_to(ROOT)})")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "shared")]),
           "FACEFLOW_INPUT_BUCKET": "input", "FACEFLOW_OUTPUT_BUCKET": "output",
           "FACEFLOW_REDIS_URL": "redis://127.0.0.1:1/0", "FACEFLOW_MODEL_DIR": str(model_dir),
           "AWS_DEFAULT_REGION": "us-east-1", "POWERTOOLS_TRACE_DISABLED": "true",
           "POWERTOOLS_METRICS_NAMESPACE": "faceflow"}
    child = ("import importlib, sys; module, attr = sys.argv[1].rsplit('.', 1); "
             "assert callable(getattr(importlib.import_module(module), attr)), sys.argv[1]")
    failures = []
    for name, fn in functions(template).items():
        handler = fn["Properties"]["ImageConfig"]["Command"][0]
        proc = subprocess.run([sys.executable, "-c", child, handler], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            failures.append(f"{name}: {handler}:\n{proc.stderr[-2000:]}")
    assert not failures, "\n".join(failures)


# --- IAM ---------------------------------------------------------------------------------

def _check_statements(tpl: dict) -> list[str]:
    problems = []
    statements = list(policy_statements(tpl))
    assert statements, "no IAM statements found"
    for where, st in statements:
        actions = [a for a in as_list(st.get("Action", [])) if isinstance(a, str)]
        if st["Effect"] == "Allow":
            if "NotAction" in st:
                problems.append(f"{where}: Allow with NotAction")
            if any("*" in a for a in actions):
                problems.append(f"{where}: Allow with a wildcard action {actions}")
            if not actions and "sts:AssumeRole" not in json.dumps(st):
                problems.append(f"{where}: Allow without explicit actions")
        elif any("*" in a for a in actions) and "Condition" not in st:
            # A Deny grants nothing; a wildcard Deny is fine when it is scoped by a condition
            # (e.g. the buckets' HTTPS-only policy).
            problems.append(f"{where}: unconditional wildcard Deny {actions}")
    return problems


def test_no_wildcard_actions_in_the_template(template):
    assert _check_statements(template) == []


def test_no_wildcard_actions_after_the_sam_transform(template, transformed):
    assert _check_statements(transformed) == []
    sqs_consumers = {f"{name}Role" for name, fn in functions(template).items()
                     if any(e["Type"] == "SQS" for e in fn["Properties"].get("Events", {}).values())}
    assert sqs_consumers == {"ChunkWorkerFunctionRole", "SessionChunkFunctionRole", "FailureFunctionRole"}
    for name, role in resources(transformed, "AWS::IAM::Role").items():
        managed = set(role["Properties"].get("ManagedPolicyArns", []))
        allowed = ALLOWED_MANAGED_POLICIES | ({SQS_EXECUTION_POLICY} if name in sqs_consumers else set())
        assert managed <= allowed, f"{name}: {managed - allowed}"


def _function_statements(template: dict, fn_name: str) -> list[dict]:
    fn = template["Resources"][fn_name]
    out = []
    for policy in fn["Properties"].get("Policies", []):
        assert isinstance(policy, dict) and "Statement" in policy, \
            f"{fn_name}: only inline statements (no SAM policy templates or managed policies)"
        out += as_list(policy["Statement"])
    return out


def _grants(statements: list[dict]) -> set[tuple[str, str]]:
    grants = set()
    for st in statements:
        assert st["Effect"] == "Allow"
        for resource in as_list(st["Resource"]):
            arn = sub_string(resource)
            assert arn, f"resource must be a !Sub string (no !Ref/!GetAtt of a bucket): {resource}"
            for action in as_list(st["Action"]):
                grants.add((action, arn))
    return grants


def test_function_policies_are_least_privilege(template):
    arn = "arn:${AWS::Partition}:s3:::"
    inp, out = bucket_name(template, "InputBucket"), bucket_name(template, "OutputBucket")
    results = f"{arn}{out}/{RESULT_PREFIX}*"
    inputs = [f"{arn}{inp}/{prefix}*" for prefix in TRIGGER_PREFIXES]
    assert _grants(_function_statements(template, "StillsFunction")) == {
        *((a, uploads) for uploads in inputs for a in ("s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectTagging")),
        ("s3:PutObject", results)}
    swaps = f"{arn}{inp}/{SWAP_PREFIX}*"   # a swap's uploads; its completion checks them and writes the manifest
    assert _grants(_function_statements(template, "ApiFunction")) == {
        *((a, uploads) for uploads in (*inputs, swaps)
          for a in ("s3:PutObject", "s3:ListMultipartUploadParts", "s3:AbortMultipartUpload")),
        ("s3:GetObject", swaps), ("s3:GetObject", results)}


def test_no_circular_reference_between_buckets_and_function_roles(template):
    for name in functions(template):
        text = json.dumps(template["Resources"][name]["Properties"].get("Policies", []))
        assert "InputBucket" not in text and "OutputBucket" not in text, name


# --- storage and triggers --------------------------------------------------------------------

def test_buckets_are_private_encrypted_https_only_and_expire(template):
    buckets = resources(template, "AWS::S3::Bucket")
    assert set(buckets) == {"InputBucket", "OutputBucket"}
    policies = {p["Properties"]["Bucket"]["Ref"]: p for p in resources(template, "AWS::S3::BucketPolicy").values()}
    expected_prefix = {"InputBucket": UPLOAD_PREFIX, "OutputBucket": RESULT_PREFIX}
    for name, bucket in buckets.items():
        props = bucket["Properties"]
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"], name
        block = props["PublicAccessBlockConfiguration"]
        assert block == {"BlockPublicAcls": True, "BlockPublicPolicy": True,
                         "IgnorePublicAcls": True, "RestrictPublicBuckets": True}, name
        rules = props["LifecycleConfiguration"]["Rules"]
        assert any(r.get("Prefix") == expected_prefix[name] and "ExpirationInDays" in r
                   and r["Status"] == "Enabled" for r in rules), name
        if name == "InputBucket":
            assert any(r.get("Prefix") == ANALYZE_PREFIX and "ExpirationInDays" in r for r in rules)
            assert any(r.get("Prefix") == SWAP_PREFIX and "ExpirationInDays" in r for r in rules)
        deny = [s for s in policies[name]["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
        assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in deny), name



def test_incomplete_multipart_uploads_to_the_input_bucket_are_aborted(template):
    """The API hands out S3 multipart uploads for large files; parts of one never completed
    are stored (and billed) until a lifecycle rule aborts the upload."""
    rules = template["Resources"]["InputBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    aborting = [r for r in rules if r.get("Status") == "Enabled" and "AbortIncompleteMultipartUpload" in r]
    assert aborting, "no AbortIncompleteMultipartUpload rule on the input bucket"
    # it must cover uploads/: no prefix (the whole bucket) or that one
    assert any(r.get("Prefix", "") in ("", UPLOAD_PREFIX) and not r.get("Filter")
               and 1 <= int(r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]) <= 7 for r in aborting)

def test_only_the_input_bucket_triggers_processing(template):
    from faceflow.images import EXTENSION_FORMAT

    assert "NotificationConfiguration" not in resources(template, "AWS::S3::Bucket")["OutputBucket"]["Properties"]
    # The input bucket's own notifications: stream session chunks to their queue, nothing else
    # (Lambda triggers are SAM S3 events).
    notifications = template["Resources"]["InputBucket"]["Properties"]["NotificationConfiguration"]
    assert set(notifications) == {"QueueConfigurations"}
    session_suffixes = set()
    for config in notifications["QueueConfigurations"]:
        assert config["Queue"] == {"Fn::GetAtt": ["SessionChunkQueue", "Arn"]}
        assert config["Event"] == "s3:ObjectCreated:*"
        rules = {r["Name"]: r["Value"] for r in config["Filter"]["S3Key"]["Rules"]}
        assert rules["prefix"] == SESSION_PREFIX
        session_suffixes.add(rules["suffix"])
    assert session_suffixes == {".mp4", ".ts"}
    suffixes, by_function = [], {}
    for fn_name, fn in functions(template).items():
        for ev_name, event in fn["Properties"].get("Events", {}).items():
            if event["Type"] != "S3":
                continue
            assert fn_name in ("StillsFunction", "SplitFunction"), f"{fn_name}.{ev_name}: only stills and split read uploads"
            props = event["Properties"]
            assert props["Bucket"] == {"Ref": "InputBucket"}, f"{ev_name}: S3 events on the input bucket only"
            assert as_list(props["Events"]) == ["s3:ObjectCreated:*"], ev_name
            rules = {r["Name"]: r["Value"] for r in props["Filter"]["S3Key"]["Rules"]}
            assert rules["prefix"] in (*TRIGGER_PREFIXES, SWAP_PREFIX), ev_name
            suffixes.append((rules["prefix"], rules["suffix"]))
            by_function.setdefault((fn_name, rules["prefix"]), set()).add(rules["suffix"])
    assert len(suffixes) == len(set(suffixes)), "one event per prefix and suffix"
    assert by_function[("SplitFunction", SWAP_PREFIX)] == {".json"}, "a swap starts with its manifest alone"
    assert ("StillsFunction", SWAP_PREFIX) not in by_function
    for prefix in TRIGGER_PREFIXES:  # the analysis prefix triggers on what uploads/ does
        assert by_function[("SplitFunction", prefix)] == {
            case(ext) for ext in VIDEO_SUFFIXES for case in (str.lower, str.upper)}
        assert by_function[("StillsFunction", prefix)] == by_function[("StillsFunction", UPLOAD_PREFIX)]
    suffixes = sorted(by_function[("StillsFunction", UPLOAD_PREFIX)])
    wanted = {case(ext) for ext in EXTENSION_FORMAT for case in (str.lower, str.upper)}
    assert wanted <= set(suffixes), f"formats the engine accepts but nothing triggers on: {wanted - set(suffixes)}"
    assert {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif"} <= set(suffixes)  # phones too


def test_output_bucket_never_triggers_after_the_sam_transform(transformed):
    buckets = resources(transformed, "AWS::S3::Bucket")
    assert "NotificationConfiguration" not in buckets["OutputBucket"]["Properties"]
    notifications = buckets["InputBucket"]["Properties"]["NotificationConfiguration"]
    assert set(notifications) == {"LambdaConfigurations", "QueueConfigurations"}, \
        "SAM must keep the session queue's notifications when it adds the functions' S3 events"
    targets = set()
    for config in notifications["LambdaConfigurations"]:
        targets.add(config["Function"]["Ref"])
        rules = {r["Name"]: r["Value"] for r in config["Filter"]["S3Key"]["Rules"]}
        assert rules["prefix"] in (*TRIGGER_PREFIXES, SWAP_PREFIX)
    assert targets == {"StillsFunctionAliaslive", "SplitFunctionAliaslive"}
    for config in notifications["QueueConfigurations"]:
        rules = {r["Name"]: r["Value"] for r in config["Filter"]["S3Key"]["Rules"]}
        assert rules["prefix"] == SESSION_PREFIX
    # S3 checks the queue policy when the notification is set: the bucket waits for it.
    assert "SessionChunkQueuePolicy" in as_list(buckets["InputBucket"]["DependsOn"])
    # The functions write results only under results/ in the output bucket: nothing they
    # write can land where the trigger listens.
    out_sub = bucket_name(transformed, "OutputBucket")
    for name, role in resources(transformed, "AWS::IAM::Role").items():
        for _, st in policy_statements(role):
            if "s3:PutObject" in as_list(st["Action"]) and name.startswith("Stills"):
                for resource in as_list(st["Resource"]):
                    assert sub_string(resource).endswith(f"{out_sub}/{RESULT_PREFIX}*"), name
    # Lambda permissions for S3 name this account.
    for name, perm in resources(transformed, "AWS::Lambda::Permission").items():
        if perm["Properties"]["Principal"] == "s3.amazonaws.com":
            assert perm["Properties"]["SourceAccount"] == {"Ref": "AWS::AccountId"}, name


def test_stills_failures_go_to_an_encrypted_queue(template):
    config = template["Resources"]["StillsFunction"]["Properties"]["EventInvokeConfig"]
    assert config["MaximumRetryAttempts"] == 2
    on_failure = config["DestinationConfig"]["OnFailure"]
    assert on_failure["Type"] == "SQS"
    queue = on_failure["Destination"]["Fn::GetAtt"][0]
    assert template["Resources"][queue]["Properties"]["SqsManagedSseEnabled"] is True


def test_failed_work_reaches_the_failure_function(template, transformed):
    """Every place where work fails for good feeds the failure function, which marks the job
    failed: the asynchronous (S3-invoked) functions' on-failure destination and the chunk
    queues' dead-letter queues. It may only consume those queues."""
    res = template["Resources"]
    fn = res["FailureFunction"]["Properties"]
    assert fn["ImageConfig"]["Command"] == ["functions.failures.app.handler"]
    sources = {e["Properties"]["Queue"]["Fn::GetAtt"][0] for e in fn["Events"].values() if e["Type"] == "SQS"}
    destinations = {res[name]["Properties"]["EventInvokeConfig"]["DestinationConfig"]["OnFailure"]["Destination"]
                    ["Fn::GetAtt"][0] for name in ("StillsFunction", "SplitFunction")}
    dead_letters = {res[q]["Properties"]["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
                    for q in ("ChunkQueue", "SessionChunkQueue")}
    assert sources == destinations | dead_letters
    for event in fn["Events"].values():
        assert event["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    for queue in sources:  # Lambda refuses a queue whose visibility timeout is below the function's
        assert res[queue]["Properties"]["VisibilityTimeout"] >= 6 * fn["Timeout"], queue
        assert "RedrivePolicy" not in res[queue]["Properties"], queue  # the last stop
    consume = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes"}
    statements = [st for policy in fn["Policies"] for st in policy["Statement"]]
    granted = {(action, sub_string(resource) or json.dumps(resource), json.dumps(st.get("Condition"), sort_keys=True))
               for st in statements for action in as_list(st["Action"]) for resource in as_list(st["Resource"])}
    out = f"arn:${{AWS::Partition}}:s3:::{bucket_name(template, 'OutputBucket')}"
    none = json.dumps(None)
    assert granted == {*((a, json.dumps({"Fn::GetAtt": [q, "Arn"]}), none) for a in consume for q in sources),
                       # a dead-lettered session chunk is committed as skipped, with its checkpoint
                       ("s3:GetObject", f"{out}/{SESSION_PREFIX}*", none), ("s3:PutObject", f"{out}/{SESSION_PREFIX}*", none),
                       ("s3:ListBucket", out, json.dumps({"StringLike": {"s3:prefix": f"{SESSION_PREFIX}*"}}))}
    assert fn_environment(template, res["FailureFunction"])["FACEFLOW_SESSION_TTL_S"] == {"Ref": "SessionTtlSeconds"}


# --- video: queues, session notifications, policies -----------------------------------------

def test_session_queue_accepts_only_the_input_buckets_notifications(template):
    res = template["Resources"]
    policy = res["SessionChunkQueuePolicy"]["Properties"]
    assert policy["Queues"] == [{"Ref": "SessionChunkQueue"}]
    statement, = policy["PolicyDocument"]["Statement"]
    assert statement["Effect"] == "Allow" and statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert as_list(statement["Action"]) == ["sqs:SendMessage"]
    assert statement["Resource"] == {"Fn::GetAtt": ["SessionChunkQueue", "Arn"]}
    condition = statement["Condition"]
    # Computed, not !GetAtt InputBucket.Arn: the bucket depends on this policy.
    assert sub_string(condition["ArnEquals"]["aws:SourceArn"]) == \
        f"arn:${{AWS::Partition}}:s3:::{bucket_name(template, 'InputBucket')}"
    assert condition["StringEquals"]["aws:SourceAccount"] == {"Ref": "AWS::AccountId"}
    assert "SessionChunkQueuePolicy" in as_list(res["InputBucket"]["DependsOn"])


def test_sqs_event_sources_report_batch_item_failures_and_have_dead_letter_queues(template, transformed):
    res = template["Resources"]
    expected = {"ChunkWorkerFunction": ("ChunkQueue", 1, 5), "SessionChunkFunction": ("SessionChunkQueue", 10, 50)}
    seen = {}
    for fn_name, fn in functions(template).items():
        for ev_name, event in fn["Properties"].get("Events", {}).items():
            if event["Type"] == "SQS" and fn_name != "FailureFunction":
                seen[fn_name] = event["Properties"]
    assert set(seen) == set(expected)
    for fn_name, (queue, batch, receives) in expected.items():
        props = seen[fn_name]
        assert props["Queue"] == {"Fn::GetAtt": [queue, "Arn"]}, fn_name
        assert props["BatchSize"] == batch, fn_name
        assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"], fn_name
        q = res[queue]["Properties"]
        assert q["SqsManagedSseEnabled"] is True, queue
        assert q["VisibilityTimeout"] >= 6 * res[fn_name]["Properties"]["Timeout"], queue
        redrive = q["RedrivePolicy"]
        assert redrive["maxReceiveCount"] == receives, queue
        dlq = redrive["deadLetterTargetArn"]["Fn::GetAtt"][0]
        assert res[dlq]["Properties"]["SqsManagedSseEnabled"] is True, dlq
        assert res[dlq]["Properties"]["MessageRetentionPeriod"] == 1209600, dlq
    # And after the transform, on every event source mapping (the failure function's three too).
    mappings = resources(transformed, "AWS::Lambda::EventSourceMapping")
    assert len(mappings) == len(expected) + 3
    for name, mapping in mappings.items():
        assert mapping["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"], name


def test_video_function_policies_are_least_privilege(template):
    arn = "arn:${AWS::Partition}:s3:::"
    inp, out = bucket_name(template, "InputBucket"), bucket_name(template, "OutputBucket")

    def grants(fn_name):
        result = set()
        for st in _function_statements(template, fn_name):
            assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st
            for resource in as_list(st["Resource"]):
                where = sub_string(resource) or json.dumps(resource)
                for action in as_list(st["Action"]):
                    result.add((action, where, json.dumps(st.get("Condition"), sort_keys=True)))
        return result

    none = json.dumps(None)
    queue = lambda name: json.dumps({"Fn::GetAtt": [name, "Arn"]})  # noqa: E731
    listing = lambda prefix: json.dumps({"StringLike": {"s3:prefix": f"{prefix}*"}})  # noqa: E731
    assert grants("SplitFunction") == {
        *((a, f"{arn}{inp}/{prefix}*", none) for prefix in (*TRIGGER_PREFIXES, SWAP_PREFIX)
          for a in ("s3:GetObject", "s3:GetObjectTagging")),
        ("s3:PutObject", f"{arn}{out}/{WORK_PREFIX}*", none),
        ("s3:PutObject", f"{arn}{out}/{RESULT_PREFIX}*", none),  # an analysed video's report
        ("sqs:SendMessage", queue("ChunkQueue"), none)}
    consume = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes"}
    assert grants("ChunkWorkerFunction") == {
        ("s3:GetObject", f"{arn}{out}/{WORK_PREFIX}*", none),
        ("s3:PutObject", f"{arn}{out}/{WORK_PREFIX}*", none),
        ("s3:ListBucket", f"{arn}{out}", listing(WORK_PREFIX)),
        ("s3:PutObject", f"{arn}{out}/{RESULT_PREFIX}*", none),
        *((a, queue("ChunkQueue"), none) for a in consume)}
    assert grants("SessionChunkFunction") == {
        ("s3:GetObject", f"{arn}{inp}/{SESSION_PREFIX}*", none),
        ("s3:GetObject", f"{arn}{out}/{SESSION_PREFIX}*", none),
        ("s3:PutObject", f"{arn}{out}/{SESSION_PREFIX}*", none),
        ("s3:ListBucket", f"{arn}{out}", listing(SESSION_PREFIX)),
        *((a, queue("SessionChunkQueue"), none) for a in consume | {"sqs:GetQueueUrl"})}
    assert grants("GpuResultFunction") == {
        ("s3:GetObject", f"{arn}{out}/{GPU_RESPONSES}*", none),
        ("s3:GetObject", f"{arn}{out}/{GPU_FAILURES}*", none)}
    # The GPU answers come in on the endpoint's two topics.
    events = template["Resources"]["GpuResultFunction"]["Properties"]["Events"]
    assert {json.dumps(e["Properties"]["Topic"]) for e in events.values() if e["Type"] == "SNS"} == {
        json.dumps({"Ref": "GpuSuccessTopic"}), json.dumps({"Ref": "GpuErrorTopic"})}


def test_video_prefixes_expire(template):
    source = (ROOT / "functions" / "common" / "layout.py").read_text()
    assert f'WORK_PREFIX = "{WORK_PREFIX}"' in source and f'SESSION_PREFIX = "{SESSION_PREFIX}"' in source
    res = template["Resources"]

    def expiring(bucket):
        return {r["Prefix"]: r["ExpirationInDays"] for r in res[bucket]["Properties"]["LifecycleConfiguration"]["Rules"]
                if r.get("Status") == "Enabled" and "Prefix" in r and "ExpirationInDays" in r}

    out = expiring("OutputBucket")
    assert out[RESULT_PREFIX] == {"Ref": "ResultExpirationDays"}
    assert out[WORK_PREFIX] == {"Ref": "WorkExpirationDays"}
    assert str(template["Parameters"]["WorkExpirationDays"]["Default"]) == "2"
    assert out[SESSION_PREFIX] == {"Ref": "SessionExpirationDays"}
    assert expiring("InputBucket")[SESSION_PREFIX] == {"Ref": "SessionExpirationDays"}
    # Checkpoints must outlive the Redis session they restore.
    assert int(template["Parameters"]["SessionExpirationDays"]["Default"]) * 86400 >= \
        int(template["Parameters"]["SessionTtlSeconds"]["Default"])


# --- HTTP API ------------------------------------------------------------------------------

PAGE_ROUTES = {("GET", "/"), ("GET", "/static/{name}")}


def test_api_routes_all_go_through_the_chosen_authorizer(template, transformed):
    routes = set()
    for event in template["Resources"]["ApiFunction"]["Properties"]["Events"].values():
        assert event["Type"] == "HttpApi"
        assert event["Properties"]["ApiId"] == {"Ref": "HttpApi"}
        routes.add((event["Properties"]["Method"].upper(), event["Properties"]["Path"]))
    assert ROUTES <= routes

    api = template["Resources"]["HttpApi"]["Properties"]
    assert "Auth" not in api, "the authorizer is chosen in DefinitionBody (SAM's Auth takes no !If)"
    assert template["Parameters"]["AuthMode"]["AllowedValues"] == ["IAM", "JWT"]
    assert template["Parameters"]["AuthMode"]["Default"] == "IAM"
    assert template["Conditions"]["UseJwt"] == {"Fn::Equals": [{"Ref": "AuthMode"}, "JWT"]}
    schemes = api["DefinitionBody"]["components"]["securitySchemes"]
    assert schemes["AWS_IAM"]["x-amazon-apigateway-authtype"] == "awsSigv4"
    jwt = schemes["Jwt"]["Fn::If"]
    assert jwt[0] == "UseJwt" and jwt[2] == {"Ref": "AWS::NoValue"}
    assert jwt[1]["x-amazon-apigateway-authorizer"]["jwtConfiguration"] == {
        "issuer": {"Ref": "JwtIssuer"}, "audience": {"Ref": "JwtAudience"}}

    # After the transform every operation has a Lambda integration and the chosen authorizer:
    # a route added as an event but not in DefinitionBody would have neither security nor this.
    body = resources(transformed, "AWS::ApiGatewayV2::Api")["HttpApi"]["Properties"]["Body"]
    operations = {(m.upper(), p): op for p, item in body["paths"].items() for m, op in item.items()}
    assert set(operations) == routes
    for route, op in operations.items():
        assert op["x-amazon-apigateway-integration"]["type"] == "aws_proxy", route
        if route in PAGE_ROUTES:  # the page's static files: a browser opening a URL sends no token
            assert op["security"] == [], route
            continue
        assert op["security"] == {"Fn::If": ["UseJwt", [{"Jwt": []}], [{"AWS_IAM": []}]]}, route


def test_outputs(template):
    assert {"InputBucketName", "OutputBucketName", "ApiUrl", "StillsFunctionArn", "StillsFunctionAliasArn",
            "ApiFunctionArn", "ApiFunctionAliasArn", "StillsFailureQueueUrl", "ChunkQueueUrl",
            "SessionChunkQueueUrl"} <= set(template["Outputs"])
    assert template["Outputs"]["ChunkQueueUrl"]["Value"] == {"Ref": "ChunkQueue"}
    assert template["Outputs"]["SessionChunkQueueUrl"]["Value"] == {"Ref": "SessionChunkQueue"}


# --- Dockerfile ----------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def stages() -> list[dict]:
    """The stages, each base with the defaults of the ARGs declared before the first FROM."""
    result, build_args = [], {}
    for word, args in dockerfile_instructions():
        if word == "ARG" and not result:
            name, _, default = args.partition("=")
            build_args[name] = default
        elif word == "FROM":
            parts = [p for p in args.split() if not p.startswith("--")]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            base = re.sub(r"\$\{(\w+)\}", lambda m: build_args.get(m[1], m[0]), parts[0])
            result.append({"base": base, "name": name, "steps": []})
        else:
            result[-1]["steps"].append((word, args))
    return result


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(rel: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent
    folders decides; `!` re-includes."""
    if not DOCKERIGNORE.exists():
        return False
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip().strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerfile_builds_on_the_lambda_python_image():
    all_stages = stages()
    assert all_stages[0]["base"] == LAMBDA_PYTHON_IMAGE
    names = set()
    for stage in all_stages:
        assert stage["base"] == LAMBDA_PYTHON_IMAGE or stage["base"] in names, \
            f"stage {stage['name']} starts from {stage['base']}"
        if stage["name"]:
            names.add(stage["name"])
    assert len(all_stages) >= 2, "a build stage fetches the models; the final stage only copies them"


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context():
    copies = [args for stage in stages() for word, args in stage["steps"] if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        if "--from=" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        for source in parts[:-1]:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
            files = [path] if path.is_file() else [
                p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            assert files, f"COPY {source}: nothing to copy"
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if rel.startswith(LEFT_OUT_OF_THE_IMAGE):
                    assert dockerignored(rel), f"{rel}: the GPU worker does not belong in the Lambda image"
                    continue
                assert not dockerignored(rel), f"{f}: excluded by .dockerignore"


def test_build_context_leaves_out_tests_and_local_state():
    for rel in ("tests/test_template.py", ".git/config", ".venv/bin/python", "bench/detectors.py",
                "shared/faceflow/__pycache__/engine.cpython-312.pyc", "shared/faceflow.egg-info/PKG-INFO",
                "models/yunet_2023mar.onnx", ".aws-sam/build/template.yaml"):
        assert dockerignored(rel), rel


def test_final_stage_bakes_models_and_code_without_onnx():
    final = stages()[-1]
    steps = final["steps"]
    text = "\n".join(f"{w} {a}" for w, a in steps)
    assert "COPY layers/routing.json /opt/faceflow/routing.json" in text  # faceflow.routing's default location
    from faceflow import routing
    assert Path("/opt/faceflow/routing.json") in routing.DEFAULT_LOCATIONS
    assert f"ENV FACEFLOW_MODEL_DIR={MODEL_DIR}" in text
    from_copies = [a for w, a in steps if w == "COPY" and "--from=" in a]
    assert from_copies and all(a.split()[-2:] == [MODEL_DIR, MODEL_DIR] for a in from_copies), from_copies
    assert "COPY shared/faceflow ${LAMBDA_TASK_ROOT}/faceflow" in text
    assert "COPY functions ${LAMBDA_TASK_ROOT}/functions" in text
    assert "tests" not in " ".join(a for w, a in steps if w == "COPY")
    assert not re.search(r"\bonnx\b(?!runtime)", " ".join(a for w, a in steps if w == "RUN")), \
        "onnx belongs to the build stage only"
    cmd = [a for w, a in steps if w == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["functions.stills.app.handler"]
    # The models are fetched in a build stage, with the fetch extra.
    build = "\n".join(a for s in stages()[:-1] for w, a in s["steps"] if w == "RUN")
    assert '".[fetch]"' in build and f"faceflow models fetch --dir {MODEL_DIR}" in build
    assert "--no-cache-dir" in build


def test_no_gui_opencv_and_insightface_without_deps():
    gui_opencv = re.compile(r"opencv-(?:contrib-)?python(?!-headless)\b", re.I)
    for path in (DOCKERFILE, REQUIREMENTS):
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            assert not gui_opencv.search(code), f"{path.name}: {line}"
            if re.search(r"\binsightface\b", code) and path == DOCKERFILE:
                assert "--no-deps" in code, f"insightface must be installed with --no-deps: {line}"
    assert not any(re.match(r"insightface\b", r) for r in requirement_lines()), \
        "insightface must be installed on its own with --no-deps, not from the requirements file"


def requirement_lines() -> list[str]:
    return [line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def test_requirements_are_pinned_and_match_the_engine():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in requirement_lines():
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not pinned with ==: {line}"
        pins[canonicalize_name(req.name)] = spec[0].version
    assert "onnx" not in pins, "onnx is for `faceflow models fetch`, in the build stage only"
    assert "opencv-python-headless" in pins and "pydantic" in pins and "redis" in pins

    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"engine dependency {req.name} is not pinned in {REQUIREMENTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {dep}"
    # The build stage pins each package of the `fetch` extra with an ARG <NAME>_VERSION.
    for dep in project["optional-dependencies"]["fetch"]:
        req = Requirement(dep)
        arg = re.search(rf"ARG {req.name.upper()}_VERSION=(\S+)", DOCKERFILE.read_text())
        assert arg, f"the build stage pins {req.name}"
        assert req.specifier.contains(arg[1]), dep


# --- size budget -------------------------------------------------------------------------

def _manylinux_platforms() -> list[str]:
    # Amazon Linux 2023 (the python3.12 base image) has glibc 2.34.
    args = []
    for minor in range(34, 16, -1):
        args += ["--platform", f"manylinux_2_{minor}_x86_64"]
    return args + ["--platform", "manylinux2014_x86_64"]


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.mark.slow
def test_runtime_dependencies_fit_the_size_budget(tmp_path):
    target = tmp_path / "site-packages"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-warn-conflicts", "--target", str(target),
           "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
           *_manylinux_platforms(), "--only-binary=:all:", "-r", str(REQUIREMENTS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for tests in list((target / "numpy").rglob("tests")):  # as layers/Dockerfile does
        shutil.rmtree(tests, ignore_errors=True)
    assert not list(target.glob("opencv_python-*.dist-info")), "the GUI opencv-python was pulled in"
    assert not (target / "onnx").exists(), "onnx was pulled in by a runtime dependency"

    total = _tree_bytes(target)
    sdk = sum(_tree_bytes(p) for pattern in ("boto3*", "botocore*", "s3transfer*") for p in target.glob(pattern))
    top = sorted(((_tree_bytes(p) if p.is_dir() else p.stat().st_size, p.name) for p in target.iterdir()),
                 reverse=True)[:8]
    mib = 1024 * 1024
    print(f"\nfunction image dependencies: {total / mib:.1f} MiB installed "
          f"({sdk / mib:.1f} MiB of it boto3/botocore/s3transfer, {(total - sdk) / mib:.1f} MiB without); "
          f"budget {SIZE_BUDGET_MIB} MiB")
    print("largest: " + ", ".join(f"{name} {size / mib:.0f}" for size, name in top))
    assert total <= SIZE_BUDGET_MIB * mib, \
        f"{total / mib:.1f} MiB installed, over the {SIZE_BUDGET_MIB} MiB budget"


# --- GPU endpoint (SageMaker asynchronous inference) ---------------------------------------

GPU_RESOURCE_TYPES = {"AWS::SageMaker::Model", "AWS::SageMaker::EndpointConfig", "AWS::SageMaker::Endpoint",
                      "AWS::ApplicationAutoScaling::ScalableTarget", "AWS::ApplicationAutoScaling::ScalingPolicy",
                      "AWS::SNS::Topic", "AWS::CloudWatch::Alarm"}
GPU_REQUESTS, GPU_RESPONSES, GPU_FAILURES = f"{RESULT_PREFIX}_gpu/requests/", f"{RESULT_PREFIX}_gpu/responses/", \
    f"{RESULT_PREFIX}_gpu/failures/"


def _only(tpl: dict, type_: str) -> tuple[str, dict]:
    found = resources(tpl, type_)
    assert len(found) == 1, f"{type_}: {sorted(found)}"
    return next(iter(found.items()))


def test_gpu_part_is_off_without_an_image(template):
    param = template["Parameters"]["GpuImageUri"]
    assert param["Type"] == "String" and param["Default"] == ""
    assert template["Conditions"]["GpuEnabled"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "GpuImageUri"}, ""]}]}
    gpu_names = {name for name, r in template["Resources"].items() if r["Type"] in GPU_RESOURCE_TYPES}
    gpu_names |= {name for name in template["Resources"] if name.startswith("Gpu")}
    assert {"GpuModel", "GpuEndpointConfig", "GpuEndpoint", "GpuScalableTarget", "GpuExecutionRole",
            "GpuSuccessTopic", "GpuErrorTopic", "GpuSubmitPolicy", "GpuLogGroup"} <= gpu_names
    for name in gpu_names:
        assert template["Resources"][name].get("Condition") == "GpuEnabled", f"{name} must depend on GpuEnabled"
    for name, output in template["Outputs"].items():
        if name.startswith("Gpu"):
            assert output.get("Condition") == "GpuEnabled", name
    assert {"GpuEndpointName", "GpuSuccessTopicArn", "GpuErrorTopicArn"} <= set(template["Outputs"])


@pytest.mark.parametrize("uri,ok", [
    ("", True),
    ("123456789012.dkr.ecr.us-east-1.amazonaws.com/faceflow-gpu:v1", True),
    ("123456789012.dkr.ecr.eu-west-3.amazonaws.com/team/faceflow-gpu:2026.01", True),
    ("123456789012.dkr.ecr.us-east-1.amazonaws.com/faceflow-gpu@sha256:" + "a" * 64, True),
    ("faceflow-gpu:latest", False),
    ("docker.io/library/faceflow:1", False),
    ("123456789012.dkr.ecr.us-east-1.amazonaws.com/faceflow-gpu", False),   # no tag: say which image
])
def test_gpu_image_uri_pattern(template, uri, ok):
    pattern = template["Parameters"]["GpuImageUri"]["AllowedPattern"]
    assert bool(re.fullmatch(pattern, uri)) == ok, uri


def _evaluate(node, params: dict):
    """Fn::Split / Fn::Select / Ref of parameters, as CloudFormation evaluates them."""
    if isinstance(node, dict) and len(node) == 1:
        (fn, arg), = node.items()
        if fn == "Ref":
            return params[arg]
        if fn == "Fn::Split":
            return _evaluate(arg[1], params).split(arg[0])
        if fn == "Fn::Select":
            return _evaluate(arg[1], params)[int(arg[0])]
    return node


@pytest.mark.parametrize("uri,arn", [
    ("123456789012.dkr.ecr.us-east-1.amazonaws.com/faceflow-gpu:v1",
     "arn:aws:ecr:us-east-1:123456789012:repository/faceflow-gpu"),
    ("210987654321.dkr.ecr.eu-west-3.amazonaws.com/team/faceflow-gpu:2026.01",
     "arn:aws:ecr:eu-west-3:210987654321:repository/team/faceflow-gpu"),
    ("123456789012.dkr.ecr.us-east-1.amazonaws.com/faceflow-gpu@sha256:" + "b" * 64,
     "arn:aws:ecr:us-east-1:123456789012:repository/faceflow-gpu"),
])
def test_gpu_role_pulls_only_its_own_repository(template, uri, arn):
    role = template["Resources"]["GpuExecutionRole"]["Properties"]
    statements = {st.get("Sid"): st for _, st in policy_statements({"Policies": role["Policies"]})}
    fmt, values = statements["PullImage"]["Resource"]["Fn::Sub"]
    got = fmt.replace("${AWS::Partition}", "aws")
    for name, expr in values.items():
        got = got.replace("${" + name + "}", _evaluate(expr, {"GpuImageUri": uri}))
    assert got == arn


def test_gpu_execution_role_is_least_privilege(template):
    role = template["Resources"]["GpuExecutionRole"]["Properties"]
    trust = role["AssumeRolePolicyDocument"]["Statement"]
    assert len(trust) == 1 and trust[0]["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    assert trust[0]["Action"] == "sts:AssumeRole"
    assert "ManagedPolicyArns" not in role
    arn = "arn:${AWS::Partition}:s3:::"
    inp, out = bucket_name(template, "InputBucket"), bucket_name(template, "OutputBucket")
    grants = set()
    for _, st in policy_statements({"Policies": role["Policies"]}):
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st
        for action in as_list(st["Action"]):
            for resource in as_list(st["Resource"]):
                grants.add((action, sub_string(resource) or json.dumps(resource, sort_keys=True)))
    s3 = {g for g in grants if g[0].startswith("s3:")}
    assert s3 == {("s3:GetObject", f"{arn}{inp}/{UPLOAD_PREFIX}*"), ("s3:GetObject", f"{arn}{inp}/{ANALYZE_PREFIX}*"),
                  ("s3:GetObject", f"{arn}{inp}/{SWAP_PREFIX}*"),  # a swap's target and source face
                  ("s3:GetObject", f"{arn}{out}/{GPU_REQUESTS}*"),
                  ("s3:PutObject", f"{arn}{out}/{RESULT_PREFIX}*"),
                  ("s3:AbortMultipartUpload", f"{arn}{out}/{RESULT_PREFIX}*")}
    sns = {g for g in grants if g[0].startswith("sns:")}
    assert sns == {("sns:Publish", json.dumps({"Ref": "GpuSuccessTopic"})),
                   ("sns:Publish", json.dumps({"Ref": "GpuErrorTopic"}))}
    ecr = {a for a, r in grants if a.startswith("ecr:")}
    assert ecr == {"ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability",
                   "ecr:GetAuthorizationToken"}
    star = {a for a, r in grants if r == json.dumps("*")}
    assert star == {"ecr:GetAuthorizationToken"}, "only the ECR login may have Resource *"
    logs = {(a, r) for a, r in grants if a.startswith("logs:")}
    group = sub_string(template["Resources"]["GpuLogGroup"]["Properties"]["LogGroupName"])
    assert logs and all(r == f"arn:${{AWS::Partition}}:logs:${{AWS::Region}}:${{AWS::AccountId}}:log-group:{group}:*"
                        for _, r in logs)
    assert {a.split(":")[0] for a, _ in grants} == {"s3", "sns", "ecr", "logs"}


def test_gpu_model_endpoint_config_and_endpoint(template):
    res = template["Resources"]
    model = res["GpuModel"]["Properties"]
    assert model["ExecutionRoleArn"] == {"Fn::GetAtt": ["GpuExecutionRole", "Arn"]}
    assert model["PrimaryContainer"]["Image"] == {"Ref": "GpuImageUri"}
    assert model["PrimaryContainer"]["Environment"]["FACEFLOW_GPU_BATCH"] == {"Ref": "GpuBatchSize"}
    assert model["PrimaryContainer"]["Environment"]["FACEFLOW_GPU_WORKERS"] == {"Ref": "GpuMaxConcurrentInvocations"}
    assert model.get("EnableNetworkIsolation") is False  # it reads and writes S3 itself

    config = res["GpuEndpointConfig"]["Properties"]
    assert "DataCaptureConfig" not in config, "data capture would copy media requests and answers"
    variant, = config["ProductionVariants"]
    assert variant["ModelName"] == {"Fn::GetAtt": ["GpuModel", "ModelName"]}
    assert variant["InstanceType"] == {"Ref": "GpuInstanceType"}
    assert template["Parameters"]["GpuInstanceType"]["Default"] == "ml.g5.xlarge"
    assert all(t.startswith("ml.g") for t in template["Parameters"]["GpuInstanceType"]["AllowedValues"])
    async_config = config["AsyncInferenceConfig"]
    assert async_config["ClientConfig"] == {"MaxConcurrentInvocationsPerInstance": {"Ref": "GpuMaxConcurrentInvocations"}}
    output = async_config["OutputConfig"]
    out = bucket_name(template, "OutputBucket")
    assert sub_string(output["S3OutputPath"]) == f"s3://{out}/{GPU_RESPONSES}"
    assert sub_string(output["S3FailurePath"]) == f"s3://{out}/{GPU_FAILURES}"
    notes = output["NotificationConfig"]
    assert notes["SuccessTopic"] == {"Ref": "GpuSuccessTopic"} and notes["ErrorTopic"] == {"Ref": "GpuErrorTopic"}

    endpoint = res["GpuEndpoint"]["Properties"]
    assert endpoint["EndpointConfigName"] == {"Fn::GetAtt": ["GpuEndpointConfig", "EndpointConfigName"]}
    name = sub_string(endpoint["EndpointName"])
    assert name == "${AWS::StackName}-gpu"
    assert sub_string(res["GpuLogGroup"]["Properties"]["LogGroupName"]) == f"/aws/sagemaker/Endpoints/{name}"
    # The results lifecycle rule covers everything the endpoint writes.
    rules = res["OutputBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    assert any(r.get("Prefix") == RESULT_PREFIX and "ExpirationInDays" in r for r in rules)


def test_gpu_matches_the_worker_and_the_submit_side():
    from functions.common import gpu
    from functions.gpu import server
    assert gpu.REQUEST_PREFIX == GPU_REQUESTS
    assert server.Config().port == 8080


def test_gpu_scales_to_zero_and_back(template):
    res = template["Resources"]
    target = res["GpuScalableTarget"]["Properties"]
    assert target["MinCapacity"] == 0 and target["MaxCapacity"] == {"Ref": "GpuMaxInstances"}
    assert target["ServiceNamespace"] == "sagemaker"
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    variant = res["GpuEndpointConfig"]["Properties"]["ProductionVariants"][0]["VariantName"]
    assert sub_string(target["ResourceId"]) == f"endpoint/${{GpuEndpoint.EndpointName}}/variant/{variant}"

    policies = {p["Properties"]["PolicyType"]: (name, p["Properties"])
                for name, p in resources(template, "AWS::ApplicationAutoScaling::ScalingPolicy").items()}
    assert set(policies) == {"TargetTrackingScaling", "StepScaling"}
    _, tracking = policies["TargetTrackingScaling"]
    assert tracking["ScalingTargetId"] == {"Ref": "GpuScalableTarget"}
    metric = tracking["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
    assert (metric["Namespace"], metric["MetricName"]) == ("AWS/SageMaker", "ApproximateBacklogSizePerInstance")
    assert metric["Dimensions"] == [{"Name": "EndpointName", "Value": {"Fn::GetAtt": ["GpuEndpoint", "EndpointName"]}}]
    assert tracking["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == {"Ref": "GpuBacklogPerInstance"}

    step_name, step = policies["StepScaling"]
    assert step["ScalingTargetId"] == {"Ref": "GpuScalableTarget"}
    config = step["StepScalingPolicyConfiguration"]
    assert config["AdjustmentType"] == "ChangeInCapacity"
    assert config["StepAdjustments"] == [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}]
    _, alarm = _only(template, "AWS::CloudWatch::Alarm")
    alarm = alarm["Properties"]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/SageMaker", "HasBacklogWithoutCapacity")
    assert alarm["Dimensions"] == metric["Dimensions"]
    assert alarm["AlarmActions"] == [{"Ref": step_name}]
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold" and alarm["Threshold"] == 1


def test_functions_get_the_endpoint_only_when_it_exists(template):
    env = template["Globals"]["Function"]["Environment"]["Variables"]["FACEFLOW_GPU_ENDPOINT"]
    condition, when_on, when_off = env["Fn::If"]
    assert condition == "GpuEnabled" and when_off == {"Ref": "AWS::NoValue"}
    assert sub_string(when_on) == sub_string(template["Resources"]["GpuEndpoint"]["Properties"]["EndpointName"])
    for name, fn in functions(template).items():
        assert "FACEFLOW_GPU_ENDPOINT" not in fn["Properties"].get("Environment", {}).get("Variables", {}), \
            f"{name}: set FACEFLOW_GPU_ENDPOINT once, in Globals, under GpuEnabled"


def test_functions_may_invoke_only_this_endpoint(template, transformed):
    policy = template["Resources"]["GpuSubmitPolicy"]["Properties"]
    statements = {st["Sid"]: st for st in policy["PolicyDocument"]["Statement"]}
    invoke = statements["InvokeGpuEndpoint"]
    assert as_list(invoke["Action"]) == ["sagemaker:InvokeEndpointAsync"]
    assert invoke["Resource"] == {"Ref": "GpuEndpoint"}
    out = bucket_name(template, "OutputBucket")
    arn = "arn:${AWS::Partition}:s3:::"
    assert [sub_string(r) for r in as_list(statements["WriteGpuRequests"]["Resource"])] == [f"{arn}{out}/{GPU_REQUESTS}*"]
    assert as_list(statements["WriteGpuRequests"]["Action"]) == ["s3:PutObject"]
    assert {sub_string(r) for r in as_list(statements["ReadGpuAnswers"]["Resource"])} == {
        f"{arn}{out}/{GPU_RESPONSES}*", f"{arn}{out}/{GPU_FAILURES}*"}
    # No other sagemaker permission anywhere.
    for where, st in policy_statements(transformed):
        actions = [a for a in as_list(st.get("Action", [])) if isinstance(a, str)]
        for action in actions:
            if action.startswith("sagemaker:"):
                assert action == "sagemaker:InvokeEndpointAsync" and st["Resource"] == {"Ref": "GpuEndpoint"}, where
    # The roles it attaches to are the functions' roles SAM makes.
    roles = resources(transformed, "AWS::IAM::Role")
    attached = [r["Ref"] for r in policy["Roles"]]
    assert attached and all(name in roles for name in attached), (attached, sorted(roles))
    # The functions that route a job (stills, API, a whole video's split) may submit; the
    # chunk and session workers and the result recorder never do.
    assert set(attached) == {"StillsFunctionRole", "ApiFunctionRole", "SplitFunctionRole"}, \
        "every function that may route a job to the GPU needs the submit policy"
