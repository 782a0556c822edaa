"""Going on after a stop: the commands a stopped run prints, the folder and checkpoint `resume=`
names, and a sweep continued with `continue_sweep=true`, which keeps the runs that had ended and
resumes the others in their folders (lm/training/run_folder.py decides which checkpoint each resumes
from). Without Lightning: conf/hydra/default.yaml's resolvers are here, and every entry point
composes it (score.py and generate.py start without Lightning)."""

import json
import logging
import re
import shlex
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lm.errors import UserError

log = logging.getLogger(__name__)


def finished_sweep_run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """With continue_sweep=true, a run of the sweep that had ended (its metrics.json: completed,
    diverged or failed): its metrics, for the sweeper, and its folder is left as it is."""
    metrics = run_dir / "metrics.json"
    if not cfg.continue_sweep or not metrics.is_file():
        return None
    earlier = json.loads(metrics.read_text())
    log.info("continue_sweep=true: %s had ended (%s); kept as it is", run_dir, earlier.get("status"))
    val_ppl = earlier.get("val_ppl")
    return {**earlier, "val_ppl": float("inf") if val_ppl is None else val_ppl}


def continue_commands(run_dir: Path) -> list[tuple[str, list[str]]]:
    """The arguments of train.py that go on with a stopped run (and, in a sweep, with the whole sweep),
    each a Hydra override as typed after the shell: paths quoted for Hydra, whose grammar reads `,`
    and `=` in a sweep run's folder name."""
    hydra = HydraConfig.get()
    run = [o for o in hydra.overrides.task if not o.startswith(("resume=", "continue_sweep="))]
    alone = [*run, f"resume={hydra_quoted(str(run_dir))}"]
    if hydra.mode != RunMode.MULTIRUN:
        return [("Continue with", alone)]
    sweep = OmegaConf.load(Path(hydra.sweep.dir) / "multirun.yaml").hydra.overrides
    task = [o for o in sweep.task if not o.startswith("continue_sweep=")]
    launch = [o for o in sweep.hydra if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))]
    whole = ["-m", *task, *launch, f"hydra.sweep.dir={hydra_quoted(hydra.sweep.dir)}", "continue_sweep=true"]
    return [("Continue the sweep with", whole), ("or this run alone with", alone)]


def hydra_quoted(value: str) -> str:
    """`value` as one Hydra value: as it is where Hydra's grammar reads it back so, else quoted (the
    grammar escapes a quote, and the backslashes that come before a quote or the closing one)."""
    try:
        if OverridesParser.create().parse_override(f"key={value}").value() == value:
            return value
    except HydraException:  # "=", ",", a space, a letter outside ASCII, "~", ...
        pass
    escaped = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
    return f"'{escaped}'"


def resume_argument(run_dir: Path) -> str:
    """`resume=<run_dir>` as one word of a shell command, that Hydra reads back as the path."""
    return shell_word(f"resume={hydra_quoted(str(run_dir))}")


def shell_word(argument: str) -> str:
    """`argument` quoted for a POSIX shell; in double quotes where that reads better than shlex's
    quoting of the single quotes Hydra needs (resume='...=...,...')."""
    if shlex.quote(argument) == argument:
        return argument
    return f'"{argument}"' if not set(argument) & set('"$`\\!') else shlex.quote(argument)


def resume_checkpoint(resume: str) -> Path:
    """`resume=` names a run folder (its checkpoints/last.ckpt) or a checkpoint in its checkpoints/."""
    path = Path(resume).expanduser().absolute()  # not resolve(): Hydra keeps symlinked paths as given
    checkpoint = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not checkpoint.is_file() or checkpoint.parent.name != "checkpoints":
        raise UserError(
            f"resume={resume}: no {checkpoint} in a run's checkpoints/ folder. Give a run folder "
            "(outputs/<date>/<time>) that holds checkpoints/last.ckpt, or one of its checkpoints/*.ckpt."
        )
    return checkpoint


def hydra_subdir(resume: str | None, continue_sweep: bool, run_dir: str, now: str) -> str | None:
    """Where Hydra writes a run's configuration: `.hydra/` at its first start, `.hydra/resumed-<now>/`
    when it goes on, nowhere for a run that a continued sweep keeps as it is."""
    earlier = continue_sweep and (Path(run_dir) / ".hydra").is_dir()
    if earlier and (Path(run_dir) / "metrics.json").is_file():
        return None
    return f".hydra/resumed-{now}" if resume or earlier else ".hydra"


def resumed_run_folder(resume: str | None, new_folder: str) -> str:
    """The run folder: a resumed run's own, else `new_folder` (conf/hydra/default.yaml). A bad
    `resume=` falls back to `new_folder`; `claim_run_folder` reports it as one line, before Hydra
    writes anything."""
    try:
        return str(resume_checkpoint(resume).parent.parent) if resume else new_folder
    except UserError:
        return new_folder
