"""Faults injected into a running :class:`~etcd_rdzv.testing.EtcdCluster`, from asyncio.

A member is killed (SIGKILL) and restarted on its data, or paused (SIGSTOP: hung, not dead)
and resumed; each step is appended to :attr:`Faults.log` (``"kill 1"``, ``"restart 1"``,
``"pause 0"``, ``"resume 0"``), so a test or the linearizability soak can say what happened.
Blocking steps (a kill waits for the process, a restart for the member to answer) run in a
thread, so the event loop keeps driving the clients under test meanwhile.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from . import EtcdCluster

__all__ = ["Faults"]


@dataclass
class Faults:
    """Kills, restarts and pauses of ``cluster``'s members, logged in order."""

    cluster: EtcdCluster
    log: list[str] = field(default_factory=list)

    async def kill_and_restart(self, member: int, down_for: float) -> None:
        """Kill ``member``, leave it dead ``down_for`` seconds, start it again."""
        await asyncio.to_thread(self.cluster.kill, member)
        self.log.append(f"kill {member}")
        await asyncio.sleep(down_for)
        await asyncio.to_thread(self.cluster.restart, member)
        self.log.append(f"restart {member}")

    async def pause_and_resume(self, member: int | None, paused_for: float) -> None:
        """Freeze ``member`` (None: the leader of the moment) ``paused_for`` seconds."""
        if member is None:
            member = await asyncio.to_thread(self.cluster.leader_index)
        self.cluster.pause(member)
        self.log.append(f"pause {member}")
        try:
            await asyncio.sleep(paused_for)
        finally:
            self.cluster.resume(member)
            self.log.append(f"resume {member}")

    async def kill_each_in_turn(self, every: float, down_for: float) -> None:
        """Every member once, in index order: wait ``every`` s, then kill and restart it."""
        for member in range(len(self.cluster.members)):
            await asyncio.sleep(every)
            await self.kill_and_restart(member, down_for)

    async def at_random(self, seconds: float, rng: random.Random) -> None:
        """For ``seconds``, every 0.5 to 2 s: kill and restart a member, pause one, or pause
        the leader, each for 0.2 to 1.5 s."""
        stop = time.monotonic() + seconds
        while time.monotonic() < stop - 3:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            kind = rng.choice(["kill", "pause", "pause-leader"])
            member = rng.randrange(len(self.cluster.members))
            if kind == "kill":
                await self.kill_and_restart(member, rng.uniform(0.2, 1.5))
            else:
                await self.pause_and_resume(None if kind == "pause-leader" else member,
                                            rng.uniform(0.2, 1.5))
