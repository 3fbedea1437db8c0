"""The routing rules as data: faceflow.routing's matching and validation on small tables, and
the decisions of the shipped table (layers/routing.json)."""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest

from faceflow import routing
from faceflow.routing import Decision, JobFacts, RoutingError, load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "layers" / "routing.json"
GIB = 1024 ** 3


def table(*rules, default="lambda"):
    return parse_rules({"version": 1, "rules": list(rules),
                        "default": {"target": default, "description": "fallback"}})


# --- matching on a small table -------------------------------------------------------------

SMALL = table(
    {"name": "private", "when": {"sensitivity": ["private"]}, "target": "lambda", "description": "private"},
    {"name": "swap", "when": {"operation": "swap"}, "target": "gpu", "description": "swap"},
    {"name": "long", "when": {"media": ["video"], "duration_s": {"gt": 60}}, "target": "gpu", "description": "long"},
    {"name": "mid-4k", "when": {"height": {"gte": 2160}, "duration_s": {"gt": 10, "lte": 60}},
     "target": "gpu", "description": "4k"},
    {"name": "urgent", "when": {"priority": ["high"]}, "target": "lambda", "description": "urgent"},
    {"name": "big", "when": {"size_bytes": {"gte": 100}}, "target": "gpu", "description": "big"},
)

SMALL_CASES = [
    # (facts, target, rule)
    ({"operation": "anonymize", "media": "video", "duration_s": 61}, "gpu", "long"),
    ({"operation": "anonymize", "media": "video", "duration_s": 60}, "lambda", "default"),     # gt is strict
    ({"operation": "anonymize", "media": "image", "duration_s": 61}, "lambda", "default"),    # media differs
    ({"operation": "swap", "media": "image"}, "gpu", "swap"),
    ({"operation": "swap", "media": "image", "sensitivity": "private"}, "lambda", "private"),  # first wins
    ({"operation": "analyze", "media": "video", "duration_s": 61, "sensitivity": "PRIVATE "}, "lambda", "private"),
    ({"operation": "analyze", "media": "video", "height": 2160, "duration_s": 60}, "gpu", "mid-4k"),  # lte
    ({"operation": "analyze", "media": "video", "height": 2160, "duration_s": 10}, "lambda", "default"),
    ({"operation": "analyze", "media": "video", "height": 2159, "duration_s": 30}, "lambda", "default"),
    ({"operation": "analyze", "media": "video", "height": 2160}, "lambda", "default"),  # duration unknown
    ({"operation": "analyze", "media": "video", "priority": "high", "size_bytes": 500}, "lambda", "urgent"),
    ({"operation": "analyze", "media": "video", "size_bytes": 100}, "gpu", "big"),
    ({"operation": "analyze", "media": "video", "size_bytes": 99}, "lambda", "default"),
    ({"operation": "analyze"}, "lambda", "default"),
]


@pytest.mark.parametrize("facts,target,rule", SMALL_CASES)
def test_first_matching_rule_decides(facts, target, rule):
    decision = SMALL.route(facts)
    assert (decision.target, decision.rule_name) == (target, rule), decision
    assert isinstance(decision, Decision) and decision.reason


def test_reason_names_what_matched():
    decision = SMALL.route({"operation": "anonymize", "media": "video", "duration_s": 75.5})
    assert decision.reason == "long (media=video, duration_s=75.5 > 60)"
    assert SMALL.route({"operation": "analyze"}).reason == "fallback"


def test_unknown_sensitivity_fails_closed_to_private():
    decision = SMALL.route({"operation": "swap", "sensitivity": "secret"})
    assert (decision.target, decision.rule_name) == ("lambda", "private")
    assert "'secret'" in decision.reason and "treated as private" in decision.reason


@pytest.mark.parametrize("tags,expected", [
    ([{"Key": "faceflow-sensitivity", "Value": "private"}], "private"),
    ([{"Key": "other", "Value": "x"}, {"Key": "Faceflow-Sensitivity", "Value": "Public"}], "public"),
    ({"faceflow-sensitivity": "private"}, "private"),
    ([], "standard"),
    (None, "standard"),
    ([{"Key": "faceflow-sensitivity", "Value": "top-secret"}], "private"),
])
def test_sensitivity_from_an_s3_tag_set(tags, expected):
    assert JobFacts.from_dict({"operation": "anonymize", "tags": tags}).sensitivity == expected


