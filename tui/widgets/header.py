"""Top panel: run, profile, device, state, phase, epoch, step, throughput, ETAs, last evaluation."""
from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.widgets import Static

from robprune.tui.state import RunState, fmt_duration

STATE_STYLE = {"running": "bold green", "paused": "bold yellow", "finished": "bold cyan", "stopped": "bold yellow",
               "error": "bold red", "starting": "bold", "not running": "bold red"}


def resources_line(r: dict) -> Text:
    """Host memory and CPU, and on a GPU its memory (allocated / total, reserved, peak), utilisation and
    temperature: whatever the newest step record carries."""
    t = Text()
    if not r:
        return t.append("resources: --", style="dim")
    if "host_rss_mb" in r:
        t.append(f"host RSS {r['host_rss_mb'] / 1024:.2f} GB")
    if "cpu_pct" in r:
        t.append(f"  CPU {r['cpu_pct']:.0f}%")
    if "gpu_mem_alloc_mb" in r:
        total = f"/{r['gpu_mem_total_mb'] / 1024:.1f}" if "gpu_mem_total_mb" in r else ""
        t.append(f"  GPU mem {r['gpu_mem_alloc_mb'] / 1024:.2f}{total} GB (reserved "
                 f"{r.get('gpu_mem_reserved_mb', 0) / 1024:.2f}, peak {r.get('gpu_mem_peak_mb', 0) / 1024:.2f})")
    if "gpu_util_pct" in r:
        t.append(f"  util {r['gpu_util_pct']:.0f}%")
    if "gpu_temp_c" in r:
        t.append(f"  {r['gpu_temp_c']:.0f}°C")
    return t


class RunHeader(Static):
    def render_state(self, s: RunState) -> None:
        eta_phase, eta_run = s.eta()
        l1 = Text()
        l1.append(f" {s.state.upper()} ", style="reverse " + STATE_STYLE.get(s.state, ""))
        l1.append(f" {s.name}", style="bold")
        l1.append(f"  {Path(s.profile).name}  {s.device}")
        l2 = Text()
        ep = f"{min(s.epoch + 1, s.epochs)}/{s.epochs}" if s.epochs else "-"
        l2.append(f"{s.phase}", style="bold")
        l2.append(f" epoch {ep}  step {s.step}  {s.images_per_s:,.0f} img/s  "
                  f"ETA phase {fmt_duration(eta_phase)} run {fmt_duration(eta_run)}")
        l3 = Text()
        if s.last_eval is not None:
            e = s.last_eval
            l3.append(f"eval@{e['step']}: nat {100 * e['nat_acc']:.2f}%  {e['attack']['kind'].upper()}-"
                      f"{e['attack']['steps']} {100 * e['adv_acc']:.2f}%")
        else:
            l3.append("eval: --")
        if s.loss is not None:
            l3.append(f"  loss {s.loss:.3f}  lr {s.lr:.2g}")
        sp = s.sparsity()
        if sp is not None:
            l3.append(f"  sparsity {100 * sp:.1f}%")
        l4 = resources_line(s.resources)
        width = max(self.size.width - 2, 10)
        for line in (l1, l2, l3, l4):
            line.truncate(width, overflow="ellipsis")
        self.update(Text("\n").join([l1, l2, l3, l4]))
