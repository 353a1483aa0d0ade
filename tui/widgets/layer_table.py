"""Per-layer table: shape, parameters, target (ratio, N:M pattern, or ``auto`` until a global allocation is made),
exact-zero sparsity, share below the projection threshold,
primal residual and rho, with inline bars."""
from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from robprune.engine.pruning import parse_nm
from robprune.tui.state import RunState

COLUMNS = ("layer", "shape", "params", "target", "sparsity", "<thr", "primal", "rho")
# Columns whose values change during a run get a fixed width (wide enough for a bar and for _num's 7 characters), so the
# layout does not depend on which value a row happened to hold when it was first drawn. The others are sized
# from their content, which never changes after the row is added.
FIXED_WIDTHS = {"target": 6, "sparsity": 12, "<thr": 12, "primal": 7, "rho": 7}


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


def _num(x: float | None) -> str:
    """At most 7 characters: 3 significant digits in the usual range, else one decimal in e-notation."""
    if x is None:
        return "--"
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"


def target_cell(L: dict) -> str:
    """The target column: the ratio (``80.0%``); an N:M layer's pattern (``2:4``: its ratio is 1 - N/M); ``auto``
    while a global allocation has not chosen it yet (it does when the ADMM phase starts)."""
    if L.get("target_pending"):
        return "auto"
    scheme = L.get("scheme")
    if L["target"] > 0 and parse_nm(scheme) is not None:
        return scheme
    return f"{100 * L['target']:.1f}%"


def _short(name: str) -> str:
    return name[:-7] if name.endswith(".weight") else name


class LayerTable(DataTable):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = False
        for c in COLUMNS:
            self.add_column(c, key=c, width=FIXED_WIDTHS.get(c))

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
                _short(name), "x".join(map(str, L["shape"])), f"{L['numel']:,}", target_cell(L),
                bar(L["sparsity"]), bar(L.get("at_or_below")),
                _num(primal), _num(rho),
            )
            if name in self.rows:
                for c, v in zip(COLUMNS, cells):
                    self.update_cell(name, c, v)
            else:
                self.add_row(*cells, key=name)
