"""Task-distribution environments for metarl, registered with gymnasium under ``metarl/``.

Filled in by the task-distribution issue; the supervised few-shot family lives in
``metarl.fewshot``.
"""
