"""The pure halves of agent.aws.botodata: what the lean copies keep and drop."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.aws import botodata as awsdata

KEYS = st.sampled_from(["documentation", "documentationUrl", "shape", "members", "type",
                        "name", "errors", "Documentation", "doc"])
TREES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=5),
    max_leaves=30,
)


def _same_shape(a: Any, b: Any) -> bool:
    """Equal except that documentation strings in ``a`` may be empty in ``b``."""
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all((b[k] == "" if k in awsdata.DOC_KEYS and isinstance(a[k], str)
                         else _same_shape(a[k], b[k])) for k in a))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_shape, a, b))
    return a == b


@given(TREES)
def test_strip_docs_empties_doc_strings_and_keeps_everything_else(tree: Any) -> None:
    before = copy.deepcopy(tree)
    out = awsdata.strip_docs(tree)
    assert tree == before  # input untouched
    assert _same_shape(tree, out)
    assert awsdata.strip_docs(out) == out  # idempotent


def test_strip_docs_keeps_a_member_named_documentation() -> None:
    model = {"documentation": "About the service.",
             "shapes": {"Api": {"type": "structure", "documentation": "An API.",
                                "members": {"documentation": {"shape": "DocList"}}}},
             "clientContextParams": {"Accelerate": {"documentation": "x", "type": "boolean"}}}
    out = awsdata.strip_docs(model)
    assert out["documentation"] == ""
    assert out["shapes"]["Api"]["documentation"] == ""
    assert out["shapes"]["Api"]["members"] == {"documentation": {"shape": "DocList"}}
    # botocore indexes this key unconditionally: it must still be there.
    assert out["clientContextParams"]["Accelerate"] == {"documentation": "", "type": "boolean"}


ENDPOINTS = {
    "version": 3,
    "partitions": [
        {"partition": "aws", "dnsSuffix": "amazonaws.com", "defaults": {"hostname": "h"},
         "regions": {"us-east-1": {}},
         "services": {"s3": {"endpoints": {"us-east-1": {}}}, "ec2": {"endpoints": {}},
                      "lambda": {"endpoints": {}}, "sts": {"endpoints": {}}}},
        {"partition": "aws-cn", "dnsSuffix": "amazonaws.com.cn", "regions": {},
         "services": {"s3": {"endpoints": {"cn-north-1": {}}}, "iot": {}}},
        {"partition": "aws-empty", "regions": {}},
    ],
}


def test_trim_endpoints_keeps_partitions_and_the_named_services_only() -> None:
    before = copy.deepcopy(ENDPOINTS)
    out = awsdata.trim_endpoints(ENDPOINTS, ["s3", "sts"])
    assert before == ENDPOINTS
    assert out["version"] == 3
    assert [p["partition"] for p in out["partitions"]] == ["aws", "aws-cn", "aws-empty"]
    aws, cn, empty = out["partitions"]
    assert aws["services"] == {"s3": {"endpoints": {"us-east-1": {}}}, "sts": {"endpoints": {}}}
    assert cn["services"] == {"s3": {"endpoints": {"cn-north-1": {}}}}
    assert empty["services"] == {}
    for p_in, p_out in zip(ENDPOINTS["partitions"], out["partitions"], strict=True):
        assert {k: v for k, v in p_in.items() if k != "services"} == \
               {k: v for k, v in p_out.items() if k != "services"}


def test_marker_ok() -> None:
    good = {"format": awsdata.FORMAT, "botocore": "1.2.3", "agent": "abc",
            "services": list(awsdata.SERVICES)}
    svcs = awsdata.SERVICES
    assert awsdata.marker_ok(good, "1.2.3", "abc", svcs)
    assert not awsdata.marker_ok(good, "1.2.4", "abc", svcs)  # botocore upgraded
    assert not awsdata.marker_ok(good, "1.2.3", "abd", svcs)  # agent upgraded: new calls?
    assert not awsdata.marker_ok({**good, "format": awsdata.FORMAT - 1}, "1.2.3", "abc", svcs)
    assert not awsdata.marker_ok({**good, "services": ["s3"]}, "1.2.3", "abc", svcs)
    assert not awsdata.marker_ok(None, "1.2.3", "abc", svcs)
    assert not awsdata.marker_ok([], "1.2.3", "abc", svcs)


def test_a_call_outside_the_list_is_refused_and_one_inside_goes_through(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The explicit list is checked: the agent's clients refuse an unlisted operation."""
    from botocore.exceptions import EndpointConnectionError

    from agent.aws import session as aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens
    c = aws.client("s3", "us-east-1", connect_timeout=0.2, max_attempts=1)
    with pytest.raises(EndpointConnectionError):
        c.head_bucket(Bucket="b")  # listed: it went as far as the network
    with pytest.raises(aws.UnlistedOperation, match="s3.ListBuckets"):
        c.list_buckets()  # not listed: refused before any request
    sm = aws.client("secretsmanager", "us-east-1", connect_timeout=0.2, max_attempts=1)
    with pytest.raises(aws.UnlistedOperation, match="secretsmanager.ListSecrets"):
        sm.list_secrets()


def test_every_listed_operation_exists_in_botocore() -> None:
    """No typo in the list: each name is an operation of its service's model."""
    import botocore.session

    sess = botocore.session.get_session()
    for svc, ops in awsdata.OPERATIONS.items():
        model = sess.get_service_model(svc)
        assert ops <= set(model.operation_names), (svc, ops - set(model.operation_names))
    assert set(awsdata.OPERATIONS) == set(awsdata.SERVICES)


MODEL = {
    "metadata": {"protocol": "rest-xml"},
    "operations": {
        "GetThing": {"input": {"shape": "GetIn"}, "output": {"shape": "GetOut"},
                     "errors": [{"shape": "NoSuchThing"}]},
        "PutThing": {"input": {"shape": "PutIn"}},
        "Ping": {},
    },
    "shapes": {
        "GetIn": {"type": "structure", "members": {"Name": {"shape": "Str"}}},
        "GetOut": {"type": "structure", "members": {"Tags": {"shape": "TagMap"},
                                                    "Parts": {"shape": "PartList"}}},
        "TagMap": {"type": "map", "key": {"shape": "Str"}, "value": {"shape": "TagValue"}},
        "TagValue": {"type": "string"},
        "PartList": {"type": "list", "member": {"shape": "Part"}},
        "Part": {"type": "structure", "members": {"Next": {"shape": "Part"}}},  # recursive
        "NoSuchThing": {"type": "structure", "members": {}, "exception": True},
        "PutIn": {"type": "structure", "members": {"Body": {"shape": "Blob"}}},
        "Blob": {"type": "blob"},
        "Str": {"type": "string"},
        "Orphan": {"type": "string"},
    },
}


def test_keep_operations_keeps_what_the_kept_operations_reach() -> None:
    before = copy.deepcopy(MODEL)
    out = awsdata.keep_operations(MODEL, ["GetThing", "Ping", "NotAnOperation"])
    assert before == MODEL
    assert set(out["operations"]) == {"GetThing", "Ping"}
    assert out["operations"]["GetThing"] == MODEL["operations"]["GetThing"]
    assert set(out["shapes"]) == {"GetIn", "GetOut", "TagMap", "TagValue", "PartList", "Part",
                                  "NoSuchThing", "Str"}
    assert all(out["shapes"][k] == MODEL["shapes"][k] for k in out["shapes"])
    assert out["metadata"] == MODEL["metadata"]
    everything = awsdata.keep_operations(MODEL, MODEL["operations"])
    assert set(everything["shapes"]) == set(MODEL["shapes"]) - {"Orphan"}
