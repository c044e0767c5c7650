"""A sweeper that picks its trials as it goes, for the tests: it takes Optuna's sweeper's
contract (search params as ``interval(a, b)`` / ``choice(...)`` in ``hydra.sweeper.params`` or
on the command line, a ``direction``, ``n_trials``; every trial must return a number, and a
missing one stops the search) without Optuna. Trial ``i`` takes each choice ``i mod n`` and an
interval's point ``(i + 1) / (n_trials + 1)`` of the way, so a test knows its trials."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf


@dataclass
class ToySweeperConf:
    _target_: str = "hydra_plugins.toy_sweeper.toy_sweeper.ToySweeper"
    direction: str = "maximize"
    n_trials: int = 2
    params: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="toy", node=ToySweeperConf,
                             provider="toy_sweeper")


class ToySweeper(Sweeper):
    def __init__(self, direction: str, n_trials: int, params: Optional[Dict[str, str]] = None):
        self.direction, self.n_trials, self.params = direction, n_trials, dict(params or {})

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        parser = OverridesParser.create()
        given = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + arguments)
        values: List[float] = []
        for i in range(self.n_trials):
            job = []
            for o in given:
                if not o.is_sweep_override():
                    job.append(o.input_line)
                    continue
                v = o.value()
                if hasattr(v, "end"):
                    x = v.start + (v.end - v.start) * (i + 1) / (self.n_trials + 1)
                else:
                    choices = list(o.sweep_string_iterator())
                    x = choices[i % len(choices)]
                job.append(f"{o.get_key_element()}={x}")
            ret = self.launcher.launch([job], initial_job_idx=i)[0]
            values.append(float(ret.return_value))  # None: a TypeError stops the search
        sweep_dir = Path(self.config.hydra.sweep.dir)
        (sweep_dir / "toy_values.yaml").write_text(OmegaConf.to_yaml({"values": values}))
        return values
