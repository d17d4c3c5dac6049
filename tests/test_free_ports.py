"""The test harness's port picker: a mesh picks its listeners' and admin ports in separate calls before any proxy
binds them, so a port must not be handed out twice in a row of calls (a clean-clone run failed on one such pair)."""

from __future__ import annotations

import socket
from pathlib import Path

from testsupport.proxymesh import free_ports


def test_ports_handed_out_are_not_handed_out_again_while_unbound() -> None:
    # 1,500 single picks from ~22,000 ports repeat one almost surely (birthday bound) unless the picker remembers
    picked = [free_ports(1)[0] for _ in range(1500)] + free_ports(50)
    assert len(picked) == len(set(picked)), "a port was handed out twice"
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(10_000 <= p < max(low, 10_001) for p in picked)  # below the ephemeral range
    with socket.socket() as s:  # and each was free when picked: the last one still is
        s.bind(("127.0.0.1", picked[-1]))
