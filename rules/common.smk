# Helpers and input functions. Rule files contain rules only.
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)  # the loraforge package next to this Snakefile

from snakemake.exceptions import WorkflowError

import loraforge.config as lfconfig
import loraforge.continue_config as lfcontinue
import loraforge.data_sources as lfdata
import loraforge.plan.intermediate as lfintermediate
import loraforge.resources as lfresources
import loraforge.suggest as lfsuggest
import loraforge.summary_page as lfsummary
import loraforge.training_record as lftraining_record
from loraforge import snakemake_bridge, workflow_hooks
from loraforge.train_monitor import NOT_RECORDED

try:
    # the file each error's line is looked up in; a key it lacks came from --config
    config = lfconfig.validate(
        config, source=(workflow.configfiles or ["config.yaml"])[-1]
    )
    lfconfig.check_paths(config)
except lfconfig.ConfigError as e:
    raise WorkflowError(str(e)) from None

snakemake_bridge.shorten_params_reasons()  # the fields that changed, not two whole dicts

MODELS = list(config["models"])
EXPORT = config["export"]
# The types the intermediate GGUF can have: the one set, or under auto F16 or Q8_0 per model
# (intermediate_of). A final quant that is also the intermediate is simply kept (not temp) by
# convert_gguf; auto then takes that type for every model.
INTERMEDIATE_TYPES = lfintermediate.candidate_intermediates(config)
KEEP_INTERMEDIATE = any(t in EXPORT["quants"] for t in INTERMEDIATE_TYPES)
FINAL_QUANTS = [q for q in EXPORT["quants"] if q not in INTERMEDIATE_TYPES]


def _alternatives(names):
    return "|".join(re.escape(n) for n in names) or "(?!)"


BUILT_MODELS = [m for m in MODELS if "build" in config["models"][m]["base"]]
HUB_MODELS = [m for m in MODELS if "hub" in config["models"][m]["base"]]
# hub datasets of every model's data.samples, by the slug of their file in results/datasets/
HUB_DATASETS = lfdata.hub_datasets(config)


wildcard_constraints:
    model=_alternatives(MODELS),
    quant=_alternatives(FINAL_QUANTS),
    intermediate=_alternatives(INTERMEDIATE_TYPES),


def settings(model):
    return lfconfig.model_settings(config, model)


def tracked_train_settings(model):
    """The train settings that decide the adapter, for train_adapter's params (a change retrains).
    save_steps, eval_steps, keep_checkpoints and gradient_checkpointing only decide when
    checkpoints and evaluations happen and where activations live, gpus how many processes share
    each optimizer step's batch: the script reads them from the config, so changing them never
    makes an adapter stale."""
    return {k: v for k, v in settings(model)["train"].items() if k not in NOT_RECORDED}


def base_dir(model):
    """The base model folder: built or fetched into results/, or a user's local folder."""
    base = config["models"][model]["base"]
    return base["path"] if "path" in base else f"results/{model}/base"


def get_base(wildcards):
    return base_dir(wildcards.model)


def _base_is_users(model):
    return "path" in config["models"][model]["base"]


def get_training_base(wildcards):
    """train_adapter's base inputs (unpack()): the base folder and its complete flag, so a base
    whose weights are missing (never built, or used up by a consume-mode merge) is built or
    fetched again before training, and a changed base (build settings, hub revision) retrains.
    Both ancient() while training is up to date by the adapter's own record (settings, data
    settings and base declaration unchanged, reports there, no retrain asked for): a base built
    or fetched again for an export must not retrain for nothing. A job with a reason of its own
    is never behind ancient() inputs (Snakemake skips ancient-linked jobs below a rerun without
    looking at their missing outputs, snakemake#4166: a target adapter missing while the base is
    stale would not be trained)."""
    model = wildcards.model
    if _base_is_users(model):
        return {"base": ancient(base_dir(model))}
    files = {"base": base_dir(model), "base_complete": f"results/{model}/base.complete"}
    if lftraining_record.training_is_current(config, model):
        return {k: ancient(v) for k, v in files.items()}
    return files


