"""The ``xlpeft`` command: LightningCLI (fit/validate/test/predict) plus ``demo`` and ``calibrate``.

    xlpeft fit --config configs/mlm-language-adapters.yaml
    xlpeft demo
    xlpeft calibrate

What it adds to LightningCLI, for a first hour that works:

* arguments are checked before any model loads (trainer numbers, input files
  and folders, adapter folders an earlier run would be overwritten in);
* values declared by both model and data have one source (``data`` for
  ``languages`` and ``lang_tokens``, ``model`` for ``backbone``): an unset side is
  derived, two different values are an error;
* the project's own errors print as one line (``--debug`` keeps the traceback)
  and a failed run leaves no empty ``lightning_logs/version_N``;
* progress lines when stdout is a file, validation metrics printed, third-party
  tips and deprecations silenced.
"""

from __future__ import annotations

import inspect
import logging
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from argparse import RawDescriptionHelpFormatter

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from xlpeft.backbones.embedded import EMBEDDED_BASE, EMBEDDED_NAMES
from xlpeft.errors import XlpeftError, XlpeftValueError
from xlpeft.lightning.base import AdapterModule
from xlpeft.lightning.checkpoint_io import read_checkpoint
from xlpeft.lightning.progress import FitToData, progress_callbacks

__all__ = ["XlpeftCLI", "cli", "main", "project_error"]

DESCRIPTION = """xlpeft: parameter-efficient adaptation of multilingual transformers to low-resource languages.
fit/validate/test/predict run a LightningCLI job, e.g. xlpeft fit --config configs/mlm-language-adapters.yaml;
demo, evaluate and calibrate are listed at the end."""
EPILOG = """other commands:
  demo        the MAD-X pipeline end to end on the embedded backbone (xlpeft demo --help)
  evaluate    zero-shot transfer table (none / English / own / typology / EMEA, CIs) from a YAML config
  calibrate   train the embedded backbone's MLM head once; "embedded" then uses it (xlpeft calibrate --help)

xlpeft options (before or after the subcommand):
  --overwrite  let AdapterExport replace adapters an earlier run wrote to the same folder
  --debug      show full tracebacks for xlpeft's own errors"""

# (model class, data class) → [(model key, data key, source side)]: one source of truth per value.
SHARED: dict[tuple[str, str], list[tuple[str, str, str]]] = {
    ("xlpeft.lightning.MaskedLMAdaptation", "xlpeft.data.datamodules.MLMDataModule"):
        [("languages", "languages", "data")],
    ("xlpeft.lightning.mlm.MaskedLMAdaptation", "xlpeft.data.datamodules.MLMDataModule"):
        [("languages", "languages", "data")],
    ("xlpeft.lightning.sft.SparseLanguageFineTuning", "xlpeft.data.datamodules.MLMDataModule"):
        [("languages", "languages", "data")],
    ("xlpeft.lightning.TranslationAdaptation", "xlpeft.data.parallel_datamodule.ParallelDataModule"):
        [("lang_tokens", "lang_tokens", "data")],
    ("xlpeft.lightning.translation.TranslationAdaptation",
     "xlpeft.data.parallel_datamodule.ParallelDataModule"): [("lang_tokens", "lang_tokens", "data")],
    ("xlpeft.lightning.bilingual.BilingualMLM", "xlpeft.lightning.bilingual.BilingualMLMDataModule"):
        [("pairs", "pairs", "data")],
    ("xlpeft.lightning.lass.LassTranslation", "xlpeft.data.parallel_datamodule.ParallelDataModule"):
        [("lang_tokens", "lang_tokens", "data")],
    ("xlpeft.lightning.cpg.CPGTranslation", "xlpeft.data.parallel_datamodule.ParallelDataModule"):
        [("lang_tokens", "lang_tokens", "data")],
}
EITHER_SIDE: dict[tuple[str, str], list[str]] = {
    ("xlpeft.lightning.TaskAdaptation", "xlpeft.data.labelled.LabelledDataModule"): ["labels"],
    ("xlpeft.lightning.task.TaskAdaptation", "xlpeft.data.labelled.LabelledDataModule"): ["labels"],
}
"""Values set on either side and copied to the other (label order is the label ids: one list)."""
_LOG_KEEP_NOTHING = {"config.yaml", "hparams.yaml"}
_ARGS_WARNING = r"LightningCLI's args parameter is intended"


