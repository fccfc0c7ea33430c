"""The demo flow end to end through the Flask test client, on both stores."""

import json


def test_confirm_round_trip(client):
    created = client.post("/agents/confirm-agent/runs", data={"message": "hi", "stream": "false"})
    assert created.status_code == 200
    run = created.json
    assert run["status"] == "PAUSED"
    tools = [dict(run["tools"][0], confirmed=True)]
    answer = client.post(f"/agents/confirm-agent/runs/{run['run_id']}/continue",
                         data={"tools": json.dumps(tools), "stream": "false"})
    assert answer.status_code == 200, answer.json
    assert answer.json["status"] == "COMPLETED"
    assert answer.json["content"] == "Done: sent to a@example.com"
    again = client.post(f"/agents/confirm-agent/runs/{run['run_id']}/continue",
                        data={"tools": json.dumps(tools), "stream": "false"})
    assert again.status_code == 409
    assert again.json == {"detail": "run is already completed", "error_code": "RUN_NOT_PAUSED",
                          "status": "COMPLETED"}
