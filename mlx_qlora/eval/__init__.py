"""Stage ``eval``: scoring what the models produce.

``json_fields`` scores JSON predictions against references: validity (parse + optional JSON
schema), aspect-term precision/recall/F1, (term, sentiment) F1 and per-field accuracy.

May import: ``infer``, ``export``, ``train``, ``model`` and the leaves. Never ``apps``.
"""
