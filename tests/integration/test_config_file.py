"""One config file, on the real console script against the session broker: file < env < flag, a real route
reading its Kafka settings and its own options from the file, JSON log lines, and no secret in its argv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kafkatools import unique

from connectors.kafka import group_lag
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames

BUCKETER = Path(sys.executable).with_name("bucketer")
SECRET = "tb-token-never-in-argv-41f0"


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")}


def test_file_env_flag_precedence_and_a_route_configured_by_the_file(bootstrap: str, tmp_path: Path) -> None:
    names = TopicNames(unique("cfgfile") + ".")
    group = unique("cfg-router")
    path = tmp_path / "bucketer.toml"
    path.write_text(
        f'[kafka]\n"bootstrap.servers" = "{bootstrap}"\nclient.id = "from-file"\n'
        f'[router]\ngroup = "{group}"\ntopic_prefix = "{names.prefix}"\nbatch_size = 50\nbatch_time = 0.9\n'
        f'until_idle = 2.0\ntinybird_token = "{SECRET}"\n[warehouse]\nbuckets = 3\n'
    )
    env = base_env() | {"BUCKETER_CONFIG": str(path), "BUCKETER_BATCH_TIME": "0.2", "BUCKETER_KAFKA_CLIENT_ID": "env"}
    shown = subprocess.run(
        [str(BUCKETER), "config", "show", "--json", "route", "--batch-size", "20", "-X", "client.id=flag"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert shown.returncode == 0, shown.stderr
    s = json.loads(shown.stdout)["settings"]
    assert s["router.batch_size"] == {"value": 20, "source": "flag"}
    assert s["router.batch_time"] == {"value": 0.2, "source": "env"}
    assert s["router.group"] == {"value": group, "source": "file"}
    assert s["kafka.client.id"] == {"value": "flag", "source": "flag"}
    assert s["kafka.bootstrap.servers"] == {"value": bootstrap, "source": "file"}
    assert SECRET not in shown.stdout

    made = subprocess.run(
        [str(BUCKETER), "loadgen", "--count", "60", "--quiet"], capture_output=True, text=True, timeout=120, env=env
    )
    assert made.returncode == 0, made.stderr
    route = subprocess.Popen(
        [str(BUCKETER), "route", "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    argv = Path(f"/proc/{route.pid}/cmdline").read_bytes().decode(errors="replace")
    out, err = route.communicate(timeout=120)
    assert route.returncode == 0, err
    assert SECRET not in argv and SECRET not in out + err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line one JSON object
    assert lines and all({"ts", "level", "logger", "msg"} <= set(doc) for doc in lines)
    # The file's group, prefix and broker: the router read the whole source and committed it.
    assert group_lag(KafkaConnection.plain(bootstrap), group, [names.source]).messages == 0
