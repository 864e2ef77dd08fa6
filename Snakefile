# lora-forge: dataset + base LLM -> LoRA adapter -> merged 16-bit shards -> Q8_0 GGUF
#             -> Q4_K_M / Q5_K_M GGUF -> Ollama Modelfile
#
#   snakemake --cores 1                              # everything of config `targets` (tiny)
#   snakemake --cores 1 results/30b/Q5_K_M.gguf      # one artifact and what it needs
#   snakemake -n results/tiny/Q5_K_M.gguf            # preview (dry run)
#   loraforge plan results/30b/Q5_K_M.gguf           # preview with the peak-disk plan
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/base.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/merge.smk"
include: "rules/gguf.smk"
include: "rules/ollama.smk"
include: "rules/hub.smk"
include: "rules/quality.smk"
include: "rules/report.smk"
include: "rules/ide.smk"


report: report_description()


rule all:
    input:
        get_final_outputs(),


check_command_line_targets()