def test_api_field_wins_over_the_tag():
    facts = JobFacts.from_dict({"operation": "anonymize", "sensitivity": "private",
                                "tags": [{"Key": "faceflow-sensitivity", "Value": "public"}]})
    assert facts.sensitivity == "private"


def test_facts_are_derived_and_normalised():
    facts = JobFacts.from_dict({"operation": " Anonymize", "name": "clip.MOV", "width": 1920, "height": 1080})
    assert (facts.operation, facts.media, facts.pixels, facts.priority, facts.sensitivity) == (
        "anonymize", "video", 1920 * 1080, "normal", "standard")
    photo = JobFacts.from_dict({"operation": "analyze", "name": "a.jpeg"})
    assert (photo.media, photo.duration_s) == ("image", 0)
    assert JobFacts.from_dict({"operation": "analyze", "name": "notes.txt"}).media is None


@pytest.mark.parametrize("facts,message", [
    ({}, "operation is required"),
    ({"operation": "blur"}, "operation 'blur' is not one of"),
    ({"operation": "analyze", "duration": 3}, "unknown job facts ['duration']"),
    ({"operation": "analyze", "duration_s": -1}, "duration_s must be a non-negative number"),
    ({"operation": "analyze", "size_bytes": "big"}, "size_bytes must be a non-negative number"),
    ({"operation": "analyze", "priority": "asap"}, "priority 'asap' is not one of"),
    ({"operation": "analyze", "media": "audio"}, "media 'audio' is not one of"),
])
def test_bad_facts_are_refused(facts, message):
    with pytest.raises(RoutingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SMALL.route(facts)


def test_gpu_decision_falls_back_when_no_endpoint_is_configured():
    decision = SMALL.route({"operation": "swap"}, gpu_available=False)
    assert (decision.target, decision.rule_name) == ("lambda", "swap")
    assert "no GPU endpoint" in decision.reason


# --- validation ----------------------------------------------------------------------------

GOOD_RULE = {"name": "ok", "when": {"operation": ["analyze"]}, "target": "gpu"}


def doc(*rules, **top):
    data = {"version": 1, "rules": list(rules), "default": {"target": "lambda", "description": "rest"}}
    data.update(top)
    return data


@pytest.mark.parametrize("data,message", [
    ([], "top level: must be an object"),
    (doc(GOOD_RULE, extra=1), r"top level: unknown keys \['extra'\]"),
    (doc(GOOD_RULE, version=2), "version: must be 1"),
    ({"version": 1, "rules": {}, "default": {"target": "lambda"}}, "rules: must be a list"),
    (doc(GOOD_RULE, default=None), "default: required"),
    (doc(GOOD_RULE, default={"target": "cpu"}), "default: target must be one of lambda, gpu"),
    (doc(GOOD_RULE, default={"target": "gpu", "why": "x"}), r"default: unknown keys \['why'\]"),
    (doc("nope"), "rule 1: must be an object"),
    (doc({**GOOD_RULE, "name": "Bad Name"}), "rule 1 .*name must be lowercase"),
    (doc({**GOOD_RULE, "target": "ec2"}), r"rule 1 \('ok'\): target must be one of lambda, gpu, not 'ec2'"),
    (doc({**GOOD_RULE, "if": {}}), r"rule 1 \('ok'\): unknown keys \['if'\]"),
    (doc({**GOOD_RULE, "description": ""}), "description must be a non-empty string"),
    (doc(GOOD_RULE, {**GOOD_RULE}), r"rule 2 \('ok'\): the name is used by an earlier rule"),
    (doc({**GOOD_RULE, "when": []}), "when must be an object"),
    (doc({**GOOD_RULE, "when": {"durations": {"gt": 1}}}), "unknown condition 'durations'"),
    (doc({**GOOD_RULE, "when": {"operation": ["blur"]}}), r"operation: \['blur'\] not among anonymize, analyze, swap"),
    (doc({**GOOD_RULE, "when": {"operation": []}}), "operation must be a value or a non-empty list"),
    (doc({**GOOD_RULE, "when": {"sensitivity": ["secret"]}}), "sensitivity: .*not among public, standard, private"),
    (doc({**GOOD_RULE, "when": {"duration_s": 60}}), "duration_s must be a range"),
    (doc({**GOOD_RULE, "when": {"duration_s": {"above": 60}}}), r"unknown operators \['above'\]"),
    (doc({**GOOD_RULE, "when": {"duration_s": {"gt": "60"}}}), "duration_s.gt must be a non-negative number"),
    (doc({**GOOD_RULE, "when": {"duration_s": {"gt": True}}}), "duration_s.gt must be a non-negative number"),
    (doc({**GOOD_RULE, "when": {"height": {"gt": 1, "gte": 2}}}), "one lower bound"),
    (doc({**GOOD_RULE, "when": {"height": {"gt": 100, "lt": 50}}}), "height: no value can be > 100 and < 50"),
    (doc({**GOOD_RULE, "when": {"height": {"gte": 50, "lt": 50}}}), "height: no value can be"),
    (doc({"name": "all", "target": "gpu"}, GOOD_RULE), r"rule 2 \('ok'\): unreachable: rule 'all'"),
])
def test_bad_tables_are_refused_with_a_clear_message(data, message):
    with pytest.raises(RoutingError, match=message):
        parse_rules(data, "test.json")
    with pytest.raises(RoutingError, match="^test.json: "):
        parse_rules(data, "test.json")


def test_a_catch_all_rule_may_come_last_and_empty_rules_use_the_default():
    t = parse_rules(doc(GOOD_RULE, {"name": "all", "target": "gpu"}))
    assert t.route({"operation": "anonymize"}).rule_name == "all"
    assert parse_rules(doc()).route({"operation": "swap"}).rule_name == "default"


def test_equal_bounds_with_inclusive_operators_are_allowed():
    t = parse_rules(doc({**GOOD_RULE, "when": {"height": {"gte": 1080, "lte": 1080}}}))
    assert t.route({"operation": "analyze", "height": 1080}).rule_name == "ok"


def test_load_rules_reports_bad_json_and_missing_files(tmp_path, monkeypatch):
    bad = tmp_path / "routing.json"
    bad.write_text('{"version": 1, "rules": [,]}')
    with pytest.raises(RoutingError, match=r"routing.json: not valid JSON: .* line 1 column"):
        load_rules(bad)
    with pytest.raises(RoutingError, match="cannot read routing rules"):
        load_rules(tmp_path / "absent.json")
    monkeypatch.setenv(routing.ENV_FILE, str(tmp_path / "absent.json"))
    with pytest.raises(RoutingError, match="cannot read routing rules"):
        routing.route({"operation": "analyze"})


def test_the_environment_names_the_table_in_force(tmp_path, monkeypatch):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(doc({"name": "everything-gpu", "target": "gpu"})))
    monkeypatch.setenv(routing.ENV_FILE, str(path))
    assert routing.route({"operation": "analyze"}).rule_name == "everything-gpu"
    monkeypatch.delenv(routing.ENV_FILE)
    assert routing.default_rules_path() == SHIPPED


