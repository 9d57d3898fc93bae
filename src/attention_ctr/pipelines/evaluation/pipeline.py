from kedro.pipeline import Node, Pipeline

from attention_ctr.evaluation.attention import report_attention_distribution
from attention_ctr.evaluation.comparison import compare_models
from attention_ctr.evaluation.explanations import collect_explanations
from attention_ctr.evaluation.plots import (
    plot_attention_distribution,
    plot_attention_heatmap,
    plot_ranking_metrics,
    plot_roc_curves,
    plot_training_curves,
)
from attention_ctr.pipelines import one_branch_per_model, one_group, per_model
from attention_ctr.pipelines.evaluation.nodes import (
    compute_test_metrics,
    draw_explanation_candidates,
    draw_ranking_candidates,
    explain_rankings,
    predict_test_split,
    profile_attention,
    rank_test_users,
    summarise_evaluation,
    time_inference,
)

PARAMS = "params:evaluation"
SHARED_INPUTS = {
    "test_samples@pandas",
    "events@pandas",
    "feature_spec",
    "cold_start_items",
    "cold_start_weights",
    "item_frequency",
    "item_ids",
    "category_ids",
    "behavior_ids",
    "user_ids",
}
# A model branch's results that the cross-model reports read. Exposed under flat names
# (`din_evaluation_summary`, ...): a node outside a namespace should not read dotted names.
CROSS_MODEL_OUTPUTS = (
    "evaluation_summary",
    "test_predictions",
    "attention_profile",
    "explanations",
)


def create_model_pipeline() -> Pipeline:
    """One model's branch; instantiated per model under its namespace, like training."""
    return Pipeline(
        [
            Node(
                predict_test_split,
                [
                    "model",
                    "trained_model",
                    "test_samples@pandas",
                    "events@pandas",
                    "feature_spec",
                    "item_frequency",
                    "cold_start_items",
                    "cold_start_weights",
                    PARAMS,
                ],
                "test_predictions",
                name="predict_test_split",
            ),
            Node(
                compute_test_metrics,
                ["test_predictions", "model"],
                "test_metrics",
                name="compute_metrics",
            ),
            Node(
                time_inference,
                [
                    "model",
                    "test_samples@pandas",
                    "events@pandas",
                    "feature_spec",
                    f"{PARAMS}.latency",
                ],
                "inference_latency",
                name="time_torch_and_onnxruntime",
            ),
            # Seeded: every model ranks the same lists. Drawn per branch (cheap) so that
            # `--namespaces din` runs a whole branch.
            Node(
                draw_ranking_candidates,
                ["test_samples@pandas", "events@pandas", "item_frequency", f"{PARAMS}.ranking"],
                "ranking_candidates",
                name="draw_ranking_candidates",
            ),
            Node(
                rank_test_users,
                [
                    "model",
                    "trained_model",
                    "ranking_candidates",
                    "events@pandas",
                    "item_ids",
                    "category_ids",
                    "behavior_ids",
                    "item_frequency",
                    "cold_start_items",
                    "cold_start_weights",
                    "feature_spec",
                    f"{PARAMS}.ranking",
                ],
                "ranking_metrics",
                name="rank_test_users",
            ),
            Node(
                summarise_evaluation,
                [
                    "model",
                    "test_metrics",
                    "ranking_metrics",
                    "cold_start_blend",
                    "inference_latency",
                    "training_history",
                ],
                "evaluation_summary",
                name="summarise_evaluation",
            ),
            Node(
                profile_attention,
                [
                    "model",
                    "test_samples@pandas",
                    "events@pandas",
                    "feature_spec",
                    "user_ids",
                    PARAMS,
                ],
                "attention_profile",
                name="profile_attention",
            ),
            # Seeded: every model ranks the same users' same candidates. Drawn per branch so
            # that `--namespaces din` runs a whole branch.
            Node(
                draw_explanation_candidates,
                ["test_samples@pandas", "item_ids", f"{PARAMS}.explanations"],
                "explanation_candidates",
                name="draw_explanation_candidates",
            ),
            Node(
                explain_rankings,
                [
                    "model",
                    "explanation_candidates",
                    "events@pandas",
                    "feature_spec",
                    "item_ids",
                    "category_ids",
                    "behavior_ids",
                    "user_ids",
                    PARAMS,
                ],
                "explanations",
                name="explain_rankings",
            ),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    models = one_branch_per_model(
        create_model_pipeline(),
        shared_inputs=SHARED_INPUTS,
        parameters={
            PARAMS,
            f"{PARAMS}.latency",
            f"{PARAMS}.explanations",
            f"{PARAMS}.ranking",
        },
        flat_outputs=CROSS_MODEL_OUTPUTS,
    )
    reports = Pipeline(
        [
            Node(
                compare_models,
                per_model("evaluation_summary"),
                ["model_comparison", "model_comparison_table"],
                name="compare_models",
            ),
            Node(
                plot_roc_curves, per_model("test_predictions"), "roc_curves@figure", name="plot_roc"
            ),
            Node(
                plot_ranking_metrics,
                per_model("evaluation_summary"),
                "ranking_metrics_plot@figure",
                name="plot_ranking_metrics",
            ),
            Node(
                plot_training_curves,
                per_model("evaluation_summary"),
                "training_curves@figure",
                name="plot_training_curves",
            ),
            Node(
                plot_attention_heatmap,
                per_model("attention_profile"),
                "attention_heatmap@figure",
                name="plot_attention_heatmap",
            ),
            Node(
                plot_attention_distribution,
                per_model("attention_profile"),
                "attention_distribution@figure",
                name="plot_attention_distribution",
            ),
            Node(
                report_attention_distribution,
                per_model("attention_profile"),
                "attention_distribution_report",
                name="report_attention_distribution",
            ),
            Node(
                collect_explanations,
                per_model("explanations"),
                ["recommendation_explanations", "recommendation_explanations_report"],
                name="collect_explanations",
            ),
        ]
    )
    return models + one_group(reports, "evaluation")
