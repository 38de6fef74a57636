"""What the MLflow UI reads, checked through the MLflow client (no browser)."""

from __future__ import annotations

from segx import tracking


def test_experiments_are_marked_for_model_training_and_make_ui_prints_the_runs_url(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.connect(uri)
    exp = tracking.experiment_id(client, "fresh", None)
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    # An experiment made elsewhere (plain MLflow) is marked when segx first uses it.
    other = client.create_experiment("made-by-hand")
    assert "mlflow.experimentKind" not in client.get_experiment(other).tags
    assert tracking.experiment_id(client, "made-by-hand", None) == other
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"
    text = tracking.ui_urls(uri, "http://127.0.0.1:5000")
    assert f"fresh: http://127.0.0.1:5000/#/experiments/{exp}?workflowType=machine_learning" in text
    assert "Default" not in text  # the empty default experiment is not offered
    assert "no runs yet" in tracking.ui_urls(f"sqlite:///{tmp_path}/none.db", "http://x")
    assert not (tmp_path / "none.db").exists()  # printing the URL never creates a store
