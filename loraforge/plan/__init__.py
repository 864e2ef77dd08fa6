"""Plan the peak disk of a run before any job starts.

The article's export died three times on a hidden 95 GB quota: 57 GB of base shards plus
57 GB of merged shards. This module replays the jobs Snakemake will run, in the order a
`--cores 1` run takes them, and tracks the bytes on disk after every event:

- a job's outputs appear when it finishes (its stale outputs are removed when it starts);
- `temp()` files disappear once every consumer of them in this run has finished (unless
  they are targets), as Snakemake's `handle_temp` does;
- the merge and the conversion are modelled inside the job, by `export.merge_mode`:
  `link` (untargeted base shards are hard links in merged/: free), `copy` (all shards
  rewritten), `consume` (each base shard is dropped once its merged shard is durable:
  peak = base + two shards, the next one being written while the last is made durable;
  the base folder is gone afterwards; the converter then releases each merged shard once
  its tensors are in the GGUF);
- in consume mode the last quantize job reading a temp intermediate frees it tensor by
  tensor as it quantizes (`loraforge.gguf.quantize(release_input=...)`): the quant grows
  while the intermediate shrinks, in llama.cpp's tensor order, instead of both being on disk
  until the job ends. Modelled per tensor when the model's architecture is known (a layout
  without it keeps the intermediate to the end: the conservative plan).

What counts: everything under `results/`, plus a base folder outside it (an HF cache).

`check()` raises `PlanError` naming the step at the peak and what would fit instead
(consume mode, one quant per run, a Q8_0 intermediate), each re-planned.

Sources of the plan: `Step`s built by hand (tests), `steps_from_dag()` on Snakemake's DAG
(`onstart:` hook, `check_workflow(workflow)`), or `plan_for_targets()` which builds the DAG
with Snakemake's API in dry-run mode (the `loraforge plan` command).
"""

from loraforge.constants import MERGE_MODES
from loraforge.plan.fit import alternatives, check, fits
from loraforge.plan.model import (
    DEFAULT_ROLES,
    RESULTS_DIR,
    Alternative,
    Event,
    ModelLayout,
    Plan,
    PlanError,
    Step,
)
from loraforge.plan.report import format_jobs, format_summary, format_timeline, timeline_frame
from loraforge.plan.simulate import Planner
from loraforge.plan.sizing import RunInputs, base_dir_of, gather_sizes, hf_config_of, plan_steps
from loraforge.sizes import Shard

__all__ = [
    "DEFAULT_ROLES", "MERGE_MODES", "RESULTS_DIR", "Alternative", "Event", "ModelLayout", "Plan", "PlanError",
    "Planner", "RunInputs", "Shard", "Step", "alternatives", "base_dir_of", "check", "fits", "format_jobs",
    "format_summary", "format_timeline", "gather_sizes", "hf_config_of", "plan_steps", "timeline_frame",
]
