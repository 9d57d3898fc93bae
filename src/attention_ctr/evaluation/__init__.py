"""Evaluation of trained models, as plain functions of tables and models (no Kedro).

`metrics` (AUC, GAUC, logloss per slice), `candidates` (seeded candidate lists),
`served_ranking` (the ranking protocol through the exported request graph), `latency`
(eager torch vs onnxruntime), `comparison` (the models' comparison table), `attention`
(how attention spreads over the history), `explanations` (why items rank high) and `plots`.
The evaluation pipeline's nodes (`attention_ctr.pipelines.evaluation.nodes`) wire them to the
catalog.
"""

# The measured counterpart of the design brief's "cosine / single head / multi-head /
# self-attention" table: which kind of attention each model puts over the history.
ATTENTION_TYPES = {
    "pooling": "none (mean pooling)",
    "din": "target attention (MLP activation unit)",
    "dien": "attention-gated GRU (AUGRU)",
    "bst": "multi-head self-attention (Transformer)",
}

WITHOUT_ATTENTION = {"pooling"}
