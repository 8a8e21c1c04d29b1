"""Teachers ready to use: `python -m rld.teachers list | fetch | verify | train` (`__main__`).

    list     every teacher the configured pairs need: where, present, SHA-256, verification
    fetch    the published teachers (cifar_teachers.tar; torchvision's ImageNet weights) or
             an archive of your own (--from URL|PATH), checked and installed atomically
    verify   evaluate each teacher and compare its top-1 with the published one
    train    train every missing teacher of the chosen pairs as one multirun

Layout: `<paths.teachers>/<dataset>/<arch>_vanilla/<dataset.teacher_file>` (what
`teacher.checkpoint` points at), `<paths.teachers>/<dataset>/MANIFEST.json` (fetched files),
`<file>.sha256` and `<file>.verify.json` beside each teacher.  This module holds what
training needs (`rld.teachers.status`); the commands import the rest.
"""

from rld.teachers.status import (
    Verification,
    check_teacher,
    missing_teacher_message,
    require_teacher_file,
    teacher_command,
    verification,
    verification_record,
)

__all__ = ["Verification", "check_teacher", "missing_teacher_message", "require_teacher_file",
           "teacher_command", "verification", "verification_record"]
