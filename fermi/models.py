"""Turn `--model` into an artifact directory: an artifact is used as is; anything else (a hub id,
a local HF checkpoint or GGUF file, a built-in model) is exported first at the precision asked
for (--precision / FERMI_PRECISION) or the default for it on this device, as the graph variant of
that device (export/variants.py), or reused from an earlier export."""

from __future__ import annotations

from pathlib import Path

from fermi.artifact import MANIFEST, load_manifest
from fermi.errors import InvalidRequest
from fermi.settings import Settings


def is_artifact(model: str) -> bool:
    return (Path(model) / MANIFEST).is_file()


def check_precision(model: str, precision: str | None) -> None:
    """An artifact directory holds one precision: raises InvalidRequest when `precision` asks
    for another (nothing to check for a source, which is exported at the precision asked)."""
    if precision is None or not is_artifact(model):
        return
    have = load_manifest(Path(model)).precision
    if have != precision:
        raise InvalidRequest(
            f"{model} holds the {have} export, not {precision}: pass its source (checkpoint, "
            "GGUF or hub id) to load or export another precision, or drop --precision",
            param="precision",
        )


def resolve_artifact(model: str, precision: str | None, settings: Settings) -> Path:
    """The artifact to load for `model`: the directory itself when it is one, else the export of
    the source at `precision` for this device (exported on first use, then reused). `precision`
    None: the export default for this model and device (the device's float precision; int4/int8
    carried over for a quantized GGUF). Raises InvalidRequest when `model` is an artifact of
    another precision than the one asked for."""
    if is_artifact(model):
        check_precision(model, precision)
        return Path(model)
    # Export lives in its own package and needs no torch; import it only when needed.
    from export.exporter import export_model
    from fermi.engine import pick_device

    return export_model(
        model, precision=precision, settings=settings, target=pick_device(settings.device)
    )
