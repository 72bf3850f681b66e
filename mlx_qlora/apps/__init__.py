"""Stage ``apps``: whole jobs built from the other stages.

``extract`` (a model over a file of texts -> schema-valid JSON per row, batched, resumable, with
a cost summary), ``prompt`` (the one prompt template training, eval and extraction share),
``reviews`` (MAMS reviews -> training rows) and ``sweep`` (hyper-parameter search).

May import: ``eval``, ``infer``, ``export``, ``train``, ``model`` and the leaves.
"""
