"""The referee: cloud-init's own user-data processing, one JSON case per stdin line.

Run with the system python3 that ships cloud-init (never the venv):
``/usr/bin/python3 tests/referee/cloudinit_referee.py < cases.jsonl``. Each input
line is ``{"raw": base64, "launch_index": int|null, "instance_data": {...}|null}``;
each output line says what cloud-init assembled:

- ``crash``: cloud-init's processing raised (it then takes no user-data at all);
- ``cloud_config``: canon of the cloud-config it would write (None: no part merged),
  after the same YAML dump/load round trip cloud-init does through its file;
- ``agent_parts``: the payloads of ``text/x-ec2-agent`` parts it passed over,
  after the launch-index filter (the agent's own extension);
- ``types``: the content type of every part after processing and filtering;
- ``warnings``: what cloud-init logged at WARNING or above.

Only cloud-init's ``UserDataProcessor``, launch-index ``Filter``,
``CloudConfigPartHandler`` and ``JinjaTemplatePartHandler`` run; ``#include`` URLs
are never fetched (the fetch raises; where that makes cloud-init drop all user-data,
the case is run again with includes that fetch nothing, ``includes_emptied``: the
agent's documented reading) and no part-handler or script runs.
"""

import base64
import json
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from canon import canon  # noqa: E402
from cloudinit import handlers, helpers, safeyaml, url_helper, util  # noqa: E402
from cloudinit import user_data as ud  # noqa: E402
from cloudinit.filters import launch_index  # noqa: E402
from cloudinit.handlers.cloud_config import CloudConfigPartHandler  # noqa: E402
from cloudinit.handlers.jinja_template import JinjaTemplatePartHandler  # noqa: E402
from cloudinit.settings import PER_INSTANCE  # noqa: E402


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        try:
            self.records.append(record.getMessage()[:300])
        except Exception:  # a log record that cannot format itself
            self.records.append(str(record.msg)[:300])


def _no_fetch(url, *args, **kwargs):
    raise url_helper.UrlError(OSError("the referee never fetches"), url=url)


class _Empty:
    contents = b""
    code = 200

    def ok(self, *args, **kwargs):
        return True


def _empty_fetch(url, *args, **kwargs):
    """An include that fetches nothing: what the agent assumes (it never fetches)."""
    return _Empty()


def run_case(case, paths, collect):
    collect.records = []
    raw = base64.b64decode(case["raw"])
    inst = case.get("instance_data")
    inst_file = paths.get_runpath("instance_data_sensitive")
    if inst is None:
        if os.path.exists(inst_file):
            os.unlink(inst_file)
    else:
        with open(inst_file, "w") as f:
            json.dump(inst, f)
    includes = False
    try:
        try:
            ud.read_file_or_url = _no_fetch
            msg = ud.UserDataProcessor(paths).process(raw)
        except Exception as exc:
            if "never fetches" not in str(exc):
                raise
            # An #include whose fetch failed drops everything (ERROR_ON_USER_DATA_FAILURE);
            # the agent never fetches: judge it against includes that fetch nothing.
            includes = True
            ud.read_file_or_url = _empty_fetch
            msg = ud.UserDataProcessor(paths).process(raw)
        msg = launch_index.Filter(util.safe_int(case.get("launch_index"))).apply(msg)
    except Exception as exc:  # cloud-init's processing itself fails: no user-data
        return {"crash": f"{type(exc).__name__}: {exc}", "warnings": collect.records}
    cc = CloudConfigPartHandler(paths)
    jinja = JinjaTemplatePartHandler(paths, sub_handlers=[cc])
    handlers.call_begin(cc, None, PER_INSTANCE)
    agent_parts = []
    types = []

    def callback(_data, filename, payload, headers):
        ctype = headers["Content-Type"]
        types.append(ctype)
        if ctype in ("text/cloud-config", "text/cloud-config-jsonp"):
            handlers.run_part(cc, None, filename, payload, PER_INSTANCE, headers)
        elif ctype == "text/jinja2":
            handlers.run_part(jinja, None, filename, payload, PER_INSTANCE, headers)
        elif ctype == "text/x-ec2-agent":
            if isinstance(payload, bytes):
                payload = payload.decode("utf-8", "surrogateescape")
            agent_parts.append(payload)

    try:
        handlers.walk(msg, callback, {})
    except Exception as exc:
        return {"crash": f"walk: {type(exc).__name__}: {exc}", "warnings": collect.records}
    cloud_config = None
    if cc.file_names and cc.cloud_buf is not None:
        # What cloud-init writes to cloud-config.txt and reads back.
        cloud_config = util.load_yaml(safeyaml.dumps(cc.cloud_buf))
    return {
        "cloud_config": canon(cloud_config) if cloud_config is not None else None,
        "agent_parts": agent_parts,
        "types": types,
        "includes_emptied": includes,
        "warnings": collect.records,
    }


def main():
    collect = _Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    root.setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})
        for line in sys.stdin:
            if not line.strip():
                continue
            out = run_case(json.loads(line), paths, collect)
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
