"""The handler table: one handler per stage config, found without importing any method."""

from app.specs import STAGE_CONFIGS
from worker.engine.registry import handlers


def test_every_stage_config_has_a_handler_and_every_handler_a_config():
    registered = handlers()
    without_handler = [config.__name__ for config in STAGE_CONFIGS if config not in registered]
    without_config = [config.__name__ for config in registered if config not in STAGE_CONFIGS]
    assert without_handler == [] and without_config == []