# --- the shipped table ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    return load_rules(SHIPPED)


SHIPPED_CASES = [
    # photos: Lambda, whatever their size and operation; a video swap: the GPU
    ({"operation": "anonymize", "name": "a.jpg", "size_bytes": 4_000_000}, "lambda", "stills-on-lambda"),
    ({"operation": "analyze", "name": "a.png", "width": 8000, "height": 6000}, "lambda", "stills-on-lambda"),
    ({"operation": "swap", "name": "a.jpg"}, "lambda", "stills-on-lambda"),
    ({"operation": "swap", "name": "a.jpg", "size_bytes": 2 * GIB}, "lambda", "stills-on-lambda"),
    ({"operation": "swap", "name": "a.mp4", "duration_s": 5}, "gpu", "video-swap-on-gpu"),
    ({"operation": "swap", "media": "video"}, "gpu", "video-swap-on-gpu"),
    # private: always Lambda, even a swap or a two-hour 4K video
    ({"operation": "swap", "name": "a.jpg", "sensitivity": "private"}, "lambda", "private-stays-on-lambda"),
    ({"operation": "anonymize", "name": "a.mp4", "duration_s": 7200, "height": 2160,
      "size_bytes": 20 * GIB, "tags": [{"Key": "faceflow-sensitivity", "Value": "private"}]},
     "lambda", "private-stays-on-lambda"),
    # video by duration, resolution, priority, size
    ({"operation": "anonymize", "name": "a.mp4", "duration_s": 20, "height": 1080}, "lambda", "default"),
    ({"operation": "anonymize", "name": "a.mp4", "duration_s": 299.9, "height": 1080}, "lambda", "default"),
    ({"operation": "anonymize", "name": "a.mp4", "duration_s": 300, "height": 720}, "gpu", "long-video-on-gpu"),
    ({"operation": "analyze", "name": "a.mov", "duration_s": 45, "height": 2160}, "gpu", "high-resolution-video-on-gpu"),
    ({"operation": "analyze", "name": "a.mov", "duration_s": 10, "height": 2160}, "lambda", "default"),
    ({"operation": "anonymize", "name": "a.mp4", "duration_s": 90, "priority": "low"}, "gpu", "low-priority-video-on-gpu"),
    ({"operation": "anonymize", "name": "a.mp4", "duration_s": 90, "priority": "high"}, "lambda", "default"),
    ({"operation": "anonymize", "name": "a.mp4", "size_bytes": 2 * GIB}, "gpu", "large-file-on-gpu"),
    ({"operation": "anonymize", "name": "a.mp4", "size_bytes": GIB - 1}, "lambda", "default"),
    ({"operation": "anonymize", "name": "a.mp4", "sensitivity": "public", "duration_s": 600}, "gpu", "long-video-on-gpu"),
]