def get_tokenizer_base(wildcards):
    """prepare_data's base input (it reads the tokenizer, which a consume-mode merge leaves in
    place): ancient() while the prepared data is there and made with today's data settings from
    the declared base (the adapter's record), so a rebuilt or refetched base does not redo it.
    """
    model = wildcards.model
    if _base_is_users(model) or lftraining_record.data_is_current(config, model):
        return ancient(base_dir(model))
    return base_dir(model)


def ancient_while_built(path, output):
    """`path` as an ancient() input only while the job's `output` exists: a job whose output is
    missing must run, and behind an ancient() input Snakemake would skip it when the input's
    producer reruns (snakemake#4166)."""
    return ancient(path) if os.path.exists(output) else path


def get_base_complete(wildcards):
    """The flag a built or fetched base carries while its weights are all there (each shard's
    digest, loraforge.base_weights). A consume-mode merge removes the weights and this flag but
    keeps the folder's small files, so a later export builds or fetches the base again.
    """
    if _base_is_users(wildcards.model):
        return []
    return f"results/{wildcards.model}/base.complete"


def data_of(model):
    """The model's data settings: data: overlaid with models.MODEL.data."""
    return lfdata.data_settings(config, model)


def get_data_files(wildcards):
    """Every sample file prepare_data reads: local files and fetched hub datasets."""
    return lfdata.data_files(config, wildcards.model)


_intermediates = {}


def intermediate_of(model):
    """The model's intermediate GGUF type (export.intermediate; auto: F16 when the export from
    16-bit fits disk_quota, planned from config.yaml alone, else Q8_0: loraforge.plan.intermediate).
    Decided on first use, so only the models a run touches are planned."""
    if model not in _intermediates:
        _intermediates[model] = lfintermediate.resolve_intermediate(config, model).ftype
    return _intermediates[model]


def get_intermediate_gguf(wildcards):
    return f"results/{wildcards.model}/{intermediate_of(wildcards.model)}.gguf"


IMATRIX = EXPORT["imatrix"]


def get_imatrix(wildcards):
    """The importance matrix a quant is made with (export.imatrix), or none."""
    return f"results/{wildcards.model}/imatrix.gguf" if IMATRIX["enabled"] else []


def get_evaluation_intermediate(wildcards):
    """With an importance matrix, the evaluation also quantizes each quant without it, from the
    same intermediate, to measure what the matrix gained."""
    return get_intermediate_gguf(wildcards) if IMATRIX["enabled"] else []


def get_export_ggufs(wildcards):
    return [f"results/{wildcards.model}/{q}.gguf" for q in EXPORT["quants"]]


def get_modelfile_gguf(wildcards):
    return f"results/{wildcards.model}/{EXPORT['modelfile_quant']}.gguf"


def model_priority(wildcards):
    """Earlier models in config.yaml build first, one model's chain at a time (the default
    scheduler would interleave models and raise the peak disk)."""
    own = config["models"][wildcards.model].get("priority")
    return (
        own if own is not None else 10 * (len(MODELS) - MODELS.index(wildcards.model))
    )


def model_outputs(model):
    """What a finished model is: its GGUFs (checked), Modelfile, memory table, training report."""
    out = [f"results/{model}/{q}.gguf" for q in EXPORT["quants"]]
    out += [f"results/{model}/checks/{q}.json" for q in EXPORT["quants"]]
    out += [
        f"results/{model}/Modelfile",
        f"results/{model}/memory.tsv",
        f"results/{model}/train/metrics.json",
        f"results/{model}/data/summary.tsv",
    ]
    return out + quality_outputs(model)


def job_threads(rule_name):
    """Threads of a job of a rule: per model, per rule or the default (loraforge.resources)."""
    return lambda wildcards: lfresources.threads(
        config, rule_name, getattr(wildcards, "model", None)
    )


def job_resources(rule_name):
    """What a job of a rule asks a scheduler for (mem_mb, disk_mb, runtime, gpu, ...), as
    callables of the job; one that evaluates to None is not declared (loraforge.resources).
    """

    def declared(name):
        def value(wildcards, input):
            return lfresources.resource(
                config,
                rule_name,
                name,
                model=getattr(wildcards, "model", None),
                inputs=[str(f) for f in input],
                wildcards=dict(wildcards.items()),
            )

        return value

    return {name: declared(name) for name in lfresources.RESOURCE_NAMES}


