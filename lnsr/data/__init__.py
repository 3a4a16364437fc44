"""Fine-tuning data: GLUE tasks and their readers (``glue``), the user's CSV/TSV/JSON files
(``files``), the metrics that score them (``metrics``) and examples to padded batches (``batches``).
An example is ``(text_a, text_b_or_None, label)`` whatever its source."""
from .batches import collate, encode
from .files import load_file_task, read_table
from .glue import TASKS, TaskSpec, get_task, load_local, load_task, read_tsv
from .metrics import METRIC_FUNCS, accuracy, compute_metrics, f1, f1_macro, matthews, pearson, spearman

__all__ = ["TASKS", "TaskSpec", "get_task", "load_task", "load_local", "read_tsv", "load_file_task", "read_table",
           "METRIC_FUNCS", "compute_metrics", "accuracy", "f1", "f1_macro", "matthews", "pearson", "spearman",
           "encode", "collate"]
