"""What to keep and print when a container cluster does not settle: which process stopped
talking to which, and what it waited for.

- ``dns_trouble``: nodes find each other by name through Docker's embedded DNS and
  resolve it again at every reconnect, so a DNS that forgot the network strands any
  node that reconnects; checked before each fault and named in every diagnosis.
- ``diagnose``: each broker's view (role, term, indexes, heartbeat age), each member's
  TCP connections labelled with the peer's name, each thread's state and kernel wait.
- ``save_logs``: every member's whole log, timestamped, into ``ZKV_FAULT_RUN_LOGS``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tests.containers.cluster import ContainerCluster

#: Every thread in a container: tid, (name), state (R running, S sleeping, D waiting on
#: disk), and the kernel function it waits in (an fsync stuck on the storage shows here).
THREADS = (
    "for t in /proc/[0-9]*/task/[0-9]*; do "
    "echo \"$(cut -d' ' -f1-3 $t/stat) $(cat $t/wchan 2>/dev/null)\"; done"
)


def dns_trouble(c: ContainerCluster) -> str:
    """Empty if broker0 resolves every member's name through Docker's embedded DNS,
    else what is wrong. Nodes find each other by name and resolve it again at every
    reconnect, so a DNS that forgot the network strands whichever node reconnects next.
    Seen here: a ``docker swarm init``/``leave`` by another session on the same daemon
    wipes the records of every user-defined bridge network (moby/moby#45144, open for
    Docker 20.10); the cluster then keeps its established connections and nothing
    else."""
    script = " ; ".join(f"getent hosts {m} >/dev/null || echo {m}" for m in c.members)
    rc, out = c.exec(c.brokers[0], script)
    missing = out.split()
    if rc == 0 and not missing:
        return ""
    return (
        f"Docker's embedded DNS on {c.name} no longer resolves {missing} from "
        f"{c.brokers[0]}: nodes cannot reconnect by name (moby/moby#45144: a `docker "
        "swarm init/leave` on this daemon wipes bridge networks' DNS records)"
    )


def diagnose(c: ContainerCluster) -> str:
    """What each broker hears (role, term, indexes, heartbeat age) and each member's TCP
    connections with their peers' current addresses: enough to tell which process
    stopped talking to which."""
    out = [dns_trouble(c) or "Docker DNS resolves every member"]
    for b in c.brokers:
        try:
            rows = c.status(b)
        except Exception as exc:  # the broker itself may be the problem
            out.append(f"{b}: status failed: {exc!r}")
            continue
        out.append(f"{b} hears:")
        out += [
            f"  {r.get('node_id')} {r.get('role_name')} term={r.get('term')} "
            f"leader={r.get('leader_id')} commit={r.get('commit_index')} "
            f"applied={r.get('applied_index')} age_ms={r.get('age_ms')} "
            f"voter={r.get('extra', {}).get('voter')}"
            for r in rows
        ]
    ips = {}
    for name in c.members:
        with contextlib.suppress(Exception):
            ips[c.ip(name)] = name
    out.append(f"addresses: {ips}")
    for name in c.members:
        _, ss = c.exec(name, "ss -tn state all 2>&1 | tail -n +2")
        for ip, who in ips.items():
            ss = ss.replace(f"{ip}:", f"{who}({ip}):")
        _, threads = c.exec(name, THREADS)
        out.append(f"--- {name} sockets:\n{ss.rstrip()}\n--- {name} threads:\n{threads.rstrip()}")
    return "\n".join(out)


def save_logs(c: ContainerCluster) -> None:
    """With ``ZKV_FAULT_RUN_LOGS=dir``, keep every member's whole log there (to trace a
    slow recovery: who stepped down, who campaigned, when)."""
    where = os.environ.get("ZKV_FAULT_RUN_LOGS")
    if not where:
        return
    Path(where).mkdir(parents=True, exist_ok=True)
    for name, m in c.members.items():
        logs = m.container.logs(stdout=True, stderr=True, timestamps=True)
        (Path(where) / f"{name}.log").write_bytes(logs)