# -- the evaluation (rules/quality.smk) --------------------------------------------------
SIXTEEN_BIT = lfintermediate.SIXTEEN_BIT


def reference_name(model):
    """The 16-bit type the quants are compared with: the intermediate when it is 16-bit."""
    inter = intermediate_of(model)
    return inter if inter in SIXTEEN_BIT else "F16"


def get_reference_gguf(wildcards):
    if intermediate_of(wildcards.model) in SIXTEEN_BIT:
        return get_intermediate_gguf(wildcards)
    return f"results/{wildcards.model}/eval/reference-F16.gguf"


def evaluated_quants():
    """Every quant the export keeps. Not the temp intermediate: as an input of the evaluation it
    would be rebuilt, and every quant made from it, whenever the table is refreshed (after one
    quant was rebuilt alone, say); bench/requantize.py measures it."""
    return list(EXPORT["quants"])


def get_evaluated_ggufs(wildcards):
    return [f"results/{wildcards.model}/{q}.gguf" for q in evaluated_quants()]


def early_priority(wildcards):
    return model_priority(wildcards) + 5


def quality_outputs(model):
    if not config["quality"]["evaluate"]:
        return []
    return [f"results/{model}/quality.tsv", f"results/{model}/conventions.tsv"]


def train_gpus(model):
    """GPUs a training job of `model` asks for (the cost table's GPU-hours); None: not set."""
    return lfresources.resource(config, "train_adapter", "gpu", model=model)


def adapter_gguf_source(model):
    """The adapter, for convert_adapter_gguf; refuses before any job runs what has no LoRA GGUF
    form (expert LoRA on a MoE, rsLoRA: loraforge.adapter_gguf.config_refusal)."""
    from loraforge.adapter_gguf import config_refusal

    reason = config_refusal(config, model)
    if reason:
        raise WorkflowError(f"results/{model}/adapter.gguf: {reason}")
    return f"results/{model}/adapter"


def buildable_files(model):
    """What `snakemake results/<model>/...` can build for a model (for error messages)."""
    values = {"quant": FINAL_QUANTS, "intermediate": INTERMEDIATE_TYPES}
    return lfsuggest.expand_patterns(
        snakemake_bridge.output_patterns(workflow), model, values
    )


def check_targets(targets):
    """A file target that no rule makes fails before the DAG is built, naming the nearest
    buildable file and what can be built for its model (instead of Snakemake's
    MissingRuleException)."""
    if snakemake_bridge.default_storage_provider(workflow):
        return  # remote storage: outputs are storage paths; Snakemake's own message stands
    rule_names = {r.name for r in workflow.rules}
    for target in targets:
        if target in rule_names or os.path.exists(target):
            continue
        relative = os.path.relpath(target) if os.path.isabs(target) else target
        if relative != target and snakemake_bridge.has_producer(workflow, relative):
            raise WorkflowError(
                f"{target}: give targets relative to the working directory: {relative}"
            )
        target = relative
        if snakemake_bridge.has_producer(workflow, target):
            continue
        known_quants = lfconfig.load_schema()["$defs"]["quant_type"]["enum"]
        raise WorkflowError(
            lfsuggest.missing_target_message(
                os.path.normpath(target),
                MODELS,
                buildable_files,
                known_quants,
                EXPORT["quants"],
            )
        )


def check_command_line_targets():
    """check_targets for the `snakemake` command's targets; called at the end of the Snakefile,
    once every rule exists (`loraforge plan` calls check_targets itself)."""
    check_targets(snakemake_bridge.command_line_targets())


def report_description():
    """The report's landing page: with the run's summary inline (results/summary.html, written
    at the end of every successful run) once there is one."""
    if os.path.exists(lfsummary.SUMMARY_PAGE):
        return "report/workflow-summary.rst"
    return "report/workflow.rst"


def get_final_outputs():
    return [f for model in config["targets"] for f in model_outputs(model)]


onstart:
    workflow_hooks.on_start(workflow, config, log)


# onstart does not run under -n: the preview ends with the planned disk and VRAM in one line
workflow_hooks.announce_dry_run_plan(workflow, config)


onsuccess:
    workflow_hooks.on_finish(workflow, config, log, success=True)


onerror:
    workflow_hooks.on_finish(workflow, config, log, success=False)
