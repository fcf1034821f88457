"""One key per value: which implicit hyperparameters are already logged under another key (pure).

Lightning's ``log_hyperparams`` logs the model's and datamodule's ``hparams`` at top level (``lr``,
``batch_size``, ``seed``); ReproducibilityCallback reads the same values again from the live objects
(``optimizer/lr``, ``train_dataloader/batch_size``, ``model/lr``, ``data/batch_size``). A value is logged
once: a candidate is dropped when the same value is already logged under a key with the same name.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Names that are the same hyperparameter wherever they appear (``initial_lr`` is the scheduler's copy of ``lr``).
SAME_QUANTITY = {"lr": "lr", "initial_lr": "lr", "batch_size": "batch_size", "seed": "seed"}
#: Prefixes whose keys repeat an ``hparams`` entry that Lightning logs at top level.
HPARAM_PREFIXES = ("model/", "data/")


def _name(key: str) -> str:
    leaf = key.rsplit("/", 1)[-1]
    return SAME_QUANTITY.get(leaf, leaf)


def drop_repeated(candidates: Mapping[str, str], logged: Mapping[str, str]) -> dict[str, str]:
    """``candidates`` without the values already in ``logged`` (or earlier in ``candidates``) under the same name.

    Two rules, so that distinct settings that happen to share a value (``early_stopping/mode`` and
    ``model_checkpoint/mode``) are both kept:

    - ``model/<k>`` and ``data/<k>`` are dropped when ``<k>`` is logged with the same value (Lightning logged
      the ``hparams`` already);
    - keys named ``lr``, ``initial_lr``, ``batch_size`` or ``seed`` are dropped when a key of the same name
      (``initial_lr`` counting as ``lr``) holds the same value. Shorter keys win among candidates.

    Example::

        >>> drop_repeated({"optimizer/lr": "0.1", "optimizer/initial_lr": "0.1", "model/width": "16",
        ...                "optimizer/momentum": "0.9"}, {"lr": "0.1", "width": "16"})
        {'optimizer/momentum': '0.9'}
    """
    seen = {(_name(k), str(v)) for k, v in logged.items() if _name(k) in SAME_QUANTITY.values()}
    out: dict[str, str] = {}
    for k in sorted(candidates, key=lambda k: (k.count("/"), len(k), k)):
        v = str(candidates[k])
        if k.startswith(HPARAM_PREFIXES):
            bare = k.split("/", 1)[1]
            if str(logged.get(bare, object())) == v:
                continue
        name = _name(k)
        if name in SAME_QUANTITY.values():
            if (name, v) in seen:
                continue
            seen.add((name, v))
        out[k] = v
    return {k: out[k] for k in candidates if k in out}
