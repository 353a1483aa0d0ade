"""Commands the engine accepts from any thread; applied by the engine at step boundaries."""
from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any

COMMANDS = ("pause", "resume", "set_rho", "eval_now", "checkpoint", "stop")


@dataclass
class Command:
    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in COMMANDS:
            raise ValueError(f"unknown command {self.name!r}; expected one of {', '.join(COMMANDS)}")
        if self.name == "set_rho":
            value = self.args.get("value")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"set_rho needs a positive number, got {value!r}")


class Control:
    """A thread-safe command queue. ``send`` never blocks; the engine drains it at each step boundary."""

    def __init__(self) -> None:
        self._q: queue.Queue[Command] = queue.Queue()

    def send(self, name: str, **args: Any) -> None:
        self._q.put(Command(name, args))

    def pause(self) -> None:
        self.send("pause")

    def resume(self) -> None:
        self.send("resume")

    def set_rho(self, value: float, layer: str | None = None, multiply: bool = False) -> None:
        """Set rho (or multiply it by ``value`` when ``multiply``) for one layer or, with layer None, all layers."""
        self.send("set_rho", value=value, layer=layer, multiply=multiply)

    def eval_now(self) -> None:
        self.send("eval_now")

    def checkpoint(self) -> None:
        self.send("checkpoint")

    def stop(self) -> None:
        self.send("stop")

    def drain(self) -> list[Command]:
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float) -> Command | None:
        """Block up to ``timeout`` seconds for the next command (used while paused)."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None
