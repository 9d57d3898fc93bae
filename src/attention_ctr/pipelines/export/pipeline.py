from kedro.pipeline import Node, Pipeline

from attention_ctr.bundle import add_cold_start_rows, build_serving_tables
from attention_ctr.onnx_export import export_onnx, export_request_onnx
from attention_ctr.pipelines import one_branch_per_model
from attention_ctr.pipelines.export.nodes import (
    build_export_report,
    check_parity,
    describe_serving,
    measure_latency,
)

SHARED_INPUTS = {
    "test_samples@pandas",
    "events@pandas",
    "feature_spec",
    "item_ids",
    "category_ids",
    "item_frequency",
    "cold_start_items",
    "cold_start_weights",
}
GRAPHS = ["onnx_model", "onnx_request_model"]  # batch graph, request graph
HELD_OUT = ["test_samples@pandas", "events@pandas", "feature_spec", "params:export"]


def create_model_pipeline() -> Pipeline:
    """One model's branch; instantiated per model under its namespace."""
    return Pipeline(
        [
            Node(
                add_cold_start_rows,
                ["model", "trained_model", "item_ids", "cold_start_weights"],
                "serving_model",
                name="add_cold_start_rows",
            ),
            Node(export_onnx, "serving_model", "onnx_model", name="export_onnx"),
            Node(
                export_request_onnx,
                "serving_model",
                "onnx_request_model",
                name="export_request_onnx",
            ),
            Node(
                check_parity,
                [*GRAPHS, "serving_model", *HELD_OUT],
                "parity",
                name="check_parity",
            ),
            Node(
                measure_latency,
                [*GRAPHS, "serving_model", *HELD_OUT],
                "latency",
                name="measure_latency",
            ),
            Node(
                build_serving_tables,
                [
                    "item_ids",
                    "category_ids",
                    "item_frequency",
                    "cold_start_items",
                    "cold_start_weights",
                ],
                ["serving_items", "serving_categories"],
                name="build_serving_tables",
            ),
            Node(
                describe_serving,
                [
                    *GRAPHS,
                    "serving_model",
                    "model",
                    "feature_spec",
                    "parity",
                    "serving_items",
                    "serving_categories",
                ],
                "serving_metadata",
                name="describe_serving",
            ),
            Node(
                build_export_report,
                [*GRAPHS, "parity", "latency"],
                "export_report",
                name="build_export_report",
            ),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return one_branch_per_model(
        create_model_pipeline(), shared_inputs=SHARED_INPUTS, parameters={"params:export"}
    )
