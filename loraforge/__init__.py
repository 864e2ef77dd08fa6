"""lora-forge: the logic behind the Snakemake workflow (importable and testable without it)."""

__version__ = "0.1.0"
