"""Per-layer table: shape, parameters, target, exact-zero sparsity, share below the projection threshold,
primal residual and rho, with inline bars."""
from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from tui.state import RunState

COLUMNS = ("layer", "shape", "params", "target", "sparsity", "<thr", "primal", "rho")


def bar(frac: float | None, width: int = 6) -> Text:
    if frac is None:
        return Text("--")
    frac = min(max(frac, 0.0), 1.0)
    full = round(frac * width)
    t = Text()
    t.append("█" * full, style="green")
    t.append("░" * (width - full), style="dim")
    t.append(f"{100 * frac:5.1f}%")
    return t


def _short(name: str) -> str:
    return name[:-7] if name.endswith(".weight") else name


class LayerTable(DataTable):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = False
        for c in COLUMNS:
            self.add_column(c, key=c)

    @property
    def selected_layer(self) -> str | None:
        if self.row_count == 0:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:
            return None
        return key.value

    def render_state(self, s: RunState) -> None:
        for L in s.layers:
            name = L["name"]
            res = s.residuals.get(name, {})
            primal = res.get("primal", L.get("primal"))
            rho = s.rho.get(name)
            cells = (
                _short(name), "x".join(map(str, L["shape"])), f"{L['numel']:,}", f"{100 * L['target']:.1f}%",
                bar(L["sparsity"]), bar(L.get("at_or_below")),
                "--" if primal is None else f"{primal:.3g}", "--" if rho is None else f"{rho:.3g}",
            )
            if name in self.rows:
                for c, v in zip(COLUMNS, cells):
                    self.update_cell(name, c, v)
            else:
                self.add_row(*cells, key=name)