def _class(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


def _default(class_path: str, key: str) -> Any:
    klass = _class(class_path)
    try:
        param = inspect.signature(klass.__init__).parameters[key]
    except (TypeError, ValueError, KeyError):
        return inspect.Parameter.empty
    return param.default


def _same(a: Any, b: Any) -> bool:
    norm = (lambda v: sorted(v) if isinstance(v, (list, tuple)) else
            dict(v) if isinstance(v, (dict, Namespace)) else v)
    return norm(a) == norm(b)


def _plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def derive_shared(model: Namespace, data: Namespace) -> list[str]:
    """Fill the unset side of each shared value from its source; refuse two different values."""
    notes: list[str] = []
    for (model_cls, data_cls), rules in SHARED.items():
        if model.get("class_path") != model_cls or data.get("class_path") != data_cls:
            continue
        for m_key, d_key, source in rules:
            src, dst = (data, model) if source == "data" else (model, data)
            s_key, t_key = (d_key, m_key) if source == "data" else (m_key, d_key)
            s_val, t_val = _plain(src.init_args.get(s_key)), _plain(dst.init_args.get(t_key))
            t_default = _plain(_default(dst.class_path, t_key))
            if t_val is None or t_val == t_default or _same(t_val, s_val):
                dst.init_args[t_key] = s_val
                continue
            side = "data" if source == "data" else "model"
            other = "model" if side == "data" else "data"
            raise XlpeftValueError(
                f"`{other}.init_args.{t_key}` can be left out (it follows `{side}.init_args.{s_key}`) or "
                f"equal it; got {t_val} vs {s_val}. Set it once, on the {side} side")
    for (model_cls, data_cls), keys in EITHER_SIDE.items():
        if model.get("class_path") != model_cls or data.get("class_path") != data_cls:
            continue
        for key in keys:
            m_val, d_val = _plain(model.init_args.get(key)), _plain(data.init_args.get(key))
            if m_val and d_val and list(m_val) != list(d_val):  # order matters: no _same
                raise XlpeftValueError(f"`model.init_args.{key}` and `data.init_args.{key}` differ ({m_val} vs "
                                       f"{d_val}); the order gives the ids: set it once, on either side")
            if m_val and not d_val:
                data.init_args[key] = m_val
            elif d_val and not m_val:
                model.init_args[key] = d_val
    for m_key in ("backbone",):  # the model's backbone is the data's tokenizer
        m_val, d_val = model.get("init_args", {}).get(m_key), data.get("init_args", {}).get(m_key)
        if m_val is None or d_val is None or m_val == d_val:
            continue
        if d_val in EMBEDDED_NAMES and d_val == _default(data.class_path, m_key):
            data.init_args[m_key] = m_val
            notes.append(f"data.init_args.backbone follows the model: {m_val}")
            continue
        raise XlpeftValueError(
            f"`data.init_args.backbone` can equal `model.init_args.backbone` (its tokenizer must match the "
            f"model's embeddings); got {d_val!r} vs {m_val!r}. Give the backbone once, on the model")
    return notes


# --------------------------------------------------------------------- checks
def _check_int(name: str, value: Any, minimum: int, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise XlpeftValueError(f"`--trainer.{name}` can be {what}; got {value!r}")


def check_trainer(trainer: Namespace) -> None:
    """The numbers Lightning would reject only after the model loaded, checked up front."""
    _check_int("max_steps", trainer.get("max_steps"), -1, "-1 (no limit) or a number of optimizer steps >= 0")
    _check_int("max_epochs", trainer.get("max_epochs"), -1, "-1 (no limit), null or a number of epochs >= 0")
    _check_int("min_steps", trainer.get("min_steps"), 0, "null or a number of steps >= 0")
    _check_int("accumulate_grad_batches", trainer.get("accumulate_grad_batches"), 1, "an int >= 1")
    _check_int("log_every_n_steps", trainer.get("log_every_n_steps"), 1, "an int >= 1")
    _check_int("num_sanity_val_steps", trainer.get("num_sanity_val_steps"), -1, "-1 (all) or an int >= 0")
    interval = trainer.get("val_check_interval")
    if interval is not None and not (isinstance(interval, int) and not isinstance(interval, bool)
                                     and interval > 0 or isinstance(interval, float) and 0 < interval <= 1):
        raise XlpeftValueError("`--trainer.val_check_interval` can be a number of training batches >= 1 or "
                               f"a fraction of an epoch in (0, 1]; got {interval!r}")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        value = trainer.get(key)
        if value is not None and (isinstance(value, bool) or value < 0
                                  or isinstance(value, float) and value > 1):
            raise XlpeftValueError(f"`--trainer.{key}` can be a number of batches >= 0 or a fraction in "
                                   f"[0, 1]; got {value!r}")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (dict, Namespace)):
        for v in (vars(value) if isinstance(value, Namespace) else value).values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _looks_local(text: str) -> bool:
    return text.startswith((".", "~", "/")) or text.count("/") > 1


def check_paths(model: Namespace, data: Namespace) -> None:
    """Input files and folders exist before anything loads."""
    for side, ns in (("model", model), ("data", data)):
        args = ns.get("init_args") or Namespace()
        backbone = args.get("backbone")
        if isinstance(backbone, str) and backbone not in (*EMBEDDED_NAMES, EMBEDDED_BASE):
            path = Path(backbone).expanduser()
            if path.exists() and not (path / "config.json").is_file():
                raise XlpeftValueError(f"`{side}.init_args.backbone` can be \"embedded\", a hub name or a model "
                                       f"folder with config.json; got {backbone!r} (no config.json in it)")
            if not path.exists() and _looks_local(backbone):
                raise XlpeftValueError(f"`{side}.init_args.backbone` can be \"embedded\", a hub name or a model "
                                       f"folder; got {backbone!r}, which does not exist. Train or export it first")
        for key in ("files",):
            for text in _strings(args.get(key)):
                if not Path(text).expanduser().exists():
                    raise XlpeftValueError(f"`{side}.init_args.{key}` names {text!r}, which does not exist; "
                                           "give an existing text file (one sentence or verse per line)")
        for key in ("language_adapters", "load_adapters"):
            for text in _strings(args.get(key)):
                if not Path(text).expanduser().is_dir():
                    raise XlpeftValueError(
                        f"`{side}.init_args.{key}` names {text!r}, which is not an adapter folder; train it "
                        f"first (e.g. `xlpeft fit --config configs/mlm-language-adapters.yaml`) or fix the path")


def precheck_data(data: Namespace) -> None:
    """Build the DataModule once before the model loads, so its argument checks come first.

    DataModule constructors only record and check their arguments (files are read
    in ``setup``), so this is cheap; it is skipped when an argument is itself a class.
    """
    klass = _class(str(data.get("class_path", "")))
    args = data.get("init_args") or Namespace()
    if klass is None or any(isinstance(v, Namespace) and "class_path" in v for v in vars(args).values()):
        return
    klass(**{k: _plain(v) for k, v in vars(args).items()})


def _export_names(callback: Namespace, model: Namespace) -> list[str]:
    args = callback.get("init_args") or Namespace()
    if args.get("names"):
        return list(args.names)
    margs = model.get("init_args") or Namespace()
    names = list(margs.get("languages") or [])
    if margs.get("pairs"):  # BilingualMLM: one adapter per pair
        from xlpeft.lightning.bilingual import pair_adapter
        names += [pair_adapter(p) for p in margs.pairs]
    if margs.get("task_adapter"):
        names.append(margs.task_adapter)
    return names


def check_exports(trainer: Namespace, model: Namespace, overwrite: bool) -> None:
    """Refuse to replace adapters an earlier run exported, unless ``--overwrite``."""
    if overwrite:
        return
    callbacks = trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if not isinstance(callback, Namespace) or not str(callback.get("class_path", "")).endswith("AdapterExport"):
            continue
        dirpath = Path((callback.get("init_args") or Namespace()).get("dirpath") or "adapters")
        taken = [n for n in _export_names(callback, model) if (dirpath / n).exists()]
        if taken:
            raise XlpeftValueError(
                f"AdapterExport would replace {', '.join(str(dirpath / n) for n in taken)} from an earlier run; "
                f"write elsewhere with `--trainer.callbacks.init_args.dirpath=runs/<new folder>` or pass "
                "`--overwrite`")


_MLM_MODELS = ("MaskedLMAdaptation", "GeneratorMLM", "HyperXTraining", "BilingualMLM", "PhylogenyMLM",
               "SparseLanguageFineTuning")


def warn_uncalibrated_training(model: Namespace) -> bool:
    """Adapters trained through an untrained MLM head learn little: say so before the run."""
    from xlpeft.backbones.embedded import backbone_path
    from xlpeft.backbones.loading import UNCALIBRATED, head_is_calibrated

    args = model.get("init_args") or Namespace()
    if not str(model.get("class_path", "")).endswith(_MLM_MODELS) or args.get("train") == "head":
        return False
    backbone = args.get("backbone")
    if not isinstance(backbone, str) or backbone != EMBEDDED_BASE and not (
            backbone in EMBEDDED_NAMES or Path(backbone).expanduser().is_dir()):
        return False
    folder = backbone_path(backbone)
    if head_is_calibrated(folder):
        return False
    logging.getLogger("xlpeft").warning(UNCALIBRATED, folder)
    return True


# ------------------------------------------------------------------------ CLI
class _SaveConfig(SaveConfigCallback):
    """Saves ``config.yaml`` into the run's log folder, and nowhere when there is no logger.

    Without a logger Lightning's ``log_dir`` is the working directory, so a
    ``logger: false`` config left ``./config.yaml`` in the repository.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the epilog's lines kept as written."""


_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)")


