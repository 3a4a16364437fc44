"""``lnsr finetune`` and ``lnsr tune``: fine-tuning over methods and seeds, with per-run JSON and a summary.

``cli`` (the ``lnsr finetune`` command), ``tune`` (``lnsr tune``), ``runner`` (one resumable run, the
seed loop), ``inputs`` (content hashes of what a run reads), ``report`` (tables, plots), ``stats``
(paired statistics), ``progress`` (ETA and machine hints).  The data are ``lnsr.data``'s, the methods
``lnsr.methods``'.
"""
from .cli import add_finetune_args, finetune_main
from .report import markdown_table, summarize, write_summary
from .runner import default_model_path

__all__ = ["add_finetune_args", "finetune_main", "markdown_table", "summarize", "write_summary",
           "default_model_path"]
