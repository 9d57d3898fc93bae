"""Project settings (https://docs.kedro.org/en/stable/configure/configuration_basics/)."""

from kedro.config import OmegaConfigLoader

from attention_ctr.hooks import SparkHooks

# kedro-viz pulls in kedro-telemetry; the project opts out here and in `.telemetry`,
# so no kedro command makes a network call or asks for consent.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro-telemetry",)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment (conf/movielens, ...) overrides single keys, not whole parameter blocks.
    "merge_strategy": {"parameters": "soft"},
    # An environment's spark.yml (conf/spark) makes SparkHooks start a Spark session.
    "config_patterns": {"spark": ["spark*", "spark*/**"]},
}

HOOKS = (SparkHooks(),)