@pytest.mark.parametrize("facts,target,rule", SHIPPED_CASES)
def test_shipped_table_decisions(shipped, facts, target, rule):
    decision = shipped.route(facts)
    assert (decision.target, decision.rule_name) == (target, rule), decision.reason


def test_shipped_table_pins_private_jobs_to_lambda_whatever_else(shipped):
    """Every combination of the other facts: private (tagged, or an unknown tag value) runs on Lambda."""
    for operation, name, duration, height, size, priority, sensitivity in itertools.product(
            routing.OPERATIONS, ["a.jpg", "a.mp4", "blob"], [None, 0, 59, 60, 300, 7200], [None, 720, 2160],
            [None, 10, GIB, 50 * GIB], routing.PRIORITIES, ["private", "Private", "classified"]):
        facts = {"operation": operation, "name": name, "duration_s": duration, "height": height,
                 "size_bytes": size, "priority": priority, "sensitivity": sensitivity}
        decision = shipped.route(facts)
        assert (decision.target, decision.rule_name) == ("lambda", "private-stays-on-lambda"), facts


def test_shipped_table_private_rule_is_first_and_video_swap_is_gpu_unless_private(shipped):
    assert shipped.rules[0].name == "private-stays-on-lambda"
    assert shipped.rules[0].target == "lambda"
    for sensitivity in ("public", "standard", None):
        for duration in (None, 1, 7200):
            facts = {"operation": "swap", "name": "a.mp4", "sensitivity": sensitivity, "duration_s": duration}
            assert shipped.route(facts).target == "gpu"
            assert shipped.route(facts, gpu_available=False).target == "lambda"
        assert shipped.route({"operation": "swap", "name": "a.jpg", "sensitivity": sensitivity}).target == "lambda"
    assert shipped.route({"operation": "swap", "name": "a.mp4", "sensitivity": "private"}).target == "lambda"


@pytest.mark.parametrize("sensitivity", ["private", "Private ", "classified"])
def test_a_private_job_never_goes_to_the_gpu_whatever_the_rules_say(sensitivity):
    """A table whose rules would send private media to the GPU (a rule above the private one,
    a catch-all, a gpu default) still keeps it on Lambda, and the reason says why."""
    careless = table({"name": "swap-gpu", "when": {"operation": ["swap"]}, "target": "gpu", "description": "swaps"},
                     {"name": "private-gpu", "when": {"sensitivity": ["private"]}, "target": "gpu",
                      "description": "private"}, default="gpu")
    for facts in ({"operation": "swap", "media": "video"}, {"operation": "anonymize", "media": "video"},
                  {"operation": "analyze"}):
        decision = careless.route({**facts, "sensitivity": sensitivity})
        assert decision.target == "lambda", decision
        assert "private media never goes to the GPU endpoint" in decision.reason
        assert careless.route(facts).target == "gpu"  # the rules themselves do send it there


def test_shipped_table_is_what_the_module_routes_with(monkeypatch):
    monkeypatch.delenv(routing.ENV_FILE, raising=False)
    assert routing.route({"operation": "swap", "name": "a.mp4"}) == load_rules(SHIPPED).route(
        {"operation": "swap", "name": "a.mp4"})


def test_shipped_table_survives_a_round_trip_and_every_rule_is_reachable(shipped):
    data = json.loads(SHIPPED.read_text())
    assert parse_rules(copy.deepcopy(data)).rules == shipped.rules
    reached = {rule for _, _, rule in SHIPPED_CASES}
    unreached = [r.name for r in shipped.rules if r.name not in reached]
    assert not unreached, f"rules no shipped case reaches: {unreached}"
    assert "default" in reached
