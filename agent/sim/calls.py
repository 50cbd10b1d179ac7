"""The fault layer: every call an agent makes (S3, EC2, Auto Scaling, peer probes) goes through it.

Per call, from the seed and the profile: partitions (store, zone, API outage), errors,
latency, stalls, a write applied but its response lost, an EC2 that describes instances
wrongly; and each mutating cloud call is judged (``agent.sim.invariants``) against the
ground truth as it was when the call was sent.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from greenlet import greenlet

from agent.heal.controller import PROBE_TIMEOUT_S
from agent.layout import member_key
from agent.sim.twins import ClientProxy, CloudTwin, S3Twin
from agent.sim.vtime import Scheduler
from agent.sim.world import BUCKET, GROUP, MUTATING, S3_WRITES, Host, Killed, Let


class CallFaults(Scheduler):
    """The per-call fault layer (a mixin of ``Simulation``)."""

    def _caller(self) -> Let:
        g = greenlet.getcurrent()
        if g is self.hub:
            raise RuntimeError("agent call outside an agent greenlet")
        if g.gen != g.host.gen:  # type: ignore[attr-defined]
            raise Killed()  # a process that is gone calls nothing: it is only unwinding
        return g  # type: ignore[return-value]

    def store_for(self, h: Host) -> Any:
        from agent.aws.store import Store

        return Store(BUCKET, "", client=ClientProxy(self._s3_call, S3Twin.OPS))

    def _s3_call(self, op: str, kw: dict[str, Any]) -> dict[str, Any]:
        g = self._caller()
        h = g.host
        p = self.profile
        r = self.rng
        self.res.calls += 1
        if not self.store_reachable(h):
            self.park(2.0)
            raise EndpointConnectionError(endpoint_url="https://s3.sim")
        if p.store_error and r.random() < p.store_error:
            self._fault("store-error")
            self.park(0.05)
            code = "SlowDown" if r.random() < 0.5 else "InternalError"
            raise ClientError({"Error": {"Code": code, "Message": "injected"},
                               "ResponseMetadata": {"HTTPStatusCode": 503 if code == "SlowDown"
                                                    else 500}}, op)
        if p.store_latency and r.random() < p.store_latency:
            self._fault("store-latency")
            self.park(r.uniform(0.1, 3.0))
        if p.call_stall and g.role == "main" and r.random() < p.call_stall:
            self._fault("call-stall")
            stall = r.uniform(20.0, 120.0)
            h.stalls.append((self.t, self.t + stall))
            self.park(stall)
        if g.gen != h.gen:
            raise Killed()
        resp = self.s3.call(op, kw)
        if op == "put_object":
            if h.beat_landed is None and g.role == "beat" and kw["Key"] == member_key(GROUP,
                                                                                      h.iid):
                h.beat_landed = self.t
            if self.keep_timeline:
                self._note_write(h, kw)
            if "/leases/" in kw["Key"]:
                self._on_lease_write(h, kw["Key"], kw["Body"])
        if p.lost_response and op in S3_WRITES and r.random() < p.lost_response:
            self._fault("lost-response")
            self.park(1.0)
            raise ReadTimeoutError(endpoint_url="https://s3.sim")
        return resp

    def _note_write(self, h: Host, kw: dict[str, Any]) -> None:
        key: str = kw["Key"]
        if "/suspicions/" in key:
            member, observer = key.rsplit("/", 2)[-2:]
            self.note("suspicion", member, f"by {observer}")
        elif "/leases/" in key:
            try:
                state = json.loads(kw["Body"]).get("state", "?")
            except (ValueError, AttributeError):
                state = "?"
            self.note("lease", key.rsplit("/", 1)[-1], f"{state} by {h.iid}")

    def cloud_for(self, h: Host) -> Any:
        from agent.aws.cloud import Cloud

        return Cloud("us-east-1", ec2=ClientProxy(self._cloud_call, CloudTwin.EC2_OPS),
                     autoscaling=ClientProxy(self._cloud_call, CloudTwin.ASG_OPS))

    def _cloud_call(self, op: str, kw: dict[str, Any]) -> dict[str, Any]:
        g = self._caller()
        h = g.host
        p = self.profile
        r = self.rng
        self.res.calls += 1
        if self.t < self.api_down_until or self.t < self.zone_dark_until.get(h.zone, 0.0):
            self.park(2.0)
            raise EndpointConnectionError(endpoint_url="https://ec2.sim")
        if p.cloud_error and r.random() < p.cloud_error:
            self._fault("cloud-error")
            self.park(0.1)
            code = r.choice(("Throttling", "RequestLimitExceeded", "InternalError"))
            raise ClientError({"Error": {"Code": code, "Message": "injected"},
                               "ResponseMetadata": {"HTTPStatusCode": 400}}, op)
        # Ground truth as it was when the call was sent, i.e. right after the actor's fence
        # (docs/safety.md 12): an action-stall below holds the request in transit, past the
        # last point where any client can check anything. EC2 has no conditional terminate
        # (no fencing token), so a member that comes back while the request is in flight is
        # beyond the controller's reach; false-action judges the state the actor sent into.
        sent_t = self.t
        sent = ({k: x.unable_since for k, x in self.hosts.items()} if op in MUTATING
                else {})
        sent_ec2 = ({k: x.state for k, x in self.cloud.instances.items()}
                    if op in MUTATING else {})
        if op in MUTATING and p.action_stall and r.random() < p.action_stall:
            self._fault("action-stall")
            self.park(r.uniform(20.0, 120.0))
        if g.gen != h.gen:
            raise Killed()
        ids = kw.get("InstanceIds") or []
        lost = (self.lost.intersection(ids) if op == "describe_instances"
                and self.t < self.lost_until else set())
        for m in lost:
            self.lost_looks[(h.iid, m)] = (self.t, self.lost_since)
        if op == "describe_instances" and (
                lost or (p.wrong_describe and r.random() < p.wrong_describe)):
            self._fault("wrong-describe")
            raise ClientError({"Error": {"Code": "InvalidInstanceID.NotFound",
                                         "Message": f"The instance ID '{','.join(ids)}' "
                                                    "does not exist"},
                               "ResponseMetadata": {"HTTPStatusCode": 400}}, op)
        if op not in MUTATING:
            return self.cloud.call(op, kw)
        # ...and before its own effects (a terminate kills the target's agent inside the
        # call). A target that came back while the call was in transit is noted, not judged.
        landed = {k: x.unable_since for k, x in self.hosts.items()}
        for k, u in sent.items():
            if u is not None and landed.get(k) is None:
                self.note("landed-late", k, f"{op} by {h.iid}: sent while it was unable, "
                          "landed after it came back")
        resp = self.cloud.call(op, kw)
        self._on_action(h, op, kw, sent, sent_t, sent_ec2)
        if p.action_lost and r.random() < p.action_lost:
            self._fault("action-lost")  # it happened; the caller cannot tell
            self.park(10.0)  # the client's read timeout
            raise ReadTimeoutError(endpoint_url="https://ec2.sim")
        return resp

    def probe(self, endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool | None:
        """The real controller's probe seam: does the member's agent answer over the network?
        An answer takes 0.01 s; silence, the whole timeout. A network cut is judged when the
        probe is sent (its packets are lost); a stopped agent answers if resumed in time
        (reported at the timeout's end, not the moment it resumed), even if it went down
        again before that end (stalls seed 6003, N = 14: resumed 1.2 s into the fence's
        probe, crashed 0.8 s later; judged at the end, the probe went unanswered and the
        member, alive 0.4 s before the terminate, was terminated)."""
        g = self._caller()
        src = g.host
        ip = endpoint.split("//", 1)[-1].split(":", 1)[0] if endpoint else ""
        dst = self.by_ip.get(ip)
        if dst is None:
            return None
        reach = (self.t >= dst.peer_cut_until and self.t >= src.peer_cut_until
                 and self.t >= self.zone_dark_until.get(dst.zone, 0.0)
                 and self.t >= self.zone_dark_until.get(src.zone, 0.0))
        inst = self.cloud.instances.get(dst.iid)
        reach = reach and inst is not None and inst.state == "running"
        if reach and dst.proc == "up":
            self.park(0.01)
            return True
        held = reach and dst.proc == "stopped"
        sent = self.t
        self.park(timeout_s)
        # A stopped agent's kernel still takes the connection; it answers once resumed.
        return (held and sent <= dst.resumed_at <= self.t
                and dst.resumed_at >= self.zone_dark_until.get(dst.zone, 0.0))
