"""The paper's experiments as commands: each is a list of runs, then a report a researcher can paste into a paper.

    from robprune.engine.experiments import Experiment
    exp = Experiment("lottery", "profiles/mnist_quick.toml", out="experiments/lottery", preset="cpu",
                     overrides=["exp.seeds=[0, 1]", "exp.targets=[2]"], progress=print)
    results = exp.run()            # blocking; exp.stop() from another thread stops the current run with a checkpoint

Experiments (names as on the command line): ``weight-dist`` (Fig. 1), ``scratch-vs-pruned`` (Table 2),
``lottery`` (Table 5), ``transfer``, ``schemes`` and ``budgets`` (per-layer budgets: uniform, global, erk).

Profiles. Every run starts from PROFILE (the base profile), then the preset's ``[profile]`` keys, then the preset's
``[<experiment>.profile]`` keys, then the user's ``--set`` keys, then the keys the experiment sets for that run
(model.width, prune.*, run.init, run.name, run.seed, eval.final_attack, the phases' epochs, attack.train.kind =
"none" for natural training).
``--set exp.<param>=<value>`` changes one of the experiment's parameters (widths, epochs, ...). Presets are TOML
files in ``profiles/experiments/`` (``cpu``, ``paper``, ``tiny``) or a path to such a file.

Runs. Run ``r`` of seed ``s`` lives in ``OUT/runs/r-s<s>``. A finished run (summary.json with status "completed") is
reused when the experiment is run again with the same settings; an unfinished one is resumed from its checkpoint; a
run whose settings differ from what the experiment would use now is refused (one line naming the first differing
key). Runs execute one after the other, each on a background thread of this process (so that :meth:`Experiment.stop`
can stop it at a step boundary with a checkpoint).

Report. ``OUT/report.md`` (tables, nat/adv % as in the paper, one sentence per table saying whether the paper's
finding held on this run, computed from the numbers), ``OUT/results.json`` (everything, including the very dict the
tables are rendered from, and every seed's numbers), ``OUT/results.csv`` (one line per table cell and seed, raw
fractions), ``OUT/runs.csv`` (one line per run), PNG figures (matplotlib, Agg: ``pip install 'robprune[plots]'``;
without it the report is the same but for the figures, and report.md says they were skipped),
``OUT/profiles/<run>.toml`` (the resolved profile of every run), and the seeds, attack settings and versions in
report.md and results.json.

Seeds and verdicts. Every run is trained once per seed of ``exp.seeds`` (run ``<name>-s<seed>``, each from its own
initial weights); a table cell is the mean over seeds with its min-max range, and a finding is "held" / "did not
hold" only when the differences it rests on exceed that spread, otherwise "inconclusive at this budget"
(:mod:`.stats`). Reports flag ADMM runs whose primal residual was still high before the hard prune
(:mod:`.convergence`) and list each side's training budget.

Modules. ``runner`` (:class:`Experiment`: settings, seeds, execution), ``specs`` (the run specs of a seed),
``presets`` (presets and parameters), ``runs`` (run specs and results, reuse and refusal of existing runs),
``record`` (results.json's record of runs, seeds, budgets and versions), ``stats`` (per-seed numbers, cells,
comparisons and verdicts), ``convergence`` (ADMM's end), ``tables`` (report tables), ``writers`` (the report files),
``figures`` (the PNGs), and one module per experiment holding its runs and its report: ``weight_dist``,
``scratch_vs_pruned``, ``lottery``, ``transfer``, ``schemes``, ``budgets``.
"""
from __future__ import annotations

from .convergence import PRIMAL_CONVERGED, admm_end
from .figures import render_png
from .lottery import lottery_init, same_zero_pattern
from .presets import EXPERIMENTS, PARAM_PREFIX, PRESETS, load_preset, preset_path
from .runner import Experiment, run_experiment
from .runs import ExperimentStopped, RunResult, RunSpec
from .scratch_vs_pruned import sliced_state
from .stats import HELD, INCONCLUSIVE, NOT_HELD, Comparison, verdict
from .tables import Table
from .weight_dist import weight_stats
from .writers import report_markdown, write_report

__all__ = ["EXPERIMENTS", "HELD", "INCONCLUSIVE", "NOT_HELD", "PARAM_PREFIX", "PRESETS", "PRIMAL_CONVERGED",
           "Comparison", "Experiment", "ExperimentStopped", "RunResult", "RunSpec", "Table", "admm_end", "load_preset",
           "lottery_init", "preset_path", "render_png", "report_markdown", "run_experiment", "same_zero_pattern",
           "sliced_state", "verdict", "weight_stats", "write_report"]
