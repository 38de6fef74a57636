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


def test_runs_say_who_made_them_what_they_are_and_what_was_chosen(ensemble_record, member_store):
    out, runs = member_store
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    member = client.get_run(runs["resnet18"])
    for run in (member, client.get_run(ensemble_record["run_id"])):
        tags = run.data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.name"]  # "Created by", "Source"
        assert tags["mlflow.note.content"].startswith("segx ")  # the UI's description
    assert "resnet18 encoder" in member.data.tags["mlflow.note.content"]
    ensemble = client.get_run(ensemble_record["run_id"])
    params = ensemble.data.params
    assert params["chosen.threshold"] == str(ensemble_record["threshold"])
    weights = {k: float(v) for k, v in params.items() if k.startswith("chosen.weight.")}
    assert len(weights) == 2
    for i, m in enumerate(ensemble_record["members"]):  # in member order, named by member
        (value,) = [v for k, v in weights.items() if k.startswith(f"chosen.weight.{i}.")]
        assert abs(value - m["weight"]) < 1e-5
    chosen = params["chosen.method"]
    expected = "single-" + chosen.split(":", 1)[1] if chosen.startswith("member:") else chosen
    assert ensemble.info.run_name == f"ensemble-{expected}-2m"


def test_member_runs_carry_their_dataset_and_system_metrics(member_store):
    out, runs = member_store
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(runs["resnet18"])
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == run.data.tags["segx.data_fingerprint"]
    assert dataset.tags[0].value == "training" and '"data.n_train"' in dataset.dataset.profile
    assert any(k.startswith("system/") for k in run.data.metrics)  # CPU, memory: MLflow's system metrics
