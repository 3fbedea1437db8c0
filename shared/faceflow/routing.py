"""Where a job runs: the Lambda functions or the GPU endpoint, decided by a rule table.

The rules are data (`layers/routing.json`, or the file named by FACEFLOW_ROUTING_FILE), read
and checked once. Each rule names the facts it matches and the target it sends a job to; the
rules are tried in order and the first match wins; the table's `default` takes whatever no
rule matched.

    {
      "version": 1,
      "rules": [
        {"name": "private-stays-on-lambda", "when": {"sensitivity": ["private"]}, "target": "lambda",
         "description": "private media never leaves the functions"},
        {"name": "long-video-on-gpu", "when": {"media": ["video"], "duration_s": {"gte": 300}},
         "target": "gpu"}
      ],
      "default": {"target": "lambda", "description": "everything else"}
    }

    from faceflow.routing import route
    decision = route({"operation": "anonymize", "media": "video", "duration_s": 900,
                      "height": 1080, "size_bytes": 2_000_000_000, "sensitivity": "private"})
    decision.target, decision.rule_name, decision.reason

Conditions (every condition of a rule must hold; a rule with no condition matches anything):

| condition | job fact | form |
|---|---|---|
| `operation` | anonymize, analyze or swap | list of values |
| `media` | image or video | list of values |
| `sensitivity` | public, standard (unset) or private: the S3 object tag `faceflow-sensitivity` or the API field | list of values |
| `priority` | low, normal (unset) or high | list of values |
| `duration_s` | seconds (0 for a photo) | range: `{"gt"/"gte": low, "lt"/"lte": high}` |
| `width`, `height`, `pixels` | frame size (pixels = width x height) | range |
| `size_bytes` | the input object's size | range |

A `private` job never goes to the GPU endpoint, whatever the rules say: a rule that would send
it there decides `lambda` instead, and the reason says so.
A range condition on a fact the job does not know (a video not yet probed) does not match:
order the rules so that one on a known fact (size_bytes) catches such jobs. A sensitivity
value that is none of the known ones is treated as `private` (a typo must not send private
media to a wider place); the decision's reason says so.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import media

TARGETS = ("lambda", "gpu")
OPERATIONS = media.OPERATIONS
MEDIA = ("image", "video")
SENSITIVITIES = ("public", "standard", "private")
PRIORITIES = ("low", "normal", "high")
SENSITIVITY_TAG = "faceflow-sensitivity"   # S3 object tag key (value: one of SENSITIVITIES)
PRIORITY_TAG = "faceflow-priority"         # S3 object tag key (value: one of PRIORITIES)
# The HTTP API's sensitivity words that differ from routing's ("normal" is "standard").
API_SENSITIVITY = {"normal": "standard"}

CHOICE_CONDITIONS = {"operation": OPERATIONS, "media": MEDIA, "sensitivity": SENSITIVITIES,
                     "priority": PRIORITIES}
RANGE_CONDITIONS = ("duration_s", "width", "height", "pixels", "size_bytes")
RANGE_OPERATORS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

ENV_FILE = "FACEFLOW_ROUTING_FILE"
# Where the shipped table is looked for when FACEFLOW_ROUTING_FILE is unset: the checkout's
# layers/ folder, then beside the package and the model folder (where an image copies it).
_HERE = Path(__file__).resolve().parent
DEFAULT_LOCATIONS = (_HERE.parents[1] / "layers" / "routing.json", _HERE / "routing.json",
                     Path("/opt/faceflow/routing.json"))


class RoutingError(ValueError):
    """The rule table (or a job's facts) is not valid; the message says where and why."""


# --- job facts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobFacts:
    """What the rules look at. Unknown numbers are None (and match no range condition)."""
    operation: str
    media: str | None = None
    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    pixels: int | None = None
    size_bytes: int | None = None
    priority: str = "normal"
    sensitivity: str = "standard"
    notes: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "JobFacts":
        """Facts from a plain dict (an API body, an S3 event's findings). Strings are
        normalised (case, spaces); `name` (a file name) gives `media` when it is absent;
        `pixels` defaults to width x height; `tags` (an S3 TagSet) gives `sensitivity`."""
        if isinstance(raw, JobFacts):
            return raw
        if not isinstance(raw, Mapping):
            raise RoutingError(f"job facts must be a mapping, not {type(raw).__name__}")
        known = {f.name for f in fields(cls)} - {"notes"} | {"name", "tags"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RoutingError(f"unknown job facts {unknown}; known: {sorted(known)}")
        notes: list[str] = []
        operation = _choice(raw.get("operation"), "operation", OPERATIONS, required=True)
        media = raw.get("media")
        if media is None and raw.get("name"):
            media = media_for(str(raw["name"]))
        media = _choice(media, "media", MEDIA) if media is not None else None
        priority = _choice(raw.get("priority") or "normal", "priority", PRIORITIES)
        sensitivity = raw.get("sensitivity")
        if sensitivity is None and raw.get("tags") is not None:
            sensitivity = sensitivity_from_tags(raw["tags"])
        sensitivity, note = normalise_sensitivity(sensitivity)
        if note:
            notes.append(note)
        numbers = {name: _number(raw.get(name), name) for name in RANGE_CONDITIONS}
        if numbers["pixels"] is None and numbers["width"] is not None and numbers["height"] is not None:
            numbers["pixels"] = numbers["width"] * numbers["height"]
        if media == "image" and numbers["duration_s"] is None:
            numbers["duration_s"] = 0
        return cls(operation=operation, media=media, priority=priority, sensitivity=sensitivity,
                   notes=tuple(notes), **numbers)

    def value(self, name: str):
        return getattr(self, name)


media_for = media.kind_of


def video_facts(size_bytes: int, info: Any = None, tags: Mapping[str, str] | None = None,
                job: Mapping[str, Any] | None = None, operation: str = "anonymize") -> dict[str, Any]:
    """The facts an uploaded video is routed on: its size, its probe (`info`: duration, width
    and height, as faceflow.video.probe gives them; None when it could not be read), and
    sensitivity and priority from the object's tags (keys lowercased) or its job record.

    Sensitivity: `private` from either the tag or the job record wins (a value that is none
    of SENSITIVITIES counts as private: normalise_sensitivity), else the first one given; the
    API's words are routing's (API_SENSITIVITY). Priority: the first of the tag and the record
    that is one of PRIORITIES (another value is ignored). `operation`: what the upload asks
    for (its prefix)."""
    facts: dict[str, Any] = {"operation": operation, "media": "video", "size_bytes": size_bytes}
    if info is not None:
        facts.update(duration_s=max(0.0, float(info.duration or 0.0)) or None,
                     width=int(info.width) or None, height=int(info.height) or None)
    tags, job = tags or {}, job or {}
    given = [v for v in (tags.get(SENSITIVITY_TAG), job.get("sensitivity")) if v not in (None, "")]
    given = [API_SENSITIVITY.get(str(v).strip().lower(), v) for v in given]
    if given:
        said = [normalise_sensitivity(v)[0] for v in given]
        facts["sensitivity"] = "private" if "private" in said else given[0]
    for priority in (tags.get(PRIORITY_TAG), job.get("priority")):
        if priority and str(priority).strip().lower() in PRIORITIES:
            facts["priority"] = str(priority).strip().lower()
            break
    return facts


def sensitivity_from_tags(tags: Iterable[Mapping[str, str]] | Mapping[str, str] | None) -> str | None:
    """The `faceflow-sensitivity` value from an S3 TagSet ([{"Key", "Value"}]) or a dict."""
    if not tags:
        return None
    if isinstance(tags, Mapping):
        pairs = tags.items()
    else:
        pairs = ((t.get("Key"), t.get("Value")) for t in tags)
    for key, value in pairs:
        if isinstance(key, str) and key.strip().lower() == SENSITIVITY_TAG:
            return value
    return None


def normalise_sensitivity(value: Any) -> tuple[str, str | None]:
    """(sensitivity, note): unset is "standard"; an unknown value fails closed to "private"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "standard", None
    text = str(value).strip().lower()
    if text in SENSITIVITIES:
        return text, None
    return "private", (f"sensitivity {str(value)[:40]!r} is not one of {', '.join(SENSITIVITIES)}: "
                       f"treated as private")


def _choice(value: Any, name: str, allowed: tuple[str, ...], required: bool = False) -> str:
    if value is None:
        if required:
            raise RoutingError(f"job facts: {name} is required (one of {', '.join(allowed)})")
        return allowed[0]
    text = str(value).strip().lower()
    if text not in allowed:
        raise RoutingError(f"job facts: {name} {value!r} is not one of {', '.join(allowed)}")
    return text


def _number(value: Any, name: str) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RoutingError(f"job facts: {name} must be a non-negative number, not {value!r}")
    return value


# --- rules -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    target: str        # "lambda" or "gpu"
    rule_name: str     # the rule that matched, or "default"
    reason: str        # what matched, in words (for logs and the job record)


@dataclass(frozen=True)
class Rule:
    name: str
    target: str
    description: str
    choices: tuple[tuple[str, frozenset[str]], ...]
    ranges: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]

    def match(self, facts: JobFacts) -> list[str] | None:
        """What matched, as phrases; None when the rule does not match."""
        said = []
        for name, allowed in self.choices:
            value = facts.value(name)
            if value not in allowed:
                return None
            said.append(f"{name}={value}")
        for name, bounds in self.ranges:
            value = facts.value(name)
            if value is None:
                return None
            for op, limit in bounds:
                if not _compare(value, op, limit):
                    return None
            said.append(" and ".join(f"{name}={_fmt(value)} {RANGE_OPERATORS[op]} {_fmt(limit)}"
                                     for op, limit in bounds))
        return said


def _compare(value: float, op: str, limit: float) -> bool:
    return {"gt": value > limit, "gte": value >= limit, "lt": value < limit, "lte": value <= limit}[op]


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


@dataclass(frozen=True)
class RoutingTable:
    rules: tuple[Rule, ...]
    default_target: str
    default_description: str
    source: str = "<rules>"

    def route(self, job_facts: JobFacts | Mapping[str, Any], gpu_available: bool = True) -> Decision:
        """The first rule that matches decides. With `gpu_available` False (no endpoint
        configured), a "gpu" decision becomes "lambda" and the reason says why."""
        facts = JobFacts.from_dict(job_facts)
        for rule in self.rules:
            matched = rule.match(facts)
            if matched is not None:
                why = rule.description + (f" ({', '.join(matched)})" if matched else "")
                return self._decide(rule.target, rule.name, why, facts, gpu_available)
        return self._decide(self.default_target, "default", self.default_description, facts, gpu_available)

    @staticmethod
    def _decide(target: str, name: str, why: str, facts: JobFacts, gpu_available: bool) -> Decision:
        notes = list(facts.notes)
        if target == "gpu" and facts.sensitivity == "private":
            # not left to the table: a rule added above the private one must not leak private media
            target = "lambda"
            notes.append("private media never goes to the GPU endpoint, so it runs on Lambda")
        elif target == "gpu" and not gpu_available:
            target = "lambda"
            notes.append("no GPU endpoint is configured, so it runs on Lambda")
        return Decision(target, name, "; ".join([why, *notes]))


def parse_rules(data: Any, source: str = "<rules>") -> RoutingTable:
    """A RoutingTable from the decoded JSON, or RoutingError naming the first problem."""
    def fail(where: str, message: str):
        raise RoutingError(f"{source}: {where}: {message}")

    if not isinstance(data, dict):
        fail("top level", f"must be an object with rules and default, not {type(data).__name__}")
    unknown = sorted(set(data) - {"version", "description", "rules", "default"})
    if unknown:
        fail("top level", f"unknown keys {unknown} (known: version, description, rules, default)")
    if data.get("version") != 1:
        fail("version", f"must be 1, not {data.get('version')!r}")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list):
        fail("rules", "must be a list of rules")
    rules: list[Rule] = []
    catch_all: str | None = None
    for index, raw in enumerate(raw_rules, start=1):
        where = f"rule {index}"
        if not isinstance(raw, dict):
            fail(where, "must be an object")
        name = raw.get("name")
        if isinstance(name, str):
            where = f"rule {index} ({name!r})"
        unknown = sorted(set(raw) - {"name", "description", "when", "target"})
        if unknown:
            fail(where, f"unknown keys {unknown} (known: name, description, when, target)")
        if not isinstance(name, str) or not _NAME.match(name):
            fail(where, "name must be lowercase letters, digits, '-' or '_' (at most 64)")
        if any(r.name == name for r in rules):
            fail(where, "the name is used by an earlier rule")
        if catch_all is not None:
            fail(where, f"unreachable: rule {catch_all!r} before it has no conditions and matches every job")
        target = raw.get("target")
        if target not in TARGETS:
            fail(where, f"target must be one of {', '.join(TARGETS)}, not {target!r}")
        description = raw.get("description", name)
        if not isinstance(description, str) or not description.strip():
            fail(where, "description must be a non-empty string")
        when = raw.get("when", {})
        if not isinstance(when, dict):
            fail(where, "when must be an object of conditions")
        choices, ranges = [], []
        for cond, value in when.items():
            if cond in CHOICE_CONDITIONS:
                choices.append((cond, _parse_choice(value, cond, CHOICE_CONDITIONS[cond],
                                                    lambda m: fail(where, m))))
            elif cond in RANGE_CONDITIONS:
                ranges.append((cond, _parse_range(value, cond, lambda m: fail(where, m))))
            else:
                fail(where, f"unknown condition {cond!r} (known: "
                            f"{', '.join([*CHOICE_CONDITIONS, *RANGE_CONDITIONS])})")
        if not when:
            catch_all = name
        rules.append(Rule(name, target, description.strip(), tuple(choices), tuple(ranges)))
    default = data.get("default")
    if not isinstance(default, dict):
        fail("default", 'required: {"target": "lambda" | "gpu", "description": ...}')
    unknown = sorted(set(default) - {"target", "description"})
    if unknown:
        fail("default", f"unknown keys {unknown} (known: target, description)")
    if default.get("target") not in TARGETS:
        fail("default", f"target must be one of {', '.join(TARGETS)}, not {default.get('target')!r}")
    description = default.get("description", "no rule matched")
    if not isinstance(description, str) or not description.strip():
        fail("default", "description must be a non-empty string")
    return RoutingTable(tuple(rules), default["target"], description.strip(), source)


def _parse_choice(value: Any, cond: str, allowed: tuple[str, ...], fail) -> frozenset[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        fail(f"{cond} must be a value or a non-empty list of values from {', '.join(allowed)}")
    bad = [v for v in values if v not in allowed]
    if bad:
        fail(f"{cond}: {bad} not among {', '.join(allowed)}")
    return frozenset(values)


def _parse_range(value: Any, cond: str, fail) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, dict) or not value:
        fail(f'{cond} must be a range such as {{"gte": 300}} or {{"gt": 0, "lte": 60}}')
    bad = sorted(set(value) - set(RANGE_OPERATORS))
    if bad:
        fail(f"{cond}: unknown operators {bad} (known: {', '.join(RANGE_OPERATORS)})")
    if "gt" in value and "gte" in value or "lt" in value and "lte" in value:
        fail(f"{cond}: give one lower bound (gt or gte) and one upper bound (lt or lte) at most")
    for op, limit in value.items():
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit < 0:
            fail(f"{cond}.{op} must be a non-negative number, not {limit!r}")
    low = value.get("gt", value.get("gte"))
    high = value.get("lt", value.get("lte"))
    if low is not None and high is not None:
        empty = low > high or (low == high and ("gt" in value or "lt" in value))
        if empty:
            fail(f"{cond}: no value can be {' and '.join(f'{RANGE_OPERATORS[o]} {_fmt(v)}' for o, v in value.items())}")
    order = ("gt", "gte", "lt", "lte")
    return tuple((op, value[op]) for op in order if op in value)


def load_rules(path: Path | str | None = None) -> RoutingTable:
    """The table at `path`, else FACEFLOW_ROUTING_FILE, else the shipped layers/routing.json."""
    path = Path(path) if path else default_rules_path()
    try:
        text = path.read_text()
    except OSError as exc:
        raise RoutingError(f"cannot read routing rules {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RoutingError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return parse_rules(data, str(path))


def default_rules_path() -> Path:
    env = os.environ.get(ENV_FILE)
    if env:
        return Path(env)
    for candidate in DEFAULT_LOCATIONS:
        if candidate.is_file():
            return candidate
    raise RoutingError(f"no routing rules: set {ENV_FILE} or ship one of "
                       f"{', '.join(str(p) for p in DEFAULT_LOCATIONS)}")


@lru_cache(maxsize=4)
def _cached(path: str) -> RoutingTable:
    return load_rules(path)


def default_table() -> RoutingTable:
    """The table in force (loaded once per path; a bad file fails at the first call)."""
    return _cached(str(default_rules_path()))


def route(job_facts: JobFacts | Mapping[str, Any], gpu_available: bool = True) -> Decision:
    """Decide with the table in force: see RoutingTable.route."""
    return default_table().route(job_facts, gpu_available=gpu_available)
