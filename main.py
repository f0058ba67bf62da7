"""fp4lab: train a model with a precision policy and log everything (``python main.py model=unet quant=nvfp4``).

Thin on purpose: Hydra composes ``conf/config.yaml`` (see ``--help``), ``trainers.app.run`` does the work, and the
return value (the monitored metric) is what Hydra's sweepers optimise.
"""
import sys

import hydra
from omegaconf import DictConfig

import conf.schemas  # noqa: F401  (registers the structured-config schemas before Hydra composes)
from conf.validate import unknown_key_message


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from trainers.app import run  # torch, Lightning and friends load only once the config is known to be valid

    return run(cfg)


if __name__ == "__main__":
    problem = unknown_key_message(sys.argv[1:])
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    main()
