"""Hydra's side of the project: the resolvers conf/ uses, and the option nodes it composes, made
from the options dataclasses so that each option is declared once (lm/options.py).

Every entry point imports this module before Hydra composes its configuration.
"""

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lm import PROJECT_ROOT
from lm.data.options import DataOptions
from lm.errors import UserError
from lm.evaluation.cache import CacheOptions
from lm.evaluation.dynamic_eval import DynamicEvalOptions
from lm.evaluation.options import EvaluateOptions, ExportOptions, SamplingOptions, ScoreOptions
from lm.models.network import network_options
from lm.options import defaults
from lm.training.continuation import hydra_subdir, resumed_run_folder
from lm.training.options import RunOptions, TrainingOptions


def _devices_per_node(gpus: int | None, devices: object) -> int:
    count = gpus or devices
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise UserError(
            f"trainer.devices={devices!r}: the SLURM launcher needs a number of devices per node."
        )
    return count


def _folder_name(text: str, max_bytes: int) -> str:
    """`text` as one folder name: no "/", at most `max_bytes` UTF-8 bytes (file systems allow 255)."""
    name = text.replace("/", "_")
    if len(name.encode()) <= max_bytes:
        return name
    return name.encode()[: max_bytes - 3].decode(errors="ignore") + "..."


store = ConfigStore.instance()
for target, options in network_options().items():  # model/net=<name>: model.net.* are its options
    store.store(group="model/net", name=options.name, node={"_target_": target, **defaults(options)})
store.store(name="training_options", node=defaults(TrainingOptions))  # model.*
store.store(name="data_options", node=defaults(DataOptions))  # data.*, under each corpus's own keys
store.store(name="run_options", node=defaults(RunOptions))  # seed, resume, overwrite
store.store(name="dynamic_eval_options", node=defaults(DynamicEvalOptions))  # evaluate.py's dynamic_eval.*
store.store(name="cache_options", node=defaults(CacheOptions))  # evaluate.py's cache.*
store.store(name="evaluate_options", node=defaults(EvaluateOptions))  # evaluate.py's split, chunk_length
store.store(name="sampling_options", node=defaults(SamplingOptions))  # generate.py's
store.store(name="score_options", node=defaults(ScoreOptions))  # score.py's carry_state, format
store.store(name="export_options", node=defaults(ExportOptions))  # python -m lm.tools.export's

# `${project_root:}` puts shared files (the PTB download, the token cache) under the repository
# whatever directory a run starts from.
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
# hydra/launcher/slurm.yaml: one SLURM task per device, whichever of trainer.gpus / devices is set,
# and GPUs only for GPU runs.
OmegaConf.register_new_resolver("devices_per_node", _devices_per_node, replace=True)
OmegaConf.register_new_resolver(
    "gpus_per_node",
    lambda accelerator, gpus, devices: 0 if accelerator == "cpu" else _devices_per_node(gpus, devices),
    replace=True,
)
# hydra/default.yaml: sweep runs' folders named by their overrides; a resumed run writes into its
# own folder and keeps the configuration its first start recorded in .hydra/ (a resumption's goes
# to .hydra/resumed-<time>/; a continued sweep's run that had ended gets none).
OmegaConf.register_new_resolver("folder_name", _folder_name, replace=True)
OmegaConf.register_new_resolver("resumed_run_folder", resumed_run_folder, replace=True)
OmegaConf.register_new_resolver("hydra_subdir", hydra_subdir, replace=True)
