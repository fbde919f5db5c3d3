"""The run configuration: one dataclass per section, loaded from YAML in configs/, overridden with --set a.b=c.

    from tokpost_fast.config import load_config
    cfg = load_config("configs/demo.yaml", overrides=["train.lr=1e-4"], world_size=2)

loader.py reads, builds and checks the whole tree (rules in its docstring); engine.py holds the settings the
training stages share (train.py, gen.py and post.py extend it); cache.py and eval.py are the remaining stage
sections. The other sections live beside the code they configure (data/, models/, losses/, perturb.py), and this
package imports them, never the other way round.
"""

from tokpost_fast.checks import ConfigError
from tokpost_fast.config.cache import CacheStageConfig
from tokpost_fast.config.engine import PRECISIONS, AutoencoderEngineConfig, EngineConfig
from tokpost_fast.config.eval import DEFAULT_METRICS, METRICS, EvalConfig
from tokpost_fast.config.gen import GenStageConfig
from tokpost_fast.config.loader import (PRESETS, Config, apply_override, build_section, check_config,
                                        config_diff, config_from_dict, dump_config, load_config, parse_value,
                                        read_yaml, to_dict)
from tokpost_fast.config.post import PostStageConfig
from tokpost_fast.config.train import TrainConfig

__all__ = ["PRECISIONS", "PRESETS", "DEFAULT_METRICS", "METRICS", "AutoencoderEngineConfig", "CacheStageConfig",
           "Config", "ConfigError", "EngineConfig", "EvalConfig", "GenStageConfig", "PostStageConfig", "TrainConfig",
           "apply_override", "build_section", "check_config", "config_diff", "config_from_dict", "dump_config",
           "load_config", "parse_value", "read_yaml", "to_dict"]