def literal_error(message: str) -> str | None:
    """jsonargparse's refusal of a choice (a ``Literal`` argument) as xlpeft's one line; None for others."""
    found = _LITERAL.search(message)
    if found is None:
        return None
    keys = re.findall(r'Parser key "([^"]+)"', message[:found.start()])
    if keys[:1] in (["model"], ["data"]) and len(keys) > 1:
        keys.insert(1, "init_args")
    return f"`{'.'.join(keys) or 'argument'}` can be {found[1]}; got {found[2].strip()!r}"


class _Parser(LightningArgumentParser):
    """LightningArgumentParser printing a refused choice as one line (not the usage and a Union dump)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        line = literal_error(message)
        if line is None or not self.exit_on_error:
            super().error(message, ex)
        print(f"xlpeft: error: {line}", file=sys.stderr)
        self.exit(2)


class XlpeftCLI(LightningCLI):
    """LightningCLI with argument checks before loading, shared values and clean failures."""

    def __init__(self, *args: Any, overwrite: bool = False, **kwargs: Any) -> None:
        self.overwrite = overwrite
        super().__init__(*args, **kwargs)

    def _section(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _parse_ckpt_path(self) -> None:
        """Read a local ``--ckpt_path`` with xlpeft's reader first: project errors for unsafe, empty or cut files.

        (Lightning reads its hyper-parameters here; URLs and "last"/"best" go to the Trainer's SafeCheckpointIO.)
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            read_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        cfg = self._section()
        model, data = cfg.get("model"), cfg.get("data")
        check_trainer(cfg.trainer)
        if isinstance(model, Namespace) and isinstance(data, Namespace):
            for note in derive_shared(model, data):
                logging.getLogger("xlpeft").info(note)
            if self.subcommand is not None:  # run=False builds objects only: inputs may come later
                check_paths(model, data)
                precheck_data(data)
        if self.subcommand == "fit" and isinstance(model, Namespace):
            check_exports(cfg.trainer, model, self.overwrite)
            warn_uncalibrated_training(model)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        extra: list[L.Callback] = [FitToData()]
        given = trainer_cfg.get("callbacks") or []
        has_bar = any(isinstance(c, ProgressBar) for c in (given if isinstance(given, list) else [given]))
        if trainer_cfg.get("enable_progress_bar") is not False and not has_bar:
            extra += progress_callbacks()
        callbacks = list(given if isinstance(given, list) else [given]) + extra
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_empty_log_dir(self.trainer)
            raise


def remove_empty_log_dir(trainer: L.Trainer | None) -> None:
    """Delete a failed run's log folder when it holds nothing but the saved config."""
    if trainer is None or trainer.logger is None or not trainer.is_global_zero:
        return
    log_dir = trainer.logger.log_dir
    if not log_dir or not Path(log_dir).is_dir():
        return
    files = [p for p in Path(log_dir).rglob("*") if p.is_file()]
    if all(p.name in _LOG_KEEP_NOTHING for p in files):
        shutil.rmtree(log_dir, ignore_errors=True)


def cli(args: list[str] | None = None, run: bool = True, overwrite: bool = False) -> LightningCLI:
    """Build the LightningCLI (any xlpeft module and DataModule, by class path)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ARGS_WARNING)  # args *is* the command line here
        return XlpeftCLI(
            AdapterModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            args=args, run=run, parser_class=_Parser, save_config_callback=_SaveConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False, overwrite=overwrite,
            parser_kwargs={"epilog": EPILOG, "prog": "xlpeft", "formatter_class": _HelpFormatter,
                           "description": DESCRIPTION},
        )


# ------------------------------------------------------------------ quiet logs
class _DropTips(logging.Filter):
    """Lightning's tips, and its "no GPU/TPU" lines that every Trainer of a CPU run repeats."""

    _NOISE = ("💡 Tip", "GPU available: False", "TPU available: False")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._NOISE)


_QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # lightning's _pytree on torch 2.13
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
    r"The number of training batches .* is smaller than the logging interval",
    r"No seed found, seed set to",
    r"You defined a `validation_step` but have no `val_dataloader`",  # the demo's train-only stages
    r"Version v4\.12\.0 introduces a better way to train encoder-decoder",  # every bert2bert step with labels
    _ARGS_WARNING,
)


def quiet_third_party() -> None:
    """Silence what a user cannot act on; show xlpeft's own stage lines."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    try:
        import transformers
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars for every load
    except (ImportError, AttributeError):
        pass
    try:
        import datasets
        datasets.disable_progress_bars()  # "Map:" bars for every tokenisation
    except (ImportError, AttributeError):
        pass
    xlog = logging.getLogger("xlpeft")
    if not xlog.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[xlpeft] %(message)s"))
        xlog.addHandler(handler)
        xlog.setLevel(logging.INFO)


def _pop_flag(argv: list[str], flag: str) -> bool:
    found = flag in argv
    while flag in argv:
        argv.remove(flag)
    return found


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand; xlpeft's own errors print one line (``--debug``: the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, overwrite = _pop_flag(argv, "--debug"), _pop_flag(argv, "--overwrite")
    quiet_third_party()
    try:
        if argv and argv[0] == "demo":
            from xlpeft.lightning.demo import main as demo
            demo(argv[1:])
        elif argv and argv[0] == "evaluate":
            from xlpeft.lightning.evaluate import main as evaluate
            evaluate(argv[1:])
        elif argv and argv[0] == "calibrate":
            from xlpeft.lightning.calibrate import main as calibrate
            calibrate(argv[1:])
        else:
            cli(argv, overwrite=overwrite)
    except Exception as err:
        own = project_error(err)
        if debug or own is None:
            raise
        text = own.args[0] if isinstance(own, KeyError) and own.args else own  # KeyError quotes its str
        print(f"xlpeft: error: {text}\n(run again with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def project_error(err: BaseException) -> BaseException | None:
    """xlpeft's own (or Lightning's configuration) error behind ``err``.

    jsonargparse re-raises an error from a class's ``__init__`` as "Does not
    validate against any of the Union subtypes", with the real one as its cause.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (XlpeftError, MisconfigurationException)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


if __name__ == "__main__":
    main()
