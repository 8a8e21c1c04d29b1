"""Packed training: the grid points of a sweep that differ only in their distiller, trained
together in one process on one device (one data pipeline, one teacher forward per batch, K
students stepped together).  Used by the `packed` launcher and by the `pack` option of the
`gpus` and `slurm` launchers (hydra_plugins/rld_plugins/_packed.py).

    from rld.packed import plan_packs, train_pack
    for unit in plan_packs(cfgs, pack=16):
        outcomes = train_pack([cfgs[i] for i in unit], [run_dirs[i] for i in unit])
"""

from rld.packed.students import (
    MODES,
    LoopStudents,
    VmapStudents,
    build_students,
    resolve_mode,
    teacher_output,
)
from rld.packed.trainer import (
    PACKABLE,
    PackTooLarge,
    PointFilter,
    PointFormatter,
    pack_key,
    plan_packs,
    point_label,
    point_scope,
    train_pack,
)

__all__ = [
    "MODES", "PACKABLE", "LoopStudents", "PackTooLarge", "PointFilter", "PointFormatter",
    "VmapStudents", "build_students", "pack_key", "plan_packs", "point_label", "point_scope",
    "resolve_mode", "teacher_output", "train_pack",
]
