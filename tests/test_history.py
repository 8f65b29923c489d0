"""The compiler's history records and the job status keep every field through their JSON form."""

from __future__ import annotations

import json

import pytest

from espalier.history import StepRecord, ValRecord, record_from_dict, steps, validations
from espalier.rollout.runner import EvalResult
from espalier.types import JobStatus


def test_history_records_survive_their_json_form():
    history = [ValRecord(0, 10.0, 2.5, EvalResult(0.25, 0.5, 0.0, 8)),
               StepRecord(1, 20.0, {"reward/mean": 0.3, "time/rollouts_s": 4.0, "time/train_s": 1.5})]
    again = [record_from_dict(json.loads(json.dumps(r.to_dict()))) for r in history]
    assert again == history
    assert steps(again)[0].seconds == 5.5 and validations(again)[0].result.score == 0.25
    with pytest.raises(ValueError, match="step or a validation"):
        record_from_dict({"kind": "eval", "step": 1})


def test_job_status_round_trips_and_ignores_fields_it_does_not_know():
    record = {"checkpoint_name": "c1", "model": "m@job/c1", "global_step": 2}
    status = JobStatus("job", "running", "m", steps=2, optimizer_steps=4, checkpoints={"c1": record},
                       last_checkpoint="c1", pending_batch_ids=(3,), metrics=({"loss": 0.1},))
    body = status.to_dict()
    assert body["checkpoint_models"] == {"c1": "m@job/c1"} and body["pending_batch_ids"] == [3]
    assert JobStatus.from_dict({**json.loads(json.dumps(body)), "from_a_newer_server": 1}) == status
