"""The `dashboard` extra: optuna-dashboard reads a study written by the `rld_optuna` sweeper,
through its own web app (no port opened): 0.14 on the released stack (the last release for
optuna 2), the newest on the next stack (`make test-next`), whose importance panel works."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from test_optuna import TINY, cli, study_of  # noqa: E402


def request(app, path: str) -> tuple[str, bytes]:
    """GET `path` from a WSGI app: (status, body)."""
    environ: dict = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return status[0], body


def get(app, path: str) -> dict:
    """GET `path` from a WSGI app; the JSON body of a 200 answer."""
    status, body = request(app, path)
    assert status.startswith("200"), (path, status, body[:500])
    return json.loads(body)


@pytest.mark.slow
def test_dashboard_reads_a_sweeper_study(teacher_root):
    import optuna
    import optuna_dashboard

    root, tag = teacher_root, "dashboard"
    cli(root, "-m", *TINY, "hparams=grid", "hparams.beta=[2,4]", "hparams.tau=[3,4]",
        f"tag={tag}")
    study = study_of(root, tag)
    expected = sorted((t.params["distiller.beta"], t.params["distiller.tau"], t.value)
                      for t in study.trials)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4

    # what `make dashboard TAG=dashboard` serves
    app = optuna_dashboard.wsgi(f"sqlite:///{root}/sweeps/{tag}/optuna.db")
    (summary,) = get(app, "/api/studies")["study_summaries"]
    assert summary["study_name"] == study.study_name
    detail = get(app, f"/api/studies/{summary['study_id']}")
    assert detail["name"] == study.study_name
    seen = []
    for trial in detail["trials"]:
        assert trial["state"] == "Complete"
        params = {p["name"]: p["param_external_value"] for p in trial["params"]}
        seen.append((float(params["distiller.beta"]), float(params["distiller.tau"]),
                     trial["values"][0]))
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert attrs["rld_state"] == "completed" and attrs["rld_run_dir"]
    assert sorted(seen) == expected

    # the hyperparameter-importance panel: broken in 0.14 (optuna 2.10's fANOVA on current
    # scikit-learn, as the README says), working in the next stack's dashboard
    status, body = request(app, f"/api/studies/{summary['study_id']}/param_importances")
    version = tuple(int(x) for x in optuna_dashboard.__version__.split(".")[:2])
    if version < (0, 15):
        assert status.startswith("400"), (status, body[:300])
    else:
        assert status.startswith("200"), (status, body[:300])
        (importances,) = json.loads(body)["param_importances"]
        assert {i["name"] for i in importances} == {"distiller.beta", "distiller.tau"}
