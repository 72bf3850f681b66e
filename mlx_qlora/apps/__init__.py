"""Stage ``apps``: whole jobs built from the other stages.

``extract`` (a model over a file of texts -> schema-valid JSON per row, batched, resumable, with
a cost summary), ``prompt`` (the one prompt template training, eval and extraction share),
``reviews`` (MAMS reviews -> training rows) and ``sweep`` (hyper-parameter search with Optuna:
short child ``train`` runs per trial, resumable; ``sweep_config`` reads the sweep YAML,
``sweep_report`` writes the table, PNG and best recipe) and ``pairs`` (``make-pairs``:
preference pairs from a model's own wrong answers on training rows).

May import: ``eval``, ``infer``, ``export``, ``train``, ``model`` and the leaves.
"""
